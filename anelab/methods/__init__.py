"""Attention-guidance methods under one protocol (:mod:`.base`): the registry, and one contract for evaluating a
method's objective on attention maps.

```python
anelab.methods.names()                                   # every method's name
m = anelab.methods.get("divide_and_bind", mode="tv_bind") # official defaults, keyword overrides
terms = anelab.methods.evaluate(m, cross, subjects, eot=eot)
terms["loss"]                                            # [B]: what the latent update descends at this step
```

Each method is one file of this package; adding one is writing that file and listing its class in
:data:`REGISTRY` (README, "Adding a method").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import AnelabError
from ..subjects import SubjectPosition
from .attend_and_excite import GuidanceConfig
from .base import Inputs, Method, Reads, TokenSoftmax, with_max_attention

AE = GuidanceConfig.name

#: name -> method class, in the order the methods study lists them.
REGISTRY: dict[str, type[Method]] = {GuidanceConfig.name: GuidanceConfig}


def _register_all() -> None:
    from .conform import Conform
    from .divide_and_bind import DivideAndBind
    from .ebama import Ebama
    from .initno import InitNO
    from .syngen import SynGen

    for cls in (DivideAndBind, SynGen, Conform, InitNO, Ebama):
        REGISTRY[cls.name] = cls


_register_all()

__all__ = [
    "AE",
    "GuidanceConfig",
    "Inputs",
    "Method",
    "REGISTRY",
    "Reads",
    "evaluate",
    "from_spec",
    "get",
    "names",
    "resolve",
    "spec",
]


def names() -> list[str]:
    """Every method's name, e.g. ``["attend_and_excite", "divide_and_bind", "syngen", "conform", "initno", "ebama"]``."""
    return list(REGISTRY)


def get(name: str, **settings) -> Method:
    """The method ``name`` at its official defaults, with ``settings`` overridden (an unknown name or setting is a
    one-line error listing what is allowed)."""
    if isinstance(name, Method):
        return name.replace(**settings) if settings else name
    if name not in REGISTRY:
        raise AnelabError(f"unknown method {name!r}; the methods are {', '.join(REGISTRY)}")
    return REGISTRY[name].from_dict(settings)


def spec(method: Method | None) -> dict | None:
    """A method as JSON: null (plain SD), A&E's settings as they are (anelab 0.2.0's form), or another method's settings
    with its ``method`` name; :func:`from_spec` reads it back."""
    if method is None:
        return None
    return method.to_dict() if method.name == AE else {"method": method.name, **method.to_dict()}


def from_spec(data: Mapping | None) -> Method | None:
    """The inverse of :func:`spec`."""
    if data is None:
        return None
    data = dict(data)
    return get(data.pop("method", AE), **data)


def describe_settings(name: str) -> dict:
    """``{setting: default}`` of method ``name`` (what ``get`` and ``--set key=value`` accept)."""
    return get(name).to_dict()


def resolve(method=None, config=None) -> Method | None:
    """The one method of :func:`anelab.generate`'s ``method=`` and ``config=``: a name or a :class:`Method` in either
    (``config`` is the settings of the method named by ``method``); neither: None, plain Stable Diffusion."""
    if config is not None and not isinstance(config, Method):
        raise AnelabError(
            f"config must be a method's settings (a GuidanceConfig for A&E, or anelab.methods.get(name)) or None "
            f"(plain SD), got {type(config).__name__}"
        )
    if method is None:
        return config
    if isinstance(method, Method):
        if config is not None and config != method:
            raise AnelabError("give the method once: method=anelab.methods.get(...) or config=..., not both")
        return method
    if not isinstance(method, str):
        raise AnelabError(f"method must be a name of {names()} or anelab.methods.get(name), got {method!r}")
    if config is not None:
        if config.name != method:
            raise AnelabError(
                f"config is {config.name}'s settings ({type(config).__name__}) but method={method!r}; "
                f"give method={method!r} alone, or its settings as anelab.methods.get({method!r}, ...)"
            )
        return config
    return get(method)


def positions(subjects) -> tuple[SubjectPosition, ...]:
    """``[(noun_position, [modifier_positions]), ...]`` (or SubjectPosition values) as subject positions, all excited."""
    out = []
    for item in subjects:
        if isinstance(item, SubjectPosition):
            out.append(item)
            continue
        noun, modifiers = (item, ()) if isinstance(item, int) else item
        out.append(SubjectPosition(int(noun), tuple(int(m) for m in modifiers or ())))
    return tuple(out)


def evaluate(
    method: Method | str,
    cross: Mapping[int, torch.Tensor],
    subjects: Sequence,
    *,
    eot: int,
    self_attention: Mapping[int, torch.Tensor] | None = None,
    step: int = 0,
    num_steps: int = 50,
    previous: dict | None = None,
    targets: torch.Tensor | None = None,
    softmax_tokens: str = "legacy",
) -> dict:
    """A method's terms on given attention maps (pure: no model, no state kept).

    ``cross``: ``{res: [B, res, res, 77]}`` mean over that resolution's layers and heads (``[res, res, 77]`` is one
    sample); ``subjects``: ``[(noun_position, [modifier_positions]), ...]`` (CLIP positions, ``<sot>`` = 0);
    ``self_attention``: ``{res: [B, res, res, res*res]}`` where the method reads it (InitNO); ``previous``: the
    ``terms["state"]`` of the step before (CONFORM, InitNO); ``softmax_tokens``: what ``"legacy"`` means for these
    maps (SD 1.x's columns; ``"prompt"`` for SD 2.x and SDXL maps). Returns the method's terms: ``loss`` [B] and
    its named terms ([B] or [B, K]), and ``max_attention`` [B, T]: the smoothed max of A&E's token maps (the method's
    own where it has them) of every token the method measures (its nouns, then their modifiers)."""
    method = get(method) if isinstance(method, str) else method
    if not isinstance(method, Method):
        raise AnelabError(f"method must be a name of {names()} or anelab.methods.get(name), got {method!r}")
    cross = {int(r): m if m.ndim == 4 else m[None] for r, m in cross.items()}
    self_attention = {int(r): m if m.ndim == 4 else m[None] for r, m in (self_attention or {}).items()}
    reads = method.reads()
    for kind, wanted, given in (
        ("cross", reads.cross, cross),
        ("self_attention", reads.self_attention, self_attention),
    ):
        missing = [r for r in wanted if r not in given]
        if missing:
            raise AnelabError(
                f"{method.name} reads {kind} maps at {list(wanted)}; {kind} has {sorted(given)} (missing {missing})"
            )
    inputs = Inputs(
        cross=cross,
        self_attention=self_attention,
        subjects=positions(subjects),
        eot=int(eot),
        step=int(step),
        num_steps=int(num_steps),
        previous=previous,
        targets=targets,
        columns=softmax_tokens,
    )
    method.check_subjects(inputs.subjects, {})
    normaliser = method if isinstance(method, TokenSoftmax) else GuidanceConfig()
    return with_max_attention(method, method.terms(inputs), inputs, normaliser.normalised(softmax_tokens))
