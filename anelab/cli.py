"""The ``anelab`` command (typer). Bad input: one line on stderr, exit code 2, nothing written.

Every command checks its input and that its output can be written before any model work. Heavy
modules (torch, diffusers, pandas) are imported inside the commands, not here, so ``anelab --help``
and input errors answer in well under a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import AnelabError
from .log import note, show

app = typer.Typer(
    help="Attend-and-Excite studies on Stable Diffusion: generate, sweep, score, report, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Options that take several values after one flag (``--tokens cat dog``), as in the README.
MULTI_VALUE_OPTIONS = ("--tokens", "--seeds", "--suppress", "--only", "--workload", "--layout", "--subjects")
BENCH_MULTI_VALUE = ("--method",)  # bench times several methods; generate takes one

MODEL = typer.Option(
    "tiny",
    help="'tiny', 'tiny-sd2' or 'tiny-xl' (offline random SD 1.x / 2.x / SDXL-shaped models), a Hub id, or a local directory.",
)
DEVICE = typer.Option(
    None, help="cpu, cuda, cuda:N, mps (default: cuda when available). A GPU torch cannot see is an error."
)
DTYPE = typer.Option(None, help="fp32 / fp16 / bf16 (default: the weights', fp32 for the tiny model).")
REVISION = typer.Option(None, help="Hub revision (branch, tag or commit) of --model.")
VARIANT = typer.Option(None, help="Weights variant of --model, e.g. fp16 (smaller download).")
GENERATOR = typer.Option(
    "cpu", help="Where each seed's noise is drawn: cpu (same on every machine) or cuda (the official code's images)."
)
STORE = typer.Option(
    None, help="The run store (default $ANELAB_STORE, else runs/store): every image is generated once, whoever asks."
)
LOW_MEMORY = typer.Option(
    False,
    "--low-memory",
    help="Hold about a quarter of A&E's backward activations and recompute the rest: same images, more time "
    "(sets $ANELAB_LOW_MEMORY for this run and its notebooks).",
)


def _low_memory(flag: bool) -> None:
    if flag:
        os.environ["ANELAB_LOW_MEMORY"] = "1"


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"anelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only: no notes, no progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also what each step of the work did (DEBUG)."),
):
    """Attend-and-Excite studies on Stable Diffusion."""
    if quiet and verbose:
        raise AnelabError("--quiet and --verbose contradict each other: give one")
    show("WARNING" if quiet else "DEBUG" if verbose else "INFO")


@app.command()
def generate(
    prompt: str = typer.Option(..., help="Text prompt, e.g. 'a cat and a dog'."),
    tokens: list[str] = typer.Option([], help="Subject words or CLIP positions to excite: --tokens cat dog"),
    subjects: list[str] = typer.Option(
        [],
        help="Subjects with their modifiers (binding methods): --subjects apple=red bowl=blue,shiny (a bare word: none)",
    ),
    seeds: list[int] = typer.Option([0], help="Seeds, run as one batch: --seeds 0 1 2"),
    model: str = MODEL,
    out: Path = typer.Option(
        ..., help="Output directory: OUT/<prompt>/<seed>.png, OUT/prompts.json, OUT/trace.parquet (every run kept)."
    ),
    method: str = typer.Option(
        "attend_and_excite", help="Guidance method (anelab.methods.names(): attend_and_excite, divide_and_bind, ...)."
    ),
    settings: list[str] = typer.Option(
        [],
        "--set",
        help="A setting of the method, key=value (YAML value): --set mode=tv_bind --set 'thresholds={0: 0.1}'",
    ),
    steps: int = typer.Option(50, min=1, help="Inference steps (PNDM 50 steps = 51 loop iterations)."),
    attention_res: Optional[int] = typer.Option(
        None,
        min=1,
        help="Attention resolution the loss reads (default: the method's, 16 on SD 1.x; on other models the same fraction of their native side, e.g. 32 on SDXL).",
    ),
    thresholds: Optional[str] = typer.Option(
        None,
        help="Refinement thresholds 'loop index:min attention,...' ('' = none). Default: the method's (A&E 0:0.05,10:0.5,20:0.8) at 50 steps, rescaled to --steps.",
    ),
    scale_factor: Optional[float] = typer.Option(None, help="Base step size (default: the method's, 20)."),
    max_iter_to_alter: Optional[int] = typer.Option(
        None,
        min=0,
        help="Regular updates while loop index < this. Default: the method's (25) at 50 steps, rescaled to --steps.",
    ),
    suppress: list[str] = typer.Option([], help="Words whose attention to push down: --suppress dog"),
    layout: list[str] = typer.Option(
        [], help="Pull a word's attention to a point (x right, y down, 0..1): --layout cat=0.8,0.5"
    ),
    plain: bool = typer.Option(False, "--plain", help="Plain Stable Diffusion (no guidance), same seeds."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    height: Optional[int] = typer.Option(None, min=8, help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, min=8, help="Image width (default: the model's)."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    generator_device: str = GENERATOR,
    revision: Optional[str] = REVISION,
    variant: Optional[str] = VARIANT,
    store: Optional[Path] = STORE,
    low_memory: bool = LOW_MEMORY,
):
    """Generate images for one prompt and seeds, guided by --method unless --plain (through the run store)."""
    _low_memory(low_memory)
    from .checks import require_number, require_seeds
    from .config import DEFAULT_STEPS, parse_thresholds
    from .io import ensure_writable
    from .loading import load_parts, load_pipeline, resolve_device, resolve_dtype
    from .pipeline import GENERATOR_DEVICES, Request
    from .subjects import gather, resolve

    # 1. everything that needs no model
    require_number("--guidance-scale", guidance_scale)
    if scale_factor is not None:
        require_number("--scale-factor", scale_factor, minimum=0)
    require_seeds(seeds)
    if generator_device not in GENERATOR_DEVICES:
        raise AnelabError(f"--generator-device must be one of {', '.join(GENERATOR_DEVICES)}, got {generator_device!r}")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if generator_device == "cuda":
        resolve_device("cuda")
    token_args = [int(t) if t.isdigit() else t for t in tokens]
    targets = {}
    for text in layout:
        word, point = _layout_point(text)
        if word in targets:
            raise AnelabError(f"--layout gives {word!r} twice ({targets[word]} and {point}); one target per token")
        targets[word] = point
    named = [_subject(text) for text in subjects] if subjects else None
    chosen = None
    if not plain:
        given = {
            "attention_res": attention_res,
            "thresholds": None if thresholds is None else parse_thresholds(thresholds),
            "scale_factor": scale_factor,
            "max_iter_to_alter": max_iter_to_alter,
        }
        chosen = _method(method, {k: v for k, v in given.items() if v is not None} | _settings(settings))
        written = {"thresholds", "max_iter_to_alter"} & (
            {k for k, v in given.items() if v is not None} | {s.split("=")[0] for s in settings}
        )
        if not written and steps != DEFAULT_STEPS:
            chosen = chosen.rescaled(DEFAULT_STEPS, steps)
            shown = ", ".join(
                f"{k} {getattr(chosen, k)}" for k in ("thresholds", "max_iter_to_alter") if hasattr(chosen, k)
            )
            note(f"default thresholds and max_iter_to_alter rescaled from {DEFAULT_STEPS} to {steps} steps: {shown}")
    elif settings or method != "attend_and_excite":
        raise AnelabError("--plain is Stable Diffusion without guidance: it takes no --method or --set")
    request = Request.of(
        prompt,
        token_args,
        seeds,
        chosen,
        subjects=named,
        suppress=suppress,
        layout=targets,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator_device=generator_device,
    )
    ensure_writable(out)
    if store is not None:
        ensure_writable(store, "--store")
    # 2. what needs the tokenizer and the scheduler only (not the weights)
    tokenizer, scheduler = load_parts(model, revision=revision)
    resolve(tokenizer, prompt, gather(tokens=token_args, subjects=named, suppress=suppress, layout=targets))
    trained = getattr(scheduler.config, "num_train_timesteps", None)
    if trained and steps > trained:
        raise AnelabError(
            f"--steps {steps} is more than the scheduler's {trained} training timesteps: at most {trained}"
        )
    if chosen is not None:
        shifting = scheduler.config.get("use_dynamic_shifting", False)  # FLUX: mu moves σ, not how many steps
        scheduler.set_timesteps(steps, **({"mu": 0.0} if shifting else {}))
        chosen.check_schedule(len(scheduler.timesteps))
    # 3. the model (or the store, when it already has these images)
    import dataclasses

    from .outputs import save_generation
    from .runs.runner import stored_generate

    pipe = load_pipeline(model, device=device, dtype=dtype, revision=revision, variant=variant)
    from .mmdit import is_mmdit

    fit = not is_mmdit(pipe)  # a transformer's maps are pooled to 16x16 at any side
    if (
        fit
        and chosen is not None
        and attention_res is None
        and not any(s.startswith("attention_res=") for s in settings)
    ):
        from .models import SD1_SIZE, native_size

        fitted = chosen.at_scale(native_size(pipe) / SD1_SIZE)  # 16 on SD 1.x and 2.1-base, 24 on SD 2.1, 32 on SDXL
        request = dataclasses.replace(request, method=fitted or chosen)
    images, trace, seconds, reused = stored_generate(
        pipe, request, model=model, store=store, revision=revision, variant=variant
    )
    paths, run = save_generation(
        out, prompt=prompt, seeds=require_seeds(seeds), images=images, trace=trace, config=request.method, model=model
    )
    how = "from the run store" if reused else f"{seconds:.2f} s/image"
    typer.echo(f"wrote {len(paths)} image(s) to {paths[0].parent} and run {run} to {out / 'trace.parquet'} ({how})")


def _method(name: str, settings: dict):
    """``anelab.methods.get(name, **settings)``, naming the CLI flag of a setting the method lacks."""
    from . import methods

    if name not in methods.REGISTRY:
        raise AnelabError(f"unknown --method {name!r}; the methods are {', '.join(methods.names())}")
    return methods.get(name, **settings)


def _settings(texts: list[str]) -> dict:
    """``["mode=tv_bind", "thresholds={0: 0.1}"]`` → ``{"mode": "tv_bind", "thresholds": {0: 0.1}}`` (YAML values)."""
    import yaml

    out = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise AnelabError(f"--set must look like key=value (e.g. --set mode=tv_bind), got {text!r}")
        if key.strip() in out:
            raise AnelabError(f"--set {key.strip()} is given twice")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AnelabError(f"--set {key.strip()}: {value!r} is not a YAML value") from None
    return out


def _subject(text: str):
    """``"apple=red,shiny"`` → ``("apple", ["red", "shiny"])``; ``"apple"`` → ``("apple", [])``."""
    noun, _, modifiers = text.partition("=")
    if not noun.strip():
        raise AnelabError(f"--subjects must look like noun=modifier,modifier (e.g. apple=red), got {text!r}")
    return noun.strip(), [m.strip() for m in modifiers.split(",") if m.strip()]


@app.command()
def sweep(
    study: str = typer.Argument(..., help="A study file (YAML) or the name of a built-in one, e.g. 'resolution'."),
    model: str = MODEL,
    out: Path = typer.Option(..., help="Sweep directory (created; resumed if it holds this study)."),
    shard: str = typer.Option(
        "0/1", help="This machine's share I/N of the work list (e.g. SLURM: $SLURM_ARRAY_TASK_ID/N)."
    ),
    prompts: Optional[int] = typer.Option(None, min=1, help="Keep the first K prompts per category."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Keep the first K seeds."),
    steps: Optional[int] = typer.Option(None, min=1, help="Inference steps (threshold steps rescale proportionally)."),
    batch: Optional[int] = typer.Option(
        None, min=1, help="Seeds per generate call (part of the spec: it changes results by float noise)."
    ),
    size: Optional[int] = typer.Option(None, min=8, help="Image side in pixels."),
    chunk: int = typer.Option(8, min=1, help="Blocks per flushed result chunk."),
    device: Optional[str] = typer.Option(
        None, help="cuda / cpu (default: this process's accelerate device, else cuda when available)."
    ),
    dtype: Optional[str] = DTYPE,
    revision: Optional[str] = REVISION,
    variant: Optional[str] = VARIANT,
    scale: str = typer.Option(
        "full",
        "--scale",
        help="smoke / quick / full: the study's protocol or a slice of it (--size is the image side).",
    ),
    store: Optional[Path] = STORE,
    low_memory: bool = LOW_MEMORY,
    allow_large: bool = typer.Option(
        False,
        "--allow-large",
        help=f"Run a study of more than {2_000_000:,} images (refused otherwise, with its size).",
    ),
):
    """Run a study into the run store: every (variant, prompt, seed) the store lacks; OUT holds the study's view.
    Resumable, shardable (--shard, SLURM arrays), accelerate-aware; writers of one store coordinate through locks."""
    from .io import ensure_writable
    from .loading import load_pipeline, resolve_device, resolve_dtype
    from .runs import load_study, run_sweep
    from .runs.plan import parse_shard, process_share
    from .runs.runner import describe

    _low_memory(low_memory)
    spec = load_study(
        study, scale=scale, prompts=prompts, seeds=seeds, steps=steps, batch=batch, size=size, allow_large=allow_large
    )
    share = parse_shard(shard)
    device, dtype = resolve_device(device or process_share()[2]), resolve_dtype(dtype)
    ensure_writable(out)
    if store is not None:
        ensure_writable(store, "--store")
    for notice in spec.notes:
        note(notice)
    pipe = load_pipeline(model, device=device, dtype=dtype, revision=revision, variant=variant)
    from .runs import Store
    from .runs.calibration import calibrated

    store = Store(store)
    spec = calibrated(spec, pipe, store=store, model=model, revision=revision, variant=variant)
    summary = run_sweep(
        spec, pipe, out, model=model, store=store, shard=share, chunk_blocks=chunk, revision=revision, variant=variant
    )
    typer.echo(describe(summary, spec, out))


@app.command()
def score(
    directory: Path = typer.Argument(
        ..., help="A folder in the A&E layout (<prompt>/<seed>.png) or a study's view (anelab sweep --out)."
    ),
    clip: str = typer.Option("openai/clip-vit-base-patch16", help="CLIP model: Hub id, local directory or 'tiny'."),
    blip: str = typer.Option(
        "Salesforce/blip-image-captioning-base", help="BLIP captioner: Hub id, local directory, 'tiny' or 'none'."
    ),
    detector: str = typer.Option(
        "none",
        help="Object detector for subject presence and position: 'google/owlv2-base-patch16-ensemble', a local directory, 'tiny' or 'none'.",
    ),
    threshold: Optional[float] = typer.Option(
        None, help="Detection score at which a subject counts as present (default 0.25, see anelab.detection)."
    ),
    batch: int = typer.Option(16, min=1, help="Images per model call."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = typer.Option(
        None, help="fp32 / fp16 / bf16 for the scorers (default: fp16 on a GPU, fp32 on the CPU)."
    ),
    rescore: bool = typer.Option(False, "--rescore", help="Ignore DIR/metrics.parquet and score everything again."),
):
    """Score images: CLIP full-prompt and minimum-object, BLIP text-text, detected subjects -> DIR/metrics.parquet
    (a study's view: into the run store). Resumable per scorer: adding a scorer scores what is missing."""
    from .checks import require_number
    from .io import ensure_writable
    from .loading import resolve_device, resolve_dtype
    from .metrics import Scorers, score_folder
    from .runs.runner import VIEW

    if not directory.is_dir():
        raise AnelabError(f"{str(directory)!r} is not a directory of images")
    if threshold is not None:
        require_number("--threshold", threshold, minimum=0, maximum=1)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    ensure_writable(directory, "the scored folder")
    blip_spec, detector_spec = (None if s == "none" else s for s in (blip, detector))
    if (directory / VIEW).is_file():  # a study: scores go to the store, once per image and model
        from .runs import load_results, score_run
        from .runs.scoring import scored_summary

        done = score_run(directory, Scorers(clip, blip_spec, detector_spec, threshold, device, dtype), batch_size=batch)
        for notice in done["notices"]:
            note(notice)
        typer.echo(f"{scored_summary(done)} -> the run store of {directory} ({len(load_results(directory))} images)")
        return
    table, notices, counts = score_folder(
        directory,
        clip,
        blip_spec,
        detector=detector_spec,
        threshold=threshold,
        device=device,
        dtype=dtype,
        batch_size=batch,
        rescore=rescore,
    )
    for notice in notices:
        note(notice)
    means = ", ".join(
        f"{c} {table[c].mean():.4f}"
        for c in ("full_prompt", "min_object", "text_text")
        if c in table and table[c].notna().any()
    )
    typer.echo(
        f"{counts['scored']} image(s) scored, {counts['already']} already scored -> {directory / 'metrics.parquet'} (means: {means})"
    )


@app.command()
def report(
    model: str = MODEL,
    scale: Optional[str] = typer.Option(
        None, "--size", "--scale", help="smoke / quick / full (default: smoke for the tiny models, full otherwise)."
    ),
    only: list[str] = typer.Option([], help="Run only these notebooks (name or number prefix, e.g. --only 02)."),
    out: Path = typer.Option(Path("reports"), help="Where the executed notebooks, HTML and index.html go."),
    runs: Optional[Path] = typer.Option(
        None, help="Where the notebooks' study views go (default runs/report-<model>-<scale>)."
    ),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    store: Optional[Path] = STORE,
    plan: bool = typer.Option(
        False,
        "--plan",
        help="Print images in the protocol, in the store, still to generate and GPU-hours; run nothing.",
    ),
    shard: str = typer.Option(
        "0/1", help="With --generate-only: this machine's share I/N of every study (SLURM: $SLURM_ARRAY_TASK_ID/N)."
    ),
    generate_only: bool = typer.Option(
        False,
        "--generate-only",
        help="Generate (and score) this shard's share of every study into the store; no notebooks.",
    ),
    jobs: Optional[int] = typer.Option(
        None, min=1, help="Notebooks executed at once (default: 2 for the tiny model on a CPU, else 1)."
    ),
    revision: Optional[str] = REVISION,
    variant: Optional[str] = VARIANT,
    low_memory: bool = LOW_MEMORY,
):
    """Execute every notebook with papermill into OUT (ipynb + html) and write OUT/index.html; or plan it (--plan),
    or fill the store with one shard of its images (--generate-only --shard I/N) on many GPUs first."""
    from .io import ensure_writable
    from .loading import resolve_device, resolve_dtype
    from .report import default_runs, match_notebooks, run_report
    from .runs.plan import parse_shard
    from .runs.study import SCALES
    from .stand_ins import TINY_MODELS

    _low_memory(low_memory)

    names = match_notebooks(only)
    tiny = model in TINY_MODELS
    scale = scale or ("smoke" if tiny else "full")
    if scale not in SCALES:
        raise AnelabError(f"--size must be one of {', '.join(SCALES)}, got {scale!r}")
    share = parse_shard(shard)
    if share != (0, 1) and not generate_only:
        raise AnelabError(
            "--shard splits the generation: use it with --generate-only, then run a plain `anelab report` once all shards are done"
        )
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    runs = runs or default_runs(model, scale)
    if plan:
        from .runs import Store
        from .runs.protocol import Context, plan_report

        table, source = plan_report(
            names, scale=scale, context=Context.of(model, device, dtype, revision, variant), store=Store(store)
        )
        typer.echo(
            f"plan of the {scale} report on {model} ({device.type}{', ' + dtype_name if dtype_name else ''}); time per image {source}:"
        )
        typer.echo(table.to_string(index=False, formatters={"gpu_hours": "{:.2f}".format}))
        return
    ensure_writable(runs, "--runs")
    if store is not None:
        ensure_writable(store, "--store")
    if generate_only:
        from .loading import load_pipeline
        from .metrics import Scorers
        from .runs.plan import process_share
        from .runs.protocol import generate_report

        launched = process_share()[2]  # under accelerate launch: this process's own GPU
        if launched is not None and (device.type != "cuda" or device.index is None):
            device = resolve_device(launched)
        pipe = load_pipeline(model, device=device, dtype=dtype, revision=revision, variant=variant)
        scorers = Scorers(
            "tiny" if tiny else "openai/clip-vit-base-patch16",
            "tiny" if tiny else "Salesforce/blip-image-captioning-base",
            "tiny" if tiny else "google/owlv2-base-patch16-ensemble",
            device=device,
        )
        generate_report(
            names,
            scale=scale,
            pipe=pipe,
            model=model,
            runs=runs,
            store=store,
            shard=share,
            scorers=scorers,
            revision=revision,
            variant=variant,
        )
        typer.echo(
            f"shard {share[0]}/{share[1]} done: its images and scores are in the store; run `anelab report` (same --size) when every shard is"
        )
        return
    ensure_writable(out)
    jobs = jobs or (2 if tiny and device.type == "cpu" else 1)
    try:
        results = run_report(
            model=model,
            scale=scale,
            only=names,
            out=out,
            runs=runs,
            device=str(device),
            dtype=dtype_name,
            store=store,
            jobs=jobs,
        )
    except KeyboardInterrupt:
        typer.echo(
            "interrupted: every notebook process stopped; the reports not finished keep their previous pages", err=True
        )
        raise typer.Exit(130) from None
    for r in results:
        typer.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.name:28s} {r.seconds:6.0f} s" + ("" if r.ok else f"  {r.error}"))
    typer.echo(f"report: {sum(r.ok for r in results)}/{len(results)} notebooks ok -> {out / 'index.html'}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def bench(
    workload: list[str] = typer.Option(
        ["tiny"],
        help="tiny (CPU), sd14-cpu (SD-1.4 size, CPU, 4 steps), sd14-gpu (fp16, 50 steps), tiny-sd3 / tiny-flux (CPU, 28 steps).",
    ),
    repeats: Optional[int] = typer.Option(
        None,
        min=1,
        help="Timed runs per program; figures are medians. Default: the workload's (tiny 5, sd14-cpu 1, sd14-gpu 5).",
    ),
    comparisons: Optional[str] = typer.Option(
        None,
        help="Which of (a) port, (b) plain SD, (c) batching, (d) recording, (e) methods, (f) transformer vs its "
        "pipeline to run, e.g. abd (default abcd, tiny-sd3/tiny-flux ef; e alone with --method).",
    ),
    method: list[str] = typer.Option(
        [], help="(e): the methods to time against plain SD at their official defaults: --method syngen initno"
    ),
    device: Optional[str] = typer.Option(None, help="Override the workload's device (e.g. cuda:1)."),
    dtype: Optional[str] = typer.Option(None, help="Override the workload's dtype (fp32 / fp16 / bf16)."),
    out: Path = typer.Option(
        Path("benchmarks/results"), help="Where <workload>.json goes (under the working directory by default)."
    ),
    model: list[str] = typer.Option(
        [],
        help="A stand-in to time, as its workload: tiny, tiny-sd3, tiny-flux (--model tiny-sd3 = --workload tiny-sd3).",
    ),
):
    """Speed and memory: anelab vs diffusers' A&E port, vs plain SD, batching, recording -> OUT/<workload>.json."""
    from .bench import WORKLOADS, run_bench, table
    from .io import ensure_writable
    from .loading import resolve_device, resolve_dtype

    stand_ins = ("tiny", "tiny-sd3", "tiny-flux")
    for name in model:
        if name not in stand_ins:
            raise AnelabError(
                f"--model {name!r}: bench times the stand-ins {', '.join(stand_ins)} (real sizes: --workload)"
            )
    if model:
        workload = list(dict.fromkeys([*(w for w in workload if w != "tiny" or "tiny" in model), *model]))
    for name in workload:
        if name not in WORKLOADS:
            raise AnelabError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    chosen = None if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype)
    ensure_writable(out)
    from .bench import TRANSFORMERS

    given = comparisons
    comparisons = None
    for name in workload:
        default = ("e" if method else "ef") if name in TRANSFORMERS else ("e" if method else "abcd")
        comparisons = given or default
        results = run_bench(
            name, repeats, comparisons=comparisons, results_dir=out, device=chosen, dtype=dtype, methods=method or None
        )
        typer.echo(table(results))


