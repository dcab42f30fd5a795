import logging
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "agg")
# the default run store is runs/store under the working directory: tests never share one with a user or an earlier session
os.environ["ANELAB_STORE"] = tempfile.mkdtemp(prefix="anelab-test-store-")


@pytest.fixture(scope="session")
def tiny_pipe():
    import anelab

    return anelab.load_pipeline("tiny")


@pytest.fixture(scope="session")
def ane_prompts():
    from anelab.prompts import load_prompts

    return load_prompts()


@pytest.fixture
def notes(caplog, monkeypatch):
    """anelab's log records at INFO and above during the test (``notes.text``), whether or not an earlier test of
    this worker sent them to stderr with ``anelab.log.show``."""
    monkeypatch.setattr(logging.getLogger("anelab"), "propagate", True)
    caplog.set_level(logging.INFO, logger="anelab")
    return caplog
