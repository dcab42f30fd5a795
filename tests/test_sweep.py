"""Study files and the sweep runner: validation, resume after SIGKILL, shards, accelerate, provenance, results."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from anelab import AnelabError
from anelab.study import SMOKE, STUDY_DIR, load_study
from anelab.sweep import _read_chunks, load_results, load_stats, load_trace, parse_shard, run_sweep, steering_arguments, work_plan

STUDY = """\
name: mini
prompts:
  - {prompt: a cat and a dog, tokens: [cat, dog]}
  - {prompt: a bird with a crown, tokens: [bird, crown]}
seeds: 4
steps: 5
size: 128
batch: 2
base: {attention_res: 8, thresholds: {0: 0.05, 3: 0.5}, max_iter_to_alter: 3}
variants:
  sd: null
  ae8: {}
  ae4: {attention_res: 4}
record: {resolutions: [8, 4]}
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


@pytest.fixture()
def study_file(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(STUDY)
    return path


@pytest.fixture()
def one_thread():
    """Sweeps compared bit for bit run with the same thread count as the subprocesses (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _comparable(out):
    rows = load_results(out).drop(columns="seconds")
    images = {p: (Path(out) / p).read_bytes() for p in rows.image}
    return rows, images


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "anelab", *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_study_loads_with_overrides(study_file):
    study = load_study(study_file)
    assert list(study.variants) == ["sd", "ae8", "ae4"] and study.variants["sd"] is None
    assert study.variants["ae4"].attention_res == 4 and study.variants["ae8"].thresholds == {0: 0.05, 3: 0.5}
    assert study.seeds == [0, 1, 2, 3] and study.record.resolutions == (8, 4) and not study.record.maps
    blocks = work_plan(study)
    assert len(blocks) == 3 * 2 * 2 and blocks[0].seeds == (0, 1) and blocks[1].seeds == (2, 3)
    small = load_study(study_file, prompts=1, seeds=3, steps=10)
    assert len(small.prompts) == 1 and small.seeds == [0, 1, 2] and [len(b.seeds) for b in work_plan(small)][:2] == [2, 1]
    assert small.variants["ae8"].thresholds == {0: 0.05, 6: 0.5} and small.variants["ae8"].max_iter_to_alter == 6
    assert small.spec_hash("tiny") != study.spec_hash("tiny") and study.spec_hash("tiny") != study.spec_hash("other")
    smoke = load_study(study_file, smoke=True, seeds=3)  # the smoke slice, explicit overrides win
    assert len(smoke.prompts) == 1 and smoke.seeds == [0, 1, 2] and smoke.steps == SMOKE["steps"] and smoke.batch == SMOKE["batch"]
    assert smoke.variants["sd"] is None and smoke.variants["ae8"].max_refinement_steps == SMOKE["base"]["max_refinement_steps"]
    assert smoke.size == 128  # the floor: attention_res 8 and the recorded 8 and 4 need only 64 px (side / 8)
    assert load_study("resolution", smoke=True).size == 512 and load_study("reproduction", smoke=True).size == 128


def test_every_committed_study_file_loads():
    files = sorted(STUDY_DIR.glob("*.yaml"))
    assert {p.stem for p in files} >= {"reproduction", "resolution", "timesteps", "step_size", "kernel"}
    for path in files:
        study = load_study(path)
        assert study.name == path.stem and study.variants and len(study.prompts) > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (("steps: 5", "steps: 5\ncolour: red"), "colour (line 7): unknown key; allowed: name, prompts"),
        (("ae4: {attention_res: 4}", "ae4: {attention_resolution: 4}"), "variants.ae4.attention_resolution (line 13): is not a GuidanceConfig field"),
        (("ae4: {attention_res: 4}", "ae4: {attention_res: -4}"), "variants.ae4 (line 13): attention_res must be a positive int"),
        (("steps: 5", "steps: five"), "steps (line 6): must be an int >= 1, got 'five'"),
        (("size: 128", "size: 100"), "size (line 7): must be a multiple of 8"),
        (("seeds: 4", "seeds: [1, 1]"), "seeds (line 5): seeds must be distinct"),
        (("record: {resolutions: [8, 4]}", "record: {resolutions: [8, 4], maps: true}"), "record.maps (line 14): sweeps keep token statistics only"),
        (("record: {resolutions: [8, 4]}", "record: {resolutions: [8, 4], dtype: fp16}"), "record.dtype (line 14): unknown key"),
        (("seeds: 4", "seeds: 4\n  bad: [indent"), "line 6: not valid YAML"),
        (("name: mini\n", ""), "missing key 'name'"),
        (("  - {prompt: a bird with a crown, tokens: [bird, crown]}", "  - {prompt: a bird with a crown, subjects: [bird]}"), "prompts (line 2): item 1 must be"),
        (("base: {attention_res: 8,", "base: {colour: 8,"), "base.colour (line 9): is not a GuidanceConfig field"),
    ],
)
def test_malformed_study_files_fail_with_the_key_and_line_and_write_nothing(tmp_path, change, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(STUDY.replace(*change))
    with pytest.raises(AnelabError, match=re.escape(message)):
        load_study(path)
    from anelab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_prompt_set_and_shard_arguments_are_checked(study_file):
    with pytest.raises(AnelabError, match="prompts.categories: must be a list drawn from"):
        load_study({"name": "x", "prompts": {"set": "ane", "categories": ["animals"]}, "seeds": 1, "steps": 1, "size": 64, "variants": {"sd": None}})
    assert len(load_study({"name": "x", "prompts": {"set": "ane", "limit": 2}, "seeds": 1, "steps": 1, "size": 64, "variants": {"sd": None}}).prompts) == 6
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(AnelabError, match="--shard"):
            parse_shard(bad)


def test_two_shards_together_equal_one(study_file, tiny_pipe, tmp_path, one_thread):
    study = load_study(study_file)
    whole = run_sweep(study, tiny_pipe, tmp_path / "whole", model="tiny", chunk_blocks=3, progress=False)
    assert whole["images"] == 24 and whole["already"] == 0 and whole["chunks"] == 4
    for index in (1, 0):
        run_sweep(study, tiny_pipe, tmp_path / "sharded", model="tiny", shard=(index, 2), progress=False)
    rows, images = _comparable(tmp_path / "whole")
    rows2, images2 = _comparable(tmp_path / "sharded")
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2 and len(images) == 24
    pd.testing.assert_frame_equal(*(load_trace(d).sort_values(["variant", "prompt", "seed", "step", "token"], ignore_index=True)
                                    for d in (tmp_path / "whole", tmp_path / "sharded")))  # fmt: skip
    again = run_sweep(study, tiny_pipe, tmp_path / "whole", model="tiny", progress=False)
    assert again["images"] == 0 and again["already"] == 24  # nothing left to do


def test_results_rows_trace_and_statistics(study_file, tiny_pipe, tmp_path):
    study = load_study(study_file)
    out = tmp_path / "out"
    run_sweep(study, tiny_pipe, out, model="tiny", progress=False)
    rows = load_results(out)
    assert list(rows.variant.unique()) == ["sd", "ae8", "ae4"] and len(rows) == 24
    assert (rows[rows.variant == "sd"][["pairs", "triggered", "refinement_rounds"]] == 0).all().all()
    guided = rows[rows.variant != "sd"]
    assert (guided.pairs == 2).all() and (guided.reached <= guided.triggered).all() and (rows.seconds > 0).all()
    trace, stats = load_trace(out), load_stats(out)
    per_image = trace[trace.threshold.notna()].drop_duplicates(["variant", "prompt", "seed", "step"]).groupby(["variant", "prompt", "seed"]).refinement_iterations.sum()
    assert per_image.to_dict() == guided.set_index(["variant", "prompt", "seed"]).refinement_rounds.to_dict()
    assert len(stats) == 24 * 6 * 2 * 2 and set(stats.res) == {8, 4}  # images x iterations x resolutions x tokens
    from anelab.metrics import score_folder

    score_folder(out, "tiny", None, progress=False)
    scored = load_results(out)
    assert scored.full_prompt.notna().all() and len(scored) == 24


def test_a_different_spec_is_refused_and_nothing_is_written(study_file, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    run_sweep(load_study(study_file, seeds=2), tiny_pipe, out, model="tiny", progress=False)
    chunks = sorted((out / "chunks").iterdir())
    with pytest.raises(AnelabError, match="holds a different sweep \\(its seeds differ: seeds was \\[0, 1\\]\\).*--force"):
        run_sweep(load_study(study_file, seeds=3), tiny_pipe, out, model="tiny", progress=False)
    with pytest.raises(AnelabError, match="model 'tiny' there, 'other' now"):
        run_sweep(load_study(study_file, seeds=2), tiny_pipe, out, model="other", progress=False)
    assert sorted((out / "chunks").iterdir()) == chunks
    forced = run_sweep(load_study(study_file, seeds=3), tiny_pipe, out, model="tiny", force=True, progress=False)
    assert forced["images"] == 6  # the new seed-block only (blocks of 2: seed 2 alone)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnelabError, match="not empty and is not a sweep directory"):
        run_sweep(load_study(study_file), tiny_pipe, tmp_path / "other", model="tiny", progress=False)
    with pytest.raises(AnelabError, match="variant 'ae8': threshold steps \\[3\\] are beyond the schedule"):
        run_sweep(load_study(study_file).__class__(**{**vars(load_study(study_file)), "steps": 2}), tiny_pipe, tmp_path / "new", model="tiny", progress=False)
    assert not (tmp_path / "new").exists()


def test_sweep_killed_at_random_moments_then_resumed_equals_an_uninterrupted_one(study_file, tmp_path):
    reference = _cli("sweep", study_file, "--out", tmp_path / "reference", "--chunk", "1")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    rng = random.Random(7)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(4):
        process = _cli("sweep", study_file, "--out", out, "--chunk", "1")
        chunks_before = len(list((out / "chunks").glob("*.rows.parquet"))) if (out / "chunks").exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:  # wait for this run to be generating
            if len(list((out / "chunks").glob("*.rows.parquet"))) > chunks_before if (out / "chunks").exists() else False:
                break
            time.sleep(0.05)
        time.sleep(0.0 if attempt == 0 else rng.uniform(0.0, 1.2))  # the first run is killed while it has most of its work left
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    final = _cli("sweep", study_file, "--out", out, "--chunk", "1")
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    assert kills >= 1  # later runs may finish before their random moment comes: how many are killed depends on the machine
    rows, images = _comparable(tmp_path / "reference")
    rows2, images2 = _comparable(out)
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2
    raw = _read_chunks(out, "rows")
    assert len(raw) == 24 and not raw.duplicated(["variant", "prompt", "seed"]).any()  # no row lost, none twice
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # a killed write may leave its temporary file,
    assert all(p.name.startswith(".") for p in leftovers)  # hidden, and never read as a result or an image
    trace = load_trace(out)
    assert not trace.duplicated(["variant", "prompt", "seed", "step", "token"]).any()


def test_two_accelerate_processes_equal_one(study_file, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    single = _cli("sweep", study_file, "--out", tmp_path / "single")
    assert single.wait(timeout=300) == 0
    launch = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "anelab", "sweep", str(study_file), "--out", str(tmp_path / "multi")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-2000:]
    assert launch.stdout.count("12 image(s) made") == 2  # each process made its half
    rows, images = _comparable(tmp_path / "single")
    rows2, images2 = _comparable(tmp_path / "multi")
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2


def test_study_steering_by_subject_index():
    study = load_study("suppression")
    assert study.steering["suppress_second"] == {"excite": [0], "suppress": [1]} and "sd" not in study.steering
    subjects, config = ("cat", "dog"), study.variants["ae"]
    assert steering_arguments(subjects, {}, config) == {"tokens": ["cat", "dog"], "suppress": [], "layout": {}}
    assert steering_arguments(subjects, study.steering["suppress_only"], config) == {"tokens": [], "suppress": ["dog"], "layout": {}}
    assert steering_arguments(subjects, study.steering["first_left"], config)["layout"] == {"cat": (0.2, 0.5)}
    assert steering_arguments(subjects, {}, None) == {"tokens": ["cat", "dog"]}  # plain SD takes no steering
    with pytest.raises(AnelabError, match="subject index \\[2\\] out of range for subjects \\['cat', 'dog'\\]"):
        steering_arguments(subjects, {"layout": {2: [0.5, 0.5]}}, config)
