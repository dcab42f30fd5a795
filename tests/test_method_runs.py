"""Methods everywhere a method can be named: the store identity (0.2.0 keys unchanged), study files with ``method:``
variants, the sweep into the store, ``anelab generate --method/--set/--subjects``, the fast path's stand-in and
low memory."""

import hashlib
import json
import re

import pandas as pd
import pytest
import torch

import anelab
from anelab import AnelabError, fast, methods
from anelab.cli import main
from anelab.loading import load_pipeline
from anelab.runs import Store, load_results, load_study, run_sweep
from anelab.runs.protocol import Context

#: sha256 of the comma-joined image keys anelab 0.2.0 (commit 1c1348a) computed for these built-in studies: the
#: store identity of every run 0.2.0 could make is unchanged, so its stores keep serving.
KEYS_020 = {
    ("tiny", "reproduction", "smoke"): (6, "787f7fdd3f9313cd"),
    ("tiny", "suppression", "quick"): (432, "eb379f91e267effe"),
    ("tiny", "layout_right", "quick"): (32, "479bd5a3de316a1a"),
    ("tiny-sd2", "timesteps", "smoke"): (21, "118c49567a3c1c97"),
    ("tiny-xl", "resolution", "quick"): (144, "c954fc7c057f3bab"),
    ("tiny", "architectures", "quick"): (240, "ffac1d7246222a48"),
}


@pytest.mark.parametrize("model, study, scale", list(KEYS_020))
def test_the_store_keys_of_anelab_0_2_0_are_unchanged(model, study, scale):
    keys = Context.of(model).keys(load_study(study, scale=scale))
    count, digest = KEYS_020[model, study, scale]
    assert len(keys) == count and hashlib.sha256(",".join(keys).encode()).hexdigest()[:16] == digest


METHODS_STUDY = """\
name: zoo
prompts:
  - {prompt: a red apple and a blue bowl, subjects: [[apple, [red]], [bowl, [blue]]]}
  - {prompt: a cat and a dog, tokens: [cat, dog]}
seeds: 2
steps: 5
size: 128
batch: 2
base: {attention_res: 4, thresholds: {0: 0.05}, max_iter_to_alter: 3, max_refinement_steps: 2}
variants:
  sd: null
  ae: {}
  syngen: {method: syngen, max_iter_to_alter: 2}
  dnb: {method: divide_and_bind, mode: tv_bind, attribute_res: [16, 8]}
"""


