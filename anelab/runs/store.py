"""The run store: every generated image once, under a key of everything that changes its bytes.

Layout (default ``runs/store`` under the working directory; ``ANELAB_STORE`` or ``--store`` elsewhere,
e.g. a shared cluster folder)::

    STORE.json                              format marker
    images/<k[:2]>/<key>.png                one image per key
    tables/rows/<write>.parquet             one row per image: key, prompt, seed, guidance statistics, what was recorded
    tables/trace/<write>.parquet            the guidance trace rows of those images
    tables/stats/<write>.parquet            their recorded token statistics
    tables/scores/<scorer>/<write>.parquet  scores per key and scorer model (clip, blip, detector)
    locks/<k[:2]>/<block>.lock              held while a block is generated and not yet written
    quarantine/                             damaged table files, moved aside (their images are made again)

A *key* is the SHA-256 of a canonical JSON of the run's identity (:func:`block_identity`: model, dtype,
device kind, prompt, objectives, steps, size, guidance scale, the whole GuidanceConfig with its step
sizes, the generator, the seeds generated together) and the seed. A *write* is one flush of one writer:
its trace and statistics files go first and its rows file is renamed into place last, so a writer killed
midway leaves no visible half entry. Two writers never write the same file. Tables are read through
``pyarrow.dataset`` with column and filter selection; when a key was written twice, the latest write wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import pandas as pd

from ..errors import AnelabError
from ..io import no_links, write_json, write_parquet, write_text
from ..methods import AE
from ..stand_ins import TINY_MODELS

FORMAT = "anelab-store/1"
STORE_ENV = "ANELAB_STORE"
DEFAULT_ROOT = Path("runs") / "store"
TABLES = ("rows", "trace", "stats")
SCORER_KINDS = ("clip", "binding", "blip", "detector")


#: What a store folder holds (anything else in a folder without STORE.json means it is not a store).
STORE_ENTRIES = {"STORE.json", "images", "tables", "locks", "quarantine"}


def _store_entry(name: str) -> bool:
    return name in STORE_ENTRIES or (name.startswith(".STORE.json.") and name.endswith(".tmp"))


def default_root() -> Path:
    """``$ANELAB_STORE`` if set, else ``runs/store`` under the working directory."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_ROOT).expanduser()


def model_identity(model, revision: str | None = None, variant: str | None = None) -> str:
    """What names the weights: ``tiny/<version>`` (``tiny-sd2/<version>``, ``tiny-xl/<version>``),
    ``<hub id>@<revision>[:<variant>]`` or ``dir:<absolute path>``."""

    if not isinstance(model, (str, os.PathLike)):
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            raise AnelabError("the store needs a model name: pass the model as 'tiny', a Hub id or a local directory")
        model = name
    model = str(model)
    if model in TINY_MODELS:
        return f"{model}/{TINY_MODELS[model]}"
    if Path(model).expanduser().exists():
        return f"dir:{Path(model).expanduser().resolve()}"
    return f"{model}@{revision or 'main'}" + (f":{variant}" if variant else "")


