"""What the run-store tests share: a small study, the results of two runs made comparable, the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

from anelab.runs import load_results

#: Two prompts x 4 seeds (batches of 2) x 3 variants, statistics at two resolutions: seconds on the tiny model.
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


def comparable(out):
    """A study's results without what differs between equal runs (times, store paths), and its image bytes."""
    rows = load_results(out)
    images = {
        (v, p, s): Path(i).read_bytes()
        for v, p, s, i in rows[["variant", "prompt", "seed", "image"]].itertuples(index=False)
    }
    return rows.drop(columns=["seconds", "image"]), images


def cli(*args, **kwargs) -> subprocess.Popen:
    """``anelab ARGS`` in a subprocess with one math thread, offline."""
    return subprocess.Popen(
        [sys.executable, "-m", "anelab", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
