"""The report suite: execute the notebooks with papermill, export HTML with nbconvert, link them in an index.

Notebooks publish their headline numbers with :func:`record` (a display output of its own MIME
type, kept in the executed ``.ipynb``); :func:`recorded` reads them back for the index and tests.
A report runs at a scale (``smoke`` / ``quick`` / ``full``, :data:`anelab.runs.SCALES`); its images go
to the run store, so a second report, or a report after ``anelab report --generate-only`` shards,
only analyses. No cell has a fixed time limit: a slow machine makes a slow report, not a failed one.
A failed notebook never hides the others; its page starts with a banner naming the failed cell.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import html
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .errors import AnelabError
from .io import write_json, write_text
from .log import bars_off, note
from .models import architecture
from .resources import as_path, notebook
from .runs import load_study
from .runs.protocol import studies_of
from .runs.study import fit_study
from .stand_ins import TINY_MODELS

NOTEBOOKS = (
    "00_attention_explorer",
    "01_reproduction",
    "02_resolution",
    "03_timesteps",
    "04_step_size_and_kernel",
    "05_suppression_and_layout",
    "06_architectures",
    "07_methods",
)
#: Longest first, so that parallel workers finish together (measured smoke times on the tiny model).
LONGEST_FIRST = (
    "06_architectures",
    "04_step_size_and_kernel",
    "02_resolution",
    "05_suppression_and_layout",
    "03_timesteps",
    "07_methods",
    "01_reproduction",
    "00_attention_explorer",
)
RECORD_MIME = "application/vnd.anelab.record+json"
TRACEBACK_FRAMES = 3  # frames of a failed cell's traceback kept on its page (the rest are folded away)
RANDOM_WEIGHTS_NOTE = (
    "This report ran on an embedded tiny model with random weights: every number and image in it is "
    "meaningless and exists only to show the pipeline end to end. Run `make report MODEL=CompVis/stable-diffusion-v1-4` "
    "for real results."
)


def record(name: str, value, label: str | None = None) -> None:
    """Publish a headline number (or short text) from a notebook: shown in the notebook, listed in the index."""
    from IPython.display import display

    if hasattr(value, "item"):
        value = value.item()
    display(
        {
            RECORD_MIME: {"name": name, "value": value, "label": label or name},
            "text/plain": f"{label or name}: {value}",
        },
        raw=True,
    )


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

    if str(model) in TINY_MODELS:
        display(Markdown(f"> **Random weights.** {RANDOM_WEIGHTS_NOTE}"))


@dataclasses.dataclass
class NotebookRun:
    name: str
    ok: bool
    seconds: float
    error: str | None
    values: dict
    failed_cell: int | None = None
    finished: str = ""  # when its report was written (UTC)


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


def default_runs(model: str, scale: str) -> Path:
    return Path("runs") / f"report-{str(model).replace('/', '--')}-{scale}"


#: The notebooks that run on SD 3 / FLUX: 06 asks its block question of the transformers (and compares the UNet
#: stand-ins or the real UNet models as on any model).
TRANSFORMER_NOTEBOOKS = ("06_architectures",)


def run_report(
    model: str = "tiny",
    scale: str = "smoke",
    only: Sequence[str] | None = None,
    out: str | os.PathLike = "reports",
    runs: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    store: str | os.PathLike | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> list[NotebookRun]:
    """Execute the notebooks (all, or ``only``) into ``out/<name>.ipynb`` and ``.html``, then ``out/index.html``.

    ``runs`` holds the notebooks' study views (default ``runs/report-<model>-<scale>``); their images live in
    the run ``store``. ``jobs`` notebooks run at once (each kernel gets its share of the CPU threads). A
    failing notebook is reported and the others still run.
    """
    names = match_notebooks(only)
    from .models import transformer_family

    kind = transformer_family(model)
    if kind is not None:  # SD 3 / FLUX: the notebooks whose questions apply to a transformer (decided before writing)
        skipped = [n for n in names if n not in TRANSFORMER_NOTEBOOKS]
        names = [n for n in names if n in TRANSFORMER_NOTEBOOKS]
        if skipped:
            note(
                f"{kind} is a transformer: skipping {', '.join(skipped)} (their studies run SD 1.x, 2.x and SDXL only)"
            )
        if not names:
            raise AnelabError(
                f"none of the notebooks asked for applies to {kind}: on a transformer {', '.join(TRANSFORMER_NOTEBOOKS)} runs"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale_staging(out)
    runs = Path(runs) if runs else default_runs(model, scale)
    store = None if store is None else str(Path(store).resolve())
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # kernels inherit it: share the cores, don't fight over them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    parameters = {"model": str(model), "scale": scale, "device": device, "dtype": dtype, "store": store}
    order = [n for n in LONGEST_FIRST if n in names] if jobs > 1 else names
    started = datetime.datetime.now(datetime.timezone.utc)
    bar = tqdm(total=len(order), desc="report", unit="notebook", disable=bars_off(progress))
    results, workers = {}, _Workers()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = {
            pool.submit(_execute, name, out, parameters | {"out_dir": str((runs / name).resolve())}, workers): name
            for name in order
        }
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[result.name] = result
            bar.set_postfix_str(f"{result.name} {'ok' if result.ok else 'FAILED'}")
            bar.update()
            _index(
                [results[n] for n in names if n in results],
                out,
                parameters | {"runs": str(runs), "started": started, "jobs": jobs},
            )
    except (
        KeyboardInterrupt
    ):  # stop every kernel within seconds; the notebooks not finished keep their previous reports
        workers.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    ordered = [results[n] for n in names]
    _index(ordered, out, parameters | {"runs": str(runs), "started": started, "jobs": jobs})
    return ordered


#: What runs one notebook in its own process (a process group of its own, so Ctrl-C stops it and its kernel at once).
_WORKER = """
import json, sys, papermill
a = json.loads(sys.argv[1])
try:
    papermill.execute_notebook(a["source"], a["target"], parameters=a["parameters"], kernel_name="python3",
                               progress_bar=False, cwd=a["cwd"], log_output=False, execution_timeout=None,
                               extra_arguments=["--IPKernelApp.log_level=ERROR"])
