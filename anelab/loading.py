"""`load_pipeline`: an offline stand-in (``tiny``, ``tiny-sd2``, ``tiny-xl``, ``tiny-sd3``, ``tiny-flux``), a Hub id, a
local directory, or a built pipeline — SD 1.x / 2.x, SDXL, SD 3 or FLUX, the class picked from the saved
``model_index.json`` (:data:`PIPELINE_CLASSES`) — placed on the device and dtype asked for, every component checked.

Devices and dtypes are validated here once (:func:`resolve_device`, :func:`resolve_dtype`): an unknown
name, or a GPU that torch cannot see, is a one-line :class:`AnelabError`, never a silent CPU run.
Load failures from the Hugging Face Hub are classified by their ``huggingface_hub.errors`` type.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import fast as fast_path
from .errors import AnelabError
from .stand_ins import TINY_MODELS, tiny_model, tiny_parts

#: dtype names accepted where a torch.dtype is (CLI options, notebook parameters).
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
DEVICE_HELP = "cpu, cuda, cuda:N, mps or meta"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A usable torch device from a name or a device; ``None`` → CUDA when available, else the CPU.

    Refused in one line: an unknown name, CUDA where torch sees no GPU, a GPU index that does not
    exist, MPS where it is unavailable. ``"meta"`` (shapes only) is allowed for dry runs and tests."""
    if device is None or device == "":
        return torch.device(default_device())
    try:
        device = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, TypeError):
        raise AnelabError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                f"this torch ({torch.__version__}) is a CPU build"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise AnelabError(
                f"device {str(device)!r} asked for, but torch sees no GPU ({build}); use --device cpu or install a CUDA torch"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise AnelabError(
                f"device {str(device)!r} does not exist: torch sees {count} GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise AnelabError(f"device {str(device)!r} asked for, but MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise AnelabError(f"device {str(device)!r} is not supported; use {DEVICE_HELP}")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``"fp16"``, ``"float16"``, ...) or a dtype; ``None`` stays ``None``."""
    if dtype is None or dtype == "" or isinstance(dtype, torch.dtype):
        return dtype or None
    if dtype not in DTYPES:
        raise AnelabError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return getattr(torch, DTYPES[dtype])


def place(modules: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move every module to ``device`` (and ``dtype``), then check that every parameter and buffer got there.

    Module by module (not ``pipe.to(...)``, whose keyword handling has silently dropped arguments before)."""
    for (
        module
    ) in modules.values():  # torch's own Module.to: diffusers' override warns about fp32 modules on every dtype cast
        torch.nn.Module.to(module, device=device, dtype=dtype)
    for name, module in modules.items():
        wrong = {str(t.device) for t in (*module.parameters(), *module.buffers()) if t.device.type != device.type}
        if wrong:
            raise AnelabError(f"{name} did not move to {device}: some of its tensors are on {sorted(wrong)}")


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules by component name (UNet, VAE, text encoder(s), ...)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


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
    """``load(path or Hub id)``, turning every failure into one line that says why (missing, gated, offline, broken)."""
    local = Path(spec).expanduser()
    if not local.exists() and spec.startswith(("/", ".", "~")):
        raise AnelabError(f"{what} directory {spec!r} does not exist")
    if local.exists() and not (local / marker).is_file():
        raise AnelabError(f"{spec!r} is a path but not a saved {what} (no {marker} in it)")
    try:
        with quiet_transformers():
            return load(str(local) if local.exists() else spec)
    except Exception as error:  # diffusers/transformers/huggingface_hub raise many types; all mean "cannot load"
        raise AnelabError(explain_load_failure(what, spec, local.exists(), error)) from error


def load_pipeline(
    spec="tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    fast: bool | None = None,
):
    """A diffusers ``StableDiffusionPipeline`` (SD 1.x, 2.x), ``StableDiffusionXLPipeline`` (SDXL),
    ``StableDiffusion3Pipeline`` (SD 3, 3.5) or ``FluxPipeline`` (FLUX.1) ready for :func:`anelab.generate`.

    ``spec``: ``"tiny"``, ``"tiny-sd2"``, ``"tiny-xl"``, ``"tiny-sd3"`` or ``"tiny-flux"`` (offline random models of
    each family's shape, see :mod:`anelab.stand_ins`), a Hub id such as ``"CompVis/stable-diffusion-v1-4"``,
    ``"stabilityai/stable-diffusion-2-1"``, ``"stabilityai/stable-diffusion-xl-base-1.0"``,
    ``"stabilityai/stable-diffusion-3-medium-diffusers"`` or ``"black-forest-labs/FLUX.1-dev"``, a local directory
    saved with ``save_pretrained`` (the class comes from its ``model_index.json``), or an already built pipeline
    (used as is). ``device`` defaults to CUDA when available; ``dtype`` (a torch dtype or a name such as
    ``"fp16"``) to the weights' own (fp32 for the tiny models); SDXL's VAE stays in fp32 under fp16 when its
    config says ``force_upcast`` (it overflows in fp16; diffusers upcasts it too). ``revision``, ``variant``
    (e.g. ``"fp16"``), ``cache_dir``, ``token`` and ``local_files_only`` go to ``from_pretrained``. The safety
    checker and watermarker are not loaded (reference runs compare raw images). Parameters are frozen:
    guidance needs gradients with respect to the latent only. ``fast`` (default: on CUDA) stores the UNet and
    VAE channels-last (:mod:`anelab.fast`).
    """
    dtype = resolve_dtype(dtype)
    target = None if device is None and _is_pipeline(spec) else resolve_device(device)
    with quiet_transformers():
        import diffusers
        from diffusers import StableDiffusionXLPipeline

    if isinstance(spec, tuple(getattr(diffusers, name) for name in PIPELINE_CLASSES)):
        pipe = spec
    elif isinstance(spec, (str, os.PathLike)) and str(spec) in TINY_MODELS:
        with quiet_transformers():
            pipe = tiny_model(str(spec))
    elif isinstance(spec, (str, os.PathLike)):
        options = dict(
            revision=revision, variant=variant, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        pipe = _from_pretrained(str(spec), dtype, {k: v for k, v in options.items() if v is not None})
    else:
        raise AnelabError(
            f"model must be 'tiny', a Hub id, a local directory or a pipeline ({', '.join(PIPELINE_CLASSES)}; "
            f"offline stand-ins: {', '.join(TINY_MODELS)}), got {type(spec).__name__}"
        )
    modules = pipeline_modules(pipe)
    place(modules, target or pipe.device, dtype)
    if (
        isinstance(pipe, StableDiffusionXLPipeline)
        and pipe.vae.dtype == torch.float16
        and getattr(pipe.vae.config, "force_upcast", False)
    ):
        torch.nn.Module.to(pipe.vae, dtype=torch.float32)
    unet = getattr(pipe, "unet", None)  # SD 3 and FLUX have a transformer (no channels-last there)
    if unet is not None and (fast is None and fast_path.available(unet.device) or fast):
        fast_path.channels_last(*(m for m in (unet, getattr(pipe, "vae", None)) if m is not None))
    for module in modules.values():
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_parts(spec, **hub_options):
    """The tokenizer and scheduler of ``spec`` without its weights (seconds, not minutes): enough to check
    prompts, tokens and threshold steps before the model is built. ``hub_options`` as in :func:`load_pipeline`."""

    if _is_pipeline(spec):
        return spec.tokenizer, spec.scheduler
    if str(spec) in TINY_MODELS:
        return tiny_parts(str(spec))
    import diffusers
    from transformers import AutoTokenizer

    options = {k: v for k, v in hub_options.items() if v is not None and k != "variant"}

    def load(path):
        config = diffusers.DiffusionPipeline.load_config(path, **options)
        scheduler = getattr(diffusers, config["scheduler"][1]).from_pretrained(path, subfolder="scheduler", **options)
        return AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **options), scheduler

    return load_or_explain("diffusers pipeline", str(spec), "model_index.json", load)


def _is_pipeline(spec) -> bool:
    return not isinstance(spec, (str, os.PathLike))


#: Pipeline classes anelab runs, by the ``_class_name`` of a saved ``model_index.json``.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def pipeline_class(path: str, options: dict):
    """The pipeline class of :data:`PIPELINE_CLASSES` the saved ``model_index.json`` names. When it cannot be read
    (offline, missing), ``StableDiffusionPipeline``: its own ``from_pretrained`` then fails with the reason."""
    import diffusers

    try:
        name = diffusers.DiffusionPipeline.load_config(path, **{k: v for k, v in options.items() if k != "variant"})[
            "_class_name"
        ]
    except Exception:  # the load itself reports why (classified by explain_load_failure)
        return diffusers.StableDiffusionPipeline
    if name not in PIPELINE_CLASSES:
        raise AnelabError(
            f"{path!r} is a {name}; anelab runs SD 1.x / 2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), "
            "SD 3 (StableDiffusion3Pipeline) and FLUX (FluxPipeline)"
        )
    return getattr(diffusers, name)


def _from_pretrained(spec: str, dtype, options: dict):
    from diffusers import StableDiffusionXLPipeline

    def load(path):
        cls = pipeline_class(path, options)
        quiet = (
            dict(add_watermarker=False)
            if cls is StableDiffusionXLPipeline
            else dict(safety_checker=None, requires_safety_checker=False)
            if cls.__name__ == "StableDiffusionPipeline"
            else {}  # SD 3 and FLUX have neither
        )
        return cls.from_pretrained(path, torch_dtype=dtype, **quiet, **options)

    try:
        return load_or_explain("diffusers pipeline", spec, "model_index.json", load)
    except AnelabError as error:
        if isinstance(error.__cause__, AnelabError):  # an unsupported pipeline class: its own message
            raise error.__cause__ from None
        raise


def explain_load_failure(what: str, spec: str, is_local: bool, error: Exception) -> str:
    """One line saying why ``spec`` could not be loaded, from the ``huggingface_hub.errors`` type in the chain."""
    from huggingface_hub import errors as hub
    from huggingface_hub import is_offline_mode

    first = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    if is_local:
        return f"cannot load the {what} saved in {spec!r}: {first}"
    chain = list(_chain(error))

    def found(kind) -> bool:
        return any(isinstance(e, kind) for e in chain)

    if found(hub.GatedRepoError):
        return (
            f"{what} {spec!r} is gated on the Hugging Face Hub: accept its licence on https://huggingface.co/{spec} "
            "with your account, then log in (`hf auth login`) or set HF_TOKEN"
        )
    if found(hub.RevisionNotFoundError):
        return f"{what} {spec!r} has no such revision (branch, tag or commit): {first}"
    if found(hub.RepositoryNotFoundError):
        return (
            f"{what} {spec!r} was not found on the Hugging Face Hub and is not a local directory "
            "(check the id; a private repository needs a token)"
        )
    if is_offline_mode() or found(hub.LocalEntryNotFoundError) or found(_connection_errors()):
        return (
            f"{what} {spec!r} is not a local directory and is not in the Hugging Face cache, and the Hub cannot "
            "be reached (offline or no network): download it on a connected machine or pass a local directory"
        )
    if found(hub.EntryNotFoundError):
        return f"{what} {spec!r} lacks a file it needs (a --variant it does not have?): {first}"
    return f"cannot load {what} {spec!r}: {first}"


def _connection_errors() -> tuple[type, ...]:
    kinds: list[type] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx", ("ConnectError", "TimeoutException")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        with contextlib.suppress(ImportError):
            imported = __import__(module)
            kinds += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return tuple(kinds)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
