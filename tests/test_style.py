"""The code stays in the one format the project keeps (ruff, line length 120) and free of unused or undefined names;
the library never prints and never imports the test names module."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import anelab

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")


@pytest.mark.skipif(not Path(RUFF).exists(), reason="ruff is a test extra (pip install -e '.[test]')")
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
    done = subprocess.run([RUFF, *command, "anelab", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def _library_sources():
    root = Path(anelab.__file__).parent
    return {p.relative_to(root.parent).as_posix(): p.read_text() for p in root.rglob("*.py")}


def test_production_code_never_imports_the_test_names_module():
    offenders = [
        name
        for name, text in _library_sources().items()
        if name != "anelab/testing.py" and re.search(r"^\s*from \.+testing import|anelab\.testing import", text, re.M)
    ]
    assert offenders == [], offenders  # the stand-ins live in anelab/stand_ins.py, beside loading


def test_library_code_never_prints():
    printing = [name for name, text in _library_sources().items() if re.search(r"^\s*print\(", text, re.M)]
    assert printing == [], printing  # messages go through the anelab logger (anelab.log) or warnings
