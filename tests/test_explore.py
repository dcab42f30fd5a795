"""The widget explorer, headless: every control redraws without error; side-by-side runs, heads, labels; notebook 00's shape."""

import ast
from pathlib import Path

import nbformat
import papermill
import pytest

import anelab
from anelab import Record
from anelab.explore import ALL, attention_explorer

PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]
FAST = dict(seeds=[0, 1], num_inference_steps=10, height=128, width=128, progress=False)
RECORD = Record(steps=[0, 3, 6, 9], tokens="prompt", heads=True)
NOTEBOOK = (
    Path(__file__).parents[1] / "notebooks" / "00_attention_explorer.ipynb"
)  # this checkout's (anelab.notebooks may map elsewhere)


@pytest.fixture(scope="module")
def sd(tiny_pipe):
    return anelab.generate(tiny_pipe, PROMPT, TOKENS, record=RECORD, **FAST)


@pytest.fixture(scope="module")
def ae(tiny_pipe):
    config = anelab.GuidanceConfig(attention_res=8, thresholds={0: 0.05, 5: 0.5})
    return anelab.generate(tiny_pipe, PROMPT, TOKENS, config=config, record=RECORD, **FAST)


def _maps(explorer):
    """The drawn map panels (image panels of view="beside" left out), titled "run · 'token'"."""
    return [ax for ax in explorer.figure.axes if ax.images and not ax.get_title().endswith("image")]


def test_every_control_redraws_the_side_by_side_runs_without_error(sd, ae):
    explorer = attention_explorer({"SD": sd.attention, "A&E": ae.attention}, {"SD": sd.images, "A&E": ae.images})
    controls = explorer.controls
    assert list(controls) == ["step", "seed", "res", "layer", "head", "token", "scale", "view", "objective"]
    assert explorer.renders == 1 and explorer.error is None and controls["step"].continuous_update is False
    assert (
        controls["res"].value == 16 and controls["scale"].value == "token" and controls["view"].value == "over"
    )  # SD's guidance res
    assert [ax.get_title() for ax in _maps(explorer)] == ["SD · 'cat'", "A&E · 'cat'"]  # a run per row
    changes = [
        ("step", 6, "step 6 (t="),
        ("seed", 1, "seed 1"),
        ("res", 8, "res 8 mean"),
        ("layer", "up_blocks.2.attentions.0.transformer_blocks.0.attn2", "up 2.0"),
        ("head", 1, "up 2.0 · head 1"),
        ("token", ALL, "colour: shared across steps"),
        ("scale", "all", "head 1"),
        ("view", "beside", "seed 1"),
        ("view", "smooth", "seed 1"),
        ("view", "map", "seed 1"),
        ("scale", "map", "colour: this map"),
        ("token", 4, "seed 1"),
        ("res", 4, "res 4 mean"),
    ]
    for name, value, shown in changes:
        before = explorer.renders
        controls[name].value = value
        assert explorer.error is None, (name, explorer.error)
        assert explorer.renders == before + 1, (
            name
        )  # exactly one draw per change, also when options follow (res → layer → head)
        assert shown in explorer.figure._suptitle.get_text(), (name, explorer.figure._suptitle.get_text())
        if name == "token" and value == ALL:
            assert len(_maps(explorer)) == 2 * 6
        if name == "view" and value == "beside":
            assert [ax.get_title() for ax in explorer.figure.axes[:1]] == ["SD image"]
    assert [ax.get_title() for ax in _maps(explorer)] == ["SD · 'a (4)'", "A&E · 'a (4)'"]
    assert (
        controls["layer"].value == "mean" and controls["head"].value == "mean" and controls["head"].disabled
    )  # no heads in a mean


def test_shared_colour_scale_stays_put_across_steps(sd, ae):
    runs = {"SD": sd.attention, "A&E": ae.attention}
    explorer = attention_explorer(runs)
    expected = max(cache.vmax(tokens=["cat"], res=16, seed=0) for cache in runs.values())
    limits = set()
    for step in (0, 3, 6, 9):
        explorer.controls["step"].value = step
        limits |= {ax.images[-1].get_clim() for ax in _maps(explorer)}
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(expected))
    explorer.controls["scale"].value = "map"
    assert len({ax.images[-1].get_clim() for ax in _maps(explorer)}) == 2  # each map its own maximum


