"""`anelab bench` on a very small workload: every comparison measured, written, and the port's result equal."""

import json

import torch

from anelab.bench import Workload, run_bench, table


def test_bench_measures_every_comparison_and_writes_json(tmp_path):
    results = run_bench(Workload("test", 128, 6, "cpu", torch.float32, max_refinement_steps=2, warmup=False), repeats=1, progress=False, results_dir=tmp_path)
    saved = json.loads((tmp_path / "test.json").read_text())
    assert saved["a_vs_diffusers_port"]["relative_latent_difference"] < 1e-4  # same work as diffusers' port (float noise)
    for key, programs in {"a_vs_diffusers_port": ("anelab", "diffusers_port"), "b_vs_plain_sd": ("sd", "ae_no_refinement", "ae_defaults"),
                          "c_batching": ("batch_of_8", "8_single_runs"), "d_recording": ("no_recording", "record_all")}.items():  # fmt: skip
        for program in programs:
            assert saved[key][program]["seconds"] > 0 and len(saved[key][program]["runs"]) == 1, (key, program)
    assert saved["b_vs_plain_sd"]["ratio_no_refinement"] > 0 and saved["d_recording"]["ratio"] > 0
    printed = table(results)
    assert "(a) diffusers A&E port" in printed and "target <= 0.5" in printed and printed.count("\n") == 11


def test_bench_runs_only_the_comparisons_asked_for(tmp_path):
    import pytest

    from anelab import AnelabError

    with pytest.raises(AnelabError, match="comparisons must be letters of 'abcd', got 'ax'"):
        run_bench("tiny", comparisons="ax", results_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(AnelabError, match="the sd14-gpu workload needs a CUDA GPU"):
            run_bench("sd14-gpu", results_dir=tmp_path)
    results = run_bench(Workload("test", 128, 3, "cpu", torch.float32, max_refinement_steps=1, warmup=False), repeats=1, progress=False,
                        results_dir=tmp_path, comparisons="d")  # fmt: skip
    assert "d_recording" in results and "a_vs_diffusers_port" not in results and table(results).count("\n") == 4


def test_a_partial_run_keeps_the_other_comparisons_of_the_same_workload_only(tmp_path):
    small = Workload("test", 128, 3, "cpu", torch.float32, max_refinement_steps=1, warmup=False)
    first = run_bench(small, repeats=2, progress=False, results_dir=tmp_path, comparisons="d")
    merged = run_bench(small, repeats=1, progress=False, results_dir=tmp_path, comparisons="b")
    saved = json.loads((tmp_path / "test.json").read_text())
    assert saved == merged and list(saved) == ["workload", "device", "b_vs_plain_sd", "d_recording"]
    assert saved["d_recording"] == first["d_recording"] and saved["d_recording"]["repeats"] == 2 and saved["b_vs_plain_sd"]["repeats"] == 1
    assert "medians of runs (b 1, d 2)" in table(merged)
    other = run_bench(Workload("test", 128, 2, "cpu", torch.float32, max_refinement_steps=1, warmup=False), repeats=1, progress=False,
                      results_dir=tmp_path, comparisons="b")  # fmt: skip
    assert list(other) == ["workload", "device", "b_vs_plain_sd"]  # a different workload replaces the file
