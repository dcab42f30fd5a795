"""`anelab bench` on a very small workload: every comparison measured, written, and the port's result equal."""

import json
import statistics

import pytest
import torch

from anelab.bench import Workload, run_bench, table


def test_bench_measures_every_comparison_and_writes_json(tmp_path):
    """Every figure is derived from the stored runs (medians, their ratios), the port's latent matches ours,
    and the printed table shows the stored ratios."""
    results = run_bench(
        Workload("test", 128, 6, "cpu", torch.float32, max_refinement_steps=2, warmup=False),
        repeats=1,
        progress=False,
        results_dir=tmp_path,
    )
    saved = json.loads((tmp_path / "test.json").read_text())
    assert saved == results
    for key, programs in {
        "a_vs_diffusers_port": ("anelab", "diffusers_port"),
        "b_vs_plain_sd": ("sd", "ae_no_refinement", "ae_defaults", "ae_low_memory"),
        "c_batching": ("batch_of_8", "8_single_runs"),
        "d_recording": ("no_recording", "record_all"),
    }.items():
        assert saved[key]["repeats"] == 1, key
        for program in programs:
            runs = saved[key][program]["runs"]
            assert len(runs) == 1 and saved[key][program]["seconds"] == statistics.median(runs) > 0, (key, program)
            assert isinstance(saved[key][program]["peak_bytes"], int), (key, program)
    a, b, c, d = (saved[key] for key in ("a_vs_diffusers_port", "b_vs_plain_sd", "c_batching", "d_recording"))
    assert a["time_ratio"] == pytest.approx(a["anelab"]["seconds"] / a["diffusers_port"]["seconds"])
    assert b["ratio_no_refinement"] == pytest.approx(b["ae_no_refinement"]["seconds"] / b["sd"]["seconds"])
    assert b["ratio_defaults"] == pytest.approx(b["ae_defaults"]["seconds"] / b["sd"]["seconds"])
    assert c["throughput_gain"] == pytest.approx(c["8_single_runs"]["seconds"] / c["batch_of_8"]["seconds"])
    assert d["ratio"] == pytest.approx(d["record_all"]["seconds"] / d["no_recording"]["seconds"])
    assert b["sd_vs_diffusers"] == pytest.approx(b["sd"]["seconds"] / b["diffusers_sd"]["seconds"])
    assert b["ae_no_refinement_vs_diffusers"] == pytest.approx(
        b["ae_no_refinement"]["seconds"] / b["diffusers_sd"]["seconds"]
    )
    assert a["relative_latent_difference"] < 1e-4  # same work as diffusers' port: float noise only
    assert b["sd_latent_difference_vs_diffusers"] < 1e-4  # plain SD: diffusers' own pipeline, float noise only
    held = b["held_for_backward_bytes"]
    assert 0 < held["low_memory"] < held["default"]  # 16x16 is the top resolution here: its read blocks hold most
    assert b["held_ratio_low_memory"] == pytest.approx(held["low_memory"] / held["default"])
    assert b["low_memory_latent_difference"] < 1e-6  # recomputation: the same numbers
    printed = table(results)
    assert (
        printed.count("\n") == 13
        and "(a) diffusers A&E port" in printed
        and "(b) diffusers StableDiffusionPipeline" in printed
    )
    for text in (
        f"{a['time_ratio']:.2f}x the port",
        f"{b['ratio_no_refinement']:.2f}x anelab SD",
        f"{b['ratio_defaults']:.2f}x SD",
        f"{b['sd_vs_diffusers']:.2f}x diffusers",
        f"{c['throughput_gain']:.2f}x throughput",
        f"{d['ratio']:.2f}x (target <= 1.15",
        f"({b['held_ratio_low_memory']:.2f}x)",
        f"max |latent diff| {a['max_abs_latent_difference']:.2e}",
        "medians of runs (a 1, b 1, c 1, d 1)",
    ):
        assert text in printed, text


