"""What each report notebook runs, the plan of a whole report, and the generation pass of one shard of it.

:data:`NOTEBOOK_STUDIES` names the studies behind each notebook. :func:`plan_report` counts, per
notebook, the images of its studies at a scale, how many the store already holds, how many are left,
and an estimate of GPU-hours; images shared between notebooks (plain SD and the default A&E appear in
five studies) are counted once in the total. :func:`generate_report` runs one shard's share of every
study into the store (and scores it), in :data:`GENERATION_ORDER`: studies whose thresholds are
calibrated from another study's plain-SD statistics come after it, and the studies that record the
most statistics come first, so the images other studies repeat are made once with everything recorded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from ..errors import AnelabError
from ..loading import load_parts, resolve_device, resolve_dtype
from ..log import logger
from ..models import architecture
from .calibration import calibrated, resolve_calibration
from .plan import work_plan
from .runner import applies, block_request, describe, request_identity, run_sweep
from .scoring import score_run
from .store import Store, image_key, model_identity
from .study import Study, fit_study, load_study

NOTEBOOK_STUDIES: dict[str, tuple[str, ...]] = {
    "00_attention_explorer": (),
    "01_reproduction": ("reproduction",),
    "02_resolution": ("resolution", "resolution_calibrated"),
    "03_timesteps": ("timesteps",),
    "04_step_size_and_kernel": ("step_size", "kernel"),
    "05_suppression_and_layout": ("suppression", "layout_right"),
    "06_architectures": ("architectures",),  # on the report's model; the notebook runs the other architectures itself
    "07_methods": ("methods",),
}
#: Generation order: calibration sources first, then the studies that record the most statistics.
GENERATION_ORDER = (
    "resolution",
    "architectures",
    "resolution_calibrated",
    "step_size",
    "timesteps",
    "suppression",
    "layout_right",
    "reproduction",
    "methods",  # its plain SD and A&E are reproduction's (the same settings at full scale)
    "kernel",
)
#: Seconds per image assumed when no GPU bench result is at hand: anelab A&E without refinement in
#: batches of 8, fp16, 512 px, 50 steps, SD-1.4-size weights on an H200 (measured, issue 15).
ASSUMED_SECONDS_PER_IMAGE = 0.5


def studies_of(notebooks) -> list[str]:
    """The studies behind ``notebooks``, in generation order."""
    wanted = {s for n in notebooks for s in NOTEBOOK_STUDIES[n]}
    return [s for s in GENERATION_ORDER if s in wanted]


@dataclasses.dataclass
class Context:
    """What a store key needs besides the study: model identity, dtype, device kind, scheduler."""

    model: str  # as given (tiny, Hub id, directory)
    identity: str
    dtype: str
    device: str
    scheduler: object
    arch: object = None  # anelab.models.Architecture: what fit_study needs (no weights)

    @classmethod
    def of(cls, model: str, device=None, dtype=None, revision=None, variant=None) -> "Context":
        import torch

        _, scheduler = load_parts(model, revision=revision)
        return cls(
            str(model),
            model_identity(model, revision, variant),
            str(resolve_dtype(dtype) or torch.float32),
            resolve_device(device).type,
            scheduler,
            architecture(model, revision=revision),
        )

    def keys(self, study: Study) -> list[str]:
        """The store key of every image of ``study`` (its tokens unchecked: planning only)."""

        study = fit_study(study, self.arch) if self.arch is not None else study
        self.scheduler.set_timesteps(study.steps)
        common = dict(
            model=self.identity,
            dtype=self.dtype,
            device=self.device,
            scheduler=type(self.scheduler).__name__,
            iterations=len(self.scheduler.timesteps),
            steps=study.steps,
            height=study.size,
            width=study.size,
            guidance_scale=study.guidance_scale,
            generator_device=study.generator_device,
        )
        common = {k: common[k] for k in ("model", "dtype", "device", "scheduler", "iterations")}
        keys = []
        for block in work_plan(study):
            if not applies(study, block):
                continue
            identity = request_identity(block_request(study, block), common)
            keys += [image_key(identity, s) for s in block.seeds]
        return keys


def seconds_per_image(bench: Path = Path("benchmarks/results/sd14-gpu.json")) -> tuple[float, str]:
    """Seconds per image for the estimate, and where the figure comes from."""
    if bench.is_file():
        measured = json.loads(bench.read_text())
        batch = measured.get("c_batching", {}).get("batch_of_8", {}).get("seconds")
        if batch:
            return batch / 8, f"measured by anelab bench on {measured.get('device')} (A&E, batch of 8, no refinement)"
    return ASSUMED_SECONDS_PER_IMAGE, (
        f"assumed {ASSUMED_SECONDS_PER_IMAGE} s/image (A&E, batch 8, fp16, H200; "
        "run `anelab bench --workload sd14-gpu` on your GPU for a measured figure)"
    )


def plan_report(notebooks, *, scale: str, context: Context, store) -> tuple[pd.DataFrame, str]:
    """One row per notebook and a total: images in the protocol, in the store, to generate, GPU-hours.

    A calibrated study whose source statistics are not in the store yet is counted with its images but
    marked as waiting for them (its thresholds, hence its keys, are not known before)."""

    per_study, notes = {}, {}
    for name in studies_of(notebooks):
        study = load_study(name, scale=scale)
        if context.arch is not None:
            study = fit_study(study, context.arch)
        if study.calibrate:
            try:
                study, _ = resolve_calibration(study, None, context=context, store=store, run_missing=False)
            except AnelabError:  # the calibrated variants' keys wait for their thresholds; the others are known
                calibrated = set(study.calibrate["variants"])
                notes[name] = f"{len(calibrated)} variant(s) wait for {study.calibrate['from']}'s plain-SD statistics"
                known = dataclasses.replace(
                    study, variants={k: v for k, v in study.variants.items() if k not in calibrated}
                )
                per_study[name] = (
                    len(calibrated) * len(study.prompts) * len(study.seeds),
                    context.keys(known) if known.variants else [],
                )
                continue
        per_study[name] = (0, context.keys(study))
    held = set()
    all_keys = {k for _, keys in per_study.values() for k in keys}
    if all_keys:
        held = set(store.latest_rows(all_keys, columns=[]).key)
    seconds, source = seconds_per_image()
    rows, union = [], set()
    for notebook in notebooks:
        images = in_store = todo = 0
        waiting = []
        for name in NOTEBOOK_STUDIES[notebook]:
            pending, keys = per_study.get(name, (0, []))
            images += pending + len(keys)
            in_store += sum(k in held for k in keys)
            todo += pending + len(set(keys) - held)
            union |= set(keys)
            if name in notes:
                waiting.append(f"{name}: {notes[name]}")
        rows.append(
            {
                "notebook": notebook,
                "studies": ", ".join(NOTEBOOK_STUDIES[notebook]) or "-",
                "images": images,
                "in_store": in_store,
                "to_generate": todo,
                "gpu_hours": todo * seconds / 3600,
                "note": "; ".join(waiting),
            }
        )
    table = pd.DataFrame(rows)
    pending = sum(c for c, _ in per_study.values())
    unique_todo = len(union - held) + pending
    total = {
        "notebook": "total",
        "studies": f"{len(per_study)} studies",
        "images": int(table.images.sum()),
        "in_store": len(union & held),
        "to_generate": unique_todo,
        "gpu_hours": unique_todo * seconds / 3600,
        "note": f"{int(table.images.sum()) - len(union) - pending} repeats made once (the store)",
    }
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True), source


def generate_report(
    notebooks,
    *,
    scale: str,
    pipe,
    model: str,
    runs: Path,
    store,
    shard=(0, 1),
    scorers=None,
    progress=True,
    revision=None,
    variant=None,
) -> list[dict]:
    """This shard's share of every study of ``notebooks`` into the store (and its scores), in generation order;
    the views go to ``runs/<study>``. A final plain report then finds everything and only analyses."""

    done = []
    store = store if isinstance(store, Store) else Store(store)
    for name in studies_of(notebooks):
        study = load_study(name, scale=scale)
        out = Path(runs) / name
        study = calibrated(study, pipe, store=store, model=model, revision=revision, variant=variant, progress=progress)
        summary = run_sweep(
            study,
            pipe,
            out,
            model=model,
            store=store,
            shard=shard,
            progress=progress,
            revision=revision,
            variant=variant,
        )
        logger.info(describe(summary, study, out))
        if scorers is not None:  # this shard's (and accelerate process's) share of the study, whoever generated it
            score_run(out, scorers, only=summary["keys"], progress=progress)
        done.append({"study": name, **{k: v for k, v in summary.items() if k != "keys"}})
    return done
