"""Files written whole or not at all: a temporary name in the same folder, then an atomic rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def save_images(images: Sequence, paths: Sequence[Path]) -> list[Path]:
    """Save PIL images to ``paths`` (format from the suffix), each atomically."""
    for image, path in zip(images, paths, strict=True):
        with atomic_path(path) as tmp:
            image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return [Path(p) for p in paths]
