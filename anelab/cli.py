"""The ``anelab`` command (typer). Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import AnelabError

app = typer.Typer(
    help="Attend-and-Excite studies on Stable Diffusion: generate, sweep, score, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Options that take several values after one flag (``--tokens cat dog``), as in the README.
MULTI_VALUE_OPTIONS = ("--tokens", "--seeds", "--suppress", "--only", "--workload")

def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AnelabError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")


@app.callback()
def _root():
    """Attend-and-Excite studies on Stable Diffusion."""


@app.command()
def generate(
    prompt: str = typer.Option(..., help="Text prompt, e.g. 'a cat and a dog'."),
    tokens: list[str] = typer.Option([], help="Subject words or CLIP positions to excite: --tokens cat dog"),
    seeds: list[int] = typer.Option([0], help="Seeds, run as one batch: --seeds 0 1 2"),
    model: str = typer.Option("tiny", help="'tiny' (offline random model), a Hub id, or a local directory."),
    out: Path = typer.Option(..., help="Output directory: OUT/<prompt>/<seed>.png and OUT/trace.parquet."),
    steps: int = typer.Option(50, help="Inference steps (PNDM 50 steps = 51 loop iterations)."),
    attention_res: int = typer.Option(16, help="Attention resolution the loss reads."),
    thresholds: str = typer.Option("0:0.05,10:0.5,20:0.8", help="Refinement thresholds 'loop index:min attention,...' ('' = none)."),
    scale_factor: float = typer.Option(20.0, help="Base step size."),
    max_iter_to_alter: int = typer.Option(25, help="Regular updates while loop index < this."),
    suppress: list[str] = typer.Option([], help="Words whose attention to push down: --suppress dog"),
    layout: list[str] = typer.Option([], help="Pull a word's attention to a point (x right, y down, 0..1): --layout cat=0.8,0.5"),
    plain: bool = typer.Option(False, "--plain", help="Plain Stable Diffusion (no guidance), same seeds."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's)."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32 / fp16 / bf16 (default: the weights')."),
):
    """Generate images for one prompt and seeds, with A&E guidance unless --plain."""
    import anelab
    from anelab.config import parse_thresholds
    from anelab.io import save_images, write_parquet

    _check_out_dir(out)
    token_args = [int(t) if t.isdigit() else t for t in tokens]
    targets = dict(_layout_point(text) for text in layout)
    config = None
    if not plain:
        config = anelab.GuidanceConfig(
            attention_res=attention_res,
            thresholds=parse_thresholds(thresholds),
            scale_factor=scale_factor,
            max_iter_to_alter=max_iter_to_alter,
        )
    pipe = anelab.load_pipeline(model, device=device, dtype=dtype)
    result = anelab.generate(
        pipe, prompt, token_args, seeds=seeds, config=config, suppress=suppress, layout=targets, num_inference_steps=steps,
        guidance_scale=guidance_scale, height=height, width=width,
    )  # fmt: skip
    paths = save_images(result.images, [out / prompt / f"{s}.png" for s in result.seeds])
    write_parquet(result.trace, out / "trace.parquet")
    typer.echo(f"wrote {len(paths)} image(s) to {out / prompt} and {out / 'trace.parquet'} ({result.seconds_per_image:.2f} s/image)")


@app.command()
def sweep(
    study: str = typer.Argument(..., help="A study file (data/studies/*.yaml) or its name, e.g. 'resolution'."),
    model: str = typer.Option("tiny", help="'tiny' (offline random model), a Hub id, or a local directory."),
    out: Path = typer.Option(..., help="Sweep directory (created; resumed if it holds this study)."),
    shard: str = typer.Option("0/1", help="This machine's share I/N of the work list (e.g. SLURM: $SLURM_ARRAY_TASK_ID/N)."),
    prompts: Optional[int] = typer.Option(None, min=1, help="Keep the first K prompts per category."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Keep the first K seeds."),
    steps: Optional[int] = typer.Option(None, min=1, help="Inference steps (threshold steps rescale proportionally)."),
    batch: Optional[int] = typer.Option(None, min=1, help="Seeds per generate call (part of the spec: it changes results by float noise)."),
    size: Optional[int] = typer.Option(None, min=8, help="Image side in pixels."),
    chunk: int = typer.Option(8, min=1, help="Blocks per flushed result chunk."),
    force: bool = typer.Option(False, "--force", help="Continue a directory that holds a different spec."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: this process's accelerate device, else cuda when available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32 / fp16 / bf16 (default: the weights')."),
):
    """Run a study: every (variant, prompt, seed) not yet in OUT; resumable, shardable, accelerate-aware."""
    import anelab
    from anelab.study import load_study
    from anelab.sweep import describe, parse_shard, process_share, run_sweep

    spec = load_study(study, prompts=prompts, seeds=seeds, steps=steps, batch=batch, size=size)
    share = parse_shard(shard)
    for note in spec.notes:
        typer.echo(f"note: {note}", err=True)
    pipe = anelab.load_pipeline(model, device=device or process_share()[2], dtype=dtype)
    summary = run_sweep(spec, pipe, out, model=model, shard=share, force=force, chunk_blocks=chunk)
    typer.echo(describe(summary, spec, out))


@app.command()
def score(
    directory: Path = typer.Argument(..., help="A folder in the A&E layout (<prompt>/<seed>.png) or a sweep's output."),
    clip: str = typer.Option("openai/clip-vit-base-patch16", help="CLIP model: Hub id, local directory or 'tiny'."),
    blip: str = typer.Option("Salesforce/blip-image-captioning-base", help="BLIP captioner: Hub id, local directory, 'tiny' or 'none'."),
    batch: int = typer.Option(16, min=1, help="Images per model call."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available; fp16 on GPU)."),
    rescore: bool = typer.Option(False, "--rescore", help="Ignore DIR/metrics.parquet and score everything again."),
):
    """Score images: CLIP full-prompt and minimum-object, BLIP text-text -> DIR/metrics.parquet (resumable)."""
    from anelab.metrics import score_folder

    before = _rows(directory / "metrics.parquet") if not rescore else 0
    table, notices = score_folder(directory, clip, None if blip == "none" else blip, device=device, batch_size=batch, rescore=rescore)
    for notice in notices:
        typer.echo(f"note: {notice}", err=True)
    means = ", ".join(f"{c} {table[c].mean():.4f}" for c in ("full_prompt", "min_object", "text_text") if table[c].notna().any())
    typer.echo(f"{len(table) - before} image(s) scored, {before} already scored -> {directory / 'metrics.parquet'} (means: {means})")


@app.command()
def report(
    model: str = typer.Option("tiny", help="'tiny' (offline random model), a Hub id, or a local directory."),
    smoke: Optional[bool] = typer.Option(None, "--smoke/--full", help="Smoke slice or full protocol (default: smoke for 'tiny', full otherwise)."),
    only: list[str] = typer.Option([], help="Run only these notebooks (name or number prefix, e.g. --only 02)."),
    out: Path = typer.Option(Path("reports"), help="Where the executed notebooks, HTML and index.html go."),
    runs: Optional[Path] = typer.Option(None, help="Where the notebooks' sweeps go (default runs/report-<model>-<mode>)."),
    device: Optional[str] = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
):
    """Execute every notebook with papermill into OUT (ipynb + html) and write OUT/index.html."""
    from anelab.report import run_report

    _check_out_dir(out)
    results = run_report(model=model, smoke=(model == "tiny") if smoke is None else smoke, only=only or None, out=out, runs=runs, device=device)
    for r in results:
        typer.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.name:28s} {r.seconds:6.0f} s" + ("" if r.ok else f"  {r.error}"))
    typer.echo(f"report: {sum(r.ok for r in results)}/{len(results)} notebooks ok -> {out / 'index.html'}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def bench(
    workload: list[str] = typer.Option(["tiny"], help="tiny (CPU), sd14-cpu (SD-1.4 size, CPU, 4 steps), sd14-gpu (fp16, 50 steps)."),
    repeats: Optional[int] = typer.Option(None, min=1, help="Timed runs per program; figures are medians. Default: the workload's (tiny 5, sd14-cpu 1, sd14-gpu 5)."),
    comparisons: str = typer.Option("abcd", help="Which of (a) port, (b) plain SD, (c) batching, (d) recording to run, e.g. abd."),
):
    """Speed and memory: anelab vs diffusers' A&E port, vs plain SD, batching, recording -> benchmarks/results/<workload>.json."""
    from anelab.bench import WORKLOADS, run_bench, table

    for name in workload:
        if name not in WORKLOADS:
            raise AnelabError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in workload:
        typer.echo(table(run_bench(name, repeats, comparisons=comparisons)))


def _rows(path: Path) -> int:
    import pandas as pd

    return len(pd.read_parquet(path, columns=["path"])) if path.is_file() else 0


def _layout_point(text: str) -> tuple[str, tuple[float, float]]:
    """``"cat=0.8,0.5"`` → ``("cat", (0.8, 0.5))``."""
    try:
        word, point = text.split("=")
        x, y = (float(v) for v in point.split(","))
    except ValueError:
        raise AnelabError(f"--layout must look like word=x,y (e.g. cat=0.8,0.5), got {text!r}") from None
    return word.strip(), (x, y)


def _expand_multi_value(argv: list[str]) -> list[str]:
    """``--tokens cat dog`` → ``--tokens cat --tokens dog`` (click options take one value per flag)."""
    out, current = [], None
    for arg in argv:
        if arg.startswith("-") and not arg.lstrip("-").isdigit():
            current = arg if arg in MULTI_VALUE_OPTIONS else None
            out.append(arg)
        elif current and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning AnelabError into one line and exit code 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = _expand_multi_value(sys.argv[1:] if argv is None else list(argv))
    try:
        app(args=argv, prog_name="anelab")
    except AnelabError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
