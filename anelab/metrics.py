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
from tqdm.auto import tqdm

from .errors import AnelabError
from .loading import default_device, load_or_explain, quiet_transformers
from .prompts import DATA_DIR, sub_prompts

DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # the paper's ViT-B/16 weights
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"  # BLIP base captioner (COCO-finetuned)
BLIP_PROMPT = "a picture of "  # prepended for generation and stripped from the caption, as LAVIS does (§2.2)
CLIP_COLUMNS = ["full_prompt", "first_half", "second_half", "min_object"]


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates in the order the A&E metrics use them (§2.1)."""
    return tuple(json.loads((DATA_DIR / "clip_imagenet_templates.json").read_text())["templates"])


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
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
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
    def caption(self, images: Sequence, batch_size: int = 16, num_beams: int = 3, min_length: int = 10, max_length: int = 30) -> list[str]:
        """Beam-search captions with LAVIS's settings (§2.2): the prompt "a picture of " is prepended, then stripped."""
        captions = []
        for batch in _batches(list(images), batch_size):
            inputs = self.processor(images=[_as_rgb(x) for x in batch], text=[BLIP_PROMPT.strip()] * len(batch), return_tensors="pt")
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
        from .testing import tiny_clip

        with quiet_transformers():
            model, tokenizer, processor = tiny_clip()
    else:
        model, tokenizer, processor = load_or_explain(
            "CLIP model", str(spec), "config.json",
            lambda path: (CLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path), CLIPImageProcessorPil.from_pretrained(path)),
        )  # fmt: skip
    return Clip(model.to(device, dtype).eval().requires_grad_(False), tokenizer, processor, str(spec))


def load_blip(spec: str | Blip = DEFAULT_BLIP, device=None, dtype=None) -> Blip:
    """BLIP captioner: ``"tiny"`` (offline random), a Hub id or a local directory; fp16 on GPU by default."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    if isinstance(spec, Blip):
        return spec
    device, dtype = _device_dtype(device, dtype)
    if str(spec) == "tiny":
        from .testing import tiny_blip

        with quiet_transformers():
            model, processor = tiny_blip()
    else:
        model, processor = load_or_explain(
            "BLIP model", str(spec), "config.json",
            lambda path: (BlipForConditionalGeneration.from_pretrained(path), BlipProcessor.from_pretrained(path)),
        )  # fmt: skip
    return Blip(model.to(device, dtype).eval().requires_grad_(False), processor, str(spec))


def _pair(images: Sequence, prompts: Sequence[str] | str) -> tuple[list, list[str]]:
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
        raise AnelabError(f"got {len(images)} images and {len(prompts)} prompts; give one prompt per image (or one for all)")
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


def text_text_scores(images: Sequence, prompts: Sequence[str] | str, clip: Clip, blip: Blip, batch_size: int = 16) -> pd.DataFrame:
    """Per image: its BLIP caption and the CLIP similarity of the caption (no templates) to the prompt (templates) (§2.2)."""
    images, prompts = _pair(images, prompts)
    captions = blip.caption(images, batch_size)
    caption_embeddings = clip.embed_texts(captions)
    scores = [float(c @ clip.embed_prompt(p)) for c, p in zip(caption_embeddings, prompts)]
    return pd.DataFrame({"prompt": prompts, "caption": captions, "text_text": scores})


GUIDANCE_COLUMNS = ["pairs", "triggered", "guidance_rate", "success_rate", "mean_refinement_rounds"]


def guidance_stats(trace: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Guidance rate, success rate and mean refinement rounds (STUDIES.md) per threshold step and overall.

    A *pair* is (image, threshold step); an image is a seed (with ``prompt``/``variant`` when the
    trace has them). Rate = share of pairs that triggered refinement; success = share of triggered
    pairs that reached the threshold; rounds = refinement iterations per pair (untriggered count 0).
    Rows with ``step`` <NA> are over all threshold steps; ``by`` adds grouping columns (e.g. category).
    """
    needed = ["seed", "step", "threshold", "triggered", "reached", "refinement_iterations", *by]
    missing = [c for c in needed if c not in trace.columns]
    if missing:
        raise AnelabError(f"guidance_stats needs trace columns {missing}")
    image = [c for c in ("variant", "prompt") if c in trace.columns and c not in by] + ["seed"]
    pairs = trace[trace.threshold.notna()].drop_duplicates([*by, *image, "step"])

    def summary(group: pd.DataFrame) -> pd.Series:
        triggered = group.triggered.astype(bool)
        reached = group.reached[triggered].astype(bool)
        return pd.Series(
            {
                "pairs": len(group),
                "triggered": int(triggered.sum()),
                "guidance_rate": triggered.mean() if len(group) else np.nan,
                "success_rate": reached.mean() if len(reached) else np.nan,
                "mean_refinement_rounds": group.refinement_iterations.mean() if len(group) else np.nan,
            }
        )

    per_step = pairs.groupby([*by, "step"]).apply(summary, include_groups=False).reset_index() if len(pairs) else None
    if by:
        overall = pairs.groupby(list(by)).apply(summary, include_groups=False).reset_index() if len(pairs) else None
    else:
        overall = summary(pairs).to_frame().T
    frames = [f for f in (per_step, overall) if f is not None]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*by, "step", *GUIDANCE_COLUMNS])
    result["step"] = result["step"].astype("Int64") if "step" in result else pd.array([pd.NA] * len(result), dtype="Int64")
    result = result.astype({"pairs": int, "triggered": int, "guidance_rate": float, "success_rate": float, "mean_refinement_rounds": float})
    return result[[*by, "step", *GUIDANCE_COLUMNS]]


