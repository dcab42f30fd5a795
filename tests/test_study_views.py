"""The tables and figures the notebooks show, on hand-made results, traces and statistics."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anelab import AnelabError, GuidanceConfig
from anelab import analysis, plotting
from anelab.runs import load_study
from anelab.runs.calibration import calibrated_study


def _results():
    """Two variants x two images; similarities chosen so the means are easy to check."""
    return pd.DataFrame({
        "variant": ["sd", "sd", "ae", "ae"], "prompt": ["a cat and a dog"] * 4, "category": ["animal_animal"] * 4,
        "seed": [0, 1, 0, 1], "tokens": ["cat,dog"] * 4, "seconds": [1.0, 3.0, 4.0, 6.0],
        "image": [f"images/{v}/a cat and a dog/{s}.png" for v, s in (("sd", 0), ("sd", 1), ("ae", 0), ("ae", 1))],
        "full_prompt": [0.2, 0.4, 0.3, 0.5], "min_object": [0.1, 0.3, 0.2, 0.4], "text_text": [0.5, 0.5, 0.6, 0.6],
        "first_half": [0.2, 0.2, 0.3, 0.3], "second_half": [0.1, 0.3, 0.2, 0.2],
    })  # fmt: skip


def _trace():
    """A&E: seed 0 triggered at step 0 and reached after 2 rounds; seed 1 never triggered. SD has no thresholds."""
    rows = []
    for seed, triggered, rounds in ((0, True, 2), (1, False, 0)):
        for token in ("cat", "dog"):
            rows.append(dict(variant="ae", prompt="a cat and a dog", seed=seed, step=0, token=token, threshold=0.05,
                             triggered=triggered, reached=True, refinement_iterations=rounds))  # fmt: skip
            rows.append(dict(variant="sd", prompt="a cat and a dog", seed=seed, step=0, token=token, threshold=np.nan,
                             triggered=False, reached=pd.NA, refinement_iterations=0))  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["reached"] = frame.reached.astype("boolean")
    return frame


def _steered():
    """Per-image statistics of one subject (what steered_subject returns)."""
    return pd.DataFrame({
        "variant": ["ae", "ae", "left", "left", "suppress", "suppress"], "prompt": ["a cat and a dog"] * 6, "seed": [0, 1] * 3,
        "max_attention": [0.6, 0.4, 0.5, 0.5, 0.1, 0.3], "centroid_x": [0.5, 0.7, 0.3, 0.1, 0.5, 0.5], "centroid_y": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    })  # fmt: skip


def test_variant_table_puts_efficiency_next_to_similarity_in_sweep_order():
    table = analysis.variant_table(_results(), _trace())
    assert list(table.index) == ["sd", "ae"]
    assert table.loc["ae", "guidance_rate"] == 0.5 and table.loc["ae", "success_rate"] == 1.0 and table.loc["ae", "mean_refinement_rounds"] == 1.0
    assert np.isnan(table.loc["sd", "guidance_rate"])  # plain SD has no threshold steps
    assert table.loc["sd", "seconds_per_image"] == 2.0 and table.loc["ae", "min_object"] == pytest.approx(0.3)
    with pytest.raises(AnelabError, match="needs columns \\['seconds'\\]|seconds"):
        analysis.variant_table(_results().drop(columns="seconds"), _trace())


def test_suppression_table_gives_the_share_under_the_bound_and_the_sub_prompt_similarity():
    results = _results().assign(variant=["ae", "ae", "suppress", "suppress"])
    table = analysis.suppression_table(_steered().query("variant != 'left'"), results, subject=1, bound=0.2)
    assert table.loc["suppress", "share_under_bound"] == 0.5 and table.loc["ae", "share_under_bound"] == 0.0
    assert table.loc["suppress", "mean_attention"] == pytest.approx(0.2)
    assert table.loc["suppress", "second_half_similarity"] == pytest.approx(0.2)
    with pytest.raises(AnelabError, match="subject must be 0 \\(first\\) or 1 \\(second\\)"):
        analysis.suppression_table(_steered(), results, subject=2, bound=0.2)


def test_layout_table_measures_the_distance_to_the_target_before_and_after():
    layout = analysis.layout_table(_steered(), {"left": (0.0, 0.5)}, reference="ae").set_index("run")
    assert layout.loc["reference", "distance"] == pytest.approx(0.6) and layout.loc["steered", "distance"] == pytest.approx(0.2)
    assert layout.loc["steered", "centroid_x"] == pytest.approx(0.2) and layout.loc["steered", "target_x"] == 0.0
    with pytest.raises(AnelabError, match="variant\\(s\\) \\['up'\\] are not in these statistics"):
        analysis.layout_table(_steered(), {"up": (0.5, 0.0)})


def test_calibrated_study_guides_each_resolution_with_its_own_quantiles():
    study = load_study("resolution", prompts=1, seeds=2)
    stats = []
    for seed, low in enumerate((0.1, 0.3)):  # lower subject at 32: 0.1 and 0.3 at every threshold step
        for step in (0, 10, 20):
            for token, value in (("cat", low), ("dog", 0.9)):
                stats.append(dict(prompt="a cat and a dog", seed=seed, step=step, timestep=1000 - 20 * step, res=32, token=token, subject=True, max_attention=value))
    calibrated, thresholds = calibrated_study(study, pd.DataFrame(stats), {32: "res32"}, quantile=0.5)
    assert thresholds == {32: {0: pytest.approx(0.2), 10: pytest.approx(0.2), 20: pytest.approx(0.2)}}
    assert list(calibrated.variants) == ["res32_calibrated"] and calibrated.name == "resolution_calibrated"
    config = calibrated.variants["res32_calibrated"]
    assert isinstance(config, GuidanceConfig) and config.attention_res == 32 and config.thresholds == thresholds[32]
    with pytest.raises(AnelabError, match="not guided variants"):
        calibrated_study(study, pd.DataFrame(stats), {32: "sd"})


def _labelled(fig):
    panels = [ax for ax in fig.axes if ax.get_xlabel() or ax.get_ylabel()]
    assert panels, "no labelled axes"
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    assert any(ax.get_title() for ax in fig.axes) or fig._suptitle is not None
    return panels


def test_measure_intervals_draw_a_point_per_variant_and_category_with_intervals():
    table = analysis.summarize(_results(), ["min_object"], by="category", groups=["variant"])
    fig = plotting.measure_intervals(table, "min_object")
    (ax,) = _labelled(fig)
    assert len(ax.containers) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["sd", "ae"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["animal_animal", "overall"]
    with pytest.raises(AnelabError, match="no rows for measure 'clip'"):
        plotting.measure_intervals(table, "clip")


def test_wide_summary_and_step_table_are_readable():
    table = analysis.summarize(_results(), ["min_object", "text_text"], by="category", groups=["variant"])
    wide = analysis.wide_summary(table)
    assert list(wide.index) == ["animal_animal", "overall"]
    assert list(wide.columns) == [("min_object", "sd"), ("min_object", "ae"), ("text_text", "sd"), ("text_text", "ae")]
    assert wide.loc["overall", ("min_object", "ae")].startswith("0.300 [") and wide.loc["overall", ("text_text", "sd")] == "0.500 [0.500, 0.500]"
    from anelab.analysis import guidance_stats

    rates = analysis.step_table(guidance_stats(_trace(), by=["variant"]))
    assert list(rates.index) == [("ae", "0"), ("ae", "all")] and rates.loc[("ae", "all"), "guidance_rate"] == 0.5


def test_guidance_rates_tradeoff_and_schedules_are_labelled():
    from anelab.analysis import guidance_stats

    rates = guidance_stats(_trace().query("variant == 'ae'"), by=["variant"])
    assert len(_labelled(plotting.guidance_rates(rates))) == 2
    curve = pd.DataFrame({"scale_factor": [5, 20, 80], "success_rate": [0.2, 0.6, 0.9], "min_object": [0.3, 0.3, 0.2]})
    assert len(_labelled(plotting.tradeoff(curve, "scale_factor", ["success_rate", "min_object"]))) == 2
    logged = _labelled(plotting.tradeoff(curve, "scale_factor", ["success_rate"], log_x=True))[0]
    assert logged.get_xscale() == "log" and [t.get_text() for t in logged.get_xticklabels()] == ["5", "20", "80"]
    fig = plotting.step_size_schedules({"sqrt": GuidanceConfig(), "constant": GuidanceConfig(step_schedule="constant"), "sd": None})
    (ax,) = _labelled(fig)
    assert len(ax.lines) == 2 and ax.get_legend() is not None


def test_attention_box_and_layout_arrows():
    fig = plotting.attention_box(_steered(), ["ae", "suppress"], bound=0.2)
    (ax,) = _labelled(fig)
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_xticklabels()] == ["ae", "suppress"]
    layout = analysis.layout_table(_steered(), {"left": (0.0, 0.5)})
    (ax,) = _labelled(plotting.layout_arrows(layout))
    assert ax.get_ylim() == (1.0, 0.0) and len(ax.texts) == 1  # y down as in the image; one arrow
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ae (reference)", "left (steered)", "left target"]
    with pytest.raises(AnelabError, match="no rows for variants"):
        plotting.attention_box(_steered(), ["nope"])


def test_sweep_images_reads_the_first_pairs_of_each_variant(tmp_path):
    results = _results()
    for path in results.image:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / path)
    fig = plotting.sweep_images(tmp_path, results, ["ae", "sd"], examples=2, title="same seeds")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and panels[0].get_ylabel() == "ae" and panels[1].get_title() == "a cat and a dog · seed 1"
    with pytest.raises(AnelabError, match="variant\\(s\\) \\['res16'\\] are not in these results"):
        plotting.sweep_images(tmp_path, results, ["res16"])
