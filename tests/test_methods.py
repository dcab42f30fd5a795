"""The methods (anelab.methods): each objective against its official implementation on fixed maps, the registry and
the evaluation contract, and every method through generate on the tiny pipeline (subjects, trace terms, batching,
refinement rules, state, the initial-noise optimisation, bad input)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig, methods
from anelab.pipeline import _Sampler

sys.path.insert(0, str(Path(__file__).parent))
from method_inputs import PROMPTS, fixed_maps  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "methods"
CASES = [
    pytest.param(json.loads(path.read_text()), k, id=f"{path.stem}-{k}")
    for path in sorted(FIXTURES.glob("*.json"))
    for k in range(len(json.loads(path.read_text())["cases"]))
]
SMALL = dict(num_inference_steps=6, height=128, width=128, output_type="latent", progress=False)
PROMPT = "a red apple and a blue bowl"
SUBJECTS = [("apple", ["red"]), ("bowl", ["blue"])]


def official_terms(fixture: dict, case: dict) -> dict:
    """anelab's terms on a fixture case's fixed maps (the previous step's maps first where the case has them)."""
    eot = PROMPTS[case["prompt"]]["eot"]
    method = methods.get(fixture["method"], **case["settings"])
    cross, self_attention = fixed_maps(case["seed"], eot)
    previous = None
    if case["previous_seed"] is not None:
        earlier, earlier_self = fixed_maps(case["previous_seed"], eot)
        previous = methods.evaluate(
            method, earlier, case["subjects"], eot=eot, self_attention=earlier_self, step=case["step"]
        )["state"]
    return methods.evaluate(
        method, cross, case["subjects"], eot=eot, self_attention=self_attention, step=case["step"], previous=previous
    )


@pytest.mark.parametrize("fixture, k", CASES)
def test_the_objective_equals_the_official_implementation(fixture, k):
    """Every term the fixture names, at 1e-5: the official loss code was run on the same float32 maps."""
    case = fixture["cases"][k]
    assert fixture["repository"] and len(fixture["commit"]) == 40
    if "update" in case:
        assert methods.get(fixture["method"]).updates(case["step"], 51) == case["update"]
    if not case["expected"]:
        return
    terms = official_terms(fixture, case)
    for name, expected in case["expected"].items():
        ours, expected = terms[name][0].detach().double().numpy(), np.asarray(expected, dtype=float)
        if ours.ndim and len(ours) > len(expected):  # max_attention of the nouns: the first columns
            ours = ours[: len(expected)]
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_every_method_has_an_official_fixture_with_varied_cases():
    have = {path.stem for path in FIXTURES.glob("*.json")}
    assert have == set(methods.names())
    for path in FIXTURES.glob("*.json"):
        cases = json.loads(path.read_text())["cases"]
        assert len(cases) >= 6 and len({(c["prompt"], c["seed"]) for c in cases}) >= 4


def test_initno_kl_and_its_inner_loop_follow_the_official_code():
    """The KL term exactly, and the number of Adam steps the official inner loop needs from the same state (±1: a
    step can land on the threshold's other side by float noise)."""
    from anelab.methods.initno import noise_kl

    fixture = json.loads((FIXTURES / "initno.json").read_text())
    method = methods.get("initno")
    for case in fixture["cases"][:4]:
        rng = np.random.default_rng(case["seed"])
        mu = torch.from_numpy((rng.standard_normal((1, 4, 8, 8)) * 0.1).astype(np.float32))
        logvar = torch.from_numpy((rng.standard_normal((1, 4, 8, 8)) * 0.1).astype(np.float32))
        assert noise_kl(mu, logvar).item() == pytest.approx(case["kl"]["value"], rel=1e-5)
        mus, logvars = [mu.clone().requires_grad_(True)], [logvar.clone().requires_grad_(True)]
        optimiser = torch.optim.Adam([*logvars, *mus], lr=method.noise_lr, eps=method.noise_eps)
        report = [dict(kl_steps=0, kl_capped=False)]
        method._kl_steps(optimiser, [0], mus, logvars, report)
        assert abs(report[0]["kl_steps"] - case["kl"]["loop_steps"]) <= 1 and not report[0]["kl_capped"]


# -- the registry and the contract ----------------------------------------------------------------------------
def test_names_get_and_settings_errors():
    assert methods.names() == ["attend_and_excite", "divide_and_bind", "syngen", "conform", "initno", "ebama"]
    assert methods.get("attend_and_excite") == GuidanceConfig()
    d = methods.get("divide_and_bind", mode="tv_bind")
    assert d.mode == "tv_bind" and d.thresholds == {0: 0.05, 10: 0.2, 20: 0.3} and d.max_refinement_steps_first == 100
    with pytest.raises(AnelabError, match="unknown method 'dnb'; the methods are attend_and_excite, divide_and_bind"):
        methods.get("dnb")
    with pytest.raises(
        AnelabError, match=r"syngen has no setting\(s\) \['thresholds'\]; its settings are: .*attention_res"
    ):
        methods.get("syngen", thresholds={0: 0.5})
    with pytest.raises(AnelabError, match="mode must be one of"):
        methods.get("divide_and_bind", mode="bind")
    for name in methods.names():  # settings round-trip through JSON: the store identity and the study spec
        m = methods.get(name)
        assert methods.from_spec(json.loads(json.dumps(methods.spec(m)))) == m


def test_rescaling_moves_every_loop_index_setting():
    d = methods.get("divide_and_bind").rescaled(50, 10)
    assert d.thresholds == {0: 0.05, 2: 0.2, 4: 0.3} and d.bind_weights == {0: 1.0, 2: 5.0, 4: 10.0}
    assert d.max_iter_to_alter == 5
    assert methods.get("conform").rescaled(50, 10).refinement_steps == (0, 2, 4)


def test_evaluate_takes_one_sample_or_a_batch_and_names_missing_maps():
    cross, self_attention = fixed_maps(0, 8, batch=2)
    one = methods.evaluate("syngen", {16: cross[16][0]}, [(3, [2]), (7, [6])], eot=8)
    both = methods.evaluate("syngen", cross, [(3, [2]), (7, [6])], eot=8)
    assert one["loss"].shape == (1,) and both["loss"].shape == (2,) and both["positive"].shape == (2, 2)
    torch.testing.assert_close(one["loss"], both["loss"][:1])
    with pytest.raises(AnelabError, match=r"initno reads self_attention maps at \[16\]; self_attention has \[\]"):
        methods.evaluate("initno", cross, [(3, []), (7, [])], eot=8)
    with pytest.raises(AnelabError, match=r"divide_and_bind reads cross maps at \[16, 64, 32\]"):
        methods.evaluate(methods.get("divide_and_bind", mode="tv_bind"), {16: cross[16]}, [(3, [2])], eot=8)


def test_a_binding_method_refuses_subjects_without_modifiers():
    cross, _ = fixed_maps(0, 6)
    with pytest.raises(
        AnelabError, match="syngen binds attributes to nouns and needs at least one subject with a modifier"
    ):
        methods.evaluate("syngen", cross, [(2, []), (5, [])], eot=6)
    alone = methods.evaluate(methods.get("syngen", include_entities=True), cross, [(2, []), (5, [])], eot=6)
    assert float(alone["loss"]) < 0  # nouns alone: the negative term only


# -- through generate on the tiny pipeline ------------------------------------------------------------------
QUICK = {  # each method at its defaults, with its loops kept short for the tiny model
    "attend_and_excite": dict(max_refinement_steps=2),
    "divide_and_bind": dict(
        mode="tv_bind", max_refinement_steps=2, max_refinement_steps_first=2, attribute_res=(16, 8)
    ),
    "syngen": {},
    "conform": dict(max_refinement_steps=2),
    "initno": dict(max_refinement_steps=2, noise_rounds=2, noise_steps=2, noise_fallback_steps=2),
    "ebama": {},
}


def quick(name: str):
    return methods.get(name, attention_res=4, **QUICK[name]).rescaled(50, 6)


@pytest.fixture(scope="module")
def plain(tiny_pipe):
    return anelab.generate(tiny_pipe, PROMPT, seeds=[0], **SMALL)


@pytest.mark.parametrize("name", list(QUICK))
def test_every_method_guides_the_tiny_model_and_traces_its_terms(tiny_pipe, plain, name):
    out = anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method=quick(name), seeds=[0], **SMALL)
    assert out.method == name and not out.trace.empty
    assert float((out.latents - plain.latents).abs().max()) > 1e-3  # guidance moved the latent
    own = {
        "divide_and_bind": ["tv", "bind"],
        "syngen": ["positive", "negative"],
        "initno": ["self", "self_raw", "clean", "align", "refinement"],  # its loss column is the cross term
        "ebama": ["positive", "negative", "presence"],
    }.get(name, [])
    assert set(own) <= set(out.trace.columns) and out.trace.columns[: len(anelab.pipeline.TRACE_COLUMNS)].tolist() == (
        anelab.pipeline.TRACE_COLUMNS
    )
    assert np.isfinite(out.trace.objective).all() and out.trace.max_attention.between(0, 1).all()
    if name != "attend_and_excite":  # the trace's loss is what the update descends
        np.testing.assert_allclose(out.trace.objective, out.trace.loss)


