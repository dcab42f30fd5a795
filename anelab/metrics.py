"""Metrics of the A&E protocol: CLIP image–text and BLIP-caption text–text similarity (reference §2),
and guidance statistics from a trace (STUDIES.md, "Measures").

Scorers are loaded once (:func:`load_clip`, :func:`load_blip`; ``"tiny"`` = offline random stand-ins)
and passed to the pure scoring functions. Similarities are cosines of L2-normalised embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .detection import DEFAULT_THRESHOLD, detect_subjects, load_detector, per_image
from .errors import AnelabError
from .io import write_parquet
from .loading import default_device, load_or_explain, quiet_transformers
from .log import bars_off
from .names import PROMPTS_FILE
from .prompts import load_prompts, sub_prompts
from .resources import data_file
from .stand_ins import tiny_blip, tiny_clip

DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # the paper's ViT-B/16 weights
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"  # BLIP base captioner (COCO-finetuned)
BLIP_PROMPT = "a picture of "  # prepended for generation and stripped from the caption, as LAVIS does (§2.2)
CLIP_COLUMNS = ["full_prompt", "first_half", "second_half", "min_object"]


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates in the order the A&E metrics use them (§2.1)."""
    return tuple(json.loads(data_file("clip_imagenet_templates.json").read_text())["templates"])


