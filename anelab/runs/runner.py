"""Run a study through the store: images and tables go to the store, ``OUT`` holds the view.

The view (``OUT/study.json`` and ``OUT/keys.parquet``) says which variants, prompts and seeds the
study has and which store keys hold their results; :mod:`anelab.runs.results` reads it back. Every
block whose images the store already holds (with the statistics this study records) is skipped, so a
second study that repeats images generates none of them. Writers coordinate through one lock per
block, held until the block is written: a process never generates a block another is generating, it
comes back to it and finds it done. A kill at any moment loses at most the blocks not yet written.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .. import __version__
from ..analysis import guidance_pairs
from ..errors import AnelabError
from ..io import file_digest, file_lock, save_images, write_json, write_parquet
from ..log import bars_off, logger, note
from ..pipeline import Request, denoiser, plan_run, sample, schedule
from ..recording import Record
from ..subjects import Subject
from .plan import Block, my_share, process_share, work_plan
from .store import Store, block_identity, block_key, covers, image_key, model_identity
from .study import Study, fit_study

VIEW, KEYS = "study.json", "keys.parquet"
NOISE_COLUMNS = ("success", "fallback", "rounds", "steps")  # of a noise report, kept per image as noise_<column>


@dataclasses.dataclass
class Job:
    """One block, prepared: its generate request, store keys and the statistics it must record."""

    block: Block
    identity: dict
    block_key: str
    keys: list[str]  # one per seed
    request: Request  # the block's generate call, whole
    record: dict | None  # resolutions, steps, token positions the study records (None: nothing)


def steered_subjects(subjects: tuple, steering: dict, method) -> tuple[Subject, ...]:
    """One prompt's subjects (``(noun, modifiers)`` in words) as a variant steers them: ``excite``/``suppress`` pick
    subjects by index (default: every subject not suppressed is excited), ``layout`` gives some a target point.
    Plain SD (``method`` None) keeps the excited nouns only (they name what the metrics look for)."""

    def pick(indices):
        missing = [i for i in indices if i >= len(subjects)]
        if missing:
            raise AnelabError(f"subject index {missing} out of range for subjects {[s[0] for s in subjects]}")
        return list(indices)

    suppressed = pick(steering.get("suppress", []))
    excited = (
        pick(steering["excite"]) if "excite" in steering else [i for i in range(len(subjects)) if i not in suppressed]
    )
    if method is None:
        return tuple(Subject(subjects[i][0]) for i in excited)
    targets = dict(zip(pick(list(steering.get("layout", {}))), (tuple(p) for p in steering.get("layout", {}).values())))
    out = []
    for i in excited:
        out.append(Subject(subjects[i][0], tuple(subjects[i][1]), target=targets.get(i)))
    out += [Subject(subjects[i][0], role="suppress") for i in suppressed]
    out += [Subject(subjects[i][0], role="layout", target=p) for i, p in targets.items() if i not in excited]
    return tuple(out)


def applies(study: Study, block: Block) -> bool:
    """Whether the block's method can act on its prompt: a binding method (``needs_modifiers``) skips prompts whose
    subjects have no modifier (their official code leaves such a prompt alone: plain SD)."""
    method = study.variants[block.variant]
    return method is None or not method.needs_modifiers() or any(modifiers for _, modifiers in block.subjects)


def block_request(study: Study, block: Block) -> Request:
    """The generate call of one block of ``study``."""
    method = study.variants[block.variant]
    return Request(
        prompt=block.prompt,
        subjects=steered_subjects(block.subjects, study.steering.get(block.variant, {}), method),
        seeds=block.seeds,
        method=method,
        num_inference_steps=study.steps,
        guidance_scale=study.guidance_scale,
        height=study.size,
        width=study.size,
        record=study.record,
        generator_device=study.generator_device,
        progress=False,
    )


def context_identity(pipe, model: str, *, steps: int, revision=None, variant=None) -> dict:
    """The store identity's fields that come from the model and the run's device, dtype and scheduler."""
    return dict(
        model=model_identity(model, revision, variant),
        dtype=str(denoiser(pipe).dtype),
        device=denoiser(pipe).device.type,
        scheduler=type(pipe.scheduler).__name__,
        iterations=len(schedule(pipe, steps)),
    )


#: The SD 3 / FLUX options of a request and their defaults: only other values enter a store identity.
TRANSFORMER_OPTIONS = dict(
    blocks=None, token_maps=None, text_softmax="text", flow_step="index", thresholds="index", max_sequence_length=None
)


def request_identity(request: Request, common: dict, subjects=None, plan=None) -> dict:
    """:func:`block_identity` of a request (``subjects``: in words; default the request's own; ``plan``: its
    :func:`plan_run`, whose steps, guidance scale and size fill what the request leaves to the family's defaults)."""
    given = {k: getattr(request, k) for k, default in TRANSFORMER_OPTIONS.items() if getattr(request, k) != default}
    transformer = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    return block_identity(
        prompt=request.prompt,
        subjects=request.subjects if subjects is None else subjects,
        seeds=request.seeds,
        steps=request.num_inference_steps if plan is None else plan.num_inference_steps,
        height=request.height if plan is None else plan.height,
        width=request.width if plan is None else plan.width,
        guidance_scale=request.guidance_scale if plan is None else plan.guidance_scale,
        method=request.method,
        generator_device=request.generator_device,
        transformer=transformer,
        **common,
    )


def prepare(study: Study, pipe, model: str, *, revision=None, variant=None) -> list[Job]:
    """Every block of the study, checked with the core's own pre-flight check (:func:`plan_run`) before any
    image is made, with its store keys."""
    common = context_identity(pipe, model, steps=study.steps, revision=revision, variant=variant)
    checked: dict[tuple[str, str], dict | None] = {}
    jobs = []
    for block in work_plan(study):
        if not applies(study, block):
            continue
        request = block_request(study, block)
        if (block.variant, block.prompt) not in checked:
            try:
                plan = plan_run(pipe, dataclasses.replace(request, seeds=(0,)))
            except AnelabError as error:
                raise AnelabError(
                    f"study {study.name!r}, variant {block.variant!r}, prompt {block.prompt!r}: {error}"
                ) from None
            record = None
            if plan.record is not None:
                record = {
                    "resolutions": sorted({layer.res for layer in plan.record.layers}),
                    "steps": list(plan.record.steps),
                    "tokens": sorted(plan.record.tokens),
                }
            checked[block.variant, block.prompt] = record
        identity = request_identity(request, common)
        jobs.append(
            Job(
                block,
                identity,
                block_key(identity),
                [image_key(identity, s) for s in block.seeds],
                request,
                checked[block.variant, block.prompt],
            )
        )
    return jobs


def write_view(out: Path, study: Study, jobs: list[Job], *, model: str, store: Store) -> None:
    """``OUT/study.json`` (spec, model, store, provenance) and ``OUT/keys.parquet`` (variant, prompt,
    category, seed, tokens, key), rewritten only when they change (several shards may write the same view)."""
    rows = [
        {
            "variant": j.block.variant,
            "prompt": j.block.prompt,
            "category": j.block.category,
            "seed": seed,
            "tokens": ",".join(map(str, j.block.tokens)),
            "key": key,
        }
        for j in jobs
        for seed, key in zip(j.block.seeds, j.keys)
    ]
    keys = pd.DataFrame(rows, columns=["variant", "prompt", "category", "seed", "tokens", "key"])
    view = {
        "study": study.spec(),
        "name": study.name,
        "scale": study.scale,
        "model": str(model),
        "store": str(store.root.resolve()),
        "source": study.source,
        "versions": _versions(),
        "descriptions": {v: study.describe(v) for v in study.variants},
    }
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / f".{VIEW}.lock"):
        old = json.loads((out / VIEW).read_text()) if (out / VIEW).is_file() else None
        if old is not None and old.get("study") != json.loads(json.dumps(view["study"])):
            note(
                f"{out} showed study {old.get('name')!r} with another spec; it now shows this one (the store keeps both)"
            )
        if old is None or {k: old.get(k) for k in ("study", "model", "store")} != json.loads(
            json.dumps({k: view[k] for k in ("study", "model", "store")})
        ):
            view["scorers"] = {}
            write_json(view, out / VIEW)
            write_parquet(keys, out / KEYS)
        elif not (out / KEYS).is_file() or not pd.read_parquet(out / KEYS).equals(keys):
            write_parquet(keys, out / KEYS)