@pytest.fixture(scope="module")
def tiny_pipe64():
    return anelab.load_pipeline("tiny", dtype=torch.float64)


@pytest.mark.parametrize("name", ["divide_and_bind", "syngen", "conform", "initno", "ebama"])
def test_a_batch_of_seeds_equals_single_seed_runs(tiny_pipe64, name):
    """Every seed keeps its own refinement, state and (InitNO) noise optimisation: batching changes nothing."""
    method = quick(name)
    batch = anelab.generate(tiny_pipe64, PROMPT, subjects=SUBJECTS, method=method, seeds=[0, 1], **SMALL)
    for k, seed in enumerate([0, 1]):
        single = anelab.generate(tiny_pipe64, PROMPT, subjects=SUBJECTS, method=method, seeds=[seed], **SMALL)
        torch.testing.assert_close(batch.latents[k : k + 1], single.latents, rtol=1e-9, atol=1e-9)
        if batch.noise is not None:
            assert batch.noise.iloc[k].drop("seed").equals(single.noise.iloc[0].drop("seed"))


def test_conform_refines_exactly_its_cap_without_a_threshold_and_carries_the_previous_step(tiny_pipe):
    method = quick("conform")
    out = anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method=method, seeds=[0, 1], **SMALL)
    steps = out.trace.drop_duplicates(["seed", "step"]).set_index(["seed", "step"])
    refined = steps.refinement_iterations.unstack(0)
    assert (refined.loc[list(method.refinement_steps)] == 2).all().all()
    assert (refined.drop(index=list(method.refinement_steps)) == 0).all().all()
    assert steps.threshold.isna().all() and steps.reached.isna().all()  # no threshold: nothing to reach
    alone = anelab.generate(
        tiny_pipe, PROMPT, subjects=SUBJECTS, method=method.replace(use_previous=False), seeds=[0, 1], **SMALL
    )
    first = out.trace.step == 0  # step 0 has no previous step: the same loss either way; later steps differ
    np.testing.assert_allclose(out.trace.loss[first], alone.trace.loss[first], rtol=1e-5)
    assert not np.allclose(out.trace.loss[~first], alone.trace.loss[~first])


