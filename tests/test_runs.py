"""Study files, the runner and the run store: validation, scales, shards, accelerate, SIGKILL, concurrent writers,
damaged files, reuse across studies, results."""

import json
import re
import time
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pytest
import torch
import yaml
from study_helpers import STUDY, comparable

from anelab import AnelabError
from anelab.resources import study_files
from anelab.runs import SCALES, Store, load_results, load_stats, load_study, load_trace, run_sweep, score_run
from anelab.runs.calibration import calibrated
from anelab.runs.plan import parse_shard, work_plan
from anelab.runs.runner import steered_subjects
from anelab.subjects import Subject


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


def test_study_loads_with_overrides(study_file):
    study = load_study(study_file)
    assert list(study.variants) == ["sd", "ae8", "ae4"] and study.variants["sd"] is None
    assert study.variants["ae4"].attention_res == 4 and study.variants["ae8"].thresholds == {0: 0.05, 3: 0.5}
    assert study.seeds == [0, 1, 2, 3] and study.record.resolutions == (8, 4) and not study.record.maps
    blocks = work_plan(study)
    assert len(blocks) == 3 * 2 * 2 and blocks[0].seeds == (0, 1) and blocks[1].seeds == (2, 3)
    small = load_study(study_file, prompts=1, seeds=3, steps=10)
    assert (
        len(small.prompts) == 1 and small.seeds == [0, 1, 2] and [len(b.seeds) for b in work_plan(small)][:2] == [2, 1]
    )
    assert small.variants["ae8"].thresholds == {0: 0.05, 6: 0.5} and small.variants["ae8"].max_iter_to_alter == 6
    assert small.spec_hash("tiny") != study.spec_hash("tiny") and study.spec_hash("tiny") != study.spec_hash("other")
    smoke = load_study(study_file, scale="smoke", seeds=3)  # the smoke slice, explicit overrides win
    SMOKE = SCALES["smoke"]
    assert (
        len(smoke.prompts) == 1
        and smoke.seeds == [0, 1, 2]
        and smoke.steps == SMOKE["steps"]
        and smoke.batch == SMOKE["batch"]
    )
    assert (
        smoke.variants["sd"] is None
        and smoke.variants["ae8"].max_refinement_steps == SMOKE["base"]["max_refinement_steps"]
    )
    assert smoke.size == 128  # the floor: attention_res 8 and the recorded 8 and 4 need only 64 px (side / 8)
    assert load_study("resolution", scale="smoke").size == 512 and load_study("reproduction", scale="smoke").size == 128
    quick = load_study("reproduction", scale="quick")
    assert (
        len(quick.prompts) == 12
        and quick.seeds == [0, 1, 2, 3]
        and quick.steps == 50
        and list(quick.variants) == ["sd", "ae"]
    )
    with pytest.raises(AnelabError, match="scale must be one of smoke, quick, full"):
        load_study(study_file, scale="huge")


def test_a_study_file_narrows_its_own_slices(study_file):
    text = STUDY + "smoke: {variants: [sd, ae4], prompts: 1}\nquick: {seeds: 2}\n"
    narrowed = load_study(yaml.safe_load(text), scale="smoke")
    assert list(narrowed.variants) == ["sd", "ae4"] and len(narrowed.prompts) == 1
    assert (
        load_study(yaml.safe_load(text), scale="quick").seeds == [0, 1]
        and len(load_study(yaml.safe_load(text)).seeds) == 4
    )
    with pytest.raises(AnelabError, match="smoke.variants: must list variants of this study"):
        load_study(yaml.safe_load(STUDY + "smoke: {variants: [nope]}\n"), scale="smoke")


def test_every_committed_study_file_loads():
    files = study_files()
    assert set(files) >= {"reproduction", "resolution", "timesteps", "step_size", "kernel"}
    for name, path in files.items():
        for scale in SCALES:
            study = load_study(path, scale=scale)
            assert (
                study.name == name
                and study.variants
                and len(study.prompts) > 0
                and all(study.describe(v) for v in study.variants)
            )


