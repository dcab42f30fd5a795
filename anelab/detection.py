"""Object-level measures: is each subject of the prompt in the image, and where (open-vocabulary detection).

The detector is loaded once (:func:`load_detector`; ``"tiny"`` = offline random stand-in) and passed to
the pure scoring function :func:`detect_subjects`, which gives one row per (image, subject): the best
box's score for the subject's text query, ``present`` (score >= threshold), and the best box and its
centre in [0, 1] image coordinates (x right, y down). :func:`per_image`, :func:`all_present`,
:func:`detection_summary` and :func:`center_distance` turn that table into the studies' measures.

Detectors are transformers' OWLv2 (Minderer et al. 2023, "Scaling Open-Vocabulary Object Detection")
and OWL-ViT (Minderer et al. 2022). The protocol follows TEBOpt's evaluation (Chen et al., NeurIPS 2024,
"A Cat Is A Cat (Not A Dog!)", released code ``eval_metrics/owlv2.py``): OWLv2 base/16 ensemble, the
bare subject noun as query, a detection threshold of 0.25.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .analysis import summarize
from .errors import AnelabError
from .loading import default_device, load_or_explain, quiet_transformers, resolve_dtype
from .log import bars_off
from .stand_ins import tiny_owl

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"  # the checkpoint TEBOpt's evaluation uses

#: A subject is ``present`` when its best box scores at least this (sigmoid of OWL's class logit).
#: 0.25 is the detection threshold of TEBOpt's released evaluation (basiclab/Unraveling-Information-Mix-ups,
#: eval_metrics/owlv2.py: OWLv2 base/16 ensemble, bare-noun queries, ``threshold=0.25``), the closest
#: published protocol for object presence in two-subject prompts; their two-object tally further drops
#: boxes under 0.4 (a stricter "both clearly there": pass ``threshold=0.4``). transformers' own
#: post-processing default is 0.1. We did not calibrate it on our images; it is a parameter everywhere.
DEFAULT_THRESHOLD = 0.25

#: Text query per subject. The bare noun, as TEBOpt queries OWLv2 (so the 0.25 above means what it
#: meant there), and as OWLv2's self-training labels are caption n-grams rather than sentences.
#: transformers' examples use "a photo of a {}"; pass ``template=`` to use it (scores shift with it).
DEFAULT_TEMPLATE = "{}"

COLOURS = frozenset("red orange yellow green blue purple pink brown gray grey black white".split())
POSITIONS = frozenset(
    "right left top bottom up down at middle center centre corner above below under over behind front side".split()
)
FUNCTION_WORDS = frozenset("a an the and with of in on to next near".split())
ATTRIBUTES = frozenset("small big large cute sitting standing running lying flying".split())
#: Words that name no object a detector could box (colours, positions, function words, attributes).
NON_OBJECT_WORDS = COLOURS | POSITIONS | FUNCTION_WORDS | ATTRIBUTES

#: Columns of :func:`detect_subjects`, in order.
DETECTION_COLUMNS = [
    "image",
    "subject_index",
    "subject",
    "query",
    "skipped",
    "score",
    "present",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "center_x",
    "center_y",
    "threshold",
    "detector",
]
#: Columns that identify an image when present in a detection table (besides ``image``).
IMAGE_KEY_COLUMNS = ("variant", "category", "prompt", "seed", "path")


@dataclasses.dataclass
class Detector:
    """An OWLv2 / OWL-ViT detector with its processor."""

    model: object
    processor: object
    name: str

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def padded(self) -> bool:
        """OWLv2's processor pads to a square at the bottom/right; OWL-ViT's stretches the image to a square."""
        return self.model.config.model_type == "owlv2"


def _detector_classes(model_type: str):
    """Model and processor classes for a saved config's ``model_type``."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor, OwlViTForObjectDetection, OwlViTProcessor

    classes = {
        "owlv2": (Owlv2ForObjectDetection, Owlv2Processor),
        "owlvit": (OwlViTForObjectDetection, OwlViTProcessor),
    }
    if model_type not in classes:
        raise AnelabError(
            f"the detector must be an OWLv2 or OWL-ViT model (model_type 'owlv2' or 'owlvit'), got {model_type!r}"
        )
    return classes[model_type]