def test_divide_and_bind_caps_refinement_at_its_first_step_separately(tiny_pipe):
    method = quick("divide_and_bind").replace(thresholds={0: 1.0, 1: 1.0}, max_refinement_steps_first=3)
    out = anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method=method, seeds=[0], **SMALL)
    rounds = out.trace.drop_duplicates("step").set_index("step").refinement_iterations
    assert rounds[0] == 3 and rounds[1] == 2  # TV far below 1: every refinement runs to its cap


def test_initno_reports_its_noise_optimisation_and_starts_from_the_optimised_noise(tiny_pipe):
    method = quick("initno")
    out = anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method=method, seeds=[0, 1], **SMALL)
    noise = out.noise
    assert list(noise.seed) == [0, 1] and set(noise.columns) >= {"success", "fallback", "rounds", "steps", "cross"}
    assert (noise.rounds >= 1).all() and (noise.rounds <= 2).all() and (noise.steps >= 1).all()
    assert (noise.success | noise.fallback).all()
    untouched = anelab.generate(
        tiny_pipe, PROMPT, subjects=SUBJECTS, method=method.replace(noise_rounds=0), seeds=[0, 1], **SMALL
    )
    assert not torch.allclose(out.latents, untouched.latents)  # the optimised noise is where denoising starts