def test_bench_runs_only_the_comparisons_asked_for(tmp_path):
    from anelab import AnelabError

    with pytest.raises(AnelabError, match="comparisons must be letters of 'abcde' on the tiny workload, got 'ax'"):
        run_bench("tiny", comparisons="ax", results_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(AnelabError, match="the sd14-gpu workload needs a CUDA GPU"):
            run_bench("sd14-gpu", results_dir=tmp_path)
    results = run_bench(
        Workload("test", 128, 3, "cpu", torch.float32, max_refinement_steps=1, warmup=False),
        repeats=1,
        progress=False,
        results_dir=tmp_path,
        comparisons="d",
    )
    assert "d_recording" in results and "a_vs_diffusers_port" not in results and table(results).count("\n") == 4


def test_a_partial_run_keeps_the_other_comparisons_of_the_same_workload_only(tmp_path):
    small = Workload("test", 128, 3, "cpu", torch.float32, max_refinement_steps=1, warmup=False)
    first = run_bench(small, repeats=2, progress=False, results_dir=tmp_path, comparisons="d")
    merged = run_bench(small, repeats=1, progress=False, results_dir=tmp_path, comparisons="b")
    saved = json.loads((tmp_path / "test.json").read_text())
    assert saved == merged and list(saved) == ["workload", "device", "b_vs_plain_sd", "d_recording"]
    assert (
        saved["d_recording"] == first["d_recording"]
        and saved["d_recording"]["repeats"] == 2
        and saved["b_vs_plain_sd"]["repeats"] == 1
    )
    for program in ("no_recording", "record_all"):  # the figure is the median of the two runs
        runs = saved["d_recording"][program]["runs"]
        assert len(runs) == 2 and saved["d_recording"][program]["seconds"] == pytest.approx(sum(runs) / 2)
    assert "medians of runs (b 1, d 2)" in table(merged)
    other = run_bench(
        Workload("test", 128, 2, "cpu", torch.float32, max_refinement_steps=1, warmup=False),
        repeats=1,
        progress=False,
        results_dir=tmp_path,
        comparisons="b",
    )
    assert list(other) == ["workload", "device", "b_vs_plain_sd"]  # a different workload replaces the file


def test_the_sd14_size_pipeline_has_sd14s_sizes():
    """The GPU bench's model, built on the meta device (shapes only, no memory): SD-1.4's UNet and CLIP ViT-L sizes."""
    from anelab.testing import sd14_sized_pipeline

    pipe = sd14_sized_pipeline(device="meta", dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # SD-1.4's UNet
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder.config.num_hidden_layers == 12
    assert pipe.unet.dtype == torch.float16 and pipe.unet.device.type == "meta"


def test_bench_times_methods_at_their_official_defaults_against_plain_sd(tmp_path, capsys):
    """(e): each chosen method at its defaults (resolutions scaled to the workload's side), its ratio to plain SD
    derived from the stored medians; ``anelab bench --method`` runs it alone."""
    w = Workload("methods", 256, 4, "cpu", torch.float32, max_refinement_steps=2, warmup=False)
    results = run_bench(
        w, repeats=1, progress=False, results_dir=tmp_path, comparisons="e", methods=["syngen", "divide_and_bind"]
    )
    e = results["e_methods"]
    assert set(e["ratios"]) == {"syngen", "divide_and_bind"}
    for name, ratio in e["ratios"].items():
        assert ratio == pytest.approx(e[name]["seconds"] / e["sd"]["seconds"]) and ratio > 0
    assert e["settings"]["divide_and_bind"]["attention_res"] == 8  # 16 at 512 px is 8 at 256 px
    assert e["settings"]["divide_and_bind"]["max_refinement_steps_first"] == 2  # capped like A&E's
    assert "(e) syngen, official defaults" in table(results)
    with pytest.raises(Exception, match="unknown method"):
        run_bench(w, repeats=1, progress=False, results_dir=tmp_path, comparisons="e", methods=["dnb"])


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_bench_times_a_transformer_against_its_own_pipeline(tmp_path, name):
    work = Workload(name, 256, 3, "cpu", torch.float32, repeats=1, warmup=False)
    results = run_bench(work, comparisons="f", results_dir=tmp_path, progress=False)
    f = results["f_transformer"]
    assert f["max_abs_latent_difference_vs_diffusers"] == 0.0  # unguided sampling is the pipeline's, bit for bit
    assert f["ratio_ae_defaults"] > 0 and f["diffusers"]["seconds"] > 0
    assert "(f) anelab A&E, defaults" in table(results)
    assert json.loads((tmp_path / f"{name}.json").read_text())["f_transformer"]["sd_vs_diffusers"] > 0
    with pytest.raises(Exception, match="comparisons must be letters of 'ef' on the tiny-sd3 workload"):
        run_bench(Workload("tiny-sd3", 256, 3, "cpu", torch.float32), comparisons="a", results_dir=tmp_path)
