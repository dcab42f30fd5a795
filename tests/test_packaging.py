"""The package works when installed from a wheel: data and notebooks ship inside it, nothing is written into it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the source tree (the build writes build/ and *.egg-info beside its sources)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "anelab", "data", "notebooks"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = dist.glob("anelab-*.whl")
    return built


def test_the_wheel_carries_the_data_and_the_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"anelab/data/{p.relative_to(ROOT / 'data').as_posix()}"
        for p in (ROOT / "data").rglob("*")
        if p.suffix in (".json", ".yaml")
    }
    expected |= {f"anelab/notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    expected |= {"anelab/assets/tiny_vocab.txt", "anelab/py.typed"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.slow
def test_an_installed_wheel_runs_a_report_from_an_unrelated_directory(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    installed = sorted(p.relative_to(target) for p in target.rglob("*") if "__pycache__" not in p.parts)
    env = os.environ | {"PYTHONPATH": str(target), "MPLBACKEND": "agg"}
    where = subprocess.run(
        [sys.executable, "-c", "import anelab; print(anelab.__file__, anelab.__version__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(target)), where  # the wheel's copy, not the source tree
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "anelab",
            "report",
            "--model",
            "tiny",
            "--size",
            "smoke",
            "--only",
            "00",
            "--out",
            "reports",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "reports" / "00_attention_explorer.html").is_file() and (work / "reports" / "index.html").is_file()
    assert {p.name for p in work.iterdir()} <= {"reports", "runs"}  # outputs go under the working directory only
    after = sorted(p.relative_to(target) for p in target.rglob("*") if "__pycache__" not in p.parts)
    assert after == installed, "something was written into the installed package"
