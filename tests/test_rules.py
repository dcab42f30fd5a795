"""The rules users rely on, pinned value by value (fast, no model): A&E's terms with suppression and layout and its
refinement rule (reference §1.5, §1.8), the step sizes and step schedules, every field of the store identity and the
key it hashes to, the model's name in it, and what recorded statistics cover. Written against the survivors of a
mutation run (README, "Mutation check")."""

import math

import numpy as np
import pytest
import torch

from anelab import AnelabError, GuidanceConfig
from anelab.config import check_schedule
from anelab.methods import get
from anelab.methods.base import Inputs
from anelab.objectives import layout_kl
from anelab.runs.store import block_identity, block_key, covers, image_key, model_identity
from anelab.subjects import Subject

EOT = 8


def _maps(seed: int = 0, res: int = 16) -> torch.Tensor:
    """[2, res, res, 77] attention probabilities (fp64), each token with a blob at its own place."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((2, res, res, 77)) * 0.5
    y, x = (np.mgrid[0:res, 0:res] + 0.5) / res
    for p in range(1, EOT):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        logits[..., p] += rng.uniform(1, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return torch.from_numpy(e / e.sum(-1, keepdims=True))


def _inputs(subjects, targets=None) -> Inputs:
    return Inputs(cross={16: _maps()}, subjects=tuple(subjects), eot=EOT, targets=targets)


SUBJECTS = [
    Subject(2, (), "excite"),
    Subject(5, (), "excite", (0.25, 0.5)),  # excited with a layout target
    Subject(3, (), "suppress"),
    Subject(6, (), "suppress"),
    Subject(7, (), "layout", (0.75, 0.5)),  # layout only
]


def _targets():
    from anelab.objectives import gaussian_target

    return torch.stack([gaussian_target(p, (16, 16), 0.15) for p in [(0.25, 0.5), (0.75, 0.5)]]).double()


@pytest.mark.parametrize("update", ["joint", "two_stage"])
def test_a_and_e_terms_combine_excite_suppress_and_layout_as_documented(update):
    config = GuidanceConfig(suppress_scale=2.5, suppress_bound=0.05, layout_scale=0.7, layout_update=update)
    inputs = _inputs(SUBJECTS, _targets())
    terms = config.terms(inputs)
    positions, roles = config.measured(inputs.subjects)
    assert positions == [2, 5, 3, 6, 7] and roles == ["excite", "excite", "suppress", "suppress", "layout"]
    maps = config.token_maps(inputs.cross[16], positions, inputs)  # [B, T, h, w]
    m = maps.flatten(2).amax(-1)
    torch.testing.assert_close(terms["max_attention"], m)
    excite = (1 - m[:, :2]).clamp(min=0).amax(-1)
    suppress = (m[:, 2:4] - 0.05).clamp(min=0).amax(-1)
    torch.testing.assert_close(terms["excite"], excite)
    torch.testing.assert_close(terms["suppress"], suppress)
    torch.testing.assert_close(terms["_suppressed_max"], m[:, 2:4].amax(-1))
    assert (suppress > 0.01).all()  # the suppression term is really there
    kl = layout_kl(torch.stack([maps[:, 1], maps[:, 4]], dim=1), inputs.targets)
    assert torch.isnan(terms["layout_kl"][:, [0, 2, 3]]).all()  # NaN off the layout tokens
    torch.testing.assert_close(terms["layout_kl"][:, [1, 4]], kl)
    torch.testing.assert_close(terms["_layout"], 0.7 * kl.sum(-1))
    want = excite + 2.5 * suppress + (0.7 * kl.sum(-1) if update == "joint" else 0)
    torch.testing.assert_close(terms["loss"], want)
    assert config.stages(inputs.subjects) == (("_layout", "loss") if update == "two_stage" else ("loss",))
    assert config.stages(inputs.subjects[:1]) == ("loss",)  # no layout target: one stage


def test_a_and_e_terms_without_excited_tokens_have_a_zero_excite_loss():
    terms = GuidanceConfig().terms(_inputs([Subject(3, (), "suppress")]))
    assert terms["excite"].shape == (2,) and (terms["excite"] == 0).all()
    assert "layout_kl" not in terms and torch.equal(terms["loss"], terms["suppress"])


def test_the_refinement_rule_is_strict_on_the_excite_loss_and_bounds_suppression():
    config = GuidanceConfig(suppress_bound=0.2)
    excite = torch.tensor([0.25, 0.5, 0.75, 0.0], dtype=torch.float64)  # exact binary fractions
    # A&E refines while loss > max(0, 1 - threshold): 0.5 at threshold 0.5 is not above
    assert config.violates({"excite": excite}, 0.5).tolist() == [False, False, True, False]
    assert config.violates({"excite": excite}, 1.5).tolist() == [True, True, True, False]  # max(0, -0.5) = 0
    supp = torch.tensor([0.125, 0.375, 0.25, 0.0], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    # suppressed tokens violate above max(suppress_bound, 1 - threshold)
    assert config.violates({"excite": zero, "_suppressed_max": supp}, 0.875).tolist() == [False, True, True, False]
    assert config.violates({"excite": zero, "_suppressed_max": supp}, 0.6875).tolist() == [False, True, False, False]
    at_bound = {"excite": zero[:1], "_suppressed_max": torch.tensor([0.25], dtype=torch.float64)}
    assert not GuidanceConfig(suppress_bound=0.25).violates(at_bound, 0.875).item()  # strict: at the bound is fine
    both = config.violates({"excite": excite, "_suppressed_max": supp}, 0.875)  # either one violates
    assert both.tolist() == [True, True, True, False]


def test_step_sizes_follow_the_index_rule_and_table_schedules():
    n = 51
    r = np.linspace(1.0, 0.5, n)
    np.testing.assert_allclose(GuidanceConfig().step_sizes(n), 20.0 * np.sqrt(r))
    np.testing.assert_allclose(
        GuidanceConfig(scale_factor=7.0, step_schedule="constant").step_sizes(n), np.full(n, 7.0)
    )
    table = GuidanceConfig(scale_factor=10.0, step_schedule=[[0, 1.0], [10, 0.0], [20, 2.0]])
    np.testing.assert_allclose(table.step_sizes(31)[[0, 5, 10, 15, 20, 30]], [10.0, 5.0, 0.0, 10.0, 20.0, 20.0])
    custom = GuidanceConfig(scale_factor=3.0, scale_range=(2.0, 1.0), step_schedule=lambda r: r**2)
    np.testing.assert_allclose(custom.step_sizes(3), 3.0 * np.array([4.0, 2.25, 1.0]))
    with pytest.raises(AnelabError, match="finite multipliers of the same shape"):
        GuidanceConfig(step_schedule=lambda r: r[:1]).step_sizes(5)


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        [],
        [[1]],
        [[1, 2, 3]],
        [[1.5, 1.0]],
        [[-1, 1.0]],
        [[1, -0.5]],
        [[2, 1.0], [1, 1.0]],
        [[1, 1.0], [1, 2.0]],
        [[0, "x"]],
        [(True, 1.0)],
        5,
    ],
)
def test_a_bad_step_schedule_is_refused(bad):
    with pytest.raises(AnelabError, match="step_schedule"):
        check_schedule(bad)


def test_a_good_step_schedule_is_kept():
    assert check_schedule([[0, 1], (4, 0.5)]) == ((0, 1.0), (4, 0.5))
    assert check_schedule("sqrt") == "sqrt"
    assert check_schedule(math.sqrt) is math.sqrt


def _identity(method=None, subjects=None, **changes):
    args = dict(
        model="tiny/1",
        dtype="torch.float32",
        device="cpu",
        scheduler="PNDMScheduler",
        iterations=5,
        prompt="a red cat and a dog",
        subjects=subjects
        or [
            Subject("cat", ("red",), "excite"),
            Subject("dog", (), "suppress"),
            Subject("cat", (), "layout", (0.25, 0.5)),
        ],
        seeds=[3, 1],
        steps=4,
        height=256,
        width=192,
        guidance_scale=7.5,
        method=method,
        generator_device="cpu",
    )
    return block_identity(**(args | changes))


def test_every_field_of_the_store_identity_is_kept_as_written():
    config = GuidanceConfig(scale_factor=12.0)
    identity = _identity(config)
    assert identity == {
        "format": identity["format"],
        "model": "tiny/1",
        "dtype": "float32",
        "device": "cpu",
        "scheduler": "PNDMScheduler",
        "prompt": "a red cat and a dog",
        "tokens": ["cat"],
        "suppress": ["dog"],
        "layout": {"cat": [0.25, 0.5]},
        "seeds": [3, 1],
        "steps": 4,
        "height": 256,
        "width": 192,
        "guidance_scale": 7.5,
        "config": config.to_dict() | {"step_sizes": [float(a) for a in config.step_sizes(5)]},
        "generator_device": "cpu",
    }
    assert _identity(None)["config"] is None
    syngen = get("syngen")
    other = _identity(syngen)
    assert other["method"] == "syngen" and other["subjects"] == [["cat", ["red"]], ["dog", []], ["cat", []]]
    assert _identity(config, transformer={"blocks": [0]})["transformer"] == {"blocks": [0]}
    assert "transformer" not in _identity(config, transformer={})


def test_the_store_key_of_a_fixed_identity_never_changes():
    """The digest of one fixed identity, as anelab computes it today: a renamed field, a changed value or another
    serialisation changes it and so orphans every store written before."""
    identity = _identity(GuidanceConfig())
    identity["format"] = 1
    assert block_key(identity) == "b6f15a5129e960112676604b43ef52cab081126be135d580f021e4bb17a27d03"
    assert image_key(identity, 3) == "d5d68c2b19d1a65ea61fc40dd184e41c1805e7aff328fea40a5cd54484dab7ae"
    keys = {
        block_key(_identity(GuidanceConfig(), **{k: v})) for k, v in [("steps", 5), ("width", 256), ("device", "cuda")]
    }
    assert len(keys | {block_key(_identity(GuidanceConfig()))}) == 4
    assert image_key(identity, 3) != image_key(identity, 1) and len(image_key(identity, 3)) >= 32


def test_model_identity_names_the_weights():
    assert model_identity("tiny") == "tiny/1" and model_identity("tiny-sd3") == "tiny-sd3/1"
    assert model_identity("org/model") == "org/model@main"
    assert model_identity("org/model", revision="abc", variant="fp16") == "org/model@abc:fp16"

    class Named:
        name_or_path = "org/named"

    class Configured:
        class config:  # noqa: N801
            _name_or_path = "org/configured"

    assert model_identity(Named()) == "org/named@main" and model_identity(Configured()) == "org/configured@main"
    with pytest.raises(
        AnelabError, match="^the store needs a model name: pass the model as 'tiny', a Hub id or a local directory$"
    ):
        model_identity(object())


def test_model_identity_of_a_directory_is_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_identity("weights") == f"dir:{(tmp_path / 'weights').resolve()}"


def test_recorded_statistics_cover_only_what_they_hold():
    have = '{"resolutions": [16, 32], "steps": [0, 1, 2], "tokens": [2, 5]}'
    assert covers(have, None) and covers(None, None)
    assert not covers(None, {"resolutions": [16], "steps": [0], "tokens": [2]})
    assert not covers("null", {"resolutions": [16], "steps": [0], "tokens": [2]})
    assert covers(have, {"resolutions": [16], "steps": [0, 2], "tokens": [5]})
    assert covers(have, {"resolutions": [16, 32], "steps": [0, 1, 2], "tokens": [2, 5]})  # exactly what was recorded
    for missing in ({"resolutions": [8]}, {"steps": [3]}, {"tokens": [7]}):
        need = {"resolutions": [16], "steps": [0], "tokens": [2]} | missing
        assert not covers(have, need), missing
