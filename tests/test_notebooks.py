"""The report suite: every notebook executed by papermill in smoke mode, asserting on what it recorded.

One class per notebook: `make test` distributes test classes over its workers (`--dist loadscope`), so the
heaviest notebooks run side by side.
"""

import json

import nbformat
import papermill
import pytest

from anelab.report import NOTEBOOKS, recorded, run_report
from anelab.resources import notebook

PARAMETERS = ("model", "scale", "out_dir", "device", "dtype", "store")


def test_committed_notebooks_carry_no_outputs_and_have_a_parameters_cell():
    for name in NOTEBOOKS:
        nb = nbformat.read(notebook(name), as_version=4)
        assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source, name
        assert "parameters" in nb.cells[1].metadata.get("tags", []), name
        for parameter in PARAMETERS:
            assert f"{parameter} = " in nb.cells[1].source, (name, parameter)
        # papermill must parse every parameter (a comment it cannot parse drops the name from --help)
        declared = [
            line.split("=")[0].strip() for line in nb.cells[1].source.splitlines() if line and not line.startswith("#")
        ]
        assert list(papermill.inspect_notebook(str(notebook(name)))) == declared, name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{name} carries outputs; clear them before committing"
                )


#: Figures each notebook draws (the plotting functions' titles, labels and legends are tested in test_study_views).
FIGURES = {
    "00_attention_explorer": 3,
    "01_reproduction": 4,
    "02_resolution": 7,
    "03_timesteps": 3,
    "04_step_size_and_kernel": 3,
    "05_suppression_and_layout": 5,
    "06_architectures": 5,
    "07_methods": 5,
}


def _rate(value):
    return value == "n/a" or 0.0 <= value <= 1.0


@pytest.fixture(scope="class")
def run(request, tmp_path_factory):
    """The class's notebook executed once (smoke, tiny model), with its own report folder, views and store."""
    out = tmp_path_factory.mktemp("reports")
    (result,) = run_report(
        model="tiny",
        scale="smoke",
        only=[request.cls.name],
        out=out,
        runs=tmp_path_factory.mktemp("runs"),
        store=tmp_path_factory.mktemp("store"),
        progress=False,
    )
    assert result.ok, result.error
    return out, result


class NotebookCase:
    """Executes one notebook (smoke, tiny model) once for the class, then checks its page, its figures and its numbers."""

    name = ""

    def test_runs_and_is_exported(self, run):
        out, result = run
        page = (out / f"{self.name}.html").read_text()
        assert "Random weights" in page and "<img" in page  # the warning and at least one figure
        assert "import anelab" not in page  # code is hidden
        assert recorded(out / f"{self.name}.ipynb") == result.values
        index = (out / "index.html").read_text()
        assert f"{self.name}.html" in index and "meaningless" in index and "commit" in index and "smoke" in index
        facts = json.loads((out / "index.json").read_text())["facts"]
        assert (
            facts["model"] == "tiny"
            and facts["scale"] == "smoke"
            and ("prompts ×" in facts["sizes"]) == (self.name != "00_attention_explorer")
        )

    def test_shows_its_figures_as_images(self, run):
        out, _ = run
        nb = nbformat.read(out / f"{self.name}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        pngs = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == FIGURES[self.name], len(pngs)
        textual = [
            o for o in outputs if "image/png" not in o.get("data", {})
        ]  # a drawn figure keeps "<Figure ...>" as its text fallback
        text = " ".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in textual)
        assert "<Figure size" not in text, "a figure was printed as text, not drawn"
        assert "Traceback" not in text and "Warning" not in text
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), (
            "a widget output would break in a saved notebook"
        )


class TestExplorer(NotebookCase):
    name = "00_attention_explorer"

    def test_values(self, run):
        v = run[1].values
        assert v["recorded maps"] > 0 and v["MiB held by the recording"] > 0