def run_sweep(
    study: Study,
    pipe,
    out: str | Path | None,
    *,
    model: str,
    store: Store | str | None = None,
    shard: tuple[int, int] = (0, 1),
    chunk_blocks: int = 8,
    progress: bool = True,
    revision: str | None = None,
    variant: str | None = None,
) -> dict:
    """Generate every block of ``study`` (this shard's and process's share) that the store lacks; write the view
    in ``out`` (None: none). The study is first fitted to the model (:func:`fit_study`: sizes and resolutions
    scaled to its native side; variants whose resolution it lacks are dropped, with a note, and the view's spec
    lists them under ``dropped``). A study with a ``calibrate`` section must have its thresholds already
    (:func:`anelab.runs.calibration.calibrated`).

    Returns a summary: images made, already in the store, waited for, writes, generation and total seconds.
    """
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not out.is_dir():
        raise AnelabError(f"--out {str(out)!r} is a file; give a directory")
    store = store if isinstance(store, Store) else Store(store)
    fitted = fit_study(study, pipe)
    if fitted is not study:
        new = {k: v for k, v in fitted.dropped.items() if k not in study.dropped}
        note(
            f"{study.name} on this model: {fitted.size} px"
            + (f" (written for SD 1.x at {study.full_size or study.size} px)" if study.scaled else "")
            + "".join(f"; variant {k} dropped: {v}" for k, v in new.items())
            + "".join(f"; {n}" for n in fitted.notes[len(study.notes) :])
        )
        study = fitted
    if study.calibrate and "thresholds" not in study.calibrate:
        raise AnelabError(
            f"study {study.name!r} takes thresholds calibrated from {study.calibrate['from']!r}: resolve them first "
            "(anelab.runs.calibration.calibrated(study, pipe, store=...), as anelab sweep and run_study do)"
        )
    jobs = prepare(
        study, pipe, model, revision=revision, variant=variant
    )  # every check first: a refusal writes nothing
    store.prepare()
    skipped = {}
    for block in work_plan(study):
        if not applies(study, block):
            skipped.setdefault(block.variant, set()).add(block.prompt)
    for name, prompts in skipped.items():
        note(
            f"{study.name}: variant {name} ({study.variants[name].name}) binds attributes and skips the "
            f"{len(prompts)} prompt(s) whose subjects have no modifier"
        )
    if out is not None:  # out=None: into the store only (e.g. a calibration source)
        write_view(out, study, jobs, model=model, store=store)
    mine = my_share(jobs, shard)
    seen = store.rows_files()
    todo = missing(store, mine)
    summary = dict(
        keys=[k for j in mine for k in j.keys],  # this shard's and process's images (for scoring its share)
        images=0,
        already=sum(len(j.keys) for j in mine) - sum(len(j.keys) for j in todo),
        waited=0,
        writes=0,
        generate_seconds=0.0,
    )
    start = time.perf_counter()
    index, count = shard
    process = process_share()[0]
    bar = tqdm(
        total=sum(len(j.keys) for j in todo),
        desc=f"{study.name} {index}/{count}" + (f" p{process}" if process else ""),
        unit="img",
        disable=bars_off(progress),
    )
    writer = _Writer(store, chunk_blocks, summary)
    deferred = []
    finished: dict[str, str] = {}  # key → recorded, of what other processes wrote since the plan was read

    def made_elsewhere(job: Job) -> bool:
        fresh = store.rows_since(seen, columns=["recorded"])
        finished.update(zip(fresh.key, fresh.recorded))
        return all(k in finished and covers(finished[k], job.record) for k in job.keys)

    for job in todo:
        lock = store.try_lock(job.block_key)
        if lock is None:  # another process is making it: come back to it at the end
            deferred.append(job)
            continue
        if made_elsewhere(job):  # another process made it since the plan was read
            lock.release()
            summary["waited"] += len(job.keys)
            bar.update(len(job.keys))
            continue
        _make(job, lock, study, pipe, store, writer, bar)
    if deferred:
        holders = sorted({store.holder(j.block_key) for j in deferred})
        note(
            f"{len(deferred)} block(s) of this work are being generated by another process ({'; '.join(holders[:3])}); "
            "waiting for it, then using its results"
        )
        writer.flush()
        for job in deferred:
            lock = store.wait_lock(job.block_key)
            if made_elsewhere(job):
                lock.release()
                summary["waited"] += len(job.keys)
                bar.update(len(job.keys))
                continue
            _make(job, lock, study, pipe, store, writer, bar)
    writer.flush()
    bar.close()
    summary["total_seconds"] = time.perf_counter() - start
    return summary