# -- a folder of images ----------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METRIC_COLUMNS = ["path", "variant", "prompt", "category", "seed", *CLIP_COLUMNS, "caption", "text_text", "clip_model", "blip_model"]


def find_images(directory: str | os.PathLike) -> pd.DataFrame:
    """Images under ``directory`` in the A&E layout (``<prompt>/<seed>.png``, the folder name is the
    prompt) or a sweep's (``images/<variant>/<prompt>/<seed>.png``): ``path`` (relative), variant, prompt, seed."""
    root = Path(directory)
    if not root.is_dir():
        raise AnelabError(f"{str(root)!r} is not a directory")
    rows = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        parts = relative.parts
        variant = parts[1] if len(parts) == 4 and parts[0] == "images" else None
        seed = int(path.stem) if path.stem.isdigit() else None
        rows.append({"path": relative.as_posix(), "variant": variant, "prompt": path.parent.name, "seed": seed})
    if not rows:
        raise AnelabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}; expected <prompt>/<seed>.png")
    return pd.DataFrame(rows)


def score_folder(
    directory: str | os.PathLike, clip: str | Clip = DEFAULT_CLIP, blip: str | Blip | None = DEFAULT_BLIP, *,
    device=None, batch_size: int = 16, chunk: int = 64, rescore: bool = False, progress: bool = True,
) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
    """Score every image under ``directory`` into ``directory/metrics.parquet`` (one row per image).

    Resumable: images already in the file are skipped; the file is rewritten atomically after each
    chunk, so an interruption loses at most one chunk. ``blip=None`` skips captioning. Returns the
    table and a list of notices (unreadable images, prompts without sub-prompts).
    """
    from .io import write_parquet
    from .prompts import load_prompts

    root = Path(directory)
    found = find_images(root)
    target = root / "metrics.parquet"
    names = {"clip_model": clip.name if isinstance(clip, Clip) else str(clip), "blip_model": None if blip is None else getattr(blip, "name", str(blip))}
    done = pd.read_parquet(target) if target.exists() and not rescore else pd.DataFrame(columns=METRIC_COLUMNS)
    for column, name in names.items():
        used = set(done[column].dropna()) if len(done) else set()
        if used and used != {name}:
            raise AnelabError(
                f"{target} was scored with {column.split('_')[0].upper()} {sorted(used)}, not {name or 'none'!r}; "
                "pass --rescore to start over"
            )
    todo = found[~found.path.isin(done.path)]
    notices = []
    unsplit = sorted({p for p in todo.prompt if sub_prompts(p) is None})
    if unsplit:
        notices.append(f"{len(unsplit)} prompt(s) have neither ' and ' nor ' with ': full-prompt score only, min_object missing: {unsplit[:5]}")
    if todo.empty:
        return done, notices
    clip = load_clip(clip, device)
    blip = None if blip is None else load_blip(blip, device)
    table = load_prompts()
    category = dict(zip(table.prompt, table.category))
    bar = tqdm(total=len(todo), desc="scoring", unit="img", disable=not progress)
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
        rows = rows[readable].reset_index(drop=True)
        if len(rows):
            scores = clip_scores(images, list(rows.prompt), clip, batch_size)
            rows = rows.assign(category=rows.prompt.map(category), **{c: scores[c] for c in CLIP_COLUMNS}, **names)
            if blip is not None:
                captions = text_text_scores(images, list(rows.prompt), clip, blip, batch_size)
                rows = rows.assign(caption=captions.caption, text_text=captions.text_text)
            else:
                rows = rows.assign(caption=None, text_text=np.nan)
            done = pd.concat([frame for frame in (done, rows[METRIC_COLUMNS]) if len(frame)], ignore_index=True)
            write_parquet(done, target)
        bar.update(len(readable))
    bar.close()
    return done, notices
