"""Files written whole or not at all: a temporary name in the same folder, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` to ``path`` atomically."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_images(images: Sequence, paths: Sequence[Path]) -> list[Path]:
    """Save PIL images to ``paths`` (format from the suffix), each atomically."""
    written = []
    for image, path in zip(images, paths, strict=True):
        path = Path(path)
        tmp = _temporary(path)
        try:
            image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written