def block_identity(
    *,
    model: str,
    dtype: str,
    device: str,
    scheduler: str,
    iterations: int,
    prompt: str,
    subjects,
    seeds,
    steps: int,
    height: int,
    width: int,
    guidance_scale: float,
    method,
    generator_device: str,
    transformer: dict | None = None,
) -> dict:
    """Everything of one generate call that changes its images' bytes (the recording does not: it only observes).
    ``subjects`` are :class:`anelab.subjects.Subject` values in words; ``iterations``: the scheduler's loop length for
    ``steps`` (the step sizes are taken over it, so a callable schedule is keyed by what it computes).

    Attend-and-Excite and plain SD are keyed exactly as anelab 0.2.0 keyed them (tokens, suppress, layout and the
    settings as ``config``), so a store written then keeps serving; another method adds its ``method`` name and its
    ``subjects`` (noun, modifiers); SD 3 / FLUX options other than their defaults (``transformer``: blocks, token maps,
    text softmax, step rule, threshold placement, T5 length) add ``transformer``."""
    guidance = (
        None if method is None else method.to_dict() | {"step_sizes": [float(a) for a in method.step_sizes(iterations)]}
    )
    identity = {
        "format": FORMAT,
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "scheduler": scheduler,
        "prompt": prompt,
        "tokens": [str(s.noun) for s in subjects if s.role == "excite"],
        "suppress": [str(s.noun) for s in subjects if s.role == "suppress"],
        "layout": {str(s.noun): [float(v) for v in s.target] for s in subjects if s.target is not None},
        "seeds": [int(s) for s in seeds],
        "steps": int(steps),
        "height": int(height),
        "width": int(width),
        "guidance_scale": float(guidance_scale),
        "config": guidance,
        "generator_device": generator_device,
    }
    if method is not None and method.name != AE:
        identity["method"] = method.name
        identity["subjects"] = [[str(s.noun), [str(m) for m in s.modifiers]] for s in subjects]
    if transformer:
        identity["transformer"] = dict(transformer)
    return identity


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def image_key(identity: dict, seed: int) -> str:
    """The key of seed ``seed`` of a block."""
    return _digest({"block": identity, "seed": int(seed)})


def block_key(identity: dict) -> str:
    return _digest({"block": identity})


def covers(have: str | None, need: dict | None) -> bool:
    """Whether statistics recorded as ``have`` (JSON of resolutions, steps, token positions) include ``need``."""
    if need is None:
        return True
    if have in (None, "null"):
        return False
    have = json.loads(have)
    return all(set(need[k]) <= set(have[k]) for k in ("resolutions", "steps", "tokens"))


