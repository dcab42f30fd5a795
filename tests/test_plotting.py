"""Quantile trends and attention figures: colour scales, views, labels, the side-by-side figure (the explorer: test_explore)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import anelab
from anelab import AnelabError, Record
from anelab.analysis import quantile_trends, subject_extremes
from anelab.plotting import attention_compare, attention_grid, attention_map, attention_trends


@pytest.fixture(scope="module")
def run(tiny_pipe):
    return anelab.generate(
        tiny_pipe,
        "a cat and a dog",
        ["cat", "dog"],
        seeds=[0, 1],
        record=Record(steps=[0, 3, 6, 9], tokens="prompt"),
        num_inference_steps=10,
        height=128,
        width=128,
        progress=False,
    )


@pytest.fixture(scope="module")
def guided(tiny_pipe):
    config = anelab.GuidanceConfig(attention_res=16, thresholds={0: 0.05, 5: 0.5})
    return anelab.generate(
        tiny_pipe,
        "a cat and a dog",
        ["cat", "dog"],
        seeds=[0, 1],
        config=config,
        record=Record(steps=[0, 3, 6, 9], tokens="prompt"),
        num_inference_steps=10,
        height=128,
        width=128,
        progress=False,
    )


def guided_other(run):
    """The same maps under another prompt."""
    from anelab.cache import AttentionCache

    cache = run.attention
    return AttentionCache(
        prompt="a bird",
        seeds=cache.seeds,
        tokens=cache.tokens,
        subjects=cache.subjects,
        timesteps=cache.timesteps,
        layers=cache.layers,
        heads=cache.heads,
        maps={k: cache[k] for k in cache.keys()},
        stats=cache.to_frame(),
    )


def _stats(values_cat, values_dog, run="SD"):
    """Hand-made statistics: one step, one resolution, an image per (cat, dog) pair plus a non-subject token."""
    rows = []
    for seed, (cat, dog) in enumerate(zip(values_cat, values_dog)):
        for token, value, subject in (("cat", cat, True), ("dog", dog, True), ("and", 0.99, False)):
            rows.append(
                dict(
                    prompt="a cat and a dog",
                    seed=seed,
                    step=0,
                    timestep=981,
                    res=16,
                    token=token,
                    subject=subject,
                    max_attention=value,
                )
            )
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
    expected = max(
        float(cache.maps(token=t, step=3, res=r, seed=1).max()) for t in ("cat", "dog") for r in cache.resolutions
    )
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(expected))
    assert "seed 1" in fig._suptitle.get_text() and "step 3" in fig._suptitle.get_text()


def test_tokens_by_steps_grid_over_the_image(run):
    fig = attention_grid(run.attention, res=8, seed=0, tokens=["dog", "<eot>"], image=run.images)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 4 and all(len(ax.images) == 2 for ax in panels)  # image + overlaid map
    cells = panels[0].images[1]
    assert cells.get_array().shape == (8, 8) and cells.get_interpolation() == "nearest"  # the raw cells over the image
    assert panels[0].images[0].get_extent() == cells.get_extent() == [-0.5, 7.5, 7.5, -0.5]  # the image fills the grid
    assert [ax.get_title() for ax in panels[:4]] == [f"step {s} (t={run.attention.timesteps[s]})" for s in (0, 3, 6, 9)]
    assert [panels[0].get_ylabel(), panels[4].get_ylabel()] == ["dog", "<eot>"]
    smooth = attention_grid(run.attention, res=8, seed=0, tokens=["dog"], image=run.images, view="smooth")
    assert [ax for ax in smooth.axes if ax.images][0].images[1].get_array().shape == (
        128,
        128,
    )  # the old look: upsampled


def test_maps_show_cell_ticks_edges_and_read_the_value_under_the_cursor(run):
    cache = run.attention
    fig = attention_map(cache, token="dog", step=3, res=8, seed=1, image=run.images)
    panel = fig.axes[0]
    assert list(panel.get_xticks()) == list(range(8)) and list(panel.get_yticks()) == list(range(8))
    assert list(panel.get_xticks(minor=True)) == list(np.arange(-0.5, 8)) and all(
        t.gridline.get_visible() for t in panel.xaxis.get_minor_ticks()
    )
    heat = cache.maps(token="dog", step=3, res=8, seed=1)
    assert panel.format_coord(5.3, 1.8) == f"cell x=5, y=2: attention {float(heat[2, 5]):.4f}"
    assert fig.axes[1].get_ylabel().startswith("attention")  # the colour bar, with numbers
    coarse = attention_map(cache, token="dog", step=3, res=16, seed=1).axes[0]
    assert list(coarse.get_xticks()) == list(range(0, 16, 2))  # at most 8 labelled cells a side


def test_shared_colour_scale_is_the_same_across_steps_for_a_token(run):
    cache = run.attention
    limits = {
        step: attention_map(cache, token="cat", step=step, res=8, seed=0).axes[0].images[0].get_clim()
        for step in cache.steps
    }
    expected = max(float(cache.maps(token="cat", step=s, res=8, seed=0).max()) for s in cache.steps)
    assert len(set(limits.values())) == 1 and limits[0] == (0.0, pytest.approx(expected))
    assert cache.vmax(tokens=["cat"], res=8, seed=0) == pytest.approx(expected)
    every = max(float(cache.maps(token=t, step=s, res=8, seed=0).max()) for t in cache.tokens for s in cache.steps)
    assert attention_map(cache, token="cat", step=3, res=8, seed=0, scale="all").axes[0].images[0].get_clim()[
        1
    ] == pytest.approx(every)
    own = attention_map(cache, token="cat", step=3, res=8, seed=0, scale="map").axes[0].images[0].get_clim()[1]
    assert (
        own == pytest.approx(float(cache.maps(token="cat", step=3, res=8, seed=0).max())) and own <= expected <= every
    )
    assert attention_map(cache, token="cat", step=3, res=8, seed=0, vmax=0.5).axes[0].images[0].get_clim() == (0.0, 0.5)
    with pytest.raises(AnelabError, match="scale must be one of \\['token', 'all', 'map'\\]"):
        attention_map(cache, token="cat", step=3, res=8, seed=0, scale="auto")
    with pytest.raises(AnelabError, match="view must be one of"):
        attention_map(cache, token="cat", step=3, res=8, seed=0, view="side")


def test_repeated_words_and_layers_are_labelled_by_position_and_short_name(run):
    cache = run.attention
    title = attention_map(cache, token="a (4)", step=0, layer="up 2.1", seed=0).axes[0].get_title()
    assert title.startswith("'a (4)' · up 2.1\nstep 0")
    fig = attention_grid(
        cache, step=0, seed=0, tokens=[1, 4], layer="up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    )
    assert [ax.get_ylabel() for ax in fig.axes if ax.images] == [
        "a (1)",
        "a (4)",
    ] and "up 2.1" in fig._suptitle.get_text()


def test_image_beside_the_map(run):
    fig = attention_map(run.attention, token="cat", step=0, res=4, seed=0, image=run.images, view="beside")
    image, heat = fig.axes[:2]
    assert image.get_title() == "image" and image.images[0].get_array().shape == (128, 128, 3)
    assert len(heat.images) == 1 and heat.images[0].get_array().shape == (4, 4)  # the raw map alone
    grid = attention_grid(run.attention, step=0, seed=0, image=run.images, view="beside")
    assert len([ax for ax in grid.axes if ax.images]) == 1 + 2 * 4  # the image heads a first column


def test_side_by_side_figure_has_runs_as_rows_and_tokens_as_columns(run, guided):
    runs = {"SD": run.attention, "A&E": guided.attention}
    fig = attention_compare(
        runs, step=3, seed=1, tokens=["cat", "dog", "a (4)"], images={"SD": run.images, "A&E": guided.images}
    )
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [f"{r} · '{t}'" for r in ("SD", "A&E") for t in ("cat", "dog", "a (4)")]
    assert (
        "seed 1" in fig._suptitle.get_text()
        and "step 3" in fig._suptitle.get_text()
        and "res 16 mean" in fig._suptitle.get_text()
    )
    top = max(c.vmax(res=16, seed=1) for c in runs.values())  # one scale: every step, token and run
    limits = {ax.images[-1].get_clim() for ax in panels}
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(top)) and len(fig.axes) == 6 + 1
    assert (
        panels[3].images[-1].get_array().shape == (16, 16) and len(panels[3].images) == 2
    )  # A&E cells over the A&E image
    per_token = attention_compare(runs, step=3, seed=1, res=8, scale="token", view="beside", images={"SD": run.images})
    maps = [ax for ax in per_token.axes if ax.images and ax.get_title() not in ("SD image", "A&E image")]
    assert len(maps) == 2 * 2 and len(per_token.axes) == 2 + 2 * 2 + 2  # SD's image, maps, a colour bar per token
    assert maps[0].images[0].get_clim()[1] == pytest.approx(
        max(c.vmax(tokens=["cat"], res=8, seed=1) for c in runs.values())
    )
    row = attention_compare(run.attention, step=0, seed=0, tokens=[1, 2, 3, 4, 5, 6])  # one run: its tokens in a row
    assert [ax.get_title() for ax in row.axes if ax.images] == [
        "'a (1)'",
        "'cat'",
        "'and'",
        "'a (4)'",
        "'dog'",
        "'<eot>'",
    ]
    with pytest.raises(AnelabError, match="must share one prompt"):
        attention_compare({"SD": run.attention, "other": guided_other(run)}, step=0, seed=0)
    with pytest.raises(AnelabError, match="pass images as \\{name: images\\}"):
        attention_compare(runs, step=0, seed=0, images=run.images)


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
    with pytest.raises(AnelabError, match="needs 1x2 axes, got 1"):
        attention_map(
            run.attention, token="cat", step=6, res=4, seed=0, image=run.images, view="beside", ax=Figure().subplots()
        )


def test_trend_plot_has_a_panel_per_resolution_with_labels_and_legend(run, tiny_pipe):
    guided = anelab.generate(
        tiny_pipe,
        "a cat and a dog",
        ["cat", "dog"],
        seeds=[0, 1],
        config=anelab.GuidanceConfig(attention_res=8, thresholds={0: 0.05, 5: 0.5}),
        record=Record(maps=False),
        num_inference_steps=10,
        height=128,
        width=128,
        progress=False,
    )
    fig = attention_trends(
        {"SD": run.attention.stats(), "A&E": guided.attention.stats()},
        resolutions=[16, 8],
        thresholds={"A&E": {0: 0.05, 5: 0.5}},
    )
    panels = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in panels] == [
        "SD · resolution 16",
        "SD · resolution 8",
        "A&E · resolution 16",
        "A&E · resolution 8",
    ]
    assert all(ax.get_xlabel() for ax in panels[2:]) and panels[0].get_ylabel() and panels[2].get_ylabel()
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert {"higher subject, q0.5", "lower subject, q0.5", "higher: q0.05–q0.5", "threshold"} <= set(legend)
    assert all(len(ax.collections) == 2 * 3 for ax in panels)  # (higher, lower) x bands below the median
    assert sum(1 for line in panels[2].lines if line.get_marker() == "_") == 2 and not any(
        line.get_marker() == "_" for line in panels[0].lines
    )
    with pytest.raises(AnelabError, match="no statistics at resolution\\(s\\) \\[64\\]"):
        attention_trends({"SD": run.attention.stats()}, resolutions=[64])