def missing(store: Store, jobs: list[Job]) -> list[Job]:
    """The jobs with a seed the store lacks, or lacks the statistics this study records."""
    if not jobs:
        return []
    have = store.latest_rows({k for j in jobs for k in j.keys}, columns=["recorded", "image_bytes"])
    if len(have):
        have = have[store.intact(have)]  # a deleted, truncated or replaced image is made again
    recorded = dict(zip(have.key, have.recorded)) if len(have) else {}
    return [j for j in jobs if not all(k in recorded and covers(recorded[k], j.record) for k in j.keys)]


def _make(job: Job, lock, study: Study, pipe, store: Store, writer: "_Writer", bar) -> None:
    """Generate one block (recording at least what the store already had for it) and queue its write."""
    record = _union_record(job, store, study.record)
    bar.set_postfix_str(f"{job.block.variant}: {job.block.prompt[:40]}", refresh=False)
    result = sample(pipe, dataclasses.replace(job.request, record=record))
    saved = save_images(result.images, [store.image(k) for k in job.keys], within=store.root)
    logger.debug(
        "%s: made %s %r for seeds %s", study.name, job.block.variant, job.block.prompt, list(job.request.seeds)
    )
    writer.add(job, result, lock, saved)
    bar.update(len(job.keys))


def _union_record(job: Job, store: Store, requested: Record | None) -> Record | None:
    """What to record: the study's request, joined with what the store's entry of this block recorded before
    (a regenerated entry never loses statistics another study needs)."""
    if job.record is None:
        return None
    have = store.latest_rows(job.keys, columns=["recorded"])
    earlier = [json.loads(t) for t in (have.recorded if len(have) else []) if t not in (None, "null")]
    if all(covers(json.dumps(job.record), e) for e in earlier):
        return requested
    wanted = {k: set(v) for k, v in job.record.items()}
    for entry in earlier:
        for k, v in entry.items():
            wanted[k] |= set(v)
    tokens = (
        sorted(wanted["tokens"]) if wanted["tokens"] == set(job.record["tokens"]) else "prompt"
    )  # "prompt" holds every token
    return Record(resolutions=sorted(wanted["resolutions"]), steps=sorted(wanted["steps"]), tokens=tokens, maps=False)


