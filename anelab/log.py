"""anelab's messages: the ``anelab`` logger (the library never prints) and the progress bars that follow it.

Notes (a dropped variant, calibrated thresholds, work another process holds) are INFO, what a run did step by
step is DEBUG, and progress bars show while INFO does. A library caller sees warnings and above until it
chooses otherwise::

    anelab.log.show()                              # notes on stderr (as the CLI and the report notebooks do)
    logging.getLogger("anelab").setLevel("DEBUG")  # or configure logging as for any library

The CLI shows INFO by default, ``--quiet`` keeps warnings and errors only (and no bars), ``--verbose`` adds DEBUG.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("anelab")
logger.addHandler(logging.NullHandler())

_HANDLER_NAME = "anelab.show"


class _LineHandler(logging.StreamHandler):
    """Bare lines to a given stream, or to whatever ``sys.stderr`` is when a message is written (a notebook
    kernel, pytest or the CLI may replace it after ``show`` was called)."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self.fixed = stream

    def emit(self, record):
        self.stream = self.fixed or sys.stderr
        super().emit(record)


def show(level: int | str = logging.INFO, stream=None) -> logging.Logger:
    """Send anelab's messages at ``level`` and above to ``stream`` (stderr) as bare lines; calling it again only
    changes the level (and the stream)."""
    if isinstance(level, str) and level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = _LineHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.fixed = stream
    logger.propagate = False  # shown once, not again by a root handler
    return logger


def note(message: str) -> None:
    """A note for the person running the work (INFO, prefixed ``note:`` as the CLI has always shown them)."""
    logger.info("note: %s", message)


def bars_off(progress: bool) -> bool:
    """``disable=`` for a tqdm bar: off when the caller said so or when anelab's INFO messages are hidden."""
    return not progress or logger.level > logging.INFO  # NOTSET (0, never configured) keeps them
