"""Files the package reads at run time: the prompt set, the CLIP templates, the study files and the report
notebooks. They ship inside the package (``anelab.data``, ``anelab.notebooks``; the top-level ``data/`` and
``notebooks/`` folders of a checkout are mapped there, see pyproject.toml) and are read with
``importlib.resources``, so an installed wheel has them too. Nothing is ever written here.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def data_file(name: str) -> Traversable:
    """A file of ``anelab.data`` (e.g. ``"ane_prompts.json"``, ``"studies/resolution.yaml"``)."""
    return resources.files("anelab.data").joinpath(name)


def study_files() -> dict[str, Traversable]:
    """The built-in study files by name (``"resolution"`` → ``studies/resolution.yaml``)."""
    folder = resources.files("anelab.data").joinpath("studies")
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def notebook(name: str) -> Traversable:
    """A report notebook of ``anelab.notebooks`` by name (``"01_reproduction"``)."""
    return resources.files("anelab.notebooks").joinpath(f"{name}.ipynb")


@contextlib.contextmanager
def as_path(entry: Traversable):
    """A real file path for ``entry`` while the context lasts (papermill and nbformat want paths)."""
    with resources.as_file(entry) as path:
        yield Path(path)
