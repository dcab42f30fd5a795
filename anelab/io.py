"""Files written whole or not at all, with the permissions the umask asks for, and the checks and locks
around them.

Every output goes through :func:`atomic_path` (a temporary name in the same folder, then an atomic
rename): a kill at any moment leaves the old file or the new one, never half of one. ``mkstemp`` makes
files readable by their owner only; the finished file gets ``0o666 & ~umask`` like any other file the
user creates, so a group-shared cluster folder stays shared.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .errors import AnelabError


@functools.lru_cache(maxsize=1)
def umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_user(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: ``0o666`` (``0o777`` for folders) minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def no_links(path: Path, root: Path | None) -> Path:
    """``path``, refused (one line) if a folder between ``root`` and it is a symbolic link: nothing anelab writes below a
    shared folder (the run store, an output folder) may follow a link somebody planted there. (A link at ``path``
    itself is replaced by the atomic rename, never followed.)"""
    path = Path(path)
    if root is None:
        return path
    root = Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise AnelabError(f"{str(path)!r} is not inside {str(root)!r}") from None
    current = root
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise AnelabError(
                f"{str(current)!r} is a symbolic link inside {str(root)!r}; anelab writes nothing through links "
                "planted in a shared folder (remove it)"
            )
    return path


@contextlib.contextmanager
def atomic_path(path: Path, within: Path | None = None):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it (``within``: a folder
    below which no link may be followed, :func:`no_links`; the rename replaces a link at ``path`` itself, never its
    target)."""
    path = no_links(Path(path), within)
    path.parent.mkdir(parents=True, exist_ok=True)
    no_links(path, within)  # the folders just made are ours; one swapped in meanwhile is refused here
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        share_like_user(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (any old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for item in (tmp, *tmp.rglob("*")):
            share_like_user(item, directory=item.is_dir())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(frame: pd.DataFrame, path: Path, within: Path | None = None) -> Path:
    """Write ``frame`` to ``path`` atomically."""
    with atomic_path(path, within) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_json(data, path: Path, within: Path | None = None) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path, within) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))
    return Path(path)


def write_text(text: str, path: Path, within: Path | None = None) -> Path:
    with atomic_path(path, within) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_images(images: Sequence, paths: Sequence[Path], within: Path | None = None) -> list[Path]:
    """Save PIL images to ``paths`` (format from the suffix), each atomically."""
    for image, path in zip(images, paths, strict=True):
        with atomic_path(path, within) as tmp:
            image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    return [Path(p) for p in paths]


def ensure_writable(directory: str | os.PathLike, what: str = "--out") -> Path:
    """Prove that ``directory`` can be written (or created) before any model work, without creating it:
    otherwise one line saying why (a file in the way, a read-only place, no permission)."""
    directory = Path(directory)
    if directory.is_symlink() and not directory.exists():
        raise AnelabError(
            f"{what} {str(directory)!r} is a link to nothing (a dangling symbolic link); give a directory"
        )
    if directory.exists() and not directory.is_dir():
        raise AnelabError(f"{what} {str(directory)!r} is a file; give a directory (it is created if missing)")
    probe_in = directory
    while not probe_in.exists():  # the nearest existing folder is where the new one would be created
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise AnelabError(f"{what} {str(directory)!r} cannot be created: {str(probe_in)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".anelab-write-check.", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise AnelabError(
            f"{what} {str(directory)!r} cannot be written: {error.strerror or error} in {str(probe_in)!r}"
        ) from None
    return directory


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = -1, within: Path | None = None):
    """An inter-process lock (``filelock``, which opens with ``O_NOFOLLOW``) on ``path``; ``timeout`` seconds (−1: wait)
    before a one-line error."""
    from filelock import FileLock, Timeout

    path = no_links(Path(path), within)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        with lock:
            yield
    except Timeout:
        raise AnelabError(f"another process holds {path}; try again when it has finished") from None
