"""The work of a study: blocks of seeds, in a fixed order, split into shards and processes.

A *block* is one :func:`anelab.generate` call: a variant, a prompt and a run of ``study.batch``
seeds. Its batch, and therefore every result, is the same however the work is sharded (bit for bit on
the same hardware and thread count: the CPU thread count changes float summation order). Shard
``I/N`` takes blocks ``I, I+N, …``; under ``accelerate launch`` each process takes its own share of it.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import AnelabError
from .study import Study


@dataclasses.dataclass(frozen=True)
class Block:
    """One generate call: a variant, a prompt and a run of seeds."""

    variant: str
    prompt: str
    category: str
    tokens: tuple
    seeds: tuple[int, ...]
    subjects: tuple = ()  # ((noun, (modifier, ...)), ...) in words; default: the tokens without modifiers

    def __post_init__(self):
        if not self.subjects:
            object.__setattr__(self, "subjects", tuple((t, ()) for t in self.tokens))


def work_plan(study: Study) -> list[Block]:
    """Every block of the study, in a fixed order (variants, then prompts, then seed blocks)."""
    blocks = []
    table = study.prompts
    subjects = table["subjects"] if "subjects" in table else [[(t, []) for t in ts] for ts in table.tokens]
    for variant in study.variants:
        for (prompt, category, tokens), named in zip(
            table[["prompt", "category", "tokens"]].itertuples(index=False), subjects
        ):
            named = tuple((noun, tuple(modifiers)) for noun, modifiers in named)
            for start in range(0, len(study.seeds), study.batch):
                seeds = tuple(study.seeds[start : start + study.batch])
                blocks.append(Block(variant, prompt, category, tuple(tokens), seeds, named))
    return blocks


def parse_shard(text: str) -> tuple[int, int]:
    """``"0/4"`` → ``(0, 4)``."""
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise AnelabError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise AnelabError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def process_share():
    """``(process index, process count, device)`` under ``accelerate launch`` (one GPU or CPU per
    process); ``(0, 1, None)`` in a plain run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device


def my_share(blocks: list, shard: tuple[int, int] = (0, 1)) -> list:
    """The blocks of this shard and this process (every ``N × processes``-th, from this one's offset)."""
    index, count = shard
    process, processes, _ = process_share()
    return [b for k, b in enumerate(blocks) if k % (count * processes) == index * processes + process]
