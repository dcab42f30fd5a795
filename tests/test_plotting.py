"""Quantile trends, attention figures and the widget explorer (headless)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import anelab
from anelab import AnelabError, Record
from anelab.analysis import quantile_trends, subject_extremes
from anelab.explore import attention_explorer
from anelab.plotting import attention_grid, attention_map, attention_trends


@pytest.fixture(scope="module")
def run(tiny_pipe):
    return anelab.generate(tiny_pipe, "a cat and a dog", ["cat", "dog"], seeds=[0, 1], record=Record(steps=[0, 3, 6, 9], tokens="prompt"),
                           num_inference_steps=10, height=128, width=128, progress=False)  # fmt: skip


def _stats(values_cat, values_dog, run="SD"):
    """Hand-made statistics: one step, one resolution, an image per (cat, dog) pair plus a non-subject token."""
    rows = []
    for seed, (cat, dog) in enumerate(zip(values_cat, values_dog)):
        for token, value, subject in (("cat", cat, True), ("dog", dog, True), ("and", 0.99, False)):
            rows.append(dict(prompt="a cat and a dog", seed=seed, step=0, timestep=981, res=16, token=token, subject=subject, max_attention=value))
    return pd.DataFrame(rows).assign(run=run)


def test_subject_extremes_take_the_max_and_min_over_subject_tokens_only():
    extremes = subject_extremes(_stats([0.2, 0.9], [0.5, 0.1]))
    assert extremes.higher.tolist() == [0.5, 0.9] and extremes.lower.tolist() == [0.2, 0.1]


def test_quantile_trends_are_quantiles_over_images():
    lows = np.arange(11) / 10  # the lower token of image k is k/10; the higher one is 1
    trends = quantile_trends(_stats(lows, np.ones(11)), quantiles=(0.1, 0.5)).set_index(["token_rank", "quantile"])
    assert trends.loc[("lower", 0.1), "value"] == pytest.approx(0.1)
    assert trends.loc[("lower", 0.5), "value"] == pytest.approx(0.5)
    assert trends.loc[("higher", 0.5), "value"] == 1.0 and (trends.images == 11).all()
    with pytest.raises(AnelabError, match="quantiles must be numbers in \\[0, 1\\]"):
        quantile_trends(_stats(lows, lows), quantiles=(1.5,))


def test_tokens_by_resolution_grid_shares_one_colour_scale(run):
    cache = run.attention
    fig = attention_grid(cache, step=3, seed=1)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 4  # subject tokens x resolutions, plus the colour bar
    assert [ax.get_title() for ax in panels[:4]] == ["res 16", "res 8", "res 4", "res 2"]
    assert [panels[0].get_ylabel(), panels[4].get_ylabel()] == ["cat", "dog"]
    limits = {ax.images[0].get_clim() for ax in panels}
    expected = max(float(cache.maps(token=t, step=3, res=r, seed=1).max()) for t in ("cat", "dog") for r in cache.resolutions)
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(expected))
    assert "seed 1" in fig._suptitle.get_text() and "step 3" in fig._suptitle.get_text()


def test_tokens_by_steps_grid_over_the_image(run):
    fig = attention_grid(run.attention, res=8, seed=0, tokens=["dog", "<eot>"], image=run.images)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 4 and all(len(ax.images) == 2 for ax in panels)  # image + overlaid map
    assert panels[0].images[1].get_array().shape == (128, 128)  # the map is upsampled to the image
    assert [ax.get_title() for ax in panels[:4]] == [f"step {s} (t={run.attention.timesteps[s]})" for s in (0, 3, 6, 9)]


def test_grid_needs_exactly_one_fixed_axis(run):
    with pytest.raises(AnelabError, match="give one step"):
        attention_grid(run.attention, seed=0)
    with pytest.raises(AnelabError, match="give one step"):
        attention_grid(run.attention, step=[0, 3], res=[8, 16], seed=0)
    with pytest.raises(AnelabError, match="got 1 images for 2 recorded seeds"):
        attention_grid(run.attention, step=0, seed=0, image=run.images[:1])


def test_single_map_draws_into_a_given_axes(run):
    fig = Figure()
    ax = fig.subplots()
    assert attention_map(run.attention, token="cat", step=6, res=4, seed=0, ax=ax) is fig
    assert "'cat' · res 4 mean" in ax.get_title() and ax.images[0].get_array().shape == (4, 4)


def test_trend_plot_has_a_panel_per_resolution_with_labels_and_legend(run, tiny_pipe):
    guided = anelab.generate(tiny_pipe, "a cat and a dog", ["cat", "dog"], seeds=[0, 1], config=anelab.GuidanceConfig(attention_res=8, thresholds={0: 0.05, 5: 0.5}),
                             record=Record(maps=False), num_inference_steps=10, height=128, width=128, progress=False)  # fmt: skip
    fig = attention_trends({"SD": run.attention.stats(), "A&E": guided.attention.stats()}, resolutions=[16, 8])
    panels = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in panels] == ["resolution 16", "resolution 8"]
    assert all(ax.get_xlabel() for ax in panels) and panels[0].get_ylabel()
    legend = [t.get_text() for t in panels[-1].get_legend().get_texts()]
    assert {"SD", "A&E", "higher", "lower", "q0.05", "q0.5"} <= set(legend)
    assert len(panels[0].lines) >= 2 * 2 * 4  # runs x (higher, lower) x quantiles
    with pytest.raises(AnelabError, match="no statistics at resolution\\(s\\) \\[64\\]"):
        attention_trends({"SD": run.attention.stats()}, resolutions=[64])


def test_explorer_builds_headless_and_redraws_when_a_control_changes(run):
    explorer = attention_explorer(run.attention, run.images)
    controls = explorer.controls
    assert controls["step"].continuous_update is False and [v for _, v in controls["step"].options] == [0, 3, 6, 9]
    assert explorer.renders == 1 and "step 0" in explorer.figure.axes[0].get_title()
    controls["step"].value = 6
    assert explorer.renders == 2 and "step 6" in explorer.figure.axes[0].get_title()
    controls["res"].value = 4
    assert [v for _, v in controls["layer"].options][0] == "mean" and len(controls["layer"].options) == 1 + len(run.attention.layers_at(4))
    controls["layer"].value = controls["layer"].options[1][1]
    assert controls["layer"].value in explorer.figure.axes[0].get_title()
    controls["token"].value = 5
    controls["seed"].value = 1
    assert "'dog'" in explorer.figure.axes[0].get_title() and "seed 1" in explorer.figure.axes[0].get_title()


def test_explorer_shows_errors_in_its_output(run):
    explorer = attention_explorer(run.attention, run.images[:1])  # one image for two seeds
    assert explorer.figure is None and "got 1 images for 2 recorded seeds" in explorer.error
    explorer.controls["overlay"].value = False
    assert explorer.error is None and explorer.figure is not None


def test_explorer_needs_maps(tiny_pipe):
    out = anelab.generate(tiny_pipe, "a cat", ["cat"], record=Record(maps=False), num_inference_steps=2, height=64, width=64, progress=False)
    with pytest.raises(ValueError, match="needs recorded maps"):
        attention_explorer(out.attention)