def test_bad_method_requests_fail_before_denoising(tiny_pipe, monkeypatch):
    monkeypatch.setattr(_Sampler, "run", lambda *a, **k: pytest.fail("denoising started"))
    run = dict(seeds=[0], **SMALL)
    with pytest.raises(AnelabError, match="needs at least one subject with a modifier"):
        anelab.generate(tiny_pipe, "a cat and a dog", ["cat", "dog"], method="syngen", **run)
    with pytest.raises(AnelabError, match="unknown method 'synGen'"):
        anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method="synGen", **run)
    with pytest.raises(AnelabError, match="config is attend_and_excite's settings .* but method='syngen'"):
        anelab.generate(tiny_pipe, PROMPT, subjects=SUBJECTS, method="syngen", config=GuidanceConfig(), **run)
    with pytest.raises(AnelabError, match="roles \\['suppress'\\] .* are attend_and_excite's"):
        anelab.generate(tiny_pipe, PROMPT + " and a dog", subjects=SUBJECTS, suppress=["dog"], method="syngen", **run)
    with pytest.raises(AnelabError, match="divide_and_bind binds one attribute per object"):
        anelab.generate(
            tiny_pipe,
            "a red big apple",
            subjects=[("apple", ["red", "big"])],
            method=methods.get("divide_and_bind", mode="tv_bind"),
            **run,
        )
    with pytest.raises(AnelabError, match="give tokens=\\[...\\] or subjects=\\[...\\], not both"):
        anelab.generate(tiny_pipe, PROMPT, ["apple"], subjects=SUBJECTS, method="syngen", **run)
    with pytest.raises(AnelabError, match="divide_and_bind reads cross-attention at resolution 64, which"):
        anelab.generate(
            tiny_pipe, PROMPT, subjects=SUBJECTS, method=methods.get("divide_and_bind", mode="tv_bind"), **run
        )


@pytest.fixture(scope="module")
def stand_ins():
    return {name: anelab.load_pipeline(name) for name in ("tiny-sd2", "tiny-xl")}


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-xl"])
@pytest.mark.parametrize("name", list(QUICK))
def test_every_method_runs_on_sd2_and_sdxl(stand_ins, model, name):
    """On SD 2.x ('!' padding: A&E's legacy columns are the prompt's) and SDXL (two encoders, added conditioning,
    Euler's scaled input), at the coarsest resolutions the stand-ins have at 128 px."""
    pipe = stand_ins[model]
    low, high = anelab.attention_resolutions(pipe, 128, 128)[:2]
    changes = {"attention_res": low} | ({"attribute_res": (high,)} if name == "divide_and_bind" else {})
    method = methods.get(name, **(QUICK[name] | changes)).rescaled(50, 6)
    out = anelab.generate(pipe, PROMPT, subjects=SUBJECTS, method=method, seeds=[0], **SMALL)
    plain = anelab.generate(pipe, PROMPT, seeds=[0], **SMALL)
    assert not out.trace.empty and np.isfinite(out.trace.objective).all()
    assert float((out.latents - plain.latents).abs().max()) > 1e-4