def _layout_point(text: str) -> tuple[str, tuple[float, float]]:
    """``"cat=0.8,0.5"`` → ``("cat", (0.8, 0.5))``, the point checked as every layout point is."""
    from .pipeline import layout_point

    try:
        word, point = text.split("=")
        x, y = (float(v) for v in point.split(","))
    except ValueError:
        raise AnelabError(f"--layout must look like word=x,y (e.g. cat=0.8,0.5), got {text!r}") from None
    return word.strip(), layout_point(word.strip(), (x, y))


def _expand_multi_value(argv: list[str]) -> list[str]:
    """``--tokens cat dog`` → ``--tokens cat --tokens dog`` (click options take one value per flag)."""
    out, current = [], None
    multi = MULTI_VALUE_OPTIONS + (BENCH_MULTI_VALUE if argv[:1] == ["bench"] else ())
    for arg in argv:
        if arg.startswith("-") and not arg.lstrip("-").isdigit():
            current = arg if arg in multi else None
            out.append(arg)
        elif current and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning AnelabError, a usage error (an option's value out of range, a missing
    option) and an OSError into one line and exit code 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = _expand_multi_value(sys.argv[1:] if argv is None else list(argv))
    try:
        code = app(args=argv, prog_name="anelab", standalone_mode=False)
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except typer.Abort:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except AnelabError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: stopped; finished results are kept, nothing half-written replaced them", err=True)
        raise SystemExit(130) from None
    except OSError as error:  # a full disk, a read-only or vanished folder: what the system said, where, in one line
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        typer.echo(f"error: {error.strerror or error}{where}; nothing half-written was left behind", err=True)
        raise SystemExit(2) from None
    except Exception as error:  # the command line's own usage errors (click's, vendored by typer): one line too
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        if type(error).__name__ == "NoArgsIsHelpError":  # `anelab` alone: the help was shown, nothing went wrong
            raise SystemExit(0) from None
        context = getattr(error, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        typer.echo(f"error: {error.format_message()}{hint}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # as click's standalone mode: the entry point always exits


if __name__ == "__main__":
    main()
