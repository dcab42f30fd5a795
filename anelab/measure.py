"""One measurement of a guidance method: the conditional-only forward at a latent, the method's terms, ∇z.

:class:`Measurer` runs the UNet (no CFG) at a latent ``z`` with autograd on, reading what the method reads
(:meth:`anelab.methods.base.Method.reads`: the mean cross-attention map at each resolution, and self-attention
where it asks), and stops after the last layer read: nothing later can change what it reads. The method's
:meth:`~anelab.methods.base.Method.terms` then give a :class:`Measure`, whose :meth:`Measure.gradient` is ∇z of a
term. The measurer holds only what is fixed for a run's guidance set-up (the UNet, the hooks, the plan), so a
CUDA graph captured through it is valid for every later run with the same :meth:`Measurer.key`; the latent, the
timestep, the text conditioning, the layout targets and the method's state are its inputs.
"""

from __future__ import annotations

import torch

from . import fast as fast_path
from . import hooks as hk
from .methods.base import Inputs, with_max_attention

#: Terms that are no trace columns: the carried state and the methods' internals (a leading underscore).
STATE = "state"


class Measure:
    """The terms of one measurement (tensors, ``loss`` [B] among them) and, once asked for, ∇z of some of them.

    fp16 safety: a sample whose term or gradient is NaN/inf gets a zero gradient (its latent is not moved)
    and is flagged in ``nonfinite``; the trace reports it."""

    def __init__(self, leaf, terms: dict, grads: dict | None = None, *, retain: bool = False):
        self.leaf, self.terms, self.grads, self.retain = leaf, terms, dict(grads or {}), retain
        self.nonfinite = None

    @property
    def state(self):
        return self.terms.get(STATE)

    def gradient(self, term: str = "loss") -> torch.Tensor:
        """∇_z of ``term`` per sample (samples are independent in the UNet, so ∇ of the sum splits)."""
        if term not in self.grads:
            with torch.enable_grad():
                grad = torch.autograd.grad(self.terms[term].sum(), self.leaf, retain_graph=self.retain)[0]
            bad = ~torch.isfinite(grad).flatten(1).all(dim=1) | ~torch.isfinite(self.terms[term].detach())
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
            self.grads[term] = torch.where(bad[:, None, None, None], torch.zeros_like(grad), grad)
        return self.grads[term]

    def outputs(self, term: str) -> dict:
        """The terms with ∇ of ``term`` as plain tensors: what a captured graph of the measurement returns."""
        self.gradient(term)
        out = {f"term:{k}": v for k, v in fast_path.flat(self.terms).items()}
        return out | {f"grad:{term}": self.grads[term], "nonfinite": self.nonfinite}

    @classmethod
    def from_outputs(cls, out: dict) -> "Measure":
        flat = {k.removeprefix("term:"): v for k, v in out.items() if k.startswith("term:")}
        grads = {k.removeprefix("grad:"): v for k, v in out.items() if k.startswith("grad:")}
        measure = cls(None, fast_path.nested(flat), grads)
        measure.nonfinite = out["nonfinite"]
        return measure

    def detached(self, keep_grad: bool) -> "Measure":
        """A copy of the terms (detached), with the loss gradient if ``keep_grad``: what refinement fills in."""
        terms = map_tensors(lambda t: t.detach().clone(), self.terms)
        return Measure(None, terms, {"loss": self.grads["loss"].clone()} if keep_grad else None)

    def put(self, rows: torch.Tensor, other: "Measure", which: torch.Tensor) -> None:
        """Rows ``rows`` of this (detached) measure take ``other``'s rows ``which`` (its loss gradient too, if kept)."""
        put_rows(self.terms, other.terms, rows, which)
        if "loss" in self.grads:
            self.grads["loss"][rows] = other.grads["loss"][which]


def map_tensors(fn, value):
    """``fn`` on every tensor of a (nested) dict of tensors, or on a tensor."""
    return {k: map_tensors(fn, v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def put_rows(target, source, rows, which=slice(None)) -> None:
    """``target[rows] = source[which]`` for every tensor of (nested) dicts of tensors, in place."""
    if isinstance(target, dict):
        for k in target:
            put_rows(target[k], source[k], rows, which)
    else:
        target[rows] = source.detach()[which]


class Measurer:
    """The measurement of a run's method at a latent (module docstring)."""

    def __init__(self, unet, hooks: hk.AttentionHooks, plan):
        self.unet, self.hooks, self.plan, self.method = unet, hooks, plan, plan.active

    def key(self, term: str, step: int) -> tuple:
        """Everything :meth:`__call__` reads besides its inputs (a graph of it is valid for this key only): the
        layers, the method's settings, the subjects, ``<eot>``, the differentiated term, what of the loop index
        the method's terms depend on (:meth:`~anelab.methods.base.Method.phase`), low memory, a transformer's reading."""
        plan = self.plan
        return (
            tuple(layer.name for layers in plan.read_layers.values() for layer in layers),
            self.method.key(),
            plan.subjects,
            plan.eot,
            term,
            self.method.phase(step, len(plan.timesteps)),
            plan.low_memory,
            None if plan.reading is None else plan.reading.key(),  # SD 3 / FLUX: the text columns the graph holds
        )

    def __call__(self, z: torch.Tensor, t, unet_kwargs: dict, *, step: int, previous=None, targets=None) -> Measure:
        plan = self.plan
        leaf = z.detach().requires_grad_(True)
        sinks = {key: hk.MeanAttention() for key in plan.read_layers}  # (kind, res) -> mean over its layers
        routes = {layer.name: sinks[key] for key, layers in plan.read_layers.items() for layer in layers}
        with torch.enable_grad():
            with self.hooks.reading(routes, stop_after=plan.stop_layer):
                self.unet(leaf, t, **unet_kwargs)
            maps = {key: sinks[key].maps(layers[0].shape) for key, layers in plan.read_layers.items()}
            inputs = Inputs(
                cross={res: m for (kind, res), m in maps.items() if kind == "cross"},
                self_attention={res: m for (kind, res), m in maps.items() if kind == "self"},
                subjects=plan.subjects,
                eot=plan.eot,
                step=step,
                num_steps=len(plan.timesteps),
                previous=previous,
                targets=targets,
                columns=plan.columns,
            )
            terms = with_max_attention(self.method, self.method.terms(inputs), inputs, plan.normaliser)
        return Measure(leaf, terms, retain=self.method.refine_term != "loss")

    def graphable(self, term: str, step: int):
        """:meth:`__call__` at loop index ``step`` with ∇ of ``term``, as a function of a graph's static inputs (a
        replay at another step of the same :meth:`key` computes the same terms: the key holds the method's phase)."""

        def run(static: dict) -> dict:
            kwargs = fast_path.nested(static, skip=("z", "t", "targets"))
            previous = kwargs.pop(STATE, None)
            measure = self(
                static["z"], static["t"], kwargs, step=step, previous=previous, targets=static.get("targets")
            )
            return measure.outputs(term)

        return run
