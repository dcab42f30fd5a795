"""Study files (``data/studies/*.yaml``): prompts × seeds × variants, validated with file line numbers.

A study fixes everything that changes a result — model size, steps, guidance settings of each
variant, what to record, the seed batch — so a sweep directory holds one comparable experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml

from .config import GuidanceConfig
from .errors import AnelabError
from .prompts import CATEGORIES, load_prompts
from .recording import Record
from .resources import study_files

TOP_KEYS = {
    "name": "study name (text)",
    "prompts": "{set: ane, categories: [...], limit: K} or a list of {prompt, tokens}",
    "seeds": "a count n (seeds 0..n-1) or a list of seeds",
    "steps": "inference steps (int)",
    "size": "image side in pixels (int, multiple of 8)",
    "guidance_scale": "classifier-free guidance scale (number, default 7.5)",
    "batch": "seeds generated together (int, default 8)",
    "base": "GuidanceConfig fields shared by the guided variants",
    "variants": "name -> GuidanceConfig overrides of base (+ excite/suppress/layout by subject index), or null for plain SD",
    "record": "Record fields (resolutions, steps, tokens); statistics only, maps: false",
    "description": "free text",
}
CONFIG_FIELDS = [f.name for f in dataclasses.fields(GuidanceConfig)]
#: Variant keys that pick what is steered, by index into each prompt's subject tokens (STUDIES.md 05).
STEERING_KEYS = {"excite": "subject indices to excite (default: all)", "suppress": "subject indices to suppress",
                 "layout": "{subject index: [x, y]} target points"}  # fmt: skip
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
    variants: dict[str, GuidanceConfig | None]  # None = plain Stable Diffusion
    record: Record | None
    steering: dict[str, dict] = dataclasses.field(default_factory=dict)  # variant -> excite/suppress/layout by subject index
    source: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def spec(self) -> dict:
        """Everything that defines the results, as plain JSON (what the spec hash covers)."""
        return {
            "name": self.name,
            "prompts": [{"prompt": p, "category": c, "tokens": list(t)} for p, c, t in self.prompts[["prompt", "category", "tokens"]].itertuples(index=False)],
            "seeds": self.seeds,
            "steps": self.steps,
            "size": self.size,
            "guidance_scale": self.guidance_scale,
            "batch": self.batch,
            "variants": {name: None if c is None else c.to_dict() for name, c in self.variants.items()},
            "record": None if self.record is None else self.record.to_dict(),
            **({"steering": self.steering} if self.steering else {}),
        }

    def spec_hash(self, model: str) -> str:
        text = json.dumps({"model": model, **self.spec()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    source: str | Path | Mapping, *, prompts: int | None = None, seeds: int | None = None,
    steps: int | None = None, batch: int | None = None, size: int | None = None, base: Mapping | None = None, smoke: bool = False,
) -> Study:  # fmt: skip
    """Read and validate a study (a YAML path, a study name, or a dict), applying overrides.

    ``smoke=True`` shrinks it to :data:`SMOKE` (explicit overrides win).

    ``prompts`` keeps the first K prompts per category (or of an explicit list), ``seeds`` the
    first K seeds; ``steps`` rescales the variants' threshold steps and ``max_iter_to_alter``
    proportionally (:meth:`GuidanceConfig.rescaled`); ``base`` overrides GuidanceConfig fields of
    every guided variant (e.g. ``{"max_refinement_steps": 3}`` for a smoke run).
    """
    if smoke:
        given = dict(prompts=prompts, seeds=seeds, steps=steps, batch=batch, base=base)
        prompts, seeds, steps, batch, base = (SMOKE[k] if given[k] is None else given[k] for k in given)
    if isinstance(source, Mapping):
        data, lines, label = dict(source), _Lines(""), "study"
    else:
        path = study_path(source)
        text = path.read_text()
        label = str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "file"
            raise AnelabError(f"{label}: {where}: not valid YAML ({getattr(error, 'problem', error)})") from None
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
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail((key,), f"must be an int >= {minimum}, got {value!r}")
        return value

    n_steps = integer("steps", data["steps"])
    side = integer("size", data["size"], 8)
    if side % 8:
        fail(("size",), f"must be a multiple of 8, got {side}")
    batch_size = integer("batch", data.get("batch", 8))
    scale = data.get("guidance_scale", 7.5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        fail(("guidance_scale",), f"must be a number, got {scale!r}")
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
        if overrides is not None and not isinstance(overrides, Mapping):
            fail(("variants", name), f"must be a mapping of GuidanceConfig overrides or null, got {overrides!r}")
        if overrides is not None and any(k in STEERING_KEYS for k in overrides):
            steering[str(name)] = _steering(overrides, ("variants", str(name)), fail)
            overrides = {k: v for k, v in overrides.items() if k not in STEERING_KEYS}
        variants[str(name)] = None if overrides is None else _config(base_fields, overrides, ("variants", str(name)), fail)
    record = _record(data.get("record"), fail)

    # overrides (CLI / notebook parameters)
    notes = []
    if prompts is not None:
        table = table.groupby("category", sort=False).head(prompts).reset_index(drop=True) if "category" in table else table.head(prompts)
    if seeds is not None:
        seed_list = seed_list[:seeds]
    if batch is not None:
        batch_size = batch
    if size is not None:
        side = size
    elif smoke:
        side = smallest_size(variants, record, side)
    if base:
        variants = {k: None if c is None else c.replace(**base) for k, c in variants.items()}
    if steps is not None and steps != n_steps:
        variants = {k: None if c is None else c.rescaled(n_steps, steps) for k, c in variants.items()}
        notes.append(f"steps {n_steps} -> {steps}: threshold steps and max_iter_to_alter rescaled proportionally")
        n_steps = steps
    return Study(
        name=data["name"], prompts=table, seeds=seed_list, steps=n_steps, size=side, guidance_scale=float(scale),
        batch=batch_size, variants=variants, record=record, steering=steering, source=label, notes=notes,
    )  # fmt: skip


#: What smoke mode (tiny model, `make report`) shrinks a study to: minutes for the whole suite on a CPU.
#: The image side also shrinks, to the smallest that still has every resolution the study reads
#: (:func:`smallest_size`): self-attention at 64x64 makes 512 px images ~5x slower than 256 px.
SMOKE = dict(prompts=1, seeds=1, steps=4, batch=1, base={"max_refinement_steps": 3})


def smallest_size(variants: Mapping[str, GuidanceConfig | None], record: Record | None, size: int, floor: int = 128) -> int:
    """The smallest image side, at most ``size`` and at least ``floor``, whose top attention resolution
    (side / 8 on SD 1.x and the tiny model) covers every ``attention_res`` of the variants and every
    recorded resolution (``Record(resolutions=None)`` records all: ``size`` stays)."""
    if record is not None and record.resolutions is None:
        return size
    needed = [c.attention_res for c in variants.values() if c is not None] + list(record.resolutions if record else ())
    return min(size, max([floor, *(8 * r for r in needed)]))


def _prompts(spec, fail) -> pd.DataFrame:
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"set", "categories", "limit"}
        if unknown:
            fail(("prompts", sorted(unknown)[0]), "unknown key; allowed: set, categories, limit")
        if spec.get("set", "ane") != "ane":
            fail(("prompts", "set"), f"only the 'ane' prompt set is built in, got {spec.get('set')!r}; or give a list of {{prompt, tokens}}")
        categories = spec.get("categories") or list(CATEGORIES)
        if not isinstance(categories, list) or any(c not in CATEGORIES for c in categories):
            fail(("prompts", "categories"), f"must be a list drawn from {list(CATEGORIES)}, got {categories!r}")
        limit = spec.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            fail(("prompts", "limit"), f"must be null or an int >= 1, got {limit!r}")
        return load_prompts(categories=categories, limit=limit)
    if isinstance(spec, list) and spec:
        rows = []
        for k, item in enumerate(spec):
            if not isinstance(item, Mapping) or set(item) - {"prompt", "tokens", "category"} or "prompt" not in item:
                fail(("prompts",), f"item {k} must be {{prompt: text, tokens: [words], category: optional}}, got {item!r}")
            tokens = item.get("tokens", [])
            if not isinstance(tokens, list) or not all(isinstance(t, (str, int)) for t in tokens):
                fail(("prompts",), f"item {k}: tokens must be a list of words, got {tokens!r}")
            rows.append({"prompt": str(item["prompt"]), "category": item.get("category", "custom"), "tokens": tokens})
        frame = pd.DataFrame(rows)
        if frame.prompt.duplicated().any():
            fail(("prompts",), f"repeated prompts: {sorted(set(frame.prompt[frame.prompt.duplicated()]))}")
        return frame
    fail(("prompts",), "must be {set: ane, categories: [...], limit: K} or a non-empty list of {prompt, tokens}")


def _steering(spec, path, fail) -> dict:
    """``excite``/``suppress``: lists of subject indices; ``layout``: {subject index: [x, y]}."""
    out = {}
    for key in ("excite", "suppress"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                fail((*path, key), f"must be a list of subject indices (0 = the prompt's first subject), got {value!r}")
            out[key] = list(value)
    if "layout" in spec:
        value = spec["layout"]
        ok = isinstance(value, Mapping) and all(
            isinstance(i, int) and isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in p)
            for i, p in value.items()
        )
        if not ok:
            fail((*path, "layout"), f"must map subject indices to [x, y] points in [0, 1], got {value!r}")
        out["layout"] = {int(i): [float(v) for v in p] for i, p in value.items()}
    return out


def _seeds(spec, fail) -> list[int]:
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return list(range(spec))
    if isinstance(spec, list) and spec and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in spec):
        if len(set(spec)) != len(spec):
            fail(("seeds",), "seeds must be distinct")
        return list(spec)
    fail(("seeds",), f"must be a count >= 1 or a list of distinct ints >= 0, got {spec!r}")


def _config(base, overrides, path, fail) -> GuidanceConfig:
    fields = {**base, **overrides}
    for key in fields:
        if key not in CONFIG_FIELDS:
            where = path + (key,) if key in overrides else ("base", key)
            fail(where, f"is not a GuidanceConfig field; allowed: {', '.join(CONFIG_FIELDS)}")
    if isinstance(fields.get("scale_range"), list):
        fields["scale_range"] = tuple(fields["scale_range"])
    try:
        return GuidanceConfig(**fields)
    except AnelabError as error:
        fail(path, str(error))


def _record(spec, fail) -> Record | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        fail(("record",), f"must be a mapping of {RECORD_FIELDS}, got {spec!r}")
    for key in spec:
        if key not in RECORD_FIELDS:
            fail(("record", key), f"unknown key; allowed: {', '.join(RECORD_FIELDS)}")
    if spec.get("maps", False):
        fail(("record", "maps"), "sweeps keep token statistics only; set maps: false (record maps of chosen images with anelab.generate)")
    fields = {k: v for k, v in spec.items() if k != "maps"}
    try:
        return Record(**fields, maps=False)
    except AnelabError as error:
        fail(("record",), str(error))
