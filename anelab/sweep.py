"""Resumable, sharded sweeps of a :class:`~anelab.study.Study` into one directory.

Layout of ``DIR``::

    provenance.json                       study spec, model, versions, spec hash (checked on resume)
    images/<variant>/<prompt>/<seed>.png  one image per (variant, prompt, seed)
    chunks/<id>.rows.parquet              result rows (variant, prompt, category, seed, ...); written last
    chunks/<id>.trace.parquet             the guidance trace of those rows' images
    chunks/<id>.stats.parquet             their recorded token statistics

The work list is deterministic: for each variant and prompt, the seeds in fixed *blocks* of
``study.batch`` — a block is one :func:`anelab.generate` call, so its batch, and therefore every
result, is the same however the work is sharded (bit for bit on the same hardware and thread
count: CPU thread count changes float summation order). Shard ``I/N`` takes blocks ``I, I+N, …``.
Rows of finished blocks are flushed in chunks written under a temporary name and renamed: a kill
at any moment leaves whole chunks only, and a resumed sweep redoes the unflushed blocks
(re-writing their images with identical bytes). Under ``accelerate launch`` each process takes
its own share of the shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import uuid
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .errors import AnelabError
from .io import atomic_path, save_images, write_parquet
from .study import Study

ROW_COLUMNS = [
    "variant", "prompt", "category", "seed", "tokens", "image",
    "seconds",  # wall time of the block's generate call / images in it
    "pairs", "triggered", "reached", "refinement_rounds",  # guidance statistics of the image (0 for plain SD)
]  # fmt: skip
PROVENANCE = "provenance.json"


@dataclasses.dataclass(frozen=True)
class Block:
    """One generate call: a variant, a prompt and a run of seeds."""

    variant: str
    prompt: str
    category: str
    tokens: tuple
    seeds: tuple[int, ...]

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.variant, self.prompt, self.seeds[0])


def work_plan(study: Study) -> list[Block]:
    """Every block of the study, in a fixed order (variants, then prompts, then seed blocks)."""
    blocks = []
    for variant in study.variants:
        for prompt, category, tokens in study.prompts[["prompt", "category", "tokens"]].itertuples(index=False):
            for start in range(0, len(study.seeds), study.batch):
                blocks.append(Block(variant, prompt, category, tuple(tokens), tuple(study.seeds[start : start + study.batch])))
    return blocks


def parse_shard(text: str) -> tuple[int, int]:
    """``"0/4"`` → ``(0, 4)``."""
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise AnelabError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise AnelabError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def image_path(block_variant: str, prompt: str, seed: int) -> str:
    return f"images/{block_variant}/{prompt}/{seed}.png"


def process_share():
    """``(process index, process count, device)`` under ``accelerate launch`` (one GPU or CPU per
    process); ``(0, 1, None)`` in a plain run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    from . import __version__

    return {"anelab": __version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip


def check_provenance(out: Path, study: Study, model: str, force: bool = False) -> dict:
    """Write ``provenance.json`` for a new directory; for an existing one, refuse a different spec unless ``force``."""
    record = {"study": study.spec(), "model": model, "spec_hash": study.spec_hash(model), "source": study.source, "versions": _versions()}
    path = out / PROVENANCE
    if path.is_file():
        old = json.loads(path.read_text())
        if old["spec_hash"] != record["spec_hash"] and not force:
            raise AnelabError(f"{out} holds a different sweep ({_difference(old, record)}); mixing would corrupt the comparison: "
                              "use another --out, or --force to continue anyway")  # fmt: skip
        if old["spec_hash"] == record["spec_hash"]:
            return old
        record["forced_over"] = old.get("forced_over", []) + [old["spec_hash"]]
    elif out.exists() and any(p.name != ".gitkeep" for p in out.iterdir()):
        raise AnelabError(f"{out} is not empty and is not a sweep directory (no {PROVENANCE}); choose a new or empty --out")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _difference(old: dict, new: dict) -> str:
    if old["model"] != new["model"]:
        return f"model {old['model']!r} there, {new['model']!r} now"
    new = json.loads(json.dumps(new))  # compare as stored (JSON keys are text)
    changed = [k for k in new["study"] if old["study"].get(k) != new["study"][k]]
    return f"its {', '.join(changed) or 'spec'} differ" + (f": {changed[0]} was {old['study'][changed[0]]!r}" if len(changed) == 1 and changed[0] in ("steps", "size", "batch", "seeds", "guidance_scale") else "")


def done_keys(out: Path) -> set[tuple[str, str, int]]:
    """(variant, prompt, seed) of every row in a finished chunk."""
    rows = _read_chunks(out, "rows", columns=["variant", "prompt", "seed"])
    return set(zip(rows.variant, rows.prompt, rows.seed)) if len(rows) else set()


def run_sweep(
    study: Study, pipe, out: str | Path, *, model: str, shard: tuple[int, int] = (0, 1), force: bool = False,
    chunk_blocks: int = 8, progress: bool = True,
) -> dict:  # fmt: skip
    """Generate every block of ``study`` that ``out`` does not have yet (this shard's and process's share).

    Returns a summary: images made, already done, chunks written, generation and total seconds.
    """
    from .pipeline import generate

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnelabError(f"--out {str(out)!r} is a file; give a directory")
    _check_study_runs(study, pipe)
    index, count = shard
    process, processes, _ = process_share()
    if process == 0:
        check_provenance(out, study, model, force)
    else:
        _wait_for(out / PROVENANCE)
        check_provenance(out, study, model, force=True)
    plan = work_plan(study)
    mine = [b for k, b in enumerate(plan) if k % (count * processes) == index * processes + process]
    done = done_keys(out)
    todo = [b for b in mine if not all((b.variant, b.prompt, s) in done for s in b.seeds)]
    summary = dict(images=0, already=sum(len(b.seeds) for b in mine) - sum(len(b.seeds) for b in todo), chunks=0, generate_seconds=0.0)
    start = time.perf_counter()
    pending: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
    bar = tqdm(total=sum(len(b.seeds) for b in todo), desc=f"{study.name} {index}/{count}", unit="img", disable=not progress)
    for block in todo:
        bar.set_postfix_str(f"{block.variant}: {block.prompt[:40]}", refresh=False)
        result = generate(
            pipe, block.prompt, seeds=list(block.seeds), config=study.variants[block.variant],
            **steering_arguments(block.tokens, study.steering.get(block.variant, {}), study.variants[block.variant]),
            num_inference_steps=study.steps, guidance_scale=study.guidance_scale, height=study.size, width=study.size,
            record=study.record, progress=False,
        )  # fmt: skip
        summary["generate_seconds"] += result.seconds
        paths = [image_path(block.variant, block.prompt, s) for s in block.seeds]
        save_images(result.images, [out / p for p in paths])
        pending.append(_frames(block, result, paths))
        summary["images"] += len(block.seeds)
        bar.update(len(block.seeds))
        if len(pending) >= chunk_blocks:
            _flush(out, pending, f"{index}-{count}-{process}")
            summary["chunks"] += 1
            pending = []
    if pending:
        _flush(out, pending, f"{index}-{count}-{process}")
        summary["chunks"] += 1
    bar.close()
    summary["total_seconds"] = time.perf_counter() - start
    return summary


def steering_arguments(subjects: tuple, steering: dict, config) -> dict:
    """``tokens``/``suppress``/``layout`` of :func:`generate` for one prompt's subjects and a variant's steering."""
    def pick(indices):
        missing = [i for i in indices if i >= len(subjects)]
        if missing:
            raise AnelabError(f"subject index {missing} out of range for subjects {list(subjects)}")
        return [subjects[i] for i in indices]

    suppressed = pick(steering.get("suppress", []))
    excited = pick(steering["excite"]) if "excite" in steering else [t for t in subjects if t not in suppressed]
    arguments = {"tokens": excited}
    if config is not None:
        arguments["suppress"] = suppressed
        layout = steering.get("layout", {})
        arguments["layout"] = dict(zip(pick(list(layout)), (tuple(p) for p in layout.values())))
    return arguments


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise AnelabError(f"{path} did not appear: process 0 of the launch did not start the sweep")
        time.sleep(0.2)


def _check_study_runs(study: Study, pipe) -> None:
    """Every variant's thresholds fit the schedule and its resolution exists, before any image is made."""
    from .hooks import cross_attention_layers

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(study.steps)
    n = len(scheduler.timesteps)
    latent = study.size // getattr(pipe, "vae_scale_factor", 8)
    available = sorted({layer.res for layer in cross_attention_layers(pipe.unet, latent, latent)}, reverse=True)
    for name, config in study.variants.items():
        if config is None:
            continue
        try:
            config.check_schedule(n)
        except AnelabError as error:
            raise AnelabError(f"variant {name!r}: {error}") from None
        if config.attention_res not in available:
            raise AnelabError(f"variant {name!r}: attention_res {config.attention_res} does not exist at {study.size} px; this model has {available}")


def _frames(block: Block, result, paths: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rows, trace and statistics of one block, labelled with variant, prompt and category."""
    labels = dict(variant=block.variant, prompt=block.prompt, category=block.category)
    trace = result.trace.assign(**labels)
    pairs = trace[trace.threshold.notna()].drop_duplicates(["seed", "step"])
    pairs = pairs.assign(reached=pairs.triggered & pairs.reached.fillna(False).astype(bool))  # triggered and then reached
    per_seed = pairs.groupby("seed").agg(
        pairs=("step", "size"), triggered=("triggered", "sum"), reached=("reached", "sum"), refinement_rounds=("refinement_iterations", "sum")
    )
    rows = pd.DataFrame(
        {
            **labels,
            "seed": list(block.seeds),
            "tokens": [",".join(map(str, block.tokens))] * len(block.seeds),
            "image": paths,
            "seconds": result.seconds_per_image,
        }
    )
    rows = rows.join(per_seed, on="seed").fillna({"pairs": 0, "triggered": 0, "reached": 0, "refinement_rounds": 0})
    rows = rows.astype({"pairs": int, "triggered": int, "reached": int, "refinement_rounds": int})[ROW_COLUMNS]
    stats = pd.DataFrame() if result.attention is None else result.attention.stats().assign(variant=block.variant, category=block.category)
    return rows, trace, stats


def _flush(out: Path, pending, tag: str) -> None:
    """Write one chunk: trace and statistics first, rows last (a chunk counts once its rows exist)."""
    name = f"{tag}-{time.time_ns()}-{uuid.uuid4().hex[:6]}"
    rows, trace, stats = (pd.concat([p[k] for p in pending], ignore_index=True) for k in range(3))
    write_parquet(trace, out / "chunks" / f"{name}.trace.parquet")
    write_parquet(stats, out / "chunks" / f"{name}.stats.parquet")
    write_parquet(rows, out / "chunks" / f"{name}.rows.parquet")


def _read_chunks(out: Path, kind: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Concatenate ``kind`` files of finished chunks (those whose rows file exists)."""
    folder = Path(out) / "chunks"
    names = sorted(p.name.removesuffix(".rows.parquet") for p in folder.glob("*.rows.parquet")) if folder.is_dir() else []
    frames = [pd.read_parquet(folder / f"{n}.{kind}.parquet", columns=columns) for n in names if (folder / f"{n}.{kind}.parquet").is_file()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])


def _sweep_dir(out) -> Path:
    out = Path(out)
    if not (out / PROVENANCE).is_file():
        raise AnelabError(f"{out} is not a sweep directory (no {PROVENANCE}); run `anelab sweep STUDY --out {out}` first")
    return out


def load_results(out: str | Path) -> pd.DataFrame:
    """All result rows of a sweep, sorted, joined with ``metrics.parquet`` (from `anelab score`) when present."""
    out = _sweep_dir(out)
    rows = _read_chunks(out, "rows")
    if rows.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    duplicated = rows.duplicated(["variant", "prompt", "seed"])
    if duplicated.any():  # only after --force over overlapping shards; keep the first
        rows = rows[~duplicated]
    metrics = out / "metrics.parquet"
    if metrics.is_file():
        scores = pd.read_parquet(metrics).drop(columns=["variant", "prompt", "category", "seed"], errors="ignore")
        rows = rows.merge(scores.rename(columns={"path": "image"}), on="image", how="left")
    order = {v: k for k, v in enumerate(json.loads((out / PROVENANCE).read_text())["study"]["variants"])}
    return rows.sort_values(["variant", "prompt", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c).reset_index(drop=True)


def load_trace(out: str | Path) -> pd.DataFrame:
    """The guidance trace of every finished image (columns of :data:`anelab.pipeline.TRACE_COLUMNS` + variant, prompt, category)."""
    return _read_chunks(_sweep_dir(out), "trace")


def load_stats(out: str | Path) -> pd.DataFrame:
    """Recorded token statistics of every finished image (:meth:`AttentionCache.stats` + variant, category)."""
    return _read_chunks(_sweep_dir(out), "stats")


def run_study(
    study: Study | str, model: str = "tiny", out: str | Path = "runs/study", *, smoke: bool = False, device=None, dtype=None,
    clip: str | None = None, blip: str | None = None, progress: bool = True, pipe=None, **overrides,
) -> pd.DataFrame:  # fmt: skip
    """For notebooks: run a study (name, file or :class:`Study`), score it and return :func:`load_results`.

    ``smoke=True`` shrinks a study given by name or file (:data:`anelab.study.SMOKE`); the scorers default to ``"tiny"`` for the
    tiny model and to the protocol's CLIP/BLIP otherwise. Finished work in ``out`` is reused.
    """
    from .loading import load_pipeline
    from .metrics import DEFAULT_BLIP, DEFAULT_CLIP, score_folder
    from .study import load_study

    if not isinstance(study, Study):
        study = load_study(study, smoke=smoke, **overrides)
    pipe = pipe or load_pipeline(model, device=device, dtype=dtype)
    summary = run_sweep(study, pipe, out, model=str(model), progress=progress)
    tiny = str(model) == "tiny"
    score_folder(out, clip or ("tiny" if tiny else DEFAULT_CLIP), blip or ("tiny" if tiny else DEFAULT_BLIP), device=device, progress=progress)
    print(describe(summary, study, Path(out)))
    return load_results(out)


def describe(summary: dict, study: Study, out: Path) -> str:
    """The summary line printed at the end of a sweep."""
    images, seconds = summary["images"], summary["total_seconds"]
    rate = images / seconds * 60 if seconds and images else 0.0
    overhead = 1 - summary["generate_seconds"] / seconds if seconds and images else 0.0
    return (f"{study.name}: {images} image(s) made, {summary['already']} already done, {summary['chunks']} chunk(s) -> {out} "
            f"({rate:.1f} images/min, runner overhead {overhead:.1%})")  # fmt: skip