def test_labels_positions_short_layer_names_and_heads(tiny_pipe, ae):
    cache = ae.attention
    explorer = attention_explorer(cache, ae.images)
    controls = explorer.controls
    assert controls["res"].value == 8  # opens at this run's guidance resolution
    assert [label for label, _ in controls["token"].options] == [
        "every token, side by side",
        "a (1)",
        "cat",
        "and",
        "a (4)",
        "dog",
        "<eot>",
    ]
    assert [label for label, _ in controls["layer"].options] == ["mean of 3 layers", "down 1.0", "up 2.0", "up 2.1"]
    assert "A&E loss reads" in controls["layer"].tooltip and controls["head"].layout.display is None
    controls["layer"].value = cache.layer_names["up 2.1"]
    assert controls["layer"].tooltip == cache.layer_names["up 2.1"] and "up 2.1" in explorer.figure._suptitle.get_text()
    assert [value for _, value in controls["head"].options] == ["mean", 0, 1] and not controls["head"].disabled
    controls["token"].value = 1
    assert [ax.get_title() for ax in _maps(explorer)] == ["'a (1)'"]
    means = anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(resolutions=(8,), steps=[0]), **FAST).attention
    assert attention_explorer(means).controls["head"].layout.display == "none"  # head means only: no head control


def test_errors_show_in_the_output_and_clear_on_a_good_choice(sd):
    explorer = attention_explorer(sd.attention, sd.images[:1])  # one image for two seeds
    assert explorer.figure is None and "got 1 images for 2 recorded seeds" in explorer.error
    explorer.controls["view"].value = "map"
    assert explorer.error is None and explorer.figure is not None


def test_explorer_needs_maps_and_runs_of_one_prompt(tiny_pipe, sd):
    out = anelab.generate(
        tiny_pipe,
        "a cat",
        ["cat"],
        record=Record(maps=False),
        num_inference_steps=2,
        height=64,
        width=64,
        progress=False,
    )
    with pytest.raises(ValueError, match="needs recorded maps"):
        attention_explorer(out.attention)
    other = anelab.generate(
        tiny_pipe,
        "a cat",
        ["cat"],
        record=Record(steps=[0]),
        num_inference_steps=2,
        height=128,
        width=128,
        progress=False,
    )
    with pytest.raises(ValueError, match="must share one prompt"):
        attention_explorer({"SD": sd.attention, "other": other.attention})


def test_notebook_00_keeps_its_shape_and_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and any(
        line.startswith("**Question.**") for line in nb.cells[0].source.splitlines()
    )
    parameters = nb.cells[1]
    assert parameters.metadata.get("tags") == ["parameters"]
    assignments = ast.parse(parameters.source).body
    assert all(isinstance(node, ast.Assign) for node in assignments)
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in assignments}  # literals only
    assert (
        values["scale"] == "smoke"
        and values["store"] is None
        and "smoke" not in values
        and values["interactive"] is True
    )
    assert list(papermill.inspect_notebook(str(NOTEBOOK))) == list(values)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert (
        'if scale == "smoke":' in code and code.count("progress=False") == code.count("anelab.generate(") >= 1
    )  # no bar widget left behind
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_the_objective_selector_asks_a_method_about_recorded_maps(tiny_pipe):
    """SynGen's objective on maps an A&E run recorded: the explorer's number is methods.evaluate on those maps."""
    from anelab import methods
    from anelab.explore import method_terms

    config = anelab.GuidanceConfig(attention_res=8, thresholds={})
    prompt, subjects = "a red apple and a blue bowl", [("apple", ["red"]), ("bowl", ["blue"])]
    run = anelab.generate(
        tiny_pipe, prompt, subjects=subjects, config=config, record=Record(steps=[0, 3], tokens="all"), **FAST
    )
    cache = run.attention
    maps = cache.text_maps(step=3, seed=1)
    assert set(maps) == set(cache.resolutions) and maps[8].shape == (1, 8, 8, 77)
    method = methods.get("syngen", attention_res=8)
    expected = methods.evaluate(method, maps, [(3, [2]), (7, [6])], eot=8)["loss"].item()
    assert method_terms(cache, method, step=3, seed=1)["loss"] == [pytest.approx(expected)]
    explorer = attention_explorer(cache, run.images)
    explorer.controls["objective"].value = "syngen"  # at its default resolution 16: this run has 16 recorded too
    assert explorer.error is None and explorer.terms["loss"] and len(explorer.terms["positive"]) == 2
    explorer.controls["objective"].value = "initno"  # reads self-attention, which is not recorded
    assert "cannot evaluate initno here" in explorer.error
    prompt_only = anelab.generate(tiny_pipe, prompt, ["apple"], config=config, record=RECORD, **FAST)
    partial = attention_explorer(prompt_only.attention)
    partial.controls["objective"].value = "syngen"
    assert "record with anelab.Record(tokens='all')" in partial.error
