"""File and folder names derived from prompts: one function writes them, one reads them back.

The A&E layout names each prompt's folder after the prompt (reference §2: the folder name *is* the
prompt the metrics score). A prompt made only of safe characters keeps that name; any other prompt
(path separators, ``..``, capitals, other characters, or over :data:`MAX_LENGTH` characters) becomes a
short slug plus a hash of the whole prompt. A safe name never contains ``~`` and a hashed one always
does, so two different prompts never share a folder. The folder → prompt mapping is also written to
``prompts.json`` beside the folders, so the prompt is recoverable from the output alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .io import file_lock, write_json

MAX_LENGTH = 100
PROMPTS_FILE = "prompts.json"
_SAFE = re.compile(
    r"[a-z0-9][a-z0-9 ,'_-]*[a-z0-9]|[a-z0-9]"
)  # lower case (case-insensitive disks), no dots, no separators


def prompt_folder(prompt: str) -> str:
    """The folder name of ``prompt``: the prompt itself when it is safe, else ``<slug>~<hash>``."""
    if len(prompt) <= MAX_LENGTH and _SAFE.fullmatch(prompt) and "  " not in prompt:
        return prompt
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60].rstrip("-") or "prompt"
    return f"{slug}~{hashlib.sha256(prompt.encode()).hexdigest()[:16]}"


def remember_prompts(out: Path, prompts) -> None:
    """Add ``{folder: prompt}`` of ``prompts`` to ``out/prompts.json`` (under a lock: several runs may share ``out``)."""
    out = Path(out)
    path = out / PROMPTS_FILE
    with file_lock(out / f".{PROMPTS_FILE}.lock"):
        known = json.loads(path.read_text()) if path.is_file() else {}
        added = {prompt_folder(p): p for p in prompts}
        if any(
            known.get(k, v) != v for k, v in added.items()
        ):  # cannot happen (see the module docstring); never overwrite silently
            raise RuntimeError(f"prompt folder collision in {path}")
        if not added.keys() <= known.keys():
            write_json(dict(sorted({**known, **added}.items())), path)


def prompt_of(folder: Path) -> str:
    """The prompt a folder holds: from ``prompts.json`` beside it, else its name (the A&E layout)."""
    folder = Path(folder)
    path = folder.parent / PROMPTS_FILE
    if path.is_file():
        known = json.loads(path.read_text())
        if folder.name in known:
            return known[folder.name]
    return folder.name
