"""`AttentionCache`: the cross-attention one :func:`anelab.generate` call recorded.

A small class around a dict keyed by ``(step, layer)``: each value is the head-averaged
probability map of the recorded tokens for every seed, ``[n_seeds, h, w, K]`` (with
``Record(heads=True)`` every head's map, ``[n_seeds, heads, h, w, K]``), detached, on the CPU. Token statistics (smoothed max as the A&E loss sees it, raw max, mass) come as a long-form
pandas frame. Saved as safetensors + parquet + a JSON manifest; never pickled objects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import unet as unet_family
from .errors import AnelabError
from .hooks import Layer
from .io import atomic_dir

STAT_COLUMNS = ["max_attention", "raw_max", "mass", "centroid_x", "centroid_y"]
FRAME_COLUMNS = [
    "prompt",
    "seed",
    "step",
    "timestep",
    "layer",  # diffusers module path, or "mean" for the mean over the resolution's layers (what the loss reads)
    "place",
    "res",
    "token_index",
    "token",
    "subject",  # a token the run was asked to guide (tokens=)
    *STAT_COLUMNS,
]
MEAN = "mean"


def short_layer_name(name: str) -> str:
    """A UNet layer's short name (:func:`anelab.unet.short_name`: ``up_blocks.1.attentions.0…attn2`` → ``up 1.0``);
    a transformer block's path is returned as is."""
    return unet_family.short_name(name)


_MANIFEST, _MAPS, _STATS = "manifest.json", "maps.safetensors", "stats.parquet"