def _html_tables(out, name):
    """The text of every table a notebook showed."""
    nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
    return [
        o["data"]["text/html"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "text/html" in o.get("data", {})
    ]


def _interval(text):
    """'+0.0012 [-0.0030, +0.0050]' → (difference, low, high)."""
    value, interval = text.split(" [")
    low, high = interval.rstrip("]").split(", ")
    return float(value), float(low), float(high)


class TestReproduction(NotebookCase):
    name = "01_reproduction"

    def test_values(self, run):
        repro = run[1].values
        for measure in ("full_prompt", "min_object", "text_text"):
            assert {f"{measure} sd", f"{measure} ae"} <= set(repro) and all(
                -1 <= repro[f"{measure} {x}"] <= 1 for x in ("sd", "ae")
            )
            difference, low, high = _interval(repro[f"A&E - SD {measure}"])
            assert low <= difference <= high and difference == pytest.approx(
                repro[f"{measure} ae"] - repro[f"{measure} sd"], abs=2e-4
            )
        assert 0 <= repro["all_present sd"] <= 1 and 0 <= repro["all_present ae"] <= 1  # the detector's no-neglect rate
        assert (
            _rate(repro["guidance rate"])
            and _rate(repro["guidance success rate"])
            and repro["mean refinement rounds"] >= 0
        )
        assert repro["seconds per image ae"] > 0 and repro["seconds per image sd"] > 0
        agree, total = repro["agrees with the published figures"].split(" of ")
        assert 0 <= int(agree) <= int(total) and int(total) >= 10

    def test_tables_say_what_each_variant_is_and_show_the_published_column(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert (
            "plain SD (no guidance)" in tables and "res 16, thresholds 0:0.05, 1:0.5, 2:0.8" in tables
        )  # the defaults at smoke's 4 steps
        assert (
            "published" in tables
            and "verdict" in tables
            and "0.806" in tables
            and "0.958" in tables
            and "ae_paper" in tables
        )
        assert "without_refinement" in tables and "with_refinement" in tables  # seconds per image split by refinement


class TestResolution(NotebookCase):
    name = "02_resolution"

    def test_values(self, run):
        resolution = run[1].values
        variants = ("sd", "res8", "res16", "res32", "res64")
        assert {f"min_object {x}" for x in variants} <= set(resolution)
        assert all(_rate(resolution[f"guidance rate {x}"]) for x in ("res8", "res16", "res32", "res64"))
        for measure in ("full_prompt", "min_object", "text_text"):  # the observed ordering, computed from the numbers
            assert sorted(resolution[f"ordering by {measure}"].split(" > ")) == sorted(variants)
        thresholds = resolution["calibrated thresholds res32_calibrated"]
        assert set(map(int, thresholds)) == {0, 1, 2} and all(
            0 <= t <= 1 for t in resolution["calibrated thresholds res64_calibrated"].values()
        )

    def test_tables(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert "res 64, thresholds" in tables and "without_refinement" in tables and "res32_calibrated" in tables


class TestTimesteps(NotebookCase):
    name = "03_timesteps"

    def test_values(self, run):
        values = run[1].values
        assert {"min_object default", "min_object strong_at_0", "min_object all_zero", "min_object sd"} <= set(values)
        agree, total = values["agrees with the original study"].split(" of ")
        assert int(total) >= 5

    def test_zero_thresholds_keep_their_steps_and_the_reference_column_shows(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert "thresholds 0:0.8, 1:0, 2:0" in tables  # strong_at_0 at smoke's 4 steps: the zero steps stay
        assert "0.227" in tables and "0.931" in tables and "original_study" in tables


class TestStepSizeAndKernel(NotebookCase):
    name = "04_step_size_and_kernel"

    def test_values(self, run):
        v = run[1].values
        assert {"success rate scale5", "success rate scale80"} <= set(v)
        assert all(_rate(v[f"success rate scale{s}"]) for s in (5, 80))
        assert set(map(int, v["calibrated thresholds at 32"])) == {
            0,
            1,
            2,
        }  # thresholds from plain SD's statistics at 32

    def test_schedules_and_kernels_are_described(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert (
            "schedule table 0:0.5 24:1" in tables or "schedule table 0:0.5 2:1" in tables
        )  # the rising table, rescaled to smoke's steps
        assert "kernel 9 σ 0.5" in tables and "no smoothing" in tables


class TestSuppressionAndLayout(NotebookCase):
    name = "05_suppression_and_layout"

    def test_values(self, run):
        five = run[1].values
        assert all(_rate(five[f"share under bound {x}"]) for x in ("sd", "ae", "suppress_second", "suppress_only"))
        assert all(_rate(five[f"suppression success {x}"]) for x in ("sd", "ae", "suppress_second", "suppress_only"))
        for d in ("left", "right", "up", "down", "right_two_stage"):
            assert (
                len(five[f"centroid distance first_{d} (A&E -> steered)"]) == 2
                and len(five[f"object distance first_{d} (A&E -> steered)"]) == 2
            )
        assert len(five["a cat at right: centroid distance (A&E -> joint)"]) == 2


class TestArchitectures(NotebookCase):
    name = "06_architectures"
    compared = {"tiny": [8, 16, 32, 64], "tiny-sd2": [8, 16, 32, 64], "tiny-xl": [16, 32]}  # the stand-ins at 512 px

    def test_values(self, run):
        v = run[1].values
        for model, resolutions in self.compared.items():
            assert v[f"resolutions {model}"] == resolutions
            assert v[f"most attended resolution {model}"] in resolutions
            for res in resolutions:  # A&E at each resolution the model has, paired against its own plain SD
                assert _rate(v[f"guidance rate {model} res{res}"])
                assert -1 <= float(v[f"min_object A&E - SD {model} res{res}"].split(" [")[0]) <= 1
        assert v["dropped tiny"] == v["dropped tiny-sd2"] == [] and v["dropped tiny-xl"] == [
            "res64",
            "res8",
        ]  # SDXL has no 8 or 64 analogue
        for family, blocks in (("sd3", 4), ("flux", 4)):  # the transformers' block question
            assert 0 <= v[f"most localising block {family}"] < blocks
            assert -1 <= v[f"lower subject attention A&E - plain {family}"] <= 1

    def test_tables_show_the_architectures(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert (
            "sdxl" in tables
            and "sd2" in tables
            and "px_per_cell" in tables
            and "this model has cross-attention at [16, 32] at 512 px" in tables
        )
        page = (run[0] / f"{self.name}.html").read_text()
        assert (
            "A&amp;E raises min_object most at resolution" in page or "A&E raises min_object most at resolution" in page
        )


class TestMethods(NotebookCase):
    name = "07_methods"

    def test_values(self, run):
        v = run[1].values
        variants = ("sd", "ae", "dnb_tv", "syngen", "conform", "initno", "ebama")  # the smoke slice's
        for variant in variants:
            assert -1 <= v[f"min_object {variant}"] <= 1 and v[f"seconds per image {variant}"] > 0
            assert -2 <= v[f"binding {variant}"] <= 2  # the smoke prompt is coloured: every variant has a margin
        for variant in variants[1:]:  # one image per variant in the smoke slice: no interval (nan)
            difference, low, high = _interval(v[f"{variant} - SD min_object"])
            assert (low <= difference <= high or low != low) and difference == pytest.approx(
                v[f"min_object {variant}"] - v["min_object sd"], abs=2e-4
            )
            assert v[f"time x SD {variant}"] > 0
        assert v["published figures found"] >= 0

    def test_tables_name_each_method_its_paper_and_what_was_searched(self, run):
        tables = " ".join(_html_tables(run[0], self.name))
        assert "Divide &amp; Bind" in tables or "Divide & Bind" in tables
        assert "xiefan-guo/initno" in tables and "not found" in tables and "iterations_per_pair" in tables