def load_detector(spec: str | Detector = DEFAULT_DETECTOR, device=None, dtype=None) -> Detector:
    """Detector: ``"tiny"`` (offline random OWLv2), a Hub id or a local directory of an OWLv2/OWL-ViT
    checkpoint (the class is picked from its config's ``model_type``). ``dtype``: a torch dtype or a name
    ("fp16", ...); fp16 on GPU and fp32 elsewhere by default."""
    if isinstance(spec, Detector):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise AnelabError(
            f"detector must be 'tiny', a Hub id, a local directory or a Detector, got {type(spec).__name__}"
        )
    try:
        device = torch.device(device or default_device())
    except RuntimeError as error:
        raise AnelabError(f"unknown device {device!r}: {error}".splitlines()[0]) from error
    dtype = resolve_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    if str(spec) == "tiny":
        with quiet_transformers():
            model, processor = tiny_owl()
    else:
        from transformers import AutoConfig

        config = load_or_explain("OWL detector", str(spec), "config.json", AutoConfig.from_pretrained)
        model_class, processor_class = _detector_classes(config.model_type)

        def load(path):
            return model_class.from_pretrained(path), processor_class.from_pretrained(path)

        model, processor = load_or_explain("OWL detector", str(spec), "config.json", load)
    return Detector(model.to(device, dtype).eval().requires_grad_(False), processor, str(spec))


def detectable(word: str) -> bool:
    """Whether ``word`` (or a phrase) names something a detector can box: some word of it has a letter
    and is not a colour, a position/direction, a function word or an attribute (:data:`NON_OBJECT_WORDS`)."""
    if not isinstance(word, str):
        raise AnelabError(f"a subject must be a word (str), got {type(word).__name__} {word!r}")
    words = re.findall(r"[^\W\d_]+", word.lower())
    return any(w not in NON_OBJECT_WORDS for w in words)


def pixel_boxes(boxes: np.ndarray, width: int, height: int, padded: bool) -> np.ndarray:
    """``[N, 4]`` corner boxes (x0, y0, x1, y1) normalised to the model's square input → pixels of the
    original ``width`` x ``height`` image (what transformers' post-processing gives with the right target size).

    OWLv2 (``padded``) pads the image at the bottom/right to a square of side max(width, height): a
    normalised coordinate u lies at u·side pixels on both axes. OWL-ViT stretches the image to the
    square: u lies at u·width (x) and u·height (y).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # [N, 4]
    scale = np.array([max(width, height)] * 4 if padded else [width, height, width, height], dtype=np.float64)
    return boxes * scale


def unit_boxes(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[N, 4]`` pixel boxes of a ``width`` x ``height`` image → [0, 1] image coordinates (x right, y down),
    clipped to the image (an OWLv2 box may reach into the padding)."""
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 4)  # [N, 4]
    return np.clip(pixels / np.array([width, height, width, height], dtype=np.float64), 0.0, 1.0)


def _corners(center_boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) → (x0, y0, x1, y1)."""
    cx, cy, w, h = center_boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _rgb(image):
    """A PIL RGB image from a PIL image, a uint8 ``[H, W, 3]`` array or a path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise AnelabError(f"image file {str(image)!r} does not exist")
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise AnelabError(
                f"an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} {list(image.shape)}"
            )
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise AnelabError(f"an image must be a PIL image, a uint8 array or a path, got {type(image).__name__}")


def _subject_lists(images: list, subjects) -> list[list[str]]:
    if isinstance(subjects, str):
        raise AnelabError(f"subjects must be a list of words (or one list per image), got the string {subjects!r}")
    subjects = list(subjects)
    if not subjects:
        raise AnelabError("no subjects given; pass a list of words, or one list per image")
    if all(isinstance(s, str) for s in subjects):  # one list of words for every image
        subjects = [subjects] * len(images)
    if len(subjects) != len(images):
        raise AnelabError(
            f"got {len(images)} images and {len(subjects)} subject lists; give one list per image (or one list for all)"
        )
    lists = [[s] if isinstance(s, str) else list(s) for s in subjects]
    for words in lists:
        for word in words:
            detectable(word)  # type check with a clear message
            if "," in word:
                raise AnelabError(f"subject {word!r} holds a comma; give the words as a list, e.g. {word.split(',')}")
    return lists


