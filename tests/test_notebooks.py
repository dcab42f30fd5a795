"""The report suite: every notebook executed by papermill in smoke mode, asserting on what it recorded."""

import json

import nbformat
import papermill
import pytest

from anelab.report import NOTEBOOKS, recorded, run_report
from anelab.resources import notebook


def test_committed_notebooks_carry_no_outputs_and_have_a_parameters_cell():
    for name in NOTEBOOKS:
        nb = nbformat.read(notebook(name), as_version=4)
        assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source, name
        assert "parameters" in nb.cells[1].metadata.get("tags", []), name
        for line in ("model = ", "smoke = ", "out_dir = ", "device = "):
            assert line in nb.cells[1].source, (name, line)
        # papermill must parse every parameter (a comment it cannot parse drops the name from --help)
        declared = [line.split("=")[0].strip() for line in nb.cells[1].source.splitlines() if line and not line.startswith("#")]
        assert list(papermill.inspect_notebook(str(notebook(name)))) == declared, name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} carries outputs; clear them before committing"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    results = run_report(model="tiny", smoke=True, out=out, runs=tmp_path_factory.mktemp("runs"), progress=False)
    return out, {r.name: r for r in results}


def test_every_notebook_runs_and_is_exported(report):
    out, results = report
    assert list(results) == list(NOTEBOOKS)
    failed = {n: r.error for n, r in results.items() if not r.ok}
    assert not failed, failed
    for name in NOTEBOOKS:
        page = (out / f"{name}.html").read_text()
        assert "Random weights" in page and "<img" in page, name  # the warning and at least one figure
        assert "import anelab" not in page, name  # code is hidden
        assert recorded(out / f"{name}.ipynb") == results[name].values
    index = (out / "index.html").read_text()
    assert all(f"{name}.html" in index for name in NOTEBOOKS) and "meaningless" in index
    assert len(json.loads((out / "index.json").read_text())) == len(NOTEBOOKS)


def _rate(value):
    return value == "n/a" or 0.0 <= value <= 1.0


def test_recorded_values(report):
    _, results = report
    v = {name: r.values for name, r in results.items()}
    assert v["00_attention_explorer"]["recorded maps"] > 0 and v["00_attention_explorer"]["MiB held by the recording"] > 0
    repro = v["01_reproduction"]
    for measure in ("full_prompt", "min_object", "text_text"):
        assert {f"{measure} sd", f"{measure} ae"} <= set(repro) and all(-1 <= repro[f"{measure} {x}"] <= 1 for x in ("sd", "ae"))
    assert _rate(repro["guidance rate"]) and _rate(repro["guidance success rate"]) and repro["mean refinement rounds"] >= 0
    assert repro["seconds per image ae"] > 0 and repro["seconds per image sd"] > 0
    resolution = v["02_resolution"]
    assert {f"min_object {x}" for x in ("sd", "res8", "res16", "res32", "res64")} <= set(resolution)
    assert all(_rate(resolution[f"guidance rate {x}"]) for x in ("res8", "res16", "res32", "res64"))
    assert set(resolution["calibrated thresholds at 32"]) == {"0", "1", "2"} or set(resolution["calibrated thresholds at 32"]) == {0, 1, 2}
    assert all(0 <= t <= 1 for t in resolution["calibrated thresholds at 64"].values())
    assert {"min_object default", "min_object strong_at_20", "min_object sd"} <= set(v["03_timesteps"])
    assert {"success rate scale5", "success rate scale80"} <= set(v["04_step_size_and_kernel"])
    assert all(_rate(v["04_step_size_and_kernel"][f"success rate scale{s}"]) for s in (5, 10, 20, 40, 80))
    five = v["05_suppression_and_layout"]
    assert all(_rate(five[f"share under bound {x}"]) for x in ("sd", "ae", "suppress_second", "suppress_only"))
    assert all(len(five[f"centroid distance first_{d} (A&E -> steered)"]) == 2 for d in ("left", "right", "up", "down"))


#: Figures each notebook draws (the plotting functions' titles, labels and legends are tested in test_study_views).
FIGURES = {"00_attention_explorer": 2, "01_reproduction": 4, "02_resolution": 6, "03_timesteps": 3,
           "04_step_size_and_kernel": 3, "05_suppression_and_layout": 4}  # fmt: skip


def test_every_notebook_shows_its_figures_as_images(report):
    out, _ = report
    for name in NOTEBOOKS:
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        pngs = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == FIGURES[name], (name, len(pngs))
        textual = [o for o in outputs if "image/png" not in o.get("data", {})]  # a drawn figure keeps "<Figure ...>" as its text fallback
        text = " ".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in textual)
        assert "<Figure size" not in text, f"{name}: a figure was printed as text, not drawn"
        assert "Traceback" not in text and "Warning" not in text, name
