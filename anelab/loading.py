"""`load_pipeline`: the tiny offline model, a Hub id, a local directory, or a built pipeline."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import AnelabError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' notices while loading (e.g. "falls back to the PIL image processor")."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_or_explain(what: str, spec: str, marker: str, load: Callable[[str], object]):
    """``load(path or Hub id)``, turning every failure into one line that says why (missing, offline, broken)."""
    local = Path(spec).expanduser()
    if not local.exists() and spec.startswith(("/", ".", "~")):
        raise AnelabError(f"{what} directory {spec!r} does not exist")
    if local.exists() and not (local / marker).is_file():
        raise AnelabError(f"{spec!r} is a path but not a saved {what} (no {marker} in it)")
    try:
        with quiet_transformers():
            return load(str(local) if local.exists() else spec)
    except Exception as error:  # diffusers/transformers/huggingface_hub raise many types; all mean "cannot load"
        raise AnelabError(_explain_load_failure(what, spec, local.exists(), error)) from error


#: dtype names accepted where a torch.dtype is (CLI options, notebook parameters).
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``"fp16"``, ``"float16"``, ...) or a dtype; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise AnelabError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return getattr(torch, DTYPES[dtype])


def load_pipeline(spec="tiny", device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """A diffusers ``StableDiffusionPipeline`` ready for :func:`anelab.generate`.

    ``spec``: ``"tiny"`` (offline random SD-1.x-shaped model, see :mod:`anelab.testing`), a Hub id
    such as ``"CompVis/stable-diffusion-v1-4"``, a local directory saved with ``save_pretrained``,
    or an already built ``StableDiffusionPipeline`` (used as is). ``device`` defaults to CUDA when
    available; ``dtype`` (a torch dtype or a name such as ``"fp16"``) to the weights' own (fp32 for the tiny model). The safety checker is not
    loaded (reference runs compare raw images). UNet parameters are frozen: guidance needs
    gradients with respect to the latent only.
    """
    dtype = resolve_dtype(dtype)
    with quiet_transformers():
        from diffusers import StableDiffusionPipeline

    if isinstance(spec, StableDiffusionPipeline):
        pipe = spec
    elif isinstance(spec, (str, os.PathLike)) and str(spec) == "tiny":
        from .testing import tiny_pipeline

        with quiet_transformers():
            pipe = tiny_pipeline()
    elif isinstance(spec, (str, os.PathLike)):
        pipe = _from_pretrained(str(spec), dtype)
    else:
        raise AnelabError(f"model must be 'tiny', a Hub id, a local directory or a StableDiffusionPipeline, got {type(spec).__name__}")
    pipe.to(torch_device=device or (pipe.device if isinstance(spec, StableDiffusionPipeline) else default_device()))
    if dtype is not None:
        pipe.to(dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(spec: str, dtype):
    from diffusers import StableDiffusionPipeline

    def load(path):
        return StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)

    return load_or_explain("diffusers pipeline", spec, "model_index.json", load)


def _explain_load_failure(what: str, spec: str, is_local: bool, error: Exception) -> str:
    if is_local:
        return f"cannot load the {what} saved in {spec!r}: {type(error).__name__}: {error}".splitlines()[0]
    chain = list(_chain(error))
    text = " ".join(f"{type(e).__name__} {e}" for e in chain).lower()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or any(
        word in text for word in ("connect", "offline", "timeout", "timed out", "name or service", "outgoing traffic")
    )
    if offline:
        return (
            f"{what} {spec!r} is not a local directory and is not in the Hugging Face cache, and the Hub "
            "cannot be reached (no network): download it on a connected machine or pass a local directory"
        )
    return f"{what} {spec!r} was not found as a local directory or on the Hugging Face Hub ({type(error).__name__})"


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