class _Writer:
    """Collects finished blocks and writes them to the store in chunks, then releases their locks."""

    def __init__(self, store: Store, chunk_blocks: int, summary: dict):
        self.store, self.chunk_blocks, self.summary = store, chunk_blocks, summary
        self.pending: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
        self.locks = []

    def add(self, job: Job, result, lock, saved: list[Path]) -> None:
        self.pending.append(_frames(job, result, saved))
        self.locks.append(lock)
        self.summary["images"] += len(job.keys)
        self.summary["generate_seconds"] += result.seconds
        if len(self.pending) >= self.chunk_blocks:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            rows, trace, stats = (pd.concat([p[k] for p in self.pending], ignore_index=True) for k in range(3))
            self.store.write(rows, trace, stats)
            self.summary["writes"] += 1
        for lock in self.locks:
            lock.release()
        self.pending, self.locks = [], []


def _frames(job: Job, result, saved: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rows (one per image, with its guidance counts and its image's size and SHA-256 as written), trace and
    statistics of one block, keyed."""
    key_of = dict(zip(job.block.seeds, job.keys))
    pairs = guidance_pairs(result.trace)
    counts = pairs.groupby("seed").agg(
        pairs=("step", "size"),
        triggered=("triggered", "sum"),
        reached=("succeeded", "sum"),
        refinement_rounds=("refinement_iterations", "sum"),
    )
    recorded = "null"
    if result.attention is not None:  # what was actually recorded (resolved from the Record)
        cache = result.attention
        recorded = json.dumps(
            {"resolutions": cache.resolutions, "steps": cache.steps, "tokens": sorted(int(t) for t in cache.tokens)}
        )
    rows = pd.DataFrame(
        {
            "key": job.keys,
            "prompt": job.block.prompt,
            "seed": list(job.block.seeds),
            "batch": ",".join(map(str, job.block.seeds)),
            "seconds": result.seconds_per_image,
            "recorded": recorded,
            "identity": json.dumps(job.identity, sort_keys=True),
            "image_bytes": [p.stat().st_size for p in saved],
            "image_sha256": [file_digest(p) for p in saved],
        }
    )
    rows = rows.join(counts, on="seed").fillna({"pairs": 0, "triggered": 0, "reached": 0, "refinement_rounds": 0})
    rows = rows.astype({"pairs": int, "triggered": int, "reached": int, "refinement_rounds": int})
    if result.noise is not None:  # a method's initial-noise optimisation (InitNO): per image
        noise = result.noise.set_index("seed")[list(NOISE_COLUMNS)].add_prefix("noise_")
        rows = rows.join(noise, on="seed")
    trace = result.trace.assign(key=result.trace.seed.map(key_of), prompt=job.block.prompt)
    stats = pd.DataFrame() if result.attention is None else result.attention.stats()
    if len(stats):
        stats = stats.assign(key=stats.seed.map(key_of))
    return rows, trace, stats


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {
        "anelab": __version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe(summary: dict, study: Study, out: Path) -> str:
    """The summary line printed at the end of a sweep."""
    images, seconds = summary["images"], summary["total_seconds"]
    rate = images / seconds * 60 if seconds and images else 0.0
    overhead = 1 - summary["generate_seconds"] / seconds if seconds and images else 0.0
    waited = f", {summary['waited']} made by another process" if summary.get("waited") else ""
    return (
        f"{study.name}: {images} image(s) made, {summary['already']} already in the store{waited}, {summary['writes']} write(s) "
        f"-> view {out} ({rate:.1f} images/min, runner overhead {overhead:.1%})"
    )


def stored_generate(
    pipe, request: Request, *, model: str, store: Store | str | None = None, revision=None, variant=None
):
    """:func:`generate` through the store (``anelab generate``): the images and trace of this exact request come
    from the store when it has them, else they are generated and kept there. Returns
    ``(images, trace, seconds_per_image, reused)``."""
    from PIL import Image

    store = store if isinstance(store, Store) else Store(store)
    plan = plan_run(pipe, request)  # every check first: a refused request leaves no store behind
    store.prepare()
    common = context_identity(pipe, model, steps=plan.num_inference_steps, revision=revision, variant=variant)
    identity = request_identity(request, common, subjects=plan.named_subjects(), plan=plan)
    nouns = tuple((s.noun, s.modifiers) for s in plan.named_subjects() if s.role == "excite")
    job = Job(
        Block("generate", request.prompt, "custom", tuple(n for n, _ in nouns), tuple(plan.seeds), nouns),
        identity,
        block_key(identity),
        [image_key(identity, s) for s in plan.seeds],
        request,
        None,
    )
    lock = store.wait_lock(job.block_key)
    try:
        if not missing(store, [job]):
            rows = store.latest_rows(job.keys, columns=["seconds"]).set_index("key").loc[job.keys]
            trace = store.entries("trace", rows.reset_index()).drop(
                columns=["key", "write", "written", "prompt"], errors="ignore"
            )
            images = []
            for key in job.keys:
                with Image.open(store.image(key)) as opened:
                    images.append(opened.copy())
            return (
                images,
                trace.sort_values(["seed", "step", "token_index"], ignore_index=True),
                float(rows.seconds.mean()),
                True,
            )
        result = sample(pipe, request)
        saved = save_images(result.images, [store.image(k) for k in job.keys], within=store.root)
        store.write(*_frames(job, result, saved))
        return result.images, result.trace, result.seconds_per_image, False
    finally:
        lock.release()