class AttentionCache:
    """Recorded cross-attention of one generate call: maps by ``(step, layer)`` and token statistics.

    ``cache[step, layer]`` is ``[n_seeds, h, w, K]`` (``per_head``: ``[n_seeds, heads, h, w, K]``)
    over the recorded tokens ``cache.tokens`` (position → word); ``cache.maps(...)`` picks one
    ``[h, w]`` map and ``cache.vmax(...)`` a colour scale fixed over steps; ``cache.stats()`` and
    ``cache.to_frame()`` are the statistics as pandas (columns ``FRAME_COLUMNS``). Layers are named
    by module path or short name (``cache.layer_names``: ``"up 1.0"`` → path).
    """

    def __init__(
        self,
        *,
        prompt: str,
        seeds: list[int],
        tokens: dict[int, str],
        subjects: list[int],
        timesteps: dict[int, int],
        layers: list[Layer],
        heads: dict[str, int],
        maps: dict[tuple[int, str], torch.Tensor],
        stats: pd.DataFrame,
        meta: dict | None = None,
    ):
        self.prompt, self.seeds, self.tokens, self.subjects = prompt, list(seeds), dict(tokens), list(subjects)
        self.timesteps = dict(timesteps)  # recorded loop index → scheduler timestep
        self.layers, self.heads = list(layers), dict(heads)
        self._maps, self._stats, self.meta = maps, stats, dict(meta or {})
        self._tops: dict[tuple, float] = {}  # vmax answers: the maps never change after construction

    # -- what is there ------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return sorted(self.timesteps)

    @property
    def resolutions(self) -> list[int]:
        return sorted({layer.res for layer in self.layers}, reverse=True)

    def layers_at(self, res: int) -> list[Layer]:
        return [layer for layer in self.layers if layer.res == res]

    @property
    def has_maps(self) -> bool:
        return bool(self._maps)

    @property
    def per_head(self) -> bool:
        """Whether every head's map was kept (``Record(heads=True)``), not only the head mean."""
        return any(t.ndim == 5 for t in self._maps.values())

    @property
    def layer_names(self) -> dict[str, str]:
        """Short name → module path of every recorded layer (``"up 1.0"`` → ``up_blocks.1.attentions.0…attn2``)."""
        return {short_layer_name(layer.name): layer.name for layer in self.layers}

    @property
    def default_res(self) -> int:
        """The resolution to open at: the one the run's A&E loss read (``attention_res``), else 16, else the finest recorded."""
        guidance = (self.meta.get("config") or {}).get("attention_res", 16)
        return next(r for r in (guidance, 16, self.resolutions[0]) if r in self.resolutions)

    @property
    def nbytes(self) -> int:
        """Bytes held by the maps."""
        return sum(t.numel() * t.element_size() for t in self._maps.values())

    def keys(self) -> Iterator[tuple[int, str]]:
        return iter(self._maps)

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        if key not in self._maps:
            raise KeyError(f"no map recorded for {key!r}" + ("" if self._maps else " (recorded with maps=False)"))
        return self._maps[key]

    def __len__(self) -> int:
        return len(self._maps)

    def __bool__(self) -> bool:  # a statistics-only cache has no maps but is not "nothing"
        return True

    def __repr__(self) -> str:
        return (
            f"AttentionCache({self.prompt!r}, seeds={self.seeds}, steps={len(self.steps)}, resolutions={self.resolutions}, "
            f"tokens={list(self.tokens.values())}, maps={len(self._maps)} ({self.nbytes / 2**20:.1f} MiB))"
        )

    # -- reading ------------------------------------------------------------------------------
    def maps(
        self,
        *,
        token: str | int,
        step: int,
        res: int | None = None,
        layer: str | None = None,
        seed: int | None = None,
        head: int | None = None,
    ) -> torch.Tensor:
        """One map ``[h, w]`` (fp32): a layer's head mean (or its head ``head``, when ``per_head``), or
        (``layer=None``) the mean over every (layer, head) at ``res`` — the map the A&E loss reads,
        before its token re-normalisation."""
        column = list(self.tokens).index(self.token_index(token))
        return self._block(step=step, res=res, layer=layer, seed=seed, head=head)[..., column]

    def text_maps(self, *, step: int, seed: int | None = None) -> dict[int, torch.Tensor]:
        """``{res: [1, h, w, S]}``: at each recorded resolution, the mean over every (layer, head) of every text position
        — what :func:`anelab.methods.evaluate` reads, so a method's objective can be asked of recorded maps (record
        with ``Record(tokens="all")``: every position, ``<sot>`` and the padding too)."""
        positions = list(self.tokens)
        if positions != list(range(len(positions))) or len(positions) < 2:
            raise AnelabError(
                "a method's objective reads every text position; record with anelab.Record(tokens='all') "
                f"(this recording holds positions {positions[:8]}{'...' if len(positions) > 8 else ''})"
            )
        return {r: self._block(step=step, res=r, layer=None, seed=seed, head=None)[None] for r in self.resolutions}

    def vmax(
        self,
        *,
        res: int | None = None,
        layer: str | None = None,
        seed: int | None = None,
        head: int | None = None,
        tokens: Sequence[str | int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> float:
        """The largest value of the maps of ``tokens`` (default: every recorded token) over ``steps``
        (default: every recorded step): a colour scale that stays put while the step (and, over
        every token, the token) changes."""
        columns = tuple(list(self.tokens).index(self.token_index(t)) for t in tokens) if tokens is not None else None
        steps = tuple(self.steps if steps is None else steps)
        key = (res, layer, seed, head, columns, steps)
        if key not in self._tops:
            pick = list(columns) if columns is not None else slice(None)
            self._tops[key] = max(
                float(self._block(step=s, res=res, layer=layer, seed=seed, head=head)[..., pick].max()) for s in steps
            )
        return self._tops[key]

    def _block(
        self, *, step: int, res: int | None, layer: str | None, seed: int | None, head: int | None
    ) -> torch.Tensor:
        """The maps of every recorded token at one step, ``[h, w, K]`` fp32 (see :meth:`maps`)."""
        if not self._maps:
            raise AnelabError(
                "this recording holds statistics only (Record(maps=False)); record with maps=True to get maps"
            )
        row = self.seed_row(seed)
        if step not in self.timesteps:
            raise AnelabError(f"step {step} was not recorded; recorded steps are {self.steps}")
        if layer is not None and layer != MEAN:
            name = self.layer_name(layer)
            found = next(item for item in self.layers if item.name == name)
            if res is not None and found.res != res:
                raise AnelabError(f"layer {layer!r} is at resolution {found.res}, not {res}")
            return self._head(self._maps[step, name][row], name, head)
        if head is not None:
            raise AnelabError(
                f"head={head} needs one layer (layer=...): heads are not aligned across layers, so the resolution mean has none"
            )
        if res not in self.resolutions:
            raise AnelabError(f"resolution {res!r} was not recorded; recorded resolutions are {self.resolutions}")
        layers = self.layers_at(res)
        weights = torch.tensor([self.heads[item.name] for item in layers], dtype=torch.float32)
        stacked = torch.stack([self._head(self._maps[step, item.name][row], item.name, None) for item in layers])
        return (stacked * weights[:, None, None, None]).sum(0) / weights.sum()

    def _head(self, kept: torch.Tensor, name: str, head: int | None) -> torch.Tensor:
        """``kept`` (``[h, w, K]`` head mean, or ``[heads, h, w, K]``) as the head mean or head ``head``, fp32."""
        if head is None:
            return kept.float().mean(0) if kept.ndim == 4 else kept.float()
        if kept.ndim != 4:
            raise AnelabError(
                f"head={head}: this recording kept head means only; record with anelab.Record(heads=True) for every head's map"
            )
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < kept.shape[0]:
            raise AnelabError(f"layer {short_layer_name(name)!r} has heads 0..{kept.shape[0] - 1}, got head={head!r}")
        return kept[head].float()

    def layer_name(self, layer: str) -> str:
        """A recorded layer's module path, from its path or short name (``"up 1.0"``)."""
        paths = [item.name for item in self.layers]
        name = layer if layer in paths else self.layer_names.get(layer)
        if name is None:
            raise AnelabError(
                f"layer {layer!r} was not recorded; recorded layers are {', '.join(self.layer_names)} (short names or module paths)"
            )
        return name

    def token_label(self, token: str | int) -> str:
        """A recorded token's word, with its position when the word is recorded twice (``"a (1)"``, ``"a (4)"``)."""
        index = self.token_index(token)
        word = self.tokens[index]
        return f"{word} ({index})" if list(self.tokens.values()).count(word) > 1 else word

    def token_index(self, token: str | int) -> int:
        """A recorded token's position, from its word, position or label (``"a (4)"``)."""
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool) and int(token) in self.tokens:
            return int(token)
        labelled = re.fullmatch(r"(.+) \((\d+)\)", str(token).strip())
        if labelled and self.tokens.get(int(labelled[2])) == labelled[1].lower():
            return int(labelled[2])
        hits = [i for i, word in self.tokens.items() if word == str(token).strip().lower()]
        if len(hits) != 1:
            listing = " ".join(f"{i}:{w}" for i, w in self.tokens.items())
            raise AnelabError(f"token {token!r} was not recorded (or is ambiguous); recorded tokens are {listing}")
        return hits[0]

    def seed_row(self, seed: int | None) -> int:
        if seed is None:
            if len(self.seeds) > 1:
                raise AnelabError(f"this recording holds seeds {self.seeds}; pass seed=")
            return 0
        if seed not in self.seeds:
            raise AnelabError(f"seed {seed!r} was not recorded; recorded seeds are {self.seeds}")
        return self.seeds.index(seed)

    def to_frame(self) -> pd.DataFrame:
        """Token statistics, long form: one row per (seed, step, layer or resolution mean, token)."""
        return self._stats.copy()

    def stats(self) -> pd.DataFrame:
        """Per (seed, step, resolution, token) statistics of the mean map the loss reads (``layer == "mean"``)."""
        frame = self._stats[self._stats.layer == MEAN]
        return frame.drop(columns=["layer", "place"]).reset_index(drop=True)

    def block_stats(self) -> dict[str, pd.DataFrame]:
        """:meth:`stats` of each recorded layer on its own, in execution order (a transformer's blocks: what
        ``plotting.attention_trends(cache.block_stats())`` draws one row each of)."""
        frame = self._stats
        return {
            layer.name: frame[frame.layer == layer.name].drop(columns=["layer", "place"]).reset_index(drop=True)
            for layer in self.layers
        }

    # -- files --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write maps (safetensors), statistics (parquet) and a JSON manifest into ``directory``, whole or not at all."""
        from safetensors.torch import save_file

        target = Path(directory)
        if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / _MANIFEST).exists())):
            raise AnelabError(f"{target} exists and is not an attention cache; choose an empty or new directory")
        with atomic_dir(target) as tmp:
            save_file({f"{step}|{name}": t.contiguous() for (step, name), t in self._maps.items()}, tmp / _MAPS)
            self._stats.to_parquet(tmp / _STATS, index=False)
            (tmp / _MANIFEST).write_text(json.dumps(self._manifest(), indent=1))
        return target

    def _manifest(self) -> dict:
        return {
            "format": "anelab.AttentionCache/1",
            "prompt": self.prompt,
            "seeds": self.seeds,
            "tokens": [[i, word] for i, word in self.tokens.items()],
            "subjects": self.subjects,
            "timesteps": [[step, t] for step, t in self.timesteps.items()],
            "layers": [
                {"name": x.name, "place": x.place, "shape": list(x.shape), "heads": self.heads[x.name]}
                for x in self.layers
            ],
            "maps": [[step, name] for step, name in self._maps],
            "meta": self.meta,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AttentionCache:
        """Read a cache written by :meth:`save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / _MANIFEST).is_file():
            raise AnelabError(f"{directory} is not a saved attention cache (no {_MANIFEST})")
        try:
            manifest = json.loads((directory / _MANIFEST).read_text())
            tensors = load_file(directory / _MAPS)
            stats = pd.read_parquet(directory / _STATS)
        except Exception as error:  # json, safetensors and pyarrow each raise their own type for a damaged file
            raise AnelabError(
                f"{directory} is a damaged attention cache ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "record and save it again"
            ) from None
        return cls(
            prompt=manifest["prompt"],
            seeds=manifest["seeds"],
            tokens={int(i): word for i, word in manifest["tokens"]},
            subjects=manifest["subjects"],
            timesteps={int(step): int(t) for step, t in manifest["timesteps"]},
            layers=[Layer(x["name"], x["place"], tuple(x["shape"])) for x in manifest["layers"]],
            heads={x["name"]: x["heads"] for x in manifest["layers"]},
            maps={(int(step), name): tensors[f"{step}|{name}"] for step, name in manifest["maps"]},
            stats=stats,
            meta=manifest["meta"],
        )
