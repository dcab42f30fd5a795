"""The run store under several processes: SIGKILL at random moments and in the middle of a write, two writers
at once, accelerate processes. (Separate from test_runs.py so that `make test` runs the two files side by side.)"""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from study_helpers import ENV, STUDY, cli, comparable

from anelab.runs import Store, load_results, load_trace

IMAGES = 16


@pytest.fixture()
def study_file(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(STUDY.replace("  ae4: {attention_res: 4}\n", "").replace("[8, 4]", "[8]"))
    return path


def test_a_kill_during_a_store_write_leaves_no_half_entry(study_file, tmp_path):
    """SIGKILL between a write's trace and its rows: the entry is invisible, and the rerun makes it."""
    store, out = tmp_path / "store", tmp_path / "out"
    script = f"""
import os, signal
from anelab.runs.store import Store
original = Store.write
def write(self, rows, trace, stats):
    if len(list((self.root / "tables" / "rows").glob("*.parquet"))) == 2:  # the third write dies halfway
        original_parquet = __import__("anelab.runs.store", fromlist=["write_parquet"]).write_parquet
        original_parquet(trace, self.root / "tables" / "trace" / "half.parquet")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, rows, trace, stats)
Store.write = write
from anelab.cli import main
main(["sweep", {str(study_file)!r}, "--out", {str(out)!r}, "--store", {str(store)!r}, "--chunk", "1"])
"""
    killed = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(load_results(out)) == 4  # two whole writes of two images; the half write is invisible
    final = cli("sweep", study_file, "--out", out, "--store", store, "--chunk", "1")
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    rows = Store(store).read("rows", columns=["key"])
    assert len(rows) == IMAGES and not rows.key.duplicated().any() and len(load_results(out)) == IMAGES


def test_sweep_killed_at_random_moments_then_resumed_equals_an_uninterrupted_one(study_file, tmp_path):
    reference = cli("sweep", study_file, "--out", tmp_path / "reference", "--store", tmp_path / "s1", "--chunk", "1")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    rng = random.Random(7)
    out, store = tmp_path / "killed", tmp_path / "s2"
    kills = 0

    def written():
        folder = store / "tables" / "rows"
        return len(list(folder.glob("*.parquet"))) if folder.exists() else 0

    for attempt in range(4):
        process = cli("sweep", study_file, "--out", out, "--store", store, "--chunk", "1")
        before, deadline = written(), time.time() + 120
        while (
            time.time() < deadline and process.poll() is None and written() == before
        ):  # until this run has written once
            time.sleep(0.05)
        time.sleep(0 if attempt == 0 else rng.uniform(0.0, 1.2))  # the first kill lands right after a write: mid-run
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    final = cli("sweep", study_file, "--out", out, "--store", store, "--chunk", "1")
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert kills >= 1
    rows, images = comparable(tmp_path / "reference")
    rows2, images2 = comparable(out)
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2
    raw = Store(store).read("rows", columns=["key"])
    assert len(raw) == IMAGES and not raw.key.duplicated().any()  # no image lost, none written twice
    leftovers = [p for p in store.rglob("*") if p.name.endswith(".tmp")]  # a killed write may leave its temporary file,
    assert all(p.name.startswith(".") for p in leftovers)  # hidden, and never read as a result or an image
    assert not load_trace(out).duplicated(["variant", "prompt", "seed", "step", "token"]).any()


def test_two_writers_of_one_store_share_the_work(study_file, tmp_path):
    """Two terminals start the same study into one folder and one store at once: every image is made once, the
    second writer says it waits for the first, both finish with the complete study."""
    store, out = tmp_path / "store", tmp_path / "a"
    first = cli("sweep", study_file, "--out", out, "--store", store, "--chunk", "1")
    second = cli("sweep", study_file, "--out", out, "--store", store, "--chunk", "1")
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    made = [int(re.search(r"(\d+) image\(s\) made", out).group(1)) for out, _ in outputs]
    assert sum(made) == IMAGES, outputs  # no image made twice
    rows = Store(store).read("rows", columns=["key"])
    assert len(rows) == IMAGES and not rows.key.duplicated().any()
    assert len(load_results(out)) == IMAGES and sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "keys.parquet",
        "study.json",
    ]
    said = " ".join(o + e for o, e in outputs)
    assert (
        "made by another process" in said or "being generated by another process" in said or min(made) == 0
    )  # told, or one did it all


def test_two_accelerate_processes_equal_one(study_file, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    single = cli("sweep", study_file, "--out", tmp_path / "single", "--store", tmp_path / "s1")
    assert single.wait(timeout=300) == 0
    launch = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "anelab",
            "sweep",
            str(study_file),
            "--out",
            str(tmp_path / "multi"),
            "--store",
            str(tmp_path / "s2"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launch.returncode == 0, launch.stderr[-2000:]
    assert launch.stdout.count(f"{IMAGES // 2} image(s) made") == 2  # each process made its half
    rows, images = comparable(tmp_path / "single")
    rows2, images2 = comparable(tmp_path / "multi")
    pd.testing.assert_frame_equal(rows, rows2)
    assert images == images2