except Exception as error:
    sys.stdout.write(json.dumps({"ename": getattr(error, "ename", type(error).__name__), "evalue": str(getattr(error, "evalue", error))}))
    sys.exit(1)
"""


class _Workers:
    """The notebook processes running now; :meth:`stop` ends them (and their kernels) and forbids new ones."""

    def __init__(self):
        self.running: set = set()
        self.stopped = False
        self.lock = threading.Lock()  # a stop cannot fall between the check and the start of a process

    def run(self, arguments: dict) -> tuple[int, str]:
        import json
        import signal
        import sys

        with self.lock:
            if self.stopped:
                raise KeyboardInterrupt
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, json.dumps(arguments)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # Ctrl-C at the terminal reaches us only: we stop the group ourselves
            )
            self.running.add(process)
        try:
            while True:
                try:
                    output, _ = process.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:  # a stopped worker's kernel may still hold its output pipe
                    if self.stopped and process.poll() is not None:
                        output = ""
                        break
        finally:
            self.running.discard(process)
        if self.stopped and process.returncode in (-signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            raise KeyboardInterrupt
        return process.returncode, output

    def stop(self) -> None:
        import signal

        with self.lock:
            self.stopped = True
        for process in list(self.running):
            for sig, grace in ((signal.SIGINT, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
                try:
                    os.killpg(process.pid, sig)  # the worker and its kernel (started in the worker's group)
                    process.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def _execute(name: str, out: Path, parameters: dict, workers: _Workers) -> NotebookRun:
    """One notebook: papermill (no time limit per cell) into a staging folder, then its HTML page (with a failure
    banner if it failed); only a notebook that ran to its end or to a failed cell replaces the previous report."""
    import json
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".staging", dir=out))
    target = staging / f"{name}.ipynb"
    start = time.perf_counter()
    error = None
    try:
        with as_path(notebook(name)) as source:
            import papermill

            declared = papermill.inspect_notebook(str(source))
            given = {k: v for k, v in parameters.items() if k in declared}
            if "interactive" in declared:
                given["interactive"] = False  # no frontend: the widget would be inert (and nbclient can stall on it)
            code, output = workers.run(
                {"source": str(source), "target": str(target), "parameters": given, "cwd": str(Path.cwd())}
            )
        if code != 0:
            lines = [line for line in output.splitlines() if line.startswith("{")]
            failure = (
                json.loads(lines[-1])
                if lines
                else {"ename": "Error", "evalue": f"the notebook process exited with {code}"}
            )
            error = f"{failure['ename']}: {failure['evalue']}".splitlines()[0][:400]
        seconds = time.perf_counter() - start
        values, failed_cell = {}, None
        if target.exists():
            values = recorded(target)
            failed_cell = _to_html(target, staging / f"{name}.html")
            for suffix in (".ipynb", ".html"):  # both finished: each replaces its predecessor in one rename
                os.replace(staging / f"{name}{suffix}", out / f"{name}{suffix}")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return NotebookRun(name, error is None, seconds, error, values, failed_cell, stamp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _clear_stale_staging(out: Path) -> None:
    """Remove the staging folders of report runs that were killed (their process is gone)."""
    import shutil

    for folder in out.glob(".*.staging"):
        parts = folder.name.split(".")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is None or not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _one_line(exc: Exception) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
    return f"{name}: {value}".splitlines()[0][:400]


def _to_html(notebook: Path, target: Path) -> int | None:
    """HTML with code cells hidden (figures, tables and text remain). A failed notebook's page opens with a
    red banner naming the failed cell and the error's last line, and its traceback keeps only its last
    frames. Returns the failed cell's number (None when nothing failed)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    failed = None
    for number, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                failed = failed or (number + 1, cell, output)
                frames = output.get("traceback", [])
                if len(frames) > TRACEBACK_FRAMES + 1:
                    output["traceback"] = [
                        f"... {len(frames) - TRACEBACK_FRAMES - 1} earlier frames folded away ...",
                        *frames[-TRACEBACK_FRAMES - 1 :],
                    ]
    nb.cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    if failed:
        number, cell, output = failed
        first_line = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
        banner = (
            f'<div style="background:#fdecea;border:2px solid #b00020;padding:10px;font-family:sans-serif">'
            f'<b style="color:#b00020">This notebook failed</b> in code cell {number} '
            f"(<code>{html.escape(first_line[:100])}</code>):<br><code>{html.escape(output.get('ename', 'Error'))}: "
            f"{html.escape(str(output.get('evalue', '')).splitlines()[-1] if output.get('evalue') else '')}</code><br>"
            "Everything below that cell is missing; the numbers above it are partial.</div>"
        )
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    write_text(body, target)
    return None if failed is None else failed[0]


