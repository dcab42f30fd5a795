"""anelab: attention-based semantic guidance (Attend-and-Excite) for Stable Diffusion, for study.

The public names are imported on first use (PEP 562), so ``import anelab`` and ``anelab --help`` do not
pay for torch and diffusers until something needs them.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anelab")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "AnelabError": "errors",
    "GuidanceConfig": "config",
    "GuidedOutput": "pipeline",
    "Record": "recording",
    "attention_resolutions": "models",
    "generate": "pipeline",
    "load_pipeline": "loading",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_"):  # a submodule: anelab.models, anelab.analysis, ...
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as missing:
            if missing.name != f"{__name__}.{name}":  # the submodule exists but needs something missing: say that
                raise
            raise AttributeError(f"module 'anelab' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'anelab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