@torch.no_grad()
def _best_boxes(detector: Detector, images: list, queries: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: ``([Q] best score per query, [Q, 4] its box as corners normalised to the model's square input)``.

    Score of a query = max over the predicted boxes of sigmoid(class logit) — the sigmoid transformers'
    post-processing applies, taken per query, so a box that scores higher for another subject does not
    hide this one. Queries are scored independently (each logit uses only its own query embedding).
    """
    inputs = detector.processor(text=queries, images=images, return_tensors="pt", truncation=True)
    inputs = inputs.to(detector.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(detector.model.dtype)
    out = detector.model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    probs = torch.sigmoid(out.logits.float())  # [B, P, Qmax]
    scores, best = probs.max(dim=1)  # [B, Qmax]
    corners = _corners(out.pred_boxes.float())  # [B, P, 4]
    picked = torch.gather(corners, 1, best.unsqueeze(-1).expand(-1, -1, 4))  # [B, Qmax, 4]
    return [(scores[i, : len(q)].cpu().numpy(), picked[i, : len(q)].cpu().numpy()) for i, q in enumerate(queries)]


def detect_subjects(
    images: Sequence,
    subjects,
    detector: Detector,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    *,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (image, subject): the best box's ``score`` for the query ``template.format(subject)``,
    ``present`` (score >= threshold), the box ``box_x0 … box_y1`` and its centre ``center_x, center_y`` in
    [0, 1] image coordinates (x right, y down). Columns: :data:`DETECTION_COLUMNS`.

    ``images``: PIL images, uint8 arrays or paths; ``subjects``: one list of words per image, or one list
    for all. Words that are not :func:`detectable` (colours, directions, ...) are not scored: their rows
    have ``skipped`` True, NaN score and box, ``present`` <NA>, and ``frame.attrs["notices"]`` says so.
    The best box is reported whether or not the subject is present.
    """
    images = list(images)
    if not images:
        raise AnelabError("no images to detect in")
    if not isinstance(threshold, numbers.Real) or np.isnan(threshold):
        raise AnelabError(f"threshold must be a number (scores lie in [0, 1]), got {threshold!r}")
    if batch_size < 1:
        raise AnelabError(f"batch_size must be at least 1, got {batch_size!r}")
    if "{}" not in template:
        raise AnelabError(f"template must contain '{{}}' where the subject goes, got {template!r}")
    lists = _subject_lists(images, subjects)
    rows, skipped = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="detecting", unit="batch", disable=bars_off(progress)):
        indices = range(start, min(start + batch_size, len(images)))
        pictures = {i: _rgb(images[i]) for i in indices}
        words = {i: [w for w in lists[i] if detectable(w)] for i in indices}
        todo = [i for i in indices if words[i]]
        queries = [[template.format(w) for w in words[i]] for i in todo]
        results = _best_boxes(detector, [pictures[i] for i in todo], queries) if todo else []
        best = {
            (i, w): (s, b) for i, (scores, corners) in zip(todo, results) for w, s, b in zip(words[i], scores, corners)
        }
        for i in indices:
            width, height = pictures[i].size
            for k, word in enumerate(lists[i]):
                row = {"image": i, "subject_index": k, "subject": word, "query": template.format(word)}
                if (i, word) not in best:  # not detectable: reported, never scored
                    skipped.append(word)
                    rows.append({**row, "skipped": True})
                    continue
                score, corners = best[i, word]
                x0, y0, x1, y1 = unit_boxes(pixel_boxes(corners, width, height, detector.padded), width, height)[0]
                rows.append(
                    {
                        **row,
                        "skipped": False,
                        "score": float(score),
                        "present": bool(score >= threshold),
                        "box_x0": x0,
                        "box_y0": y0,
                        "box_x1": x1,
                        "box_y1": y1,
                        "center_x": (x0 + x1) / 2,
                        "center_y": (y0 + y1) / 2,
                    }
                )
    frame = (
        pd.DataFrame(rows).reindex(columns=DETECTION_COLUMNS).assign(threshold=float(threshold), detector=detector.name)
    )
    floats = ("score", "box_x0", "box_y0", "box_x1", "box_y1", "center_x", "center_y")
    frame = frame.astype(
        {
            "image": "int64",
            "subject_index": "int64",
            "skipped": bool,
            "present": "boolean",
            **dict.fromkeys(floats, "float64"),
        }
    )
    frame.attrs["notices"] = (
        [
            f"{len(skipped)} subject(s) not detectable as objects (colours, positions, ...), not scored: {sorted(set(skipped))}"
        ]
        if skipped
        else []
    )
    return frame


# -- measures from a detection table ----------------------------------------------------------
def _image_keys(frame: pd.DataFrame) -> list[str]:
    missing = [c for c in ("image", "subject_index", "subject", "skipped", "present") if c not in frame.columns]
    if missing:
        raise AnelabError(f"a detection table needs columns {missing}; got {list(frame.columns)} (see detect_subjects)")
    return [c for c in IMAGE_KEY_COLUMNS if c in frame.columns] + ["image"]


def all_present(frame: pd.DataFrame) -> pd.Series:
    """Per image (indexed by its key columns): every detectable subject present — the numerator of the
    no-neglect rate. <NA> for an image whose subjects were all skipped."""
    keys = _image_keys(frame)
    grouped = _presence(frame).groupby([frame[k] for k in keys], sort=False, dropna=False)
    counted, lowest = grouped.count(), grouped.min()  # all present <=> the minimum over scored subjects is 1
    return pd.Series(
        pd.array(np.where(counted > 0, lowest == 1, pd.NA), dtype="boolean"), index=lowest.index, name="all_present"
    )


def _presence(frame: pd.DataFrame) -> pd.Series:
    """``present`` as floats: 1.0 / 0.0, NaN where the subject was skipped."""
    return frame.present.astype("Float64").astype(float).where(~frame.skipped.astype(bool))


def per_image(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per image: its key columns, ``n_subjects`` (detectable), ``all_present`` and, per subject
    position k, ``present_k``, ``score_k`` and the best box's centre ``center_x_k``, ``center_y_k`` — floats
    (presence 1.0/0.0, NaN = skipped) ready for :func:`anelab.analysis.summarize`."""
    keys = _image_keys(frame)
    if frame.duplicated([*keys, "subject_index"]).any():
        raise AnelabError(
            f"a detection table has one row per image and subject; rows repeat over {keys + ['subject_index']} "
            f"(add a column such as {list(IMAGE_KEY_COLUMNS)} that tells the images apart)"
        )
    counted = ~frame.skipped.astype(bool)
    scored = frame.assign(present=_presence(frame))
    wide = scored.set_index([*keys, "subject_index"])[["present", "score", "center_x", "center_y"]].unstack(
        "subject_index"
    )
    wide.columns = [f"{measure}_{k}" for measure, k in wide.columns]
    order = sorted(wide.columns, key=lambda c: (int(c.rsplit("_", 1)[1]), c))
    n_subjects = counted.groupby([frame[k] for k in keys], sort=False, dropna=False).sum().rename("n_subjects")
    everything = all_present(frame).astype("Float64").astype(float)
    table = pd.concat([n_subjects, everything, wide[order]], axis=1).reindex(n_subjects.index)
    return table.reset_index()


def detection_summary(
    frame: pd.DataFrame, by: Sequence[str] = ("variant", "category"), measures: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean and 95% CI over images of ``all_present`` and each ``present_k`` per ``by`` (the last column
    gets an "overall" row, the others are groups), via :func:`anelab.analysis.summarize` on :func:`per_image`.

    ``frame`` must carry the ``by`` columns (merge variant/category onto :func:`detect_subjects`' rows).
    """

    by = list(by)
    if not by:
        raise AnelabError("by must name at least one column, e.g. ('variant', 'category')")
    missing = [c for c in by if c not in frame.columns]
    if missing:
        raise AnelabError(
            f"detection_summary groups by {missing}, which the detection table lacks; add them per image first"
        )
    table = per_image(frame)
    if measures is None:
        measures = ["all_present", *[c for c in table.columns if c.startswith("present_")]]
    return summarize(table, list(measures), by=by[-1], groups=by[:-1])


def center_distance(frame: pd.DataFrame, subject: str | int, target_xy: Sequence[float]) -> pd.Series:
    """Per image (indexed by its key columns): Euclidean distance in [0, 1] image coordinates from the
    detected centre of ``subject`` (a word, or its position in the subject list) to ``target_xy``
    (x right, y down); NaN where the subject is absent or skipped (STUDIES.md 05, layout)."""
    keys = _image_keys(frame)
    target = np.asarray(target_xy, dtype=float)
    if target.shape != (2,) or not np.isfinite(target).all():
        raise AnelabError(f"target_xy must be two finite numbers (x, y) in image coordinates, got {target_xy!r}")
    column = "subject_index" if isinstance(subject, (int, np.integer)) else "subject"
    rows = frame[frame[column] == subject]
    if rows.empty:
        raise AnelabError(
            f"subject {subject!r} is not in this detection table; its subjects are {sorted(set(frame.subject))}"
        )
    present = rows.present.fillna(False).astype(bool) & ~rows.skipped.astype(bool)
    distance = np.hypot(rows.center_x - target[0], rows.center_y - target[1]).where(present)
    return pd.Series(distance.to_numpy(dtype=float), index=rows.set_index(keys).index, name="center_distance")