def _commit() -> str:
    """The git commit of the source tree, when the package runs from one (else the installed version)."""

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if head.returncode == 0:
            return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") + f" (anelab {__version__})"
    except OSError:
        pass
    return f"anelab {__version__}"


def _sizes(names, scale: str, model: str | None = None) -> str:
    """Prompts and seeds of the report's studies at this scale, on this model (sizes and variants as
    :func:`anelab.runs.study.fit_study` fits them), in words."""

    arch = None
    if model is not None:
        try:
            arch = architecture(model)
        except AnelabError:  # the model cannot be read here: the sizes as written
            arch = None
    parts = []
    for name in studies_of(names):
        study = load_study(name, scale=scale)
        study = study if arch is None else fit_study(study, arch)
        dropped = f" ({len(study.dropped)} dropped: {', '.join(study.dropped)})" if study.dropped else ""
        parts.append(
            f"{name}: {len(study.prompts)} prompts × {len(study.seeds)} seeds × {len(study.variants)} variants{dropped}, "
            f"{study.steps} steps, {study.size} px"
        )
    return "; ".join(parts)


def _index(results: list[NotebookRun], out: Path, meta: dict) -> None:
    """``index.html`` (and ``index.json``): when, which commit, model, device, dtype, scale and sizes; per
    notebook its status, time and headline numbers (marked partial when it failed), with links."""
    model = meta["model"]
    previous = []
    if (out / "index.json").is_file():  # notebooks not (yet) run again keep their entry: their files are the old ones
        import json

        try:
            earlier = json.loads((out / "index.json").read_text()).get("notebooks", [])
        except (OSError, ValueError):
            earlier = []
        done = {r.name for r in results}
        previous = [
            NotebookRun(**{k: v for k, v in e.items() if k in NotebookRun.__dataclass_fields__})
            for e in earlier
            if e.get("name") not in done and (out / f"{e.get('name')}.ipynb").is_file()
        ]
    results = sorted([*results, *previous], key=lambda r: NOTEBOOKS.index(r.name) if r.name in NOTEBOOKS else 99)
    rows = []
    for r in results:
        numbers = (
            "<br>".join(f"{html.escape(str(k))}: <b>{html.escape(_fmt(v))}</b>" for k, v in r.values.items()) or "—"
        )
        if not r.ok:
            numbers = f"<span class='fail'>partial (failed in cell {r.failed_cell or '?'})</span><br>{numbers}"
        status = "ok" if r.ok else f"<span class='fail'>failed: {html.escape(r.error or '')}</span>"
        rows.append(
            f"<tr><td><a href='{r.name}.html'>{r.name}</a><br><small>{html.escape(r.finished)}</small></td><td>{status}</td>"
            f"<td>{r.seconds:.0f} s</td><td>{numbers}</td></tr>"
        )

    note = f"<p class='warn'>{html.escape(RANDOM_WEIGHTS_NOTE)}</p>" if str(model) in TINY_MODELS else ""
    facts = {
        "run": meta["started"].strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "model": model,
        "scale": meta["scale"],
        "device": meta["device"] or "default",
        "dtype": meta["dtype"] or "the weights'",
        "store": meta["store"] or "runs/store (default)",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "sizes": _sizes([r.name for r in results], meta["scale"], model),
    }
    listing = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>anelab report</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto}}td,th{{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}}
table{{border-collapse:collapse;margin-bottom:1.5em}}.fail{{color:#b00}}.warn{{background:#fff3cd;padding:8px}}</style></head><body>
<h1>anelab report</h1>{note}<table>{listing}</table>
<table><tr><th>notebook</th><th>status</th><th>time</th><th>headline numbers</th></tr>{"".join(rows)}</table></body></html>"""
    write_text(page, out / "index.html")
    write_json({"facts": facts, "notebooks": [dataclasses.asdict(r) for r in results]}, out / "index.json")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
