"""`Record`: what to record of a :func:`anelab.generate` run, and the sink that records it.

The recorder watches the **conditional half of the CFG forward** of each recorded loop
iteration — the forward that predicts the noise, on the latent after any A&E update — so no
extra UNet pass runs and the samples are bit-identical to an unrecorded run (the layers keep
their fused output; the probabilities are computed beside it). Per layer it keeps the head mean
of the recorded tokens' maps (with ``heads=True``, every head's map); per resolution it computes
the token statistics of the mean over every (layer, head) at that resolution, normalised exactly
as the A&E loss normalises (§1.2-1.4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from . import hooks as hk
from .cache import FRAME_COLUMNS, MEAN, STAT_COLUMNS, AttentionCache
from .checks import is_number
from .config import GuidanceConfig
from .errors import AnelabError
from .objectives import token_statistics
from .tokens import prompt_tokens, resolve_tokens

TOKEN_CHOICES = ("subjects", "prompt", "all")
#: Where a layer sits, in execution order: a UNet's down/mid/up blocks; SD 3's joint blocks, FLUX's double then single.
PLACES = ("down", "mid", "up", "joint", "double", "single")


@dataclasses.dataclass(frozen=True)
class Record:
    """What ``generate(..., record=Record(...))`` keeps (all on the CPU, detached).

    ``max_gb`` is the memory budget for the maps: a request estimated above it is refused
    before sampling, with its size and how to shrink it.
    """

    resolutions: Sequence[int] | None = (
        None  # attention grid sides to record; None = every one the model has (anelab.attention_resolutions: SD 1.x 8/16/32/64, SDXL 32/64)
    )
    steps: Sequence[int] | None = None  # loop indices to record; None = every iteration
    tokens: str | Sequence[str | int] = (
        "subjects"  # "subjects" (the guided tokens), "prompt" (all, incl. <eot>), "all" (every text position) or a list
    )
    maps: bool = True  # keep the maps; False keeps only the token statistics (cheap scalars)
    heads: bool = False  # keep every head's map, [n_seeds, heads, h, w, K] per (step, layer), instead of the head mean (x heads memory)
    dtype: torch.dtype = torch.float16  # dtype of the kept maps (statistics are computed in fp32)
    max_gb: float = 4.0  # budget for the kept maps

    def __post_init__(self):
        if self.resolutions is not None:
            resolutions = (self.resolutions,) if isinstance(self.resolutions, int) else tuple(self.resolutions)
            if not resolutions or any(
                isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in resolutions
            ):
                raise AnelabError(
                    f"Record.resolutions must be None (all) or positive ints (8, 16, 32, 64 at 512 px), got {self.resolutions!r}"
                )
            object.__setattr__(self, "resolutions", tuple(sorted({int(r) for r in resolutions}, reverse=True)))
        if self.steps is not None:
            steps = (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)
            if not steps or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in steps):
                raise AnelabError(f"Record.steps must be None (all) or loop indices >= 0, got {self.steps!r}")
            object.__setattr__(self, "steps", tuple(sorted({int(s) for s in steps})))
        if isinstance(self.tokens, str) and self.tokens not in TOKEN_CHOICES:
            raise AnelabError(
                f"Record.tokens must be one of {TOKEN_CHOICES} or a list of words/positions, got {self.tokens!r}"
            )
        if not isinstance(self.heads, bool) or (self.heads and not self.maps):
            raise AnelabError(
                f"Record.heads must be True or False, and True needs maps=True; got heads={self.heads!r}, maps={self.maps!r}"
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise AnelabError(
                f"Record.dtype must be a floating torch dtype (torch.float16, torch.float32), got {self.dtype!r}"
            )
        if not is_number(self.max_gb) or self.max_gb <= 0:  # NaN or inf would turn the budget off
            raise AnelabError(f"Record.max_gb must be a positive number, got {self.max_gb!r}")

    def to_dict(self) -> dict:
        return {
            "resolutions": None if self.resolutions is None else list(self.resolutions),
            "steps": None if self.steps is None else list(self.steps),
            "tokens": self.tokens if isinstance(self.tokens, str) else list(self.tokens),
            "maps": self.maps,
            "dtype": str(self.dtype).removeprefix("torch."),
        } | (
            {"heads": True} if self.heads else {}
        )  # written only when set: study spec hashes of head-mean records stay as they were


@dataclasses.dataclass
class RecordPlan:
    """A :class:`Record` checked against one run: layers, steps, token positions, normaliser."""

    record: Record
    layers: list[hk.Layer]
    steps: list[int]
    tokens: dict[int, str]  # recorded position → word
    subjects: list[int]
    eot: int
    config: GuidanceConfig  # whose normalisation the smoothed max uses
    bytes: int  # estimated size of the kept maps


def plan_record(
    record, *, pipe, prompt, subjects, eot, seeds, timesteps, layers, config, height, width, measured=None
) -> RecordPlan:
    """Check ``record`` for this run (before any denoising); every failure is one clear AnelabError. ``subjects``:
    the positions flagged as subjects (nouns); ``measured``: every token the run measures (default: ``subjects``),
    what ``tokens="subjects"`` records."""
    if not isinstance(record, Record):
        raise AnelabError(f"record must be an anelab.Record or None, got {type(record).__name__}")
    config = config or GuidanceConfig()
    shapes = {layer.res: layer.shape for layer in layers}
    available = sorted(shapes, reverse=True)
    smoothable = [r for r in available if not config.smooth or config.kernel_size // 2 < min(shapes[r])]
    wanted = smoothable if record.resolutions is None else record.resolutions
    missing = [r for r in wanted if r not in available]
    if missing:
        raise AnelabError(
            f"cannot record resolution(s) {missing} at {height}x{width}: this model has cross-attention at {available}"
        )
    too_small = [r for r in wanted if r not in smoothable]
    if too_small:
        raise AnelabError(
            f"kernel_size {config.kernel_size} is too large for the maps at resolution(s) {too_small}; record {smoothable}"
        )
    recorded_layers = [layer for layer in layers if layer.res in wanted]
    n = len(timesteps)
    steps = list(range(n)) if record.steps is None else list(record.steps)
    if steps[-1] >= n:
        raise AnelabError(
            f"Record.steps {[s for s in steps if s >= n]} are outside the schedule: loop indices are 0..{n - 1}"
        )
    words = prompt_tokens(pipe.tokenizer, prompt)
    if record.tokens == "subjects":
        if not subjects:
            raise AnelabError(
                'Record(tokens="subjects") needs subject tokens (tokens=[...]); or use tokens="prompt" or a list'
            )
        positions = list(measured if measured is not None else subjects)
    elif record.tokens == "prompt":
        positions = [*words, eot]
    elif record.tokens == "all":  # every text position: what a method's objective reads (AttentionCache.text_maps)
        positions = list(range(pipe.tokenizer.model_max_length))
    else:
        positions = resolve_tokens(pipe.tokenizer, prompt, record.tokens)
    names = {i: "<sot>" if i == 0 else "<eot>" if i == eot else "<pad>" for i in positions} | words | {eot: "<eot>"}
    size = torch.empty(0, dtype=record.dtype).element_size()
    net = getattr(pipe, "unet", None) or pipe.transformer  # SD 3 / FLUX: blocks of the transformer
    copies = {
        layer.name: net.get_submodule(layer.name).heads if record.heads else 1 for layer in recorded_layers
    }  # maps kept per layer
    per_step = (
        sum(layer.shape[0] * layer.shape[1] * copies[layer.name] for layer in recorded_layers) * len(positions) * size
    )
    estimate = len(seeds) * len(steps) * per_step if record.maps else 0
    if estimate > record.max_gb * 2**30:
        raise AnelabError(
            f"recording would hold {estimate / 2**30:.1f} GiB of maps ({len(seeds)} seeds x {len(steps)} steps x "
            f"{per_step / 2**20:.2f} MiB{', every head' if record.heads else ''}), over the Record.max_gb budget of "
            f"{record.max_gb:g} GiB; record fewer steps, resolutions, tokens or seeds, "
            f"{'keep head means (heads=False), ' if record.heads else ''}use maps=False (statistics only), or raise max_gb"
        )
    return RecordPlan(
        record, recorded_layers, steps, {i: names[i] for i in positions}, list(subjects), eot, config, estimate
    )


class Recorder:
    """Attention sink for the recorded steps; builds the :class:`AttentionCache` at the end."""

    def __init__(self, plan: RecordPlan, prompt: str, seeds: list[int]):
        self.plan, self.prompt, self.seeds = plan, prompt, seeds
        self.positions = list(plan.tokens)
        self.recorded = set(plan.steps)
        self.heads: dict[str, int] = {}
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.timesteps: dict[int, int] = {}
        self._stats: list[tuple[int, str, int, dict[str, np.ndarray]]] = []  # (step, layer, res, stats [B,K])
        self._means: dict[
            int, list[tuple[str, torch.Tensor]]
        ] = {}  # res → (layer, head mean [B, h, w, S]) of this step
        self._step = None

    def sinks(self, step: int) -> dict[str, hk.Sink]:
        """The layers to read at loop index ``step`` (none when the step is not recorded)."""
        if step not in self.recorded:
            return {}
        self._step, self._means = step, {}
        return {layer.name: self for layer in self.plan.layers}

    def __call__(self, name: str, probs: torch.Tensor) -> None:  # probs [B, heads, hw, S], fp32
        layer = self._layer(name)
        self.heads[name] = probs.shape[1]
        mean = probs.detach().mean(dim=1).unflatten(1, layer.shape)  # [B, h, w, S]
        self._means.setdefault(layer.res, []).append((name, mean))
        if self.plan.record.heads:
            kept = probs.detach()[..., self.positions].unflatten(2, layer.shape)  # [B, heads, h, w, K]
            self.maps[self._step, name] = kept.to("cpu", self.plan.record.dtype)
        elif self.plan.record.maps:
            self.maps[self._step, name] = mean[..., self.positions].to("cpu", self.plan.record.dtype)  # [B, h, w, K]

    def end_step(self, step: int, timestep: int) -> None:
        """Close a recorded step: statistics of every layer and of each resolution's mean over every
        (layer, head), one batched :func:`token_statistics` call per resolution."""
        self.timesteps[step] = int(timestep)
        n = len(self.seeds)
        for res, means in self._means.items():
            heads = [self.heads[name] for name, _ in means]
            overall = sum(mean * h for (_, mean), h in zip(means, heads)) / sum(heads)  # mean over every (layer, head)
            names = [name for name, _ in means] + [MEAN]
            stats = token_statistics(
                torch.cat([m for _, m in means] + [overall]), self.positions, self.plan.eot, self.plan.config
            )
            stats = {k: v.cpu().numpy() for k, v in stats.items()}
            self._stats += [
                (step, name, res, {k: v[j * n : (j + 1) * n] for k, v in stats.items()}) for j, name in enumerate(names)
            ]
        self._means = {}

    def _layer(self, name: str) -> hk.Layer:
        return next(layer for layer in self.plan.layers if layer.name == name)

    def cache(self, meta: dict) -> AttentionCache:
        return AttentionCache(
            prompt=self.prompt,
            seeds=self.seeds,
            tokens=self.plan.tokens,
            subjects=self.plan.subjects,
            timesteps=self.timesteps,
            layers=self.plan.layers,
            heads=self.heads,
            maps=self.maps,
            stats=self.frame(),
            meta=meta,
        )

    def frame(self) -> pd.DataFrame:
        """Long-form statistics (columns ``FRAME_COLUMNS``), sorted by seed, step, resolution, layer, token."""
        n_seeds, n_tokens, n_chunks = len(self.seeds), len(self.positions), len(self._stats)
        per_chunk = n_seeds * n_tokens
        places = {layer.name: layer.place for layer in self.plan.layers}
        for res in {layer.res for layer in self.plan.layers}:
            places[MEAN, res] = "+".join(sorted({x.place for x in self.plan.layers if x.res == res}, key=PLACES.index))
        steps, names, resolutions = (np.array([chunk[k] for chunk in self._stats]) for k in range(3))
        columns = {
            "prompt": np.full(n_chunks * per_chunk, self.prompt, dtype=object),
            "seed": np.tile(np.repeat(self.seeds, n_tokens), n_chunks),
            "step": np.repeat(steps, per_chunk),
            "timestep": np.repeat([self.timesteps[s] for s in steps], per_chunk),
            "layer": np.repeat(names, per_chunk).astype(object),
            "place": np.repeat(
                [places[(MEAN, r) if n == MEAN else n] for n, r in zip(names, resolutions)], per_chunk
            ).astype(object),
            "res": np.repeat(resolutions, per_chunk),
            "token_index": np.tile(self.positions, n_chunks * n_seeds),
            "token": np.tile([self.plan.tokens[i] for i in self.positions], n_chunks * n_seeds).astype(object),
            "subject": np.tile([i in self.plan.subjects for i in self.positions], n_chunks * n_seeds),
        }
        for key in STAT_COLUMNS:
            columns[key] = np.concatenate([chunk[3][key].reshape(-1) for chunk in self._stats]).astype(np.float64)
        frame = pd.DataFrame(columns)[FRAME_COLUMNS]
        order = {layer.name: k for k, layer in enumerate(self.plan.layers)} | {MEAN: len(self.plan.layers)}
        frame = frame.sort_values(
            ["seed", "step", "res", "layer", "token_index"], key=lambda c: c.map(order) if c.name == "layer" else c
        )
        return frame.reset_index(drop=True)