def templated(prompt: str, templates: Sequence[str] | None = None) -> list[str]:
    """The template sentences of ``prompt`` with the official plain replacements 'a a'→'a', then 'the a'→'a' (§2.1)."""
    return [t.format(prompt).replace("a a", "a").replace("the a", "a") for t in templates or imagenet_templates()]


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or default_device())
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def _as_rgb(image):
    """A PIL RGB image from a PIL image, an array or a path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image.convert("RGB")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _features(output) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor, or an output whose pooler_output holds them)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclasses.dataclass
class Clip:
    """A CLIP model with its tokenizer and image processor; embeddings are L2-normalised fp32 on the CPU."""

    model: object
    tokenizer: object
    image_processor: object
    name: str
    _prompts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """``[N, D]`` text embeddings without templates (how §2.2 embeds a caption)."""
        chunks = []
        for batch in _batches(list(texts), batch_size):
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt").to(
                self.device
            )
            chunks.append(_features(self.model.get_text_features(**tokens)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        """``[D]``: mean of the normalised embeddings of the 80 template sentences, normalised again (§2.1)."""
        if prompt not in self._prompts:
            self._prompts[prompt] = torch.nn.functional.normalize(self.embed_texts(templated(prompt)).mean(0), dim=-1)
        return self._prompts[prompt]

    @torch.no_grad()
    def embed_images(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        """``[N, D]`` image embeddings (CLIP's own preprocessing)."""
        chunks = []
        for batch in _batches(list(images), batch_size):
            pixels = self.image_processor(images=[_as_rgb(x) for x in batch], return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.model.dtype)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()


@dataclasses.dataclass
class Blip:
    """A BLIP captioner with its processor."""

    model: object
    processor: object
    name: str

    @torch.no_grad()
    def caption(
        self, images: Sequence, batch_size: int = 16, num_beams: int = 3, min_length: int = 10, max_length: int = 30
    ) -> list[str]:
        """Beam-search captions with LAVIS's settings (§2.2): the prompt "a picture of " is prepended, then stripped."""
        captions = []
        for batch in _batches(list(images), batch_size):
            inputs = self.processor(
                images=[_as_rgb(x) for x in batch], text=[BLIP_PROMPT.strip()] * len(batch), return_tensors="pt"
            )
            inputs = inputs.to(self.model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model.generate(**inputs, num_beams=num_beams, min_length=min_length, max_length=max_length)
            for text in self.processor.batch_decode(out, skip_special_tokens=True):
                captions.append(text[len(BLIP_PROMPT) :] if text.startswith(BLIP_PROMPT) else text.strip())
        return captions


def load_clip(spec: str | Clip = DEFAULT_CLIP, device=None, dtype=None) -> Clip:
    """CLIP scorer: ``"tiny"`` (offline random), a Hub id or a local directory; fp16 on GPU by default."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    if isinstance(spec, Clip):
        return spec
    device, dtype = _device_dtype(device, dtype)
    if str(spec) == "tiny":
        with quiet_transformers():
            model, tokenizer, processor = tiny_clip()
    else:
        model, tokenizer, processor = load_or_explain(
            "CLIP model",
            str(spec),
            "config.json",
            lambda path: (
                CLIPModel.from_pretrained(path),
                CLIPTokenizer.from_pretrained(path),
                CLIPImageProcessorPil.from_pretrained(path),
            ),
        )
    return Clip(model.to(device, dtype).eval().requires_grad_(False), tokenizer, processor, str(spec))


def load_blip(spec: str | Blip = DEFAULT_BLIP, device=None, dtype=None) -> Blip:
    """BLIP captioner: ``"tiny"`` (offline random), a Hub id or a local directory; fp16 on GPU by default."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    if isinstance(spec, Blip):
        return spec
    device, dtype = _device_dtype(device, dtype)
    if str(spec) == "tiny":
        with quiet_transformers():
            model, processor = tiny_blip()
    else:
        model, processor = load_or_explain(
            "BLIP model",
            str(spec),
            "config.json",
            lambda path: (BlipForConditionalGeneration.from_pretrained(path), BlipProcessor.from_pretrained(path)),
        )
    return Blip(model.to(device, dtype).eval().requires_grad_(False), processor, str(spec))


def _pair(images: Sequence, prompts: Sequence[str] | str) -> tuple[list, list[str]]:
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
        raise AnelabError(
            f"got {len(images)} images and {len(prompts)} prompts; give one prompt per image (or one for all)"
        )
    if not images:
        raise AnelabError("no images to score")
    return images, prompts


def clip_scores(images: Sequence, prompts: Sequence[str] | str, clip: Clip, batch_size: int = 32) -> pd.DataFrame:
    """Per image: CLIP similarity to the full prompt, to each sub-prompt and their minimum (§2.1).

    A prompt with neither " and " nor " with " has no sub-prompts: its halves and ``min_object`` are NaN.
    """
    images, prompts = _pair(images, prompts)
    image_embeddings = clip.embed_images(images, batch_size)  # [N, D]

    def score(texts: list[str | None]) -> np.ndarray:
        known = {t for t in texts if t is not None}
        table = {t: clip.embed_prompt(t) for t in known}
        return np.array([np.nan if t is None else float(e @ table[t]) for e, t in zip(image_embeddings, texts)])

    halves = [sub_prompts(p) or (None, None) for p in prompts]
    frame = pd.DataFrame({"prompt": prompts, "full_prompt": score(prompts)})
    frame["first_half"] = score([h[0] for h in halves])
    frame["second_half"] = score([h[1] for h in halves])
    frame["min_object"] = frame[["first_half", "second_half"]].min(axis=1, skipna=False)
    return frame


def binding_scores(images: Sequence, prompts: Sequence[str] | str, clip: Clip, batch_size: int = 32) -> pd.DataFrame:
    """Per image: the attribute-binding margin of its prompt's colour–object pairs (:func:`anelab.prompts.attribute_pairs`):
    the mean over pairs (c, n) of CLIP(image, "a c n") minus the mean of CLIP(image, "a c m") over the prompt's other
    nouns m (each text through the 80 templates). Above 0: each colour sits on its own object rather than on the
    other; NaN for a prompt without a colour–object pair (or with one noun)."""
    from .prompts import attribute_pairs

    images, prompts = _pair(images, prompts)
    image_embeddings = clip.embed_images(images, batch_size)  # [N, D]
    texts: dict[str, torch.Tensor] = {}

    def similarity(embedding, text: str) -> float:
        if text not in texts:
            texts[text] = clip.embed_prompt(text)
        return float(embedding @ texts[text])

    margins = []
    for embedding, prompt in zip(image_embeddings, prompts):
        pairs, nouns = attribute_pairs(prompt)
        values = [
            similarity(embedding, f"a {c} {n}")
            - np.mean([similarity(embedding, f"a {c} {m}") for m in nouns if m != n])
            for c, n in pairs
            if any(m != n for m in nouns)
        ]
        margins.append(float(np.mean(values)) if values else np.nan)
    return pd.DataFrame({"prompt": prompts, "binding": margins})


def text_text_scores(
    images: Sequence, prompts: Sequence[str] | str, clip: Clip, blip: Blip, batch_size: int = 16
) -> pd.DataFrame:
    """Per image: its BLIP caption and the CLIP similarity of the caption (no templates) to the prompt (templates) (§2.2)."""
    images, prompts = _pair(images, prompts)
    captions = blip.caption(images, batch_size)
    caption_embeddings = clip.embed_texts(captions)
    scores = [float(c @ clip.embed_prompt(p)) for c, p in zip(caption_embeddings, prompts)]
    return pd.DataFrame({"prompt": prompts, "caption": captions, "text_text": scores})


# -- scoring images with several scorers -------------------------------------------------------
SCORER_COLUMNS = {
    "clip": CLIP_COLUMNS,
    "binding": ["binding"],  # with the CLIP model: the attribute-binding margin of the coloured prompts
    "blip": ["caption", "text_text"],
    "detector": [
        "subjects",
        "all_present",
        "detect_threshold",
    ],  # + present_k, score_k, center_x_k, center_y_k per subject k
}


@dataclasses.dataclass
class Scorers:
    """The scorers of one scoring job, each a model spec (``"tiny"``, a Hub id, a local directory, a
    loaded scorer) or None (not scored); loaded once, on first use, on ``device``."""

    clip: str | Clip | None = DEFAULT_CLIP
    blip: str | Blip | None = DEFAULT_BLIP
    detector: object = None  # str | anelab.detection.Detector | None
    threshold: float | None = None  # detection threshold (None: anelab.detection.DEFAULT_THRESHOLD)
    device: object = None
    dtype: object = None
    _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    def names(self) -> dict[str, str]:
        """``{kind: model name}`` of the scorers in use (CLIP is needed by BLIP's text–text score too; the binding margin
        is CLIP's too, a kind of its own so that images scored before it existed get it)."""
        specs = {"clip": self.clip, "binding": self.clip, "blip": self.blip, "detector": self.detector}
        return {kind: getattr(spec, "name", str(spec)) for kind, spec in specs.items() if spec is not None}

    def get(self, kind: str):
        if kind == "binding":
            return self.get("clip")
        if kind not in self._loaded:
            spec = getattr(self, kind)
            if kind == "clip":
                self._loaded[kind] = load_clip(spec, self.device, self.dtype)
            elif kind == "blip":
                self._loaded[kind] = load_blip(spec, self.device, self.dtype)
            else:
                self._loaded[kind] = load_detector(spec, self.device, self.dtype)
        return self._loaded[kind]

    @property
    def detection_threshold(self) -> float:

        return DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)


def score_images(
    images: Sequence,
    prompts: Sequence[str],
    subjects: Sequence[Sequence[str]],
    scorers: Scorers,
    kinds: Sequence[str],
    batch_size: int = 16,
) -> tuple[pd.DataFrame, list[str]]:
    """One row per image with the columns of each scorer in ``kinds`` (:data:`SCORER_COLUMNS`) and
    ``<kind>_model``; the notices say what could not be scored (a subject that is not an object, ...)."""
    images, prompts = _pair(images, prompts)
    frame, notices = pd.DataFrame(index=range(len(images))), []
    if "clip" in kinds or "blip" in kinds or "binding" in kinds:
        clip = scorers.get("clip")
    if "clip" in kinds:
        scores = clip_scores(images, prompts, clip, batch_size)
        frame = frame.assign(**{c: scores[c] for c in CLIP_COLUMNS}, clip_model=clip.name)
    if "binding" in kinds:
        frame = frame.assign(binding=binding_scores(images, prompts, clip, batch_size).binding, binding_model=clip.name)
    if "blip" in kinds:
        captions = text_text_scores(images, prompts, clip, scorers.get("blip"), batch_size)
        frame = frame.assign(
            caption=captions.caption, text_text=captions.text_text, blip_model=scorers.get("blip").name
        )
    if "detector" in kinds:
        detector = scorers.get("detector")
        found = detect_subjects(images, [list(s) for s in subjects], detector, scorers.detection_threshold, batch_size)
        notices += found.attrs.get("notices", [])
        frame = frame.join(_detection_columns(found, len(images))).assign(detector_model=detector.name)
    return frame, notices


def _detection_columns(found: pd.DataFrame, n_images: int) -> pd.DataFrame:
    """The wide per-image detection columns from :func:`anelab.detection.detect_subjects`' long table."""

    table = per_image(found).set_index("image").drop(columns="n_subjects")
    table.insert(0, "subjects", found.groupby("image").subject.agg(",".join))
    table.insert(2, "detect_threshold", found.groupby("image").threshold.first())
    return table.reindex(range(n_images))


# -- a folder of images ----------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KEY_COLUMNS = ["path", "variant", "prompt", "category", "seed"]


def find_images(directory: str | os.PathLike) -> pd.DataFrame:
    """Images under ``directory`` in the A&E layout (``<prompt folder>/<seed>.png``: the folder name is the
    prompt, or ``prompts.json`` beside the folders says which prompt it holds): ``path`` (relative), variant, prompt, seed."""
    import json

    root = Path(directory)
    if not root.is_dir():
        raise AnelabError(f"{str(root)!r} is not a directory")
    rows, known = [], {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if (
            path.suffix.lower() not in IMAGE_SUFFIXES
            or any(part.startswith(".") for part in relative.parts)
            or not path.is_file()
        ):
            continue
        parts = relative.parts
        variant = parts[1] if len(parts) == 4 and parts[0] == "images" else None
        seed = int(path.stem) if path.stem.isdigit() else None
        mapping = path.parent.parent / PROMPTS_FILE
        if mapping not in known:
            known[mapping] = json.loads(mapping.read_text()) if mapping.is_file() else {}
        prompt = known[mapping].get(path.parent.name, path.parent.name)
        rows.append({"path": relative.as_posix(), "variant": variant, "prompt": prompt, "seed": seed})
    if not rows:
        raise AnelabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}; expected <prompt>/<seed>.png")
    return pd.DataFrame(rows)


def prompt_subjects(prompt: str, known: dict[str, list[str]] | None = None) -> list[str]:
    """The subject words of ``prompt``: the prompt set's nouns when it is one of its prompts (or ``known``),
    else the last word of each sub-prompt (reference §2.1 split), e.g. "a cat and a red ball" → cat, ball."""
    if known and prompt in known:
        return list(known[prompt])
    return [part.split()[-1] for part in (sub_prompts(prompt) or (prompt,)) if part.split()]


def unscored(done: pd.DataFrame, paths: Sequence[str], kind: str, name: str, where: str) -> list[str]:
    """Paths of ``paths`` that ``done`` has no ``kind`` score for; a different model for ``kind`` in ``done`` is
    refused (mixing models would corrupt the comparison), a missing one is simply scored."""
    column = f"{kind}_model"
    used = set(done[column].dropna()) if column in done else set()
    if used - {name}:
        raise AnelabError(
            f"{where} was scored with {kind} {sorted(used)}, not {name!r}; pass --rescore to start over with {name!r}"
        )
    have = set(done.path[done[column].notna()]) if column in done else set()
    return [p for p in paths if p not in have]


def score_folder(
    directory: str | os.PathLike,
    clip: str | Clip | None = DEFAULT_CLIP,
    blip: str | Blip | None = DEFAULT_BLIP,
    *,
    detector=None,
    threshold: float | None = None,
    device=None,
    dtype=None,
    batch_size: int = 16,
    chunk: int = 64,
    rescore: bool = False,
    progress: bool = True,
    subjects: dict[str, list[str]] | None = None,
) -> tuple[pd.DataFrame, list[str], dict]:
    """Score every image under ``directory`` into ``directory/metrics.parquet`` (one row per image).

    Resumable per scorer: an image is scored with each requested scorer it has no score from (so
    adding BLIP or the detector to a folder scored without them scores what is missing); a different
    model than the file's is refused unless ``rescore``. The file is rewritten atomically after each
    chunk, so an interruption loses at most one chunk. ``subjects`` ({prompt: words}) are the detector's
    queries (default: the prompt set's nouns, else :func:`prompt_subjects`). Returns the table, notices
    (unreadable images, prompts without sub-prompts, undetectable subjects) and counts.
    """

    root = Path(directory)
    found = find_images(root)
    target = root / "metrics.parquet"
    scorers = Scorers(clip, blip, detector, threshold, device, dtype)
    names = scorers.names()
    done = _read_metrics(target) if target.exists() and not rescore else pd.DataFrame(columns=KEY_COLUMNS)
    paths = list(found.path)
    needs = {kind: set(unscored(done, paths, kind, name, str(target))) for kind, name in names.items()}
    todo = found[[any(p in needs[k] for k in needs) for p in found.path]]
    counts = {"scored": 0, "already": len(found) - len(todo)}
    notices = []
    unsplit = sorted({p for p in todo.prompt if sub_prompts(p) is None})
    if unsplit:
        notices.append(
            f"{len(unsplit)} prompt(s) have neither ' and ' nor ' with ': full-prompt score only, min_object missing: {unsplit[:5]}"
        )
    if todo.empty:
        return done, notices, counts
    table = load_prompts()
    category, nouns = (
        dict(zip(table.prompt, table.category)),
        {**dict(zip(table.prompt, table.tokens)), **(subjects or {})},
    )
    done = done.set_index("path") if len(done) else pd.DataFrame(columns=KEY_COLUMNS).set_index("path")
    for kind in names:  # load every scorer before the first image: a bad model id fails here, in one line
        if needs[kind]:
            scorers.get(kind)
    bar = tqdm(total=len(todo), desc="scoring", unit="img", disable=bars_off(progress))
    for start in range(0, len(todo), chunk):
        rows = todo.iloc[start : start + chunk]
        images, readable = [], []
        for row in rows.itertuples():
            try:
                images.append(_as_rgb(root / row.path))
                readable.append(True)
            except Exception as error:  # PIL raises several types for a broken file
                notices.append(f"could not read {row.path}: {type(error).__name__}: {error}")
                readable.append(False)
        rows = rows[readable].reset_index(drop=True).assign(category=lambda r: r.prompt.map(category))
        for kind in names:
            mine = [k for k, p in enumerate(rows.path) if p in needs[kind]]
            if not mine:
                continue
            scores, said = score_images(
                [images[k] for k in mine],
                list(rows.prompt.iloc[mine]),
                [prompt_subjects(p, nouns) for p in rows.prompt.iloc[mine]],
                scorers,
                [kind],
                batch_size,
            )
            notices += [n for n in said if n not in notices]
            scored = pd.concat([rows.iloc[mine][KEY_COLUMNS].reset_index(drop=True), scores], axis=1).set_index("path")
            done = scored.combine_first(done) if len(done) else scored
        if len(rows):
            done = _tidy(done)
            write_parquet(done.reset_index(), target)
            counts["scored"] += len(rows)
        bar.update(len(readable))
    bar.close()
    return done.reset_index(), notices, counts


def _tidy(done: pd.DataFrame) -> pd.DataFrame:
    """Columns in a fixed order (CLIP and BLIP columns always, per-subject detection columns last), None for missing text."""
    fixed = [c for c in KEY_COLUMNS if c != "path"] + [
        c for kind in SCORER_COLUMNS for c in (*SCORER_COLUMNS[kind], f"{kind}_model")
    ]
    done = done.reindex(
        columns=list(dict.fromkeys([*done.columns, *CLIP_COLUMNS, "caption", "text_text", "clip_model", "blip_model"]))
    )
    order = [c for c in fixed if c in done.columns]
    order += sorted((c for c in done.columns if c not in fixed), key=lambda c: (c.rsplit("_", 1)[-1], c))
    done = done[order].copy()
    for column in (
        "variant",
        "prompt",
        "category",
        "caption",
        "subjects",
        "clip_model",
        "binding_model",
        "blip_model",
        "detector_model",
    ):
        if column in done:
            done[column] = done[column].astype(object).where(done[column].notna(), None)
    return done


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise AnelabError(
            f"{path} is damaged ({type(error).__name__}); delete it or pass --rescore to score again"
        ) from None