class Store:
    """A content-addressed store of generated images, their traces, statistics and scores (module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._schemas: dict[Path, object] = {}  # table file → its schema, read once (reading it checks the footer)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout --------------------------------------------------------------------------------
    def image(self, key: str) -> Path:
        return self.root / "images" / key[:2] / f"{key}.png"

    def intact(self, rows: pd.DataFrame) -> pd.Series:
        """Per row of ``rows`` (``key`` and, where the writer recorded it, ``image_bytes``): whether its image is there
        with the size it was written with (a cheap check: one ``stat`` per image). Rows written before sizes were
        recorded only need their image to exist."""
        sizes = rows["image_bytes"] if "image_bytes" in rows else pd.Series(float("nan"), index=rows.index)
        ok = []
        for key, size in zip(rows.key, sizes):
            try:
                found = self.image(key).stat().st_size
            except OSError:
                ok.append(False)
                continue
            ok.append(bool(found > 0 and (size != size or found == size)))
        return pd.Series(ok, index=rows.index, dtype=bool)

    def set_aside_image(self, key: str, why: str) -> None:
        """Move a damaged image to ``quarantine/`` (the next sweep makes it again), with a warning saying why."""
        aside = no_links(self.root / "quarantine", self.root)
        aside.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.image(key), aside / f"images-{key}.png")
        warnings.warn(
            f"damaged store image {key} ({why}) moved to {aside}; the next sweep makes it again", stacklevel=3
        )

    def _table_dir(self, kind: str) -> Path:
        return self.root / "tables" / (kind if kind in TABLES else f"scores/{kind}")

    def prepare(self) -> None:
        """Create the store's folders (a new store) and check that it is one, of this format. Safe under any number of
        writers creating one store at once (a SLURM array's first seconds): the marker is written first, atomically,
        and a folder holding only store entries (another writer's) is a store being made, not a foreign folder."""
        marker = self.root / "STORE.json"
        if self.root.is_symlink() and not self.root.exists():
            raise AnelabError(f"--store {str(self.root)!r} is a link to nothing (a dangling symbolic link)")
        if self.root.exists() and not self.root.is_dir():
            raise AnelabError(f"--store {str(self.root)!r} is a file; give a directory (it is created if missing)")
        if not marker.is_file():
            foreign = sorted(
                p.name for p in (self.root.iterdir() if self.root.is_dir() else ()) if not _store_entry(p.name)
            )
            if foreign:
                raise AnelabError(
                    f"{self.root} is not empty and is not a run store (no STORE.json; it holds {foreign[:3]}); "
                    "choose another --store"
                )
            try:
                write_json({"format": FORMAT}, marker, within=self.root)  # several writers: the same bytes, one wins
            except OSError as error:
                raise AnelabError(f"cannot create the run store {self.root}: {error.strerror or error}") from None
        self.check_format()
        for kind in (*TABLES, *SCORER_KINDS):
            no_links(self._table_dir(kind), self.root).mkdir(parents=True, exist_ok=True)

    def check_format(self) -> None:
        """Refuse a store of another format version (one line: which, and what this anelab reads)."""
        marker = self.root / "STORE.json"
        try:
            found = json.loads(marker.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            raise AnelabError(
                f"{marker} is damaged (not the JSON of a store marker); is {self.root} a run store?"
            ) from None
        if found != FORMAT:
            raise AnelabError(
                f"the run store {self.root} is of format {found!r}; this anelab reads {FORMAT!r} (use another --store, "
                "or the anelab version that wrote it)"
            )

    # -- locks ---------------------------------------------------------------------------------
    def _lock_path(self, block: str) -> Path:
        path = no_links(self.root / "locks" / block[:2] / f"{block}.lock", self.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return no_links(path, self.root)

    def try_lock(self, block: str):
        """The lock of a block if no other process holds it, else None (non-blocking)."""
        from filelock import FileLock, Timeout

        path = self._lock_path(block)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        owner = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
        write_text(owner, path.with_suffix(".owner"), within=self.root)  # a rename: never through a planted link
        return lock

    def wait_lock(self, block: str, timeout: float = -1):
        """The lock of a block, waiting for its holder to finish."""
        from filelock import FileLock

        lock = FileLock(str(self._lock_path(block)), timeout=timeout)
        lock.acquire()
        return lock

    def holder(self, block: str) -> str:
        path = self.root / "locks" / block[:2] / f"{block}.owner"
        return path.read_text()[:200] if path.is_file() and not path.is_symlink() else "another process"

    # -- writing -------------------------------------------------------------------------------
    def write(self, rows: pd.DataFrame, trace: pd.DataFrame, stats: pd.DataFrame) -> str:
        """One write: trace and statistics first, rows last (the rows make the entries visible)."""
        write = f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        stamp = {"write": write, "written": time.time_ns()}
        for kind, frame in (("trace", trace), ("stats", stats), ("rows", rows)):
            if kind == "rows" or len(frame):
                write_parquet(frame.assign(**stamp), self._table_dir(kind) / f"{write}.parquet", within=self.root)
        return write

    def write_scores(self, kind: str, frame: pd.DataFrame) -> None:
        """Scores of some keys by one scorer model (columns ``key``, ``model`` and the scorer's)."""
        write = f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        write_parquet(
            frame.assign(written=time.time_ns()), self._table_dir(kind) / f"{write}.parquet", within=self.root
        )

    # -- reading -------------------------------------------------------------------------------
    def rows_files(self) -> set[str]:
        """The names of the rows files (one per write) now in the store."""
        folder = self._table_dir("rows")
        return {p.name for p in folder.glob("*.parquet") if not p.name.startswith(".")} if folder.is_dir() else set()

    def rows_since(self, seen: set[str], columns: list[str] | None = None) -> pd.DataFrame:
        """Rows of the writes that appeared since ``seen`` (rows file names; updated in place): a cheap way for
        a writer to learn what other processes finished, without reading the whole table."""
        import pyarrow.parquet as pq

        new = sorted(self.rows_files() - seen)
        frames = []
        for name in new:
            try:
                frames.append(
                    pq.read_table(self._table_dir("rows") / name, columns=["key", *(columns or [])]).to_pandas()
                )
            except Exception:  # damaged or just moved aside: the full read handles it
                continue
            seen.add(name)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key", *(columns or [])])

    def read(self, kind: str, keys=None, columns: list[str] | None = None, filter=None) -> pd.DataFrame:
        """Rows of a table, for ``keys`` (None: all), only ``columns`` (None: all), and a ``pyarrow.compute``
        ``filter`` expression, read through ``pyarrow.dataset``."""
        import pyarrow.compute as pc

        for attempt in range(2):
            dataset = self._dataset(kind)
            if dataset is None:
                return pd.DataFrame(columns=columns or ["key"])
            condition = filter
            if keys is not None:
                keyed = pc.field("key").isin(list(keys))
                condition = keyed if condition is None else condition & keyed
            wanted = None if columns is None else [c for c in dict.fromkeys(columns) if c in dataset.schema.names]
            try:
                return dataset.to_table(columns=wanted, filter=condition).to_pandas()
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid / IOError: a file damaged past its footer
                if attempt:
                    raise AnelabError(f"cannot read the store's {kind} table in {self.root}: {error}") from None
                self._find_damaged(kind)
        raise AssertionError("unreachable")

    def latest_rows(self, keys=None, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows of ``keys`` (one per key: the latest write)."""
        wanted = None if columns is None else list(dict.fromkeys([*columns, "key", "write", "written"]))
        rows = self.read("rows", keys, wanted)
        for column in wanted or ():  # rows files of an older schema lack newer columns: read as missing values
            if column not in rows:
                rows[column] = pd.Series(dtype=object) if rows.empty else None
        if rows.empty:
            return rows
        return rows.sort_values("written", kind="stable").drop_duplicates("key", keep="last").reset_index(drop=True)

    def entries(self, kind: str, rows: pd.DataFrame, columns: list[str] | None = None, filter=None) -> pd.DataFrame:
        """The ``trace`` or ``stats`` rows written together with ``rows`` (same key and write)."""
        wanted = None if columns is None else list(dict.fromkeys([*columns, "key", "write"]))
        table = self.read(kind, set(rows.key), wanted, filter)
        if table.empty:
            return table
        chosen = pd.MultiIndex.from_frame(rows[["key", "write"]])
        return table[pd.MultiIndex.from_frame(table[["key", "write"]]).isin(chosen)].reset_index(drop=True)

    def scores(self, kind: str, model: str, keys=None) -> pd.DataFrame:
        """The latest score of each key by ``model``."""
        import pyarrow.compute as pc

        table = self.read(kind, keys, filter=pc.field("model") == model)
        if table.empty:
            return table
        return table.sort_values("written", kind="stable").drop_duplicates("key", keep="last").reset_index(drop=True)

    def _dataset(self, kind: str):
        import pyarrow as pa
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        folder = self._table_dir(kind)
        files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []
        valid = []
        for path in files:
            if path not in self._schemas:
                try:
                    self._schemas[path] = pq.read_schema(path)  # reads the footer: a truncated file fails here
                except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                    self._quarantine(kind, path, error)
                    continue
            valid.append(path)
        if not valid:
            return None
        schema = pa.unify_schemas([self._schemas[p] for p in valid], promote_options="permissive")
        return ds.dataset([str(p) for p in valid], schema=schema, format="parquet")

    def _find_damaged(self, kind: str) -> None:
        import pyarrow.parquet as pq

        for path in list(self._schemas):
            if path.parent == self._table_dir(kind) and path.exists():
                try:
                    pq.read_table(path)
                except Exception as error:  # damaged data pages behind an intact footer
                    self._quarantine(kind, path, error)

    def _quarantine(self, kind: str, path: Path, error: Exception) -> None:
        """Move a damaged table file aside, with the other tables of the same write (so its images are made again)."""
        aside = no_links(self.root / "quarantine", self.root)
        aside.mkdir(parents=True, exist_ok=True)
        moved = []
        siblings = [self._table_dir(k) / path.name for k in TABLES] if kind in TABLES else [path]
        for file in siblings:
            if file.exists():
                target = aside / f"{file.parent.name}-{file.name}"
                with contextlib.suppress(FileNotFoundError):  # another reader moved it first
                    os.replace(file, target)
                    moved.append(str(target))
            self._schemas.pop(file, None)
        warnings.warn(
            f"damaged store file {path} ({type(error).__name__}: {str(error).splitlines()[0][:120]}) moved to {aside}; "
            "its images will be generated again",
            stacklevel=3,
        )