@pytest.mark.parametrize(
    "change, message",
    [
        (("steps: 5", "steps: 5\ncolour: red"), "colour (line 7): unknown key; allowed: name, prompts"),
        (
            ("ae4: {attention_res: 4}", "ae4: {attention_resolution: 4}"),
            "variants.ae4.attention_resolution (line 13): is not a GuidanceConfig field",
        ),
        (
            ("ae4: {attention_res: 4}", "ae4: {attention_res: -4}"),
            "variants.ae4 (line 13): attention_res must be a positive int",
        ),
        (("steps: 5", "steps: five"), "steps (line 6): must be an int >= 1, got 'five'"),
        (("size: 128", "size: 100"), "size (line 7): must be a multiple of 8"),
        (("seeds: 4", "seeds: [1, 1]"), "seeds (line 5): seeds must be distinct"),
        (
            ("record: {resolutions: [8, 4]}", "record: {resolutions: [8, 4], maps: true}"),
            "record.maps (line 14): sweeps keep token statistics only",
        ),
        (
            ("record: {resolutions: [8, 4]}", "record: {resolutions: [8, 4], dtype: fp16}"),
            "record.dtype (line 14): unknown key",
        ),
        (("seeds: 4", "seeds: 4\n  bad: [indent"), "line 6: not valid YAML"),
        (("name: mini\n", ""), "missing key 'name'"),
        (
            (
                "  - {prompt: a bird with a crown, tokens: [bird, crown]}",
                "  - {prompt: a bird with a crown, nouns: [bird]}",
            ),
            "prompts (line 2): item 1 must be",
        ),
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
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_prompt_set_and_shard_arguments_are_checked(study_file):
    with pytest.raises(AnelabError, match="prompts.categories: must be a list drawn from"):
        load_study(
            {
                "name": "x",
                "prompts": {"set": "ane", "categories": ["animals"]},
                "seeds": 1,
                "steps": 1,
                "size": 64,
                "variants": {"sd": None},
            }
        )
    assert (
        len(
            load_study(
                {
                    "name": "x",
                    "prompts": {"set": "ane", "limit": 2},
                    "seeds": 1,
                    "steps": 1,
                    "size": 64,
                    "variants": {"sd": None},
                }
            ).prompts
        )
        == 6
    )
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(AnelabError, match="--shard"):
            parse_shard(bad)


def test_two_shards_together_equal_one(study_file, tiny_pipe, tmp_path, one_thread):
    study = load_study(study_file)
    whole = run_sweep(
        study, tiny_pipe, tmp_path / "whole", model="tiny", store=tmp_path / "s1", chunk_blocks=3, progress=False
    )
    assert whole["images"] == 24 and whole["already"] == 0 and whole["writes"] == 4
    for index in (1, 0):
        run_sweep(
            study,
            tiny_pipe,
            tmp_path / "sharded",
            model="tiny",
            store=tmp_path / "s2",
            shard=(index, 2),
            progress=False,
        )
    rows, images = comparable(tmp_path / "whole")
    rows2, images2 = comparable(tmp_path / "sharded")
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2 and len(images) == 24
    pd.testing.assert_frame_equal(
        *(
            load_trace(d).sort_values(["variant", "prompt", "seed", "step", "token"], ignore_index=True)
            for d in (tmp_path / "whole", tmp_path / "sharded")
        )
    )
    again = run_sweep(study, tiny_pipe, tmp_path / "whole", model="tiny", store=tmp_path / "s1", progress=False)
    assert again["images"] == 0 and again["already"] == 24  # nothing left to do


def test_results_rows_trace_statistics_and_scores(study_file, tiny_pipe, tmp_path):
    from anelab.metrics import Scorers

    out = tmp_path / "out"
    run_sweep(load_study(study_file), tiny_pipe, out, model="tiny", store=tmp_path / "store", progress=False)
    rows = load_results(out)
    assert (
        list(rows.variant.unique()) == ["sd", "ae8", "ae4"]
        and len(rows) == 24
        and rows.image.map(lambda p: Path(p).is_file()).all()
    )
    assert (rows[rows.variant == "sd"][["pairs", "triggered", "refinement_rounds"]] == 0).all().all()
    guided = rows[rows.variant != "sd"]
    assert (guided.pairs == 2).all() and (guided.reached <= guided.triggered).all() and (rows.seconds > 0).all()
    trace, stats = load_trace(out), load_stats(out)
    per_image = (
        trace[trace.threshold.notna()]
        .drop_duplicates(["variant", "prompt", "seed", "step"])
        .groupby(["variant", "prompt", "seed"])
        .refinement_iterations.sum()
    )
    assert per_image.to_dict() == guided.set_index(["variant", "prompt", "seed"]).refinement_rounds.to_dict()
    assert len(stats) == 24 * 6 * 2 * 2 and set(stats.res) == {8, 4}  # images x iterations x resolutions x tokens
    narrow = load_stats(
        out, columns=["res", "max_attention"], filter=pc.field("res") == 8
    )  # read only what is asked for
    assert (
        set(narrow.columns) == {"variant", "category", "key", "res", "max_attention"} and len(narrow) == len(stats) // 2
    )
    done = score_run(out, Scorers("tiny", "tiny", "tiny"), progress=False)
    assert {k: c["scored"] for k, c in done["counts"].items()} == {
        "clip": 24,
        "binding": 24,
        "blip": 24,
        "detector": 24,
    }
    scored = load_results(out)
    assert scored.full_prompt.notna().all() and scored.text_text.notna().all() and len(scored) == 24
    assert set(scored.all_present.dropna()) <= {0.0, 1.0} and scored.present_0.notna().all()
    again = score_run(out, Scorers("tiny", "tiny", "tiny"), progress=False)
    assert {k: c["scored"] for k, c in again["counts"].items()} == {"clip": 0, "binding": 0, "blip": 0, "detector": 0}


def test_a_second_study_of_the_same_images_generates_none_of_them(study_file, tiny_pipe, tmp_path):
    store = Store(tmp_path / "store")
    first_study = load_study(study_file)
    start = time.perf_counter()
    first = run_sweep(first_study, tiny_pipe, tmp_path / "first", model="tiny", store=store, progress=False)
    first_seconds = time.perf_counter() - start
    renamed = yaml.safe_load(STUDY)
    renamed["name"] = "mini_again"
    renamed["variants"] = {"plain": None, "guided_at_8": {}}  # the same variants under other names
    start = time.perf_counter()
    second = run_sweep(load_study(renamed), tiny_pipe, tmp_path / "second", model="tiny", store=store, progress=False)
    second_seconds = time.perf_counter() - start
    assert first["images"] == 24 and second["images"] == 0 and second["already"] == 16
    assert second_seconds < 0.3 * first_seconds, (first_seconds, second_seconds)
    a, b = load_results(tmp_path / "first"), load_results(tmp_path / "second")
    for mine, theirs in (("sd", "plain"), ("ae8", "guided_at_8")):
        x, y = (t[t.variant == v].reset_index(drop=True) for t, v in ((a, mine), (b, theirs)))
        assert [Path(p).read_bytes() for p in x.image] == [Path(p).read_bytes() for p in y.image] and list(
            x.key
        ) == list(y.key)
    other_seeds = run_sweep(
        load_study(study_file, seeds=3), tiny_pipe, tmp_path / "third", model="tiny", store=store, progress=False
    )
    assert (
        other_seeds["images"] == 6
    )  # seed 2 alone is a new batch (the batch is part of the key); seeds 0-1 are reused


def test_a_view_can_be_rewritten_with_another_spec_and_loses_nothing(study_file, tiny_pipe, tmp_path, notes):
    store, out = tmp_path / "store", tmp_path / "out"
    run_sweep(load_study(study_file, seeds=2), tiny_pipe, out, model="tiny", store=store, progress=False)
    run_sweep(load_study(study_file, seeds=4), tiny_pipe, out, model="tiny", store=store, progress=False)
    assert "it now shows this one" in notes.text and len(load_results(out)) == 24
    run_sweep(load_study(study_file, seeds=2), tiny_pipe, out, model="tiny", store=store, progress=False)
    assert len(load_results(out)) == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnelabError, match="is not empty and is not a run store"):
        run_sweep(load_study(study_file), tiny_pipe, out, model="tiny", store=tmp_path / "other", progress=False)
    bad = load_study(study_file).__class__(**{**vars(load_study(study_file)), "steps": 2})
    with pytest.raises(
        AnelabError, match="variant 'ae8', prompt 'a cat and a dog': threshold steps \\[3\\] are beyond the schedule"
    ):
        run_sweep(bad, tiny_pipe, tmp_path / "new", model="tiny", store=store, progress=False)
    assert not (tmp_path / "new").exists()


def test_a_damaged_table_file_is_moved_aside_and_its_images_made_again(study_file, tiny_pipe, tmp_path):
    store, out = Store(tmp_path / "store"), tmp_path / "out"
    study = load_study(study_file)
    run_sweep(study, tiny_pipe, out, model="tiny", store=store, chunk_blocks=2, progress=False)
    reference, images = comparable(out)
    rows_files = sorted((store.root / "tables" / "rows").glob("*.parquet"))
    victim = rows_files[1]
    victim.write_bytes(
        victim.read_bytes()[: victim.stat().st_size // 2]
    )  # cut short, as a full disk or a kill of a copy would
    with pytest.warns(UserWarning, match=f"damaged store file .*{victim.name}.*moved to"):
        assert len(load_results(out)) == 20  # the lost block's rows are gone, the rest reads
    again = run_sweep(study, tiny_pipe, out, model="tiny", store=store, progress=False)
    assert again["images"] == 4  # the two blocks of that write, made again
    rows, images2 = comparable(out)
    pd.testing.assert_frame_equal(reference.drop(columns="key"), rows.drop(columns="key"))
    assert images == images2 and (store.root / "quarantine" / f"rows-{victim.name}").exists()


def test_study_steering_by_subject_index():
    study = load_study("suppression")
    assert study.steering["suppress_second"] == {"excite": [0], "suppress": [1]} and "sd" not in study.steering
    subjects, config = (("cat", ()), ("dog", ())), study.variants["ae"]
    assert steered_subjects(subjects, {}, config) == (Subject("cat"), Subject("dog"))
    assert steered_subjects(subjects, study.steering["suppress_only"], config) == (Subject("dog", role="suppress"),)
    first_left = steered_subjects(subjects, study.steering["first_left"], config)
    assert first_left[0] == Subject("cat", target=(0.2, 0.5)) and first_left[1] == Subject("dog")
    assert steered_subjects(subjects, {"suppress": [1]}, None) == (Subject("cat"),)  # plain SD takes no steering
    with pytest.raises(AnelabError, match="subject index \\[2\\] out of range for subjects \\['cat', 'dog'\\]"):
        steered_subjects(subjects, {"layout": {2: [0.5, 0.5]}}, config)


def test_a_calibrated_study_takes_its_thresholds_from_the_sources_plain_sd_statistics(study_file, tiny_pipe, tmp_path):
    """calibrate: {from: <study>, ...} runs the source's plain SD into the store (once), then guides with its quantiles."""
    from anelab.analysis import calibrate_thresholds

    store = Store(tmp_path / "store")
    dependent = load_study(
        {
            "name": "mini_calibrated",
            "prompts": yaml.safe_load(STUDY)["prompts"],
            "seeds": 4,
            "steps": 5,
            "size": 128,
            "batch": 2,
            "base": {"thresholds": {0: 0.05, 3: 0.5}, "max_iter_to_alter": 3},
            "variants": {"at4": {"attention_res": 4}},
            "calibrate": {"from": str(study_file), "variant": "sd", "quantile": 0.5, "variants": ["at4"]},
        }
    )
    with pytest.raises(AnelabError, match="takes thresholds calibrated from .*: resolve them first"):
        run_sweep(dependent, tiny_pipe, tmp_path / "dep", model="tiny", store=store, progress=False)
    resolved = calibrated(dependent, tiny_pipe, store=store, model="tiny", progress=False)
    summary = run_sweep(resolved, tiny_pipe, tmp_path / "dep", model="tiny", store=store, progress=False)
    assert (
        summary["images"] == 8
    )  # the calibrated variant; the source's 8 plain-SD images went in first, without a view
    source = run_sweep(load_study(study_file), tiny_pipe, tmp_path / "src", model="tiny", store=store, progress=False)
    assert source["already"] == 8 and source["images"] == 16  # its SD images were already made by the calibration
    stats = load_stats(tmp_path / "src").query("variant == 'sd'")
    expected = calibrate_thresholds(stats, 4, [0, 3], 0.5)
    from anelab.runs import load_view

    used = load_view(tmp_path / "dep")[0]["study"]["calibrate"]["thresholds"]["at4"]
    assert {int(k): v for k, v in used.items()} == pytest.approx(expected, abs=1e-6) and load_results(
        tmp_path / "dep"
    ).variant.unique().tolist() == ["at4"]


def test_a_calibration_source_follows_the_runs_overrides_and_is_read_beside_the_study_file(
    study_file, tiny_pipe, tmp_path
):
    """A 2-seed, 3-step run of a calibrated study makes its plain-SD source at 2 seeds and 3 steps too, not at the
    source file's own; a relative ``from`` is the file beside the calibrated study's."""
    store = Store(tmp_path / "store")
    dependent = tmp_path / "dependent.yaml"
    dependent.write_text(
        STUDY.replace("name: mini", "name: dependent")
        + "calibrate: {from: mini.yaml, variant: sd, quantile: 0.5, variants: [ae8]}\n"
    )
    study = load_study(dependent, seeds=2, steps=3)
    resolved = calibrated(study, tiny_pipe, store=store, model="tiny", progress=False)
    rows = store.latest_rows(columns=["identity"])
    made = [json.loads(i) for i in rows.identity]
    assert len(made) == 2 * 2 and {i["steps"] for i in made} == {3}  # the source: 2 prompts x 2 seeds, 3 steps
    assert resolved.calibrate["thresholds"]["ae8"]
