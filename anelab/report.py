"""The report suite: execute the notebooks with papermill, export HTML with nbconvert, link them in an index.

Notebooks publish their headline numbers with :func:`record` (a display output of its own MIME
type, kept in the executed ``.ipynb``); :func:`recorded` reads them back for the index and tests.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .errors import AnelabError
from .resources import as_path, notebook

NOTEBOOKS = (
    "00_attention_explorer", "01_reproduction", "02_resolution", "03_timesteps", "04_step_size_and_kernel", "05_suppression_and_layout",
)  # fmt: skip
RECORD_MIME = "application/vnd.anelab.record+json"
SMOKE_CELL_TIMEOUT = 600  # seconds per cell in smoke mode: a hung cell fails its notebook, not the suite
RANDOM_WEIGHTS_NOTE = (
    "This report ran on the embedded tiny model with random weights: every number and image in it is "
    "meaningless and exists only to show the pipeline end to end. Run `make report MODEL=CompVis/stable-diffusion-v1-4` "
    "for real results."
)


def record(name: str, value, label: str | None = None) -> None:
    """Publish a headline number (or short text) from a notebook: shown in the notebook, listed in the index."""
    from IPython.display import display

    if hasattr(value, "item"):
        value = value.item()
    display({RECORD_MIME: {"name": name, "value": value, "label": label or name}, "text/plain": f"{label or name}: {value}"}, raw=True)


def recorded(notebook: str | os.PathLike) -> dict:
    """``{name: value}`` of every :func:`record` call in an executed notebook."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    values = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if RECORD_MIME in data:
                item = data[RECORD_MIME]
                values[item["name"]] = item["value"]
    return values


def random_weights_banner(model: str) -> None:
    """In a notebook: say loudly when the numbers come from random weights."""
    from IPython.display import Markdown, display

    if str(model) == "tiny":
        display(Markdown(f"> **Random weights.** {RANDOM_WEIGHTS_NOTE}"))


@dataclasses.dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    error: str | None
    values: dict


def run_report(
    model: str = "tiny", smoke: bool = True, only: Sequence[str] | None = None, out: str | os.PathLike = "reports",
    runs: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None, progress: bool = True,
) -> list[NotebookRun]:  # fmt: skip
    """Execute the notebooks (all, or ``only``) into ``out/<name>.ipynb`` and ``.html``, then ``out/index.html``.

    ``runs`` holds the sweeps the notebooks run (default ``runs/report-<model>-<smoke|full>``), so a
    second report reuses finished work. A failing notebook is reported and the others still run.
    """
    import papermill

    names = match_notebooks(only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = str(model).replace("/", "--")
    runs = Path(runs) if runs else Path("runs") / f"report-{slug}-{'smoke' if smoke else 'full'}"
    results = []
    bar = tqdm(names, desc="report", unit="notebook", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        target = out / f"{name}.ipynb"
        parameters = {"model": str(model), "smoke": bool(smoke), "out_dir": str((runs / name).resolve()), "device": device, "dtype": dtype}
        start = time.perf_counter()
        error = None
        with as_path(notebook(name)) as source:
            if "interactive" in papermill.inspect_notebook(str(source)):
                parameters["interactive"] = False  # no frontend: the widget would be inert (and nbclient can stall on it)
            try:
                papermill.execute_notebook(
                    str(source), str(target), parameters=parameters, kernel_name="python3",
                    progress_bar=False, cwd=str(Path.cwd()), log_output=False,
                    execution_timeout=SMOKE_CELL_TIMEOUT if smoke else None,
                )  # fmt: skip
            except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error; report and go on
                error = _one_line(exc)
        seconds = time.perf_counter() - start
        values = recorded(target) if target.exists() else {}
        if target.exists():
            _to_html(target, out / f"{name}.html")
        results.append(NotebookRun(name, error is None, seconds, error, values))
    _index(results, out, model, smoke)
    return results


def match_notebooks(only: Sequence[str] | None) -> list[str]:
    """The notebooks ``only`` names (a full name, the part after the number, or a number prefix), all when empty."""
    if not only:
        return list(NOTEBOOKS)
    names = []
    for name in only:
        hits = [n for n in NOTEBOOKS if n == name or n.split("_", 1)[1] == name or n.startswith(name)]
        if len(hits) != 1:
            raise AnelabError(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
        names.append(hits[0])
    return names


def _one_line(exc: Exception) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
    return f"{name}: {value}".splitlines()[0][:400]


def _to_html(notebook: Path, target: Path) -> None:
    """HTML with code cells hidden (the figures, tables and text remain)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    target.write_text(body)


def _index(results: list[NotebookRun], out: Path, model: str, smoke: bool) -> None:
    rows = []
    for r in results:
        numbers = "<br>".join(f"{html.escape(str(k))}: <b>{html.escape(_fmt(v))}</b>" for k, v in r.values.items()) or "—"
        status = "ok" if r.ok else f"<span class='fail'>failed: {html.escape(r.error or '')}</span>"
        rows.append(f"<tr><td><a href='{r.name}.html'>{r.name}</a></td><td>{status}</td><td>{r.seconds:.0f} s</td><td>{numbers}</td></tr>")
    note = f"<p class='warn'>{html.escape(RANDOM_WEIGHTS_NOTE)}</p>" if str(model) == "tiny" else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>anelab report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}}
table{{border-collapse:collapse}}.fail{{color:#b00}}.warn{{background:#fff3cd;padding:8px}}</style></head><body>
<h1>anelab report</h1><p>model <code>{html.escape(str(model))}</code>, {'smoke' if smoke else 'full'} mode.</p>{note}
<table><tr><th>notebook</th><th>status</th><th>time</th><th>headline numbers</th></tr>{''.join(rows)}</table></body></html>"""
    (out / "index.html").write_text(page)
    (out / "index.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
