"""The tables and figures the notebooks show, on hand-made results, traces and statistics."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anelab import AnelabError, GuidanceConfig, analysis, plotting
from anelab.runs import load_study
from anelab.runs.calibration import calibrated_study


def _results():
    """Two variants x two images; similarities chosen so the means are easy to check."""
    return pd.DataFrame(
        {
            "variant": ["sd", "sd", "ae", "ae"],
            "prompt": ["a cat and a dog"] * 4,
            "category": ["animal_animal"] * 4,
            "seed": [0, 1, 0, 1],
            "tokens": ["cat,dog"] * 4,
            "seconds": [1.0, 3.0, 4.0, 6.0],
            "image": [f"images/{v}/a cat and a dog/{s}.png" for v, s in (("sd", 0), ("sd", 1), ("ae", 0), ("ae", 1))],
            "full_prompt": [0.2, 0.4, 0.3, 0.5],
            "min_object": [0.1, 0.3, 0.2, 0.4],
            "text_text": [0.5, 0.5, 0.6, 0.6],
            "first_half": [0.2, 0.2, 0.3, 0.3],
            "second_half": [0.1, 0.3, 0.2, 0.2],
        }
    )


def _trace():
    """A&E: seed 0 triggered at step 0 and reached after 2 rounds; seed 1 never triggered. SD has no thresholds."""
    rows = []
    for seed, triggered, rounds in ((0, True, 2), (1, False, 0)):
        for token in ("cat", "dog"):
            rows.append(
                dict(
                    variant="ae",
                    prompt="a cat and a dog",
                    seed=seed,
                    step=0,
                    token=token,
                    threshold=0.05,
                    triggered=triggered,
                    reached=True,
                    refinement_iterations=rounds,
                )
            )
            rows.append(
                dict(
                    variant="sd",
                    prompt="a cat and a dog",
                    seed=seed,
                    step=0,
                    token=token,
                    threshold=np.nan,
                    triggered=False,
                    reached=pd.NA,
                    refinement_iterations=0,
                )
            )
    frame = pd.DataFrame(rows)
    frame["reached"] = frame.reached.astype("boolean")
    return frame


def _steered():
    """Per-image statistics of one subject (what steered_subject returns)."""
    return pd.DataFrame(
        {
            "variant": ["ae", "ae", "left", "left", "suppress", "suppress"],
            "prompt": ["a cat and a dog"] * 6,
            "seed": [0, 1] * 3,
            "max_attention": [0.6, 0.4, 0.5, 0.5, 0.1, 0.3],
            "centroid_x": [0.5, 0.7, 0.3, 0.1, 0.5, 0.5],
            "centroid_y": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        }
    )


def test_variant_table_puts_efficiency_next_to_similarity_in_sweep_order():
    table = analysis.variant_table(_results(), _trace())
    assert list(table.index) == ["sd", "ae"]
    assert (
        table.loc["ae", "guidance_rate"] == 0.5
        and table.loc["ae", "success_rate"] == 1.0
        and table.loc["ae", "mean_refinement_rounds"] == 1.0
    )
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
    assert layout.loc["reference", "distance"] == pytest.approx(0.6) and layout.loc[
        "steered", "distance"
    ] == pytest.approx(0.2)
    assert layout.loc["steered", "centroid_x"] == pytest.approx(0.2) and layout.loc["steered", "target_x"] == 0.0
    with pytest.raises(AnelabError, match="variant\\(s\\) \\['up'\\] are not in these statistics"):
        analysis.layout_table(_steered(), {"up": (0.5, 0.0)})


def test_calibrated_study_guides_each_resolution_with_its_own_quantiles():
    study = load_study("resolution", prompts=1, seeds=2)
    stats = []
    for seed, low in enumerate((0.1, 0.3)):  # lower subject at 32: 0.1 and 0.3 at every threshold step
        for step in (0, 10, 20):
            for token, value in (("cat", low), ("dog", 0.9)):
                stats.append(
                    dict(
                        prompt="a cat and a dog",
                        seed=seed,
                        step=step,
                        timestep=1000 - 20 * step,
                        res=32,
                        token=token,
                        subject=True,
                        max_attention=value,
                    )
                )
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
    assert (
        wide.loc["overall", ("min_object", "ae")].startswith("0.300 [")
        and wide.loc["overall", ("text_text", "sd")] == "0.500 [0.500, 0.500]"
    )
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
    fig = plotting.step_size_schedules(
        {"sqrt": GuidanceConfig(), "constant": GuidanceConfig(step_schedule="constant"), "sd": None}
    )
    (ax,) = _labelled(fig)
    assert len(ax.lines) == 4 and ax.get_legend() is not None  # a curve and its threshold-step dots per schedule
    assert [len(line.get_xdata()) for line in ax.lines[1::2]] == [3, 3]  # dots at 0, 10, 20


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


def test_sweep_images_shows_each_variant_with_scores_and_marks(tmp_path):
    results = _results()
    results["image"] = [str(tmp_path / p) for p in results.image]
    for path in results.image:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    results["min_object"] = 0.25
    fig = plotting.sweep_images(results, ["ae", "sd"], examples=2, title="same seeds", marks={"ae": (0.8, 0.5)})
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and panels[0].get_ylabel() == "ae" and panels[1].get_title() == "a cat and a dog · seed 1"
    assert (
        panels[0].get_xlabel() == "min_object 0.25" and len(panels[0].lines) == 1 and not panels[2].lines
    )  # the target marked on ae only
    chosen = plotting.sweep_images(results, ["sd"], examples=[("a cat and a dog", 1)])
    assert [ax.get_title() for ax in chosen.axes if ax.images] == ["a cat and a dog · seed 1"]
    with pytest.raises(AnelabError, match="variant\\(s\\) \\['res16'\\] are not in these results"):
        plotting.sweep_images(results, ["res16"])


def test_paired_differences_pair_by_seed_and_read_plainly():
    results = _results()
    differences = analysis.paired_differences(results, ["min_object", "text_text"], baseline="sd")
    overall = differences.query("category == 'overall'").set_index("measure")
    assert overall.loc["min_object", "difference"] == pytest.approx(0.1) and overall.loc["min_object", "n"] == 2
    assert overall.loc["min_object", "ci_low"] == pytest.approx(0.1) and overall.loc[
        "min_object", "relative"
    ] == pytest.approx(0.5)
    assert overall.loc["text_text", "difference"] == pytest.approx(0.1)
    table = analysis.difference_table(differences)
    assert table.loc[("ae", "overall"), "min_object"] == "+0.100 [+0.100, +0.100] (+50.0%)"
    reading = analysis.reading_of_differences(differences)
    assert (
        "ae, min_object: +0.1000" in reading
        and "**higher** than plain SD" in reading
        and "resolved in animal_animal" in reading
    )
    noisy = results.assign(min_object=[0.1, 0.3, 0.3, 0.2])  # +0.2 and -0.1: not resolved
    assert "not resolved" in analysis.reading_of_differences(analysis.paired_differences(noisy, ["min_object"]))
    with pytest.raises(AnelabError, match="baseline variant 'none'"):
        analysis.paired_differences(results, ["min_object"], baseline="none")


def test_seconds_split_by_refinement_and_orderings():
    results = _results().assign(refinement_rounds=[0, 0, 3, 0])
    table = analysis.seconds_table(results)
    assert (
        table.loc["ae", "with_refinement"] == 4.0
        and table.loc["ae", "without_refinement"] == 6.0
        and table.loc["sd", "images_with"] == 0
    )
    assert analysis.ordering(pd.Series({"sd": 0.2, "res16": 0.4, "res8": 0.3, "res64": np.nan})) == "res16 > res8 > sd"


def test_rates_carry_wilson_intervals_and_their_n():
    low, high = analysis.rate_interval([0, 5, 10], [10, 10, 10])
    assert low[0] == 0 and 0.2 < high[0] < 0.35 and low[1] < 0.5 < high[1] and high[2] == pytest.approx(1.0)
    rates = analysis.guidance_stats(_trace().query("variant == 'ae'"))
    row = rates[rates.step.isna()].iloc[0]
    assert (
        row.pairs == 2
        and row.triggered == 1
        and row.succeeded == 1
        and row.guidance_rate_low < 0.5 < row.guidance_rate_high
    )
    fig = plotting.guidance_rates(
        analysis.guidance_stats(_trace().query("variant == 'ae'"), by=["variant"]), max_step=20
    )
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == ["n=1"] and fig.axes[0].get_xlim()[1] >= 20


def test_published_figures_sit_beside_the_measured_ones():
    reference = analysis.published("03_timesteps")
    assert {"guidance_rate", "success_rate", "mean_refinement_rounds"} <= set(
        reference.measure
    ) and reference.source_text.str.len().gt(10).all()
    measured = pd.DataFrame(
        [
            {
                "variant": "default",
                "category": "overall",
                "measure": "guidance_rate",
                "value": 0.04,
                "ci_low": 0.03,
                "ci_high": 0.05,
            },
            {
                "variant": "default",
                "category": "overall",
                "measure": "success_rate",
                "value": 0.5,
                "ci_low": 0.4,
                "ci_high": 0.6,
            },
            {"variant": "high_early", "category": "overall", "measure": "mean_refinement_rounds", "value": 0.25},
        ]
    )
    table = analysis.beside_published(measured, "03_timesteps").set_index(["variant", "measure"])
    assert table.loc[("default", "guidance_rate"), "verdict"] == "agrees (inside the 95% CI)"
    assert (
        table.loc[("default", "success_rate"), "verdict"] == "lower than published"
        and table.loc[("default", "success_rate"), "published"] == 0.958
    )
    assert table.loc[("high_early", "mean_refinement_rounds"), "verdict"] == "agrees (within 10%)"
    assert table.loc[("strong_at_0", "guidance_rate"), "verdict"] == "not measured"


def test_suppression_and_layout_use_the_detected_objects():
    results = _results().assign(
        variant=["ae", "ae", "suppress", "suppress"],
        present_0=[1.0, 1.0, 1.0, 0.0],
        present_1=[1.0, 1.0, 0.0, 0.0],
        center_x_0=[0.5, 0.6, 0.2, np.nan],
        center_y_0=[0.5] * 4,
    )
    table = analysis.suppression_table(_steered().query("variant != 'left'"), results, subject=1, bound=0.2)
    assert (
        table.loc["suppress", "suppressed_absent_other_present"] == 0.5
        and table.loc["ae", "suppressed_absent_other_present"] == 0.0
    )
    assert table.loc["suppress", "images_judged"] == 2
    layout = analysis.layout_table(
        _steered().replace({"variant": {"suppress": "left2"}}),
        {"left": (0.1, 0.5)},
        results=results.replace({"variant": {"suppress": "left"}}),
    )
    steered = layout.set_index("run").loc["steered"]
    assert (
        steered.object_distance == pytest.approx(0.1)
        and steered.object_found == 0.5
        and steered.distance == pytest.approx(0.1)
    )


def test_trend_panels_cross_resolution_curves_and_paired_intervals():
    stats = []
    for variant, lift in (("sd", 0.0), ("res16", 0.2)):
        for seed in (0, 1):
            for step in (0, 1, 2):
                for res in (16, 32):
                    for token, value in (("cat", 0.3 + lift * (res == 16)), ("dog", 0.8)):
                        stats.append(
                            dict(
                                variant=variant,
                                prompt="a cat and a dog",
                                seed=seed,
                                step=step,
                                timestep=900 - step,
                                res=res,
                                token=token,
                                subject=True,
                                max_attention=value,
                            )
                        )
    stats = pd.DataFrame(stats)
    effect = analysis.cross_resolution_by_step(stats)
    assert set(effect.variant) == {"res16"} and effect.query("res == 16").difference.tolist() == pytest.approx(
        [0.2] * 3
    )
    assert effect.query("res == 32").difference.tolist() == pytest.approx([0.0] * 3)
    fig = plotting.cross_resolution_curves(effect)
    assert len(fig.axes[0].lines) == 3  # two resolutions and the zero line
    runs = {"SD": stats.query("variant == 'sd'"), "A&E@16": stats.query("variant == 'res16'")}
    trends = plotting.attention_trends(runs, quantiles=(0.1, 0.5), thresholds={"A&E@16": {0: 0.05, 2: 0.8}})
    panels = [ax for ax in trends.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "SD · resolution 32",
        "SD · resolution 16",
        "A&E@16 · resolution 32",
        "A&E@16 · resolution 16",
    ]
    assert all(ax.collections for ax in panels)  # the quantile bands
    differences = analysis.paired_differences(_results(), ["min_object"])
    paired = plotting.paired_intervals(differences, "min_object")
    assert "difference from plain SD" in paired.axes[0].get_title()
