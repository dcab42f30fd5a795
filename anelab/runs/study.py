"""Study files (``data/studies/*.yaml``): prompts × seeds × variants, validated with file line numbers.

A study fixes everything that changes a result — image size, steps, guidance settings of each
variant, what to record, the seed batch, the generator — so its images are one comparable experiment.
A study runs at a *scale* (:data:`SCALES`): ``full`` is the file as written (the seed's protocol),
``quick`` a real-weights sanity run of every variant, ``smoke`` the thinnest slice that still runs
every code path (the tiny model in ``make report``). A study file may narrow its own ``smoke`` and
``quick`` slices (e.g. fewer kernel variants at 512 px).

Sizes and attention resolutions are written for SD 1.x at 512 px. :func:`fit_study` makes a study what
it is on one model (the runner calls it): on a model of native side N the image side and every attention
resolution scale by N/512 — the same fraction of the image (SD 2.1: 768 px, 16 → 24; SDXL: 1024 px,
16 → 32) — and a variant whose resolution the model lacks is dropped, with the reason, instead of
failing the study. ``scaled: false`` in a file means its size and resolutions are the model's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml

from .. import methods
from ..checks import is_int, is_number
from ..errors import AnelabError
from ..methods import AE, GuidanceConfig, Method
from ..models import SD1_SIZE, Architecture
from ..pipeline import layout_point
from ..prompts import CATEGORIES, load_prompts
from ..recording import Record
from ..resources import study_files

TOP_KEYS = {
    "name": "study name (text)",
    "prompts": "{set: ane, categories: [...], limit: K} or a list of {prompt, tokens, subjects: [[noun, [modifiers]], ...]}",
    "seeds": "a count n (seeds 0..n-1) or a list of seeds",
    "steps": "inference steps (int)",
    "size": "image side in pixels (int, multiple of 8)",
    "guidance_scale": "classifier-free guidance scale (number, default 7.5)",
    "batch": "seeds generated together (int, default 8)",
    "base": "GuidanceConfig fields shared by the guided variants",
    "variants": "name -> GuidanceConfig overrides of base (+ excite/suppress/layout by subject index), {method: name, its settings...} for another method (anelab.methods), or null for plain SD",
    "record": "Record fields (resolutions, steps, tokens); statistics only, maps: false",
    "generator_device": "where each seed's noise is drawn: cpu (default, the same on every machine) or cuda (the official code's)",
    "calibrate": "thresholds from another study's plain-SD statistics: {from: study, variant: sd, quantile: 0.5, variants: [...]}",
    "smoke": "overrides of the smoke slice: {variants: [...], categories: [...], prompts: K per category, seeds: K}",
    "quick": "overrides of the quick slice: {variants: [...], categories: [...], prompts: K per category, seeds: K}",
    "description": "free text",
    "scaled": "true (default): size and attention resolutions are written for SD 1.x at 512 px and scale with the model's native side; false: they are the model's own",
    "dropped": "variants a model lacks the resolution of (written by fit_study; informational)",
}
#: The scales a study runs at: overrides of the file's prompts (per category), seeds, steps, batch and
#: guidance fields. ``smoke`` also shrinks the image to the smallest side that has every resolution read.
SCALES = {
    "smoke": dict(
        prompts=1,
        seeds=1,
        steps=4,
        batch=1,
        base={  # each guided variant takes the fields its method has: every loop kept short
            "max_refinement_steps": 3,
            "max_refinement_steps_first": 3,
            "noise_rounds": 2,
            "noise_steps": 2,
            "noise_fallback_steps": 2,
        },
    ),
    "quick": dict(
        prompts=4, seeds=4, batch=4
    ),  # ~48 images per variant: every variant, about one GPU-hour for the whole report
    "full": {},
}
SLICE_KEYS = ("variants", "categories", "prompts", "seeds")
CONFIG_FIELDS = [f.name for f in dataclasses.fields(GuidanceConfig)]
#: Variant keys that pick what is steered, by index into each prompt's subject tokens (STUDIES.md 05).
STEERING_KEYS = {
    "excite": "subject indices to excite (default: all)",
    "suppress": "subject indices to suppress",
    "layout": "{subject index: [x, y]} target points",
}
RECORD_FIELDS = ["resolutions", "steps", "tokens", "maps"]


@dataclasses.dataclass
class Study:
    """A validated study: the work of one sweep directory."""

    name: str
    prompts: pd.DataFrame  # prompt, category, tokens
    seeds: list[int]
    steps: int
    size: int
    guidance_scale: float
    batch: int
    variants: dict[str, Method | None]  # a method's settings (GuidanceConfig: A&E); None = plain Stable Diffusion
    record: Record | None
    steering: dict[str, dict] = dataclasses.field(
        default_factory=dict
    )  # variant -> excite/suppress/layout by subject index
    source: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    generator_device: str = "cpu"
    scale: str = "full"
    calibrate: dict | None = (
        None  # {from, variant, quantile, variants}: thresholds taken from another study's plain-SD statistics
    )
    scaled: bool = True  # size and resolutions written for SD 1.x at 512 px (fit_study scales them to the model); False: the model's own
    dropped: dict[str, str] = dataclasses.field(
        default_factory=dict
    )  # variant -> why this model cannot run it (fit_study)
    full_size: int | None = None  # the side before a smoke slice shrank it (None: size)
    overrides: dict = dataclasses.field(
        default_factory=dict
    )  # load_study's explicit overrides (a calibration source takes them too)

    def spec(self) -> dict:
        """Everything that defines the results, as plain JSON (what the spec hash covers)."""
        return {
            "name": self.name,
            "prompts": [
                {"prompt": p, "category": c, "tokens": list(t)}
                for p, c, t in self.prompts[["prompt", "category", "tokens"]].itertuples(index=False)
            ],
            **({"subjects": self.subjects_spec()} if self.reads_modifiers() else {}),
            "seeds": self.seeds,
            "steps": self.steps,
            "size": self.size,
            "guidance_scale": self.guidance_scale,
            "batch": self.batch,
            "variants": {name: variant_spec(c) for name, c in self.variants.items()},
            "record": None if self.record is None else self.record.to_dict(),
            **({"steering": self.steering} if self.steering else {}),
            **({"generator_device": self.generator_device} if self.generator_device != "cpu" else {}),
            **({"calibrate": self.calibrate} if self.calibrate else {}),
            **({"scaled": False} if not self.scaled else {}),
            **({"dropped": self.dropped} if self.dropped else {}),
        }

    def reads_modifiers(self) -> bool:
        """Whether a variant's method reads the subjects' modifiers (then they are part of the spec)."""
        return any(c is not None and c.name != AE for c in self.variants.values())

    def subjects_spec(self) -> list:
        """Each prompt's subjects ``[[noun, [modifiers]], ...]`` (the prompts' order)."""
        table = self.prompts
        if "subjects" not in table:
            return [[[t, []] for t in tokens] for tokens in table.tokens]
        return [[[n, list(m)] for n, m in subjects] for subjects in table.subjects]

    def describe(self, variant: str) -> str:
        """What a variant is, in words a table legend can carry: its resolution, thresholds, step size and
        schedule, kernel and σ where they differ from the defaults, its steering (plain SD: "plain SD"); another
        method: its label and the settings that differ from its defaults."""
        config = self.variants[variant]
        if config is None:
            return "plain SD (no guidance)"
        if config.name != AE:
            return config.describe()
        default = GuidanceConfig()
        parts = [
            f"res {config.attention_res}",
            "thresholds " + (", ".join(f"{k}:{v:.3g}" for k, v in config.thresholds.items()) or "none"),
        ]
        if config.scale_factor != default.scale_factor:
            parts.append(f"α {config.scale_factor:g}")
        if config.step_schedule != default.step_schedule or config.scale_range != default.scale_range:
            schedule = (
                config.step_schedule
                if isinstance(config.step_schedule, str)
                else "table " + " ".join(f"{i}:{v:g}" for i, v in config.step_schedule)
                if isinstance(config.step_schedule, tuple)
                else getattr(config.step_schedule, "__name__", "callable")
            )
            parts.append(f"schedule {schedule} over r {config.scale_range[0]:g}→{config.scale_range[1]:g}")
        if not config.smooth:
            parts.append("no smoothing")
        elif (config.kernel_size, config.sigma) != (default.kernel_size, default.sigma):
            parts.append(f"kernel {config.kernel_size} σ {config.sigma:g}")
        if config.layout_update != default.layout_update:
            parts.append(f"{config.layout_update} layout update")
        steer = self.steering.get(variant, {})
        for key in ("excite", "suppress"):
            if key in steer:
                parts.append(
                    f"{key} subject{'s' if len(steer[key]) != 1 else ''} {', '.join(map(str, steer[key])) or 'none'}"
                )
        for index, point in steer.get("layout", {}).items():
            parts.append(f"subject {index} → ({point[0]:g}, {point[1]:g})")
        return ", ".join(parts)

    def spec_hash(self, model: str) -> str:
        text = json.dumps({"model": model, **self.spec()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Bounds on what a study file may ask for: its bytes, the YAML nodes it expands to (aliases counted each time they
#: are used), its seeds, and (unless ``allow_large``) its images.
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 200_000
MAX_SEEDS = 10_000_000
MAX_IMAGES = 2_000_000


class _Repeated(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping (``1`` and ``'1'`` count as the same key)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = str(self.construct_object(key_node, deep=True))
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _Repeated(f"key {key!r} is given twice in one mapping (lines {seen[key]} and {line})")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(node, memo=None) -> int:
    """The nodes a YAML document expands to, each alias counted at every use (memoised: no expansion happens)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle counts once (the safe loader refuses to build one anyway)
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_yaml(path: Path):
    """``(data, text)`` of a study file, or one line: too large, not UTF-8, not YAML, expanding to too many nodes
    (nested aliases), a key given twice."""
    label = str(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise AnelabError(f"{label}: {path.stat().st_size:,} bytes; a study file is at most {MAX_FILE_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AnelabError(f"{label}: not UTF-8 text (byte {error.start}); save the study file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        if node is not None and _expanded_nodes(node) > MAX_NODES:
            raise AnelabError(
                f"{label}: expands to over {MAX_NODES:,} YAML nodes (nested aliases?); a study is far smaller"
            )
        data = yaml.load(text, Loader=_StrictLoader)
    except _Repeated as error:
        raise AnelabError(f"{label}: {error.message}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise AnelabError(f"{label}: {where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    return data, text


class _Lines:
    """File line of each key path in a YAML document (for error messages)."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            return
        self._walk(root, ())

    def _walk(self, node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*path, str(key.value))] = key.start_mark.line + 1
                self._walk(value, (*path, str(key.value)))

    def at(self, *path) -> str:
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(str(p) for p in path[:end]))
            if line:
                return f"{'.'.join(map(str, path))} (line {line})"
        return ".".join(map(str, path))


def _fail(where: str, message: str, source: str):
    raise AnelabError(f"{source}: {where}: {message}")


def study_path(name_or_path: str | Path):
    """A study file path, or the name of a built-in one (``resolution`` → the package's ``studies/resolution.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    built_in = study_files()
    if str(name_or_path) in built_in:
        return built_in[str(name_or_path)]
    raise AnelabError(f"study {str(name_or_path)!r} is neither a file nor one of {sorted(built_in)}")


def load_study(
    source: str | Path | Mapping,
    *,
    scale: str = "full",
    prompts: int | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    size: int | None = None,
    base: Mapping | None = None,
    allow_large: bool = False,
) -> Study:
    """Read and validate a study (a YAML path, a study name, or a dict) at a ``scale`` of :data:`SCALES`
    (and the file's own ``smoke``/``quick`` slice), then apply explicit overrides, which win (and are checked as the
    file's values are). A study of more than :data:`MAX_IMAGES` images is refused, with its size, unless
    ``allow_large`` (``--allow-large``).

    ``prompts`` keeps the first K prompts per category (or of an explicit list), ``seeds`` the
    first K seeds; ``steps`` rescales the variants' threshold steps and ``max_iter_to_alter``
    proportionally (:meth:`GuidanceConfig.rescaled`); ``base`` overrides GuidanceConfig fields of
    every guided variant (e.g. ``{"max_refinement_steps": 3}`` for a smoke run).
    """
    if scale not in SCALES:
        raise AnelabError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if isinstance(source, Mapping):
        data, lines, label = dict(source), _Lines(""), "study"
    else:
        path = study_path(source)
        label = str(path)
        data, text = read_yaml(path)
        lines = _Lines(text)
    if not isinstance(data, Mapping):
        raise AnelabError(f"{label}: a study is a mapping of {sorted(TOP_KEYS)}, got {type(data).__name__}")

    def fail(path, message):
        _fail(lines.at(*path), message, label)

    for key in data:
        if key not in TOP_KEYS:
            fail((key,), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    for key in ("name", "prompts", "seeds", "steps", "size", "variants"):
        if key not in data:
            raise AnelabError(f"{label}: missing key {key!r} ({TOP_KEYS[key]})")
    if not isinstance(data["name"], str) or not data["name"].strip():
        fail(("name",), "must be non-empty text")

    def integer(key, value, minimum=1):
        if not is_int(value) or value < minimum:
            fail((key,), f"must be an int >= {minimum}, got {value!r}")
        return value

    n_steps = integer("steps", data["steps"])
    side = integer("size", data["size"], 8)
    if side % 8:
        fail(("size",), f"must be a multiple of 8, got {side}")
    batch_size = integer("batch", data.get("batch", 8))
    cfg_scale = data.get("guidance_scale", 7.5)
    if not is_number(cfg_scale):
        fail(("guidance_scale",), f"must be a finite number, got {cfg_scale!r}")
    table = _prompts(data["prompts"], fail)
    seed_list = _seeds(data["seeds"], fail)
    base_fields = data.get("base") or {}
    if not isinstance(base_fields, Mapping):
        fail(("base",), f"must be a mapping of GuidanceConfig fields, got {base_fields!r}")
    variants_data = data["variants"]
    if not isinstance(variants_data, Mapping) or not variants_data:
        fail(("variants",), "must map variant names to overrides (or null for plain SD)")
    variants, steering = {}, {}
    for name, overrides in variants_data.items():
        if str(name) in variants:
            fail(("variants", name), f"names variant {str(name)!r} twice ({name!r} and another spelling of it)")
        if overrides is not None and not isinstance(overrides, Mapping):
            fail(("variants", name), f"must be a mapping of GuidanceConfig overrides or null, got {overrides!r}")
        if overrides is not None and any(k in STEERING_KEYS for k in overrides):
            steering[str(name)] = _steering(overrides, ("variants", str(name)), fail)
            overrides = {k: v for k, v in overrides.items() if k not in STEERING_KEYS}
        variants[str(name)] = (
            None if overrides is None else _config(base_fields, overrides, ("variants", str(name)), fail)
        )
    for key in base_fields:  # a base field must be a setting of some guided variant's method
        if not any(c is not None and key in _settings(type(c)) for c in variants.values()):
            fail(
                ("base", key), f"is not a setting of any guided variant's method; A&E's are: {', '.join(CONFIG_FIELDS)}"
            )
    record = _record(data.get("record"), fail)
    generator = data.get("generator_device", "cpu")
    if generator not in ("cpu", "cuda"):
        fail(("generator_device",), f"must be cpu or cuda, got {generator!r}")
    slices = {name: _slice(data.get(name), name, variants, fail) for name in ("smoke", "quick")}
    sd1_units = data.get("scaled", True)
    if not isinstance(sd1_units, bool):
        fail(("scaled",), f"must be true or false, got {sd1_units!r}")
    dropped = data.get("dropped") or {}
    if not isinstance(dropped, Mapping):
        fail(("dropped",), f"must map variant names to reasons, got {dropped!r}")
    calibrate = _calibrate(data.get("calibrate"), variants, fail)

    # the scale, then explicit overrides (CLI / notebook parameters), checked as the file's values are
    given = dict(prompts=prompts, seeds=seeds, steps=steps, batch=batch, base=base)
    for name, value in (("prompts", prompts), ("seeds", seeds), ("steps", steps), ("batch", batch), ("size", size)):
        if value is not None and (not is_int(value) or value < (8 if name == "size" else 1)):
            raise AnelabError(f"{label}: the override {name}={value!r} must be an int >= {8 if name == 'size' else 1}")
    if size is not None and size % 8:
        raise AnelabError(f"{label}: the override size={size} must be a multiple of 8 (as the file's size)")
    if base is not None:
        if not isinstance(base, Mapping):
            raise AnelabError(f"{label}: the override base must be a mapping of settings, got {base!r}")
        known = {f for c in variants.values() if c is not None for f in _settings(type(c))}
        unknown = sorted(set(base) - known)
        if unknown:
            raise AnelabError(f"{label}: the override base names {unknown}, a setting of none of the guided variants")
    scaled = {
        **SCALES[scale],
        **{k: v for k, v in slices.get(scale, {}).items() if k not in ("variants", "categories")},
    }
    prompts, seeds, steps, batch, base = (scaled.get(k) if given[k] is None else given[k] for k in given)
    if "categories" in slices.get(scale, {}) and "category" in table:
        table = table[table.category.isin(slices[scale]["categories"])].reset_index(drop=True)
    if "variants" in slices.get(scale, {}):
        variants = {k: v for k, v in variants.items() if k in slices[scale]["variants"]}
        steering = {k: v for k, v in steering.items() if k in variants}
    notes = []
    if prompts is not None:
        table = (
            table.groupby("category", sort=False).head(prompts).reset_index(drop=True)
            if "category" in table
            else table.head(prompts)
        )
    if seeds is not None:
        seed_list = seed_list[:seeds]
    if batch is not None:
        batch_size = batch
    full_side = side
    if size is not None:
        side = full_side = size
    elif scale == "smoke":
        side = smallest_size(variants, record, side)
    if base:  # each guided variant takes the fields its method has
        variants = {k: None if c is None else _with(c, base) for k, c in variants.items()}
    if steps is not None and steps != n_steps:
        variants = {k: None if c is None else c.rescaled(n_steps, steps) for k, c in variants.items()}
        notes.append(f"steps {n_steps} -> {steps}: threshold steps and max_iter_to_alter rescaled proportionally")
        n_steps = steps
    images = len(variants) * len(table) * len(seed_list)
    if images > MAX_IMAGES and not allow_large:
        raise AnelabError(
            f"{label}: {len(variants)} variants x {len(table)} prompts x {len(seed_list):,} seeds = {images:,} images, over "
            f"{MAX_IMAGES:,}; shrink it, or go ahead with --allow-large (allow_large=True)"
        )
    return Study(
        name=data["name"],
        prompts=table,
        seeds=seed_list,
        steps=n_steps,
        size=side,
        guidance_scale=float(cfg_scale),
        batch=batch_size,
        variants=variants,
        record=record,
        steering=steering,
        source=label,
        notes=notes,
        generator_device=generator,
        scale=scale,
        calibrate=None
        if calibrate is None
        else {**calibrate, "variants": [v for v in calibrate["variants"] if v in variants]},
        scaled=sd1_units,
        dropped={str(k): str(v) for k, v in dropped.items()},
        full_size=full_side,
        overrides={k: v for k, v in dict(given, size=size).items() if v is not None},
    )


def fit_study(study: Study, model) -> Study:
    """``study`` as it runs on ``model`` (a pipeline or an :class:`anelab.models.Architecture`).

    A study written for SD 1.x at 512 px (``scaled``) runs at side × N/512 on a model of native side N, with
    every attention resolution (variants' ``attention_res``, recorded resolutions) × N/512 as well: the same
    fraction of the image (SD 1.x and SD 2.1-base: as written; SD 2.1 at 768 px: 16 → 24; SDXL at 1024 px:
    16 → 32, 32 → 64). A variant whose resolution the model does not have there (SDXL has no 8 or 64
    analogue) is dropped and listed in ``dropped`` with the reason; recorded resolutions it lacks are dropped
    with a note. A smoke slice (shrunk below its written side) takes, from its own side up, the first side at
    which the model has every resolution the study reads. The result is in the model's own units
    (``scaled=False``), so fitting twice changes nothing; on SD 1.x the study is returned unchanged."""

    arch = model if isinstance(model, Architecture) else Architecture.of(model)
    factor = arch.native / SD1_SIZE if study.scaled else 1.0
    written = study.full_size or study.size
    side_full = _multiple_of_8(written * factor)
    have = arch.resolutions(side_full)

    def moved(res: int) -> int | None:
        value = res * factor
        return int(round(value)) if abs(value - round(value)) < 1e-9 else None

    variants, dropped, notes = {}, dict(study.dropped), list(study.notes)
    for name, config in study.variants.items():
        fitted = None if config is None else config.at_scale(factor)
        if config is None or (fitted is not None and set(fitted.resolutions()) <= set(have)):
            variants[name] = config if fitted == config else fitted
            continue
        if config.name == AE:
            scaled = f" (x{factor:g} = {config.attention_res * factor:g})" if factor != 1 else ""
            what = f"attention_res {config.attention_res}{scaled}"
        else:
            scaled = f" (x{factor:g})" if factor != 1 else ""
            what = f"{config.name} reads resolutions {config.resolutions()}{scaled}"
        dropped[name] = f"{what}: this model has cross-attention at {have} at {side_full} px"
    record = study.record
    if record is not None and record.resolutions is not None:
        kept = sorted({moved(r) for r in record.resolutions} & set(have))
        lost = [r for r in record.resolutions if moved(r) not in have]
        if lost:
            notes.append(
                f"recorded resolution(s) {sorted(lost)} dropped: this model has cross-attention at {have} at {side_full} px"
            )
        if tuple(sorted(kept, reverse=True)) != tuple(record.resolutions):
            record = dataclasses.replace(record, resolutions=kept) if kept else None
    side = side_full
    if study.size != written and not (
        record is not None and record.resolutions is None
    ):  # a smoke slice: from its own side up
        needed = {r for c in variants.values() if c is not None for r in c.resolutions()} | set(
            record.resolutions if record else ()
        )
        start = _multiple_of_8(study.size * factor)
        candidates = [start, *range(-(-start // 64) * 64, side_full, 64), side_full]
        side = next(s for s in candidates if needed <= set(arch.resolutions(s)))
    if variants == study.variants and record is study.record and side == study.size and dropped == study.dropped:
        return study
    calibrate = study.calibrate
    if calibrate is not None:
        chosen = [v for v in calibrate["variants"] if v in variants]
        calibrate = {**calibrate, "variants": chosen} if chosen else None
    return dataclasses.replace(
        study,
        size=side,
        variants=variants,
        record=record,
        steering={k: v for k, v in study.steering.items() if k in variants},
        calibrate=calibrate,
        notes=notes,
        dropped=dropped,
        scaled=False,
        full_size=side_full,
    )


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def _calibrate(spec, variants: Mapping, fail) -> dict | None:
    """``calibrate: {from: study, variant: sd, quantile: 0.5, variants: [...]}``: the listed guided variants take
    thresholds at their own threshold steps from the plain-SD statistics of ``from`` at their own resolution."""
    if spec is None:
        return None
    allowed = {"from", "variant", "quantile", "variants"}
    if not isinstance(spec, Mapping) or set(spec) - allowed or "from" not in spec or "variants" not in spec:
        fail(("calibrate",), f"must be a mapping with from and variants (and variant, quantile), got {spec!r}")
    if not isinstance(spec["from"], str) or not spec["from"].strip():
        fail(("calibrate", "from"), f"must name the source study (a built-in name or a file), got {spec['from']!r}")
    quantile = spec.get("quantile", 0.5)
    if not is_number(quantile) or not 0 <= quantile <= 1:
        fail(("calibrate", "quantile"), f"must be a number in [0, 1], got {quantile!r}")
    chosen = spec["variants"]
    if not isinstance(chosen, list) or not chosen or any(variants.get(v) is None for v in chosen):
        fail(("calibrate", "variants"), f"must list guided variants of this study, got {chosen!r}")
    return {
        "from": str(spec["from"]),
        "variant": str(spec.get("variant", "sd")),
        "quantile": float(quantile),
        "variants": list(chosen),
    }


def _slice(spec, name: str, variants: Mapping, fail) -> dict:
    """A file's own ``smoke``/``quick`` slice: a subset of its variants, and prompts / seeds counts."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping) or set(spec) - set(SLICE_KEYS):
        fail((name,), f"must be a mapping of {list(SLICE_KEYS)}, got {spec!r}")
    out = {}
    if "variants" in spec:
        chosen = spec["variants"]
        if not isinstance(chosen, list) or not chosen or any(v not in variants for v in chosen):
            fail((name, "variants"), f"must list variants of this study ({list(variants)}), got {chosen!r}")
        out["variants"] = list(chosen)
    if "categories" in spec:
        if (
            not isinstance(spec["categories"], list)
            or not spec["categories"]
            or any(c not in (*CATEGORIES, "custom") for c in spec["categories"])
        ):
            fail((name, "categories"), f"must be a list drawn from {list(CATEGORIES)}, got {spec['categories']!r}")
        out["categories"] = list(spec["categories"])
    for key in ("prompts", "seeds"):
        if key in spec:
            if not is_int(spec[key]) or spec[key] < 1:
                fail((name, key), f"must be an int >= 1, got {spec[key]!r}")
            out[key] = int(spec[key])
    return out


def smallest_size(variants: Mapping[str, Method | None], record: Record | None, size: int, floor: int = 128) -> int:
    """The smallest image side, at most ``size`` and at least ``floor``, whose top attention resolution
    (side / 8 on SD 1.x and the tiny model) covers every resolution the variants' methods read and every
    recorded resolution (``Record(resolutions=None)`` records all: ``size`` stays)."""
    if record is not None and record.resolutions is None:
        return size
    needed = [r for c in variants.values() if c is not None for r in c.resolutions()]
    needed += list(record.resolutions if record else ())
    return min(size, max([floor, *(8 * r for r in needed)]))


def _prompts(spec, fail) -> pd.DataFrame:
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"set", "categories", "limit"}
        if unknown:
            fail(("prompts", sorted(unknown)[0]), "unknown key; allowed: set, categories, limit")
        if spec.get("set", "ane") != "ane":
            fail(
                ("prompts", "set"),
                f"only the 'ane' prompt set is built in, got {spec.get('set')!r}; or give a list of {{prompt, tokens}}",
            )
        categories = spec.get("categories") or list(CATEGORIES)
        if not isinstance(categories, list) or any(c not in CATEGORIES for c in categories):
            fail(("prompts", "categories"), f"must be a list drawn from {list(CATEGORIES)}, got {categories!r}")
        limit = spec.get("limit")
        if limit is not None and (not is_int(limit) or limit < 1):
            fail(("prompts", "limit"), f"must be null or an int >= 1, got {limit!r}")
        return load_prompts(categories=categories, limit=limit)
    if isinstance(spec, list) and spec:
        rows = []
        for k, item in enumerate(spec):
            allowed = {"prompt", "tokens", "subjects", "category"}
            if not isinstance(item, Mapping) or set(item) - allowed or "prompt" not in item:
                fail(
                    ("prompts",),
                    f"item {k} must be {{prompt: text, tokens: [words] or subjects: [[noun, [modifiers]], ...], "
                    f"category: optional}}, got {item!r}",
                )
            subjects = _item_subjects(item.get("subjects"), k, fail)
            tokens = item.get("tokens", [n for n, _ in subjects] if subjects else [])
            if not isinstance(tokens, list) or not all(isinstance(t, (str, int)) for t in tokens):
                fail(("prompts",), f"item {k}: tokens must be a list of words, got {tokens!r}")
            if subjects and [n for n, _ in subjects] != tokens:
                fail(
                    ("prompts",),
                    f"item {k}: tokens {tokens!r} must be the subjects' nouns {[n for n, _ in subjects]!r}",
                )
            rows.append(
                {
                    "prompt": str(item["prompt"]),
                    "category": item.get("category", "custom"),
                    "tokens": tokens,
                    "subjects": subjects or [(t, []) for t in tokens],
                }
            )
        frame = pd.DataFrame(rows)
        if frame.prompt.duplicated().any():
            fail(("prompts",), f"repeated prompts: {sorted(set(frame.prompt[frame.prompt.duplicated()]))}")
        return frame
    fail(("prompts",), "must be {set: ane, categories: [...], limit: K} or a non-empty list of {prompt, tokens}")


def _item_subjects(spec, k: int, fail) -> list:
    """A custom prompt's ``subjects``: ``[[noun, [modifiers]], ...]`` (a bare word is a noun without modifiers)."""
    if spec is None:
        return []
    out = []
    items = spec if isinstance(spec, list) else [None]
    for item in items:
        if isinstance(item, str):
            out.append((item, []))
        elif (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], list)
            and all(isinstance(m, str) for m in item[1])
        ):
            out.append((item[0], list(item[1])))
        else:
            fail(("prompts",), f"item {k}: subjects must be a list of [noun, [modifiers]] (or nouns), got {spec!r}")
    return out


def _steering(spec, path, fail) -> dict:
    """``excite``/``suppress``: lists of subject indices; ``layout``: {subject index: [x, y]}."""
    out = {}
    for key in ("excite", "suppress"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list) or not all(is_int(i) and i >= 0 for i in value):
                fail((*path, key), f"must be a list of subject indices (0 = the prompt's first subject), got {value!r}")
            out[key] = list(value)
    if "layout" in spec:
        value = spec["layout"]
        if not isinstance(value, Mapping) or not all(is_int(i) and i >= 0 for i in value):
            fail((*path, "layout"), f"must map subject indices to [x, y] points in [0, 1], got {value!r}")
        try:
            out["layout"] = {int(i): list(layout_point(f"subject {i}", p)) for i, p in value.items()}
        except AnelabError as error:
            fail((*path, "layout"), str(error))
    return out


def _seeds(spec, fail) -> list[int]:
    if is_int(spec) and spec >= 1:
        if spec > MAX_SEEDS:
            fail(("seeds",), f"{spec} seeds is more than any study can run (at most {MAX_SEEDS:,})")
        return list(range(spec))
    if isinstance(spec, list) and spec and all(is_int(s) and 0 <= s < 2**64 for s in spec):
        if len(set(spec)) != len(spec):
            fail(("seeds",), "seeds must be distinct")
        return list(spec)
    fail(("seeds",), f"must be a count >= 1 or a list of distinct ints >= 0, got {spec!r}")


def _config(base, overrides, path, fail) -> Method:
    """A variant's method: A&E (``GuidanceConfig``) with ``base`` and the overrides, or ``method: name`` with its own
    settings (and the fields of ``base`` it has)."""
    name = overrides.get("method", AE)
    if name not in methods.REGISTRY:
        fail((*path, "method"), f"unknown method {name!r}; the methods are {', '.join(methods.names())}")
    cls = methods.REGISTRY[name]
    known = _settings(cls)
    settings = {k: v for k, v in overrides.items() if k != "method"}
    for key in settings:
        if key not in known:
            what = "a GuidanceConfig field" if name == AE else f"a setting of {name}"
            fail((*path, key), f"is not {what}; allowed: {', '.join(known)}")
    if name == AE:
        for key in base:
            if key not in known:
                fail(("base", key), f"is not a GuidanceConfig field; allowed: {', '.join(CONFIG_FIELDS)}")
    fields = {**{k: v for k, v in base.items() if k in known}, **settings}
    try:
        return cls.from_dict(fields)  # also a spec read back from JSON (threshold steps as text)
    except AnelabError as error:
        fail(path, str(error))


def _settings(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _with(method: Method, changes: Mapping) -> Method:
    """``method`` with the fields of ``changes`` it has (a scale's or the CLI's overrides of every guided variant)."""
    known = set(_settings(type(method)))
    mine = {k: v for k, v in changes.items() if k in known}
    return method.replace(**mine) if mine else method


def variant_spec(method: Method | None):
    """A variant as the spec writes it: null (plain SD), A&E's settings, or another method's with its ``method`` name."""
    return methods.spec(method)


def _record(spec, fail) -> Record | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        fail(("record",), f"must be a mapping of {RECORD_FIELDS}, got {spec!r}")
    for key in spec:
        if key not in RECORD_FIELDS:
            fail(("record", key), f"unknown key; allowed: {', '.join(RECORD_FIELDS)}")
    if spec.get("maps", False):
        fail(
            ("record", "maps"),
            "sweeps keep token statistics only; set maps: false (record maps of chosen images with anelab.generate)",
        )
    fields = {k: v for k, v in spec.items() if k != "maps"}
    try:
        return Record(**fields, maps=False)
    except AnelabError as error:
        fail(("record",), str(error))