def test_a_study_names_methods_per_variant_and_base_reaches_the_fields_they_have(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(METHODS_STUDY)
    study = load_study(path)
    assert study.variants["ae"] == anelab.GuidanceConfig(
        attention_res=4, thresholds={0: 0.05}, max_iter_to_alter=3, max_refinement_steps=2
    )
    syngen, dnb = study.variants["syngen"], study.variants["dnb"]
    assert syngen.name == "syngen" and syngen.attention_res == 4 and syngen.max_iter_to_alter == 2
    assert dnb.thresholds == {0: 0.05} and dnb.max_refinement_steps == 2 and dnb.attribute_res == (16, 8)
    spec = study.spec()
    assert spec["variants"]["syngen"]["method"] == "syngen" and "method" not in spec["variants"]["ae"]
    assert spec["subjects"][0] == [["apple", ["red"]], ["bowl", ["blue"]]]
    for change, message in (
        ("syngen: {method: syngen, max_iter_to_alter: 2}", "syngen: {method: sin_gen}"),
        (
            "dnb: {method: divide_and_bind, mode: tv_bind, attribute_res: [16, 8]}",
            "dnb: {method: divide_and_bind, temperature2: 1}",
        ),
    ):
        path.write_text(METHODS_STUDY.replace(change, message))
        expected = "unknown method 'sin_gen'" if "sin_gen" in message else "is not a setting of divide_and_bind"
        with pytest.raises(AnelabError, match=f"variants.* \\(line \\d+\\).*{expected}"):
            load_study(path)
    path.write_text(METHODS_STUDY.replace("base: {attention_res: 4,", "base: {colour: 1, attention_res: 4,"))
    with pytest.raises(AnelabError, match="base.colour \\(line 9\\): is not a GuidanceConfig field"):
        load_study(path)


def test_a_sweep_of_methods_fills_the_store_once_and_skips_what_a_binding_method_cannot_bind(
    tmp_path, tiny_pipe, notes
):
    path = tmp_path / "zoo.yaml"
    path.write_text(METHODS_STUDY)
    store = Store(tmp_path / "store")
    summary = run_sweep(load_study(path), tiny_pipe, tmp_path / "view", model="tiny", store=store, progress=False)
    assert "variant syngen (syngen) binds attributes and skips the 1 prompt(s)" in notes.text
    assert summary["images"] == 2 * 2 * 3 + 2  # sd, ae and dnb on both prompts, syngen on the coloured one
    results = load_results(tmp_path / "view")
    assert len(results) == summary["images"] and set(results.variant) == {"sd", "ae", "syngen", "dnb"}
    rows = store.latest_rows(columns=["identity"])
    identities = [json.loads(t) for t in rows.identity]
    assert {i.get("method") for i in identities} == {None, "syngen", "divide_and_bind"}
    assert all("subjects" in i for i in identities if i.get("method"))
    trace = store.read("trace")
    assert {"tv", "bind", "positive", "negative"} <= set(trace.columns)
    again = run_sweep(load_study(path), tiny_pipe, tmp_path / "view2", model="tiny", store=store, progress=False)
    assert again["images"] == 0 and again["already"] == summary["images"]  # every image once, whoever asks


def test_the_identity_of_a_method_names_it_its_settings_and_its_subjects():
    from anelab.runs.store import block_identity, image_key
    from anelab.subjects import Subject

    common = dict(
        model="tiny/1", dtype="float32", device="cpu", scheduler="PNDMScheduler", iterations=6, prompt="p",
        seeds=[0], steps=5, height=128, width=128, guidance_scale=7.5, generator_device="cpu",
    )  # fmt: skip
    subjects = (Subject("apple", ("red",)), Subject("bowl", ("blue",)))
    syngen = block_identity(subjects=subjects, method=methods.get("syngen"), **common)
    ae = block_identity(subjects=subjects, method=methods.get("attend_and_excite"), **common)
    assert syngen["method"] == "syngen" and syngen["subjects"] == [["apple", ["red"]], ["bowl", ["blue"]]]
    assert "method" not in ae and "subjects" not in ae and ae["tokens"] == ["apple", "bowl"]  # 0.2.0's form
    other = block_identity(subjects=subjects, method=methods.get("syngen", scale_factor=10.0), **common)
    unbound = block_identity(subjects=(Subject("apple"), Subject("bowl")), method=methods.get("syngen"), **common)
    keys = {image_key(i, 0) for i in (syngen, ae, other, unbound)}
    assert len(keys) == 4


def test_cli_generate_takes_a_method_its_settings_and_subjects(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a red apple and a blue bowl", "--subjects", "apple=red", "bowl=blue"]
    args += ["--steps", "5", "--height", "128", "--width", "128", "--attention-res", "4", "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--method", "divide_and_bind", "--set", "mode=tv_bind", "--set", "attribute_res=[16, 8]"])
    err = capsys.readouterr().err
    assert done.value.code == 0, err
    trace = pd.read_parquet(out / "trace.parquet")
    assert json.loads(trace.config.iloc[0])["method"] == "divide_and_bind" and "bind" in trace
    for bad, message in (
        (["--method", "sin_gen"], "unknown --method 'sin_gen'; the methods are attend_and_excite"),
        (["--method", "syngen", "--set", "mode=tv"], "syngen has no setting\\(s\\) \\['mode'\\]"),
        (["--method", "syngen", "--set", "mode"], "--set must look like key=value"),
        (["--plain", "--method", "syngen"], "--plain is Stable Diffusion without guidance"),
    ):
        with pytest.raises(SystemExit) as done:
            main([*args, *bad])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


@pytest.fixture
def stand_in(monkeypatch):
    """The fast path on the CPU (its stand-in), on a pipeline of its own (the graphs live on the UNet)."""
    monkeypatch.setattr(fast, "available", lambda device: True)
    return load_pipeline("tiny")


RUN = dict(num_inference_steps=6, height=128, width=128, output_type="latent", progress=False)
SUBJECTS = [("apple", ["red"]), ("bowl", ["blue"])]


@pytest.mark.parametrize(
    "method",
    [
        methods.get("divide_and_bind", mode="tv_bind", attention_res=4, attribute_res=(16, 8), max_refinement_steps=2,
                    max_refinement_steps_first=2).rescaled(50, 6),
        methods.get("conform", attention_res=4, max_refinement_steps=2).rescaled(50, 6),
        methods.get("syngen", attention_res=4).rescaled(50, 6),
    ],
    ids=["divide_and_bind", "conform", "syngen"],
)  # fmt: skip
def test_the_fast_path_gives_the_eager_results_for_a_method(stand_in, method):
    """A graph of a method's measurement is keyed by its settings and its step phase (D&B's bind weight) and takes its
    state as an input (CONFORM's previous maps): replaying a graph captured at another step gives the eager result."""
    runs = {
        f: anelab.generate(stand_in, "a red apple and a blue bowl", subjects=SUBJECTS, method=method, seeds=[0, 1],
                           fast=f, **RUN)
        for f in (None, False)
    }  # fmt: skip
    torch.testing.assert_close(runs[None].latents, runs[False].latents, rtol=1e-6, atol=1e-6)
    assert (
        runs[None]
        .trace[["triggered", "refinement_iterations"]]
        .equals(runs[False].trace[["triggered", "refinement_iterations"]])
    )
    kinds = {key[0] for key in stand_in.unet.__dict__["_anelab_graphs"].graphs}
    assert kinds == {"CFG forward", "guided step"}


def test_low_memory_gives_the_same_result_for_a_method_reading_three_resolutions(tiny_pipe):
    method = methods.get("divide_and_bind", mode="tv_bind", attention_res=4, attribute_res=(16, 8),
                         max_refinement_steps=1, max_refinement_steps_first=1).rescaled(50, 6)  # fmt: skip
    runs = [
        anelab.generate(
            tiny_pipe, "a red apple and a blue bowl", subjects=SUBJECTS, method=method, low_memory=flag, **RUN
        )
        for flag in (False, True)
    ]
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=1e-5, atol=1e-5)


def test_low_memory_gives_the_same_result_for_initno_which_reads_self_attention(tiny_pipe):
    method = methods.get(
        "initno", noise_rounds=1, noise_steps=2, noise_fallback_steps=2, kl_max_steps=5, attention_res=8
    ).rescaled(50, 6)
    runs = [
        anelab.generate(tiny_pipe, "a cat and a dog", tokens=["cat", "dog"], method=method, low_memory=flag, **RUN)
        for flag in (False, True)
    ]
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=1e-5, atol=1e-5)
