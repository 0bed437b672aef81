"""The results folder: every run of the app is written here, survives restarts, and is listed back
to whoever made it.

`python app.py` keeps results in the user's data directory (`default_results_dir()`, e.g.
`~/.local/share/attention-editing/results` on Linux) or in `--output-dir`.  Each run is one folder
named `<task>-<YYYYmmdd-HHMMSS>-<32 hex>` holding its files and `run.json`: the task, when it was
made, a line about it, the inputs a resume needs (Personalize), and its owner.

Owners.  A visitor sees only their own runs in the Results tab:

- with `--auth`, the login (`user:NAME`), so the runs follow the person to another browser;
- otherwise the browser: a random 128-bit token kept in the browser's local storage
  (`gr.BrowserState`), stored here only as a hash (`browser:<sha256>`), so a page reload or a
  server restart finds the same runs, and another browser on the same server finds none;
- an API client (`gradio_client`) gets its files in each response; its runs are recorded under
  its session (`session:<hash>`) and listed to nobody.

Clean-up, controlled by whoever starts the server (`--keep-results-days`, `--max-results-gb`;
0 turns either off): runs older than the age limit are removed, then the oldest runs until the
folder is under the size cap.  A run written to in the last `MIN_AGE_S` seconds, or in use (a
personalization run that is training), is never removed; temporary files that a killed process
left inside a run folder (`.<name>.*` from the atomic writes) are removed once they are an hour
old.  The caches kept beside the runs (`CACHES`: the Edit video tab's fine-tunes and inversions,
so that editing the same clip again, also after a restart, skips them) are cleaned up entry by
entry with the same rules.  Only folders with a run's name and those caches are ever touched,
so pointing `--output-dir` at a folder with other files in it is harmless.  A visitor can also
delete their own runs.

The folder is never served by Gradio's `file=` route (it is not in `allowed_paths`): a result
reaches the browser as a copy in the process's private Gradio folder, as before
(`ui.gradio_fixes.allow_results_from` lets Gradio copy from here).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

logger = logging.getLogger("app")

APP_NAME = "attention-editing"
RECORD = "run.json"
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_MAX_GB = 20.0
#: a run folder written to this recently is never removed by the clean-up (it may be being written)
MIN_AGE_S = 15 * 60
#: temporary files of atomic writes older than this are a killed process's leftovers
STALE_TEMP_S = 3600
#: the clean-up runs at most this often as new runs are made
CLEAN_EVERY_S = 60
#: the Results tab lists at most this many runs (newest first)
LIST_LIMIT = 200
#: caches kept in the results folder and cleaned up with it (`OutputStore.cache_dir`)
CACHES = ("video-cache",)
#: a browser's owner token: 32 hex digits
_TOKEN = re.compile(r"[0-9a-f]{32}")


def run_name_pattern(task: str = r"[a-z_]+") -> re.Pattern:
    return re.compile(rf"({task})-\d{{8}}-\d{{6}}-[0-9a-f]{{32}}")


_ANY_RUN = run_name_pattern()


def default_results_dir() -> Path:
    """Where `python app.py` keeps results unless told otherwise: the user's data directory."""
    import platformdirs

    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "results"


def new_browser_token() -> str:
    return secrets.token_hex(16)


def browser_owner(token: str | None) -> str | None:
    """The owner a browser's token stands for (its hash), or None for a missing or malformed token."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    return "browser:" + hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Run:
    """One run folder as the Results tab shows it."""

    name: str
    task: str
    created: float
    about: str
    owner: str
    folder: Path
    inputs: dict = field(default_factory=dict)
    files: tuple[str, ...] = ()  # relative to `folder`, the record and temporary files left out
    size: int = 0
    modified: float = 0.0

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M:%S")


def _scan(folder: Path) -> tuple[list[Path], int, float]:
    """(the run's files, bytes in all, newest modification) of a run folder, temporaries included."""
    paths, size, newest = [], 0, 0.0
    for path in folder.rglob("*"):
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile
            continue
        newest = max(newest, stat.st_mtime)
        if path.is_file():
            paths.append(path)
            size += stat.st_size
    return paths, size, newest


def _is_temporary(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


class OutputStore:
    """The folder every run of the app writes into, one subfolder per run (see the module docstring).

    `root` None: a temporary folder removed when the process exits (tests, library use).
    `keep_days`, `max_bytes`: the clean-up's age limit and size cap (None or 0: none).
    """

    def __init__(self, root: str | Path | None = None, *, keep_days: float | None = None,
                 max_bytes: int | None = None):
        self.temporary = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="attention-app-")) / "outputs"
            atexit.register(shutil.rmtree, root.parent, ignore_errors=True)
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"The results folder '{root}' is a file, not a folder.")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.keep_days = keep_days or None
        self.max_bytes = max_bytes or None
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        self._last_clean = 0.0

    # ------------------------------------------------------------------ writing

    def new_run_dir(self, task: str, owner: str | None = None, about: str = "", inputs: dict | None = None) -> Path:
        """A new, empty run folder for `task`, recorded with its owner, a line about it and the
        `inputs` a resume needs."""
        from pipelines.io import write_atomic

        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = self.root / f"{task}-{stamp}-{uuid.uuid4().hex}"
        run_dir.mkdir(parents=True)
        record = {"task": task, "created": time.time(), "owner": owner or "",
                  "about": " ".join(str(about).split())[:300], "inputs": inputs or {}}
        write_atomic(run_dir / RECORD, lambda temp: temp.write_text(json.dumps(record, indent=1)), "the run's record")
        self.clean_soon()
        return run_dir

    def run_dir_named(self, name: str | None, task: str) -> Path | None:
        """The existing run folder of `task` called `name` (as `new_run_dir` made it), or None.

        Visitors refer to a run by this name, never by a path: anything that is not exactly the
        name of one of this store's `task` folders (a path, `..`, another task's run) is None.
        """
        name = (name or "").strip()
        if not run_name_pattern(re.escape(task)).fullmatch(name):
            return None
        folder = self.root / name
        return folder if folder.is_dir() and folder.resolve().parent == self.root else None

    @contextlib.contextmanager
    def in_use(self, run_dir: Path):
        """While the block runs, the clean-up leaves `run_dir` alone (a training run)."""
        with self._lock:
            self._in_use[run_dir.name] = self._in_use.get(run_dir.name, 0) + 1
        try:
            yield run_dir
        finally:
            with self._lock:
                left = self._in_use.pop(run_dir.name) - 1
                if left:
                    self._in_use[run_dir.name] = left

    # ------------------------------------------------------------------ reading

    def _read(self, folder: Path) -> Run | None:
        if not _ANY_RUN.fullmatch(folder.name) or not folder.is_dir():
            return None
        try:
            record = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        paths, size, newest = _scan(folder)
        kept = [p.relative_to(folder) for p in paths if p.name != RECORD and not _is_temporary(p, folder)]
        files = tuple(str(p) for p in sorted(kept, key=lambda p: (len(p.parts), str(p))))  # the run's own files first
        created = record.get("created")
        return Run(name=folder.name, task=str(record.get("task") or _ANY_RUN.fullmatch(folder.name).group(1)),
                   created=float(created) if isinstance(created, (int, float)) else newest,
                   about=str(record.get("about") or ""), owner=str(record.get("owner") or ""), folder=folder,
                   inputs=record.get("inputs") if isinstance(record.get("inputs"), dict) else {},
                   files=files, size=size, modified=newest)

    def runs(self, owner: str | None) -> list[Run]:
        """`owner`'s runs, newest first (at most LIST_LIMIT); none for no owner."""
        if not owner:
            return []
        found = []
        for folder in self.root.iterdir():
            run = self._read(folder)
            if run is not None and run.owner == owner:
                found.append(run)
        found.sort(key=lambda run: run.created, reverse=True)
        return found[:LIST_LIMIT]

    def run(self, name: str | None, owner: str | None) -> Run | None:
        """`owner`'s run called `name`, or None (someone else's run, a path, a removed run)."""
        name = (name or "").strip() if isinstance(name, str) else ""
        if not owner or not _ANY_RUN.fullmatch(name):
            return None
        run = self._read(self.root / name)
        return run if run is not None and run.owner == owner else None

    def delete(self, name: str | None, owner: str | None) -> bool:
        """Remove `owner`'s run `name` (not while it is in use); True when it was removed."""
        run = self.run(name, owner)
        if run is None:
            return False
        with self._lock:
            if run.name in self._in_use:
                return False
            shutil.rmtree(run.folder, ignore_errors=True)
        return not run.folder.exists()

    # ------------------------------------------------------------------ clean-up

    def clean_soon(self) -> None:
        """`clean()`, at most once per CLEAN_EVERY_S."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_clean < CLEAN_EVERY_S:
                return
            self._last_clean = now
        self.clean()

    def clean(self, now: float | None = None) -> list[str]:
        """Remove killed processes' temporary files, runs past the age limit, then the oldest runs
        until the folder is under the size cap.  Returns the names of the removed runs."""
        now = time.time() if now is None else now
        runs = []
        for folder in self._removable():
            if folder.is_dir():
                self._remove_stale_temporaries(folder, now)
                paths, size, newest = _scan(folder)
            else:
                stat = folder.stat()
                size, newest = stat.st_size, stat.st_mtime
            runs.append((newest, size, folder))
        runs.sort(key=lambda item: item[0])  # oldest first
        total = sum(size for _, size, _ in runs)
        removed = []
        for newest, size, folder in runs:
            too_old = self.keep_days is not None and now - newest > self.keep_days * 86400
            too_big = self.max_bytes is not None and total > self.max_bytes
            if not (too_old or too_big) or now - newest < MIN_AGE_S:
                continue
            with self._lock:
                if folder.name in self._in_use:
                    continue
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
            total -= size
            removed.append(folder.name)
        if removed:
            logger.info("results clean-up: removed %d run(s) (older than %s days or over %s bytes in all)",
                        len(removed), self.keep_days, self.max_bytes)
        return removed

    def cache_dir(self, name: str) -> Path:
        """A cache kept with the results (e.g. the Edit video tab's fine-tunes and inversions, so
        that editing the same clip again after a restart skips them); its entries (the items of
        its subfolders) are cleaned up like runs."""
        if name not in CACHES:
            raise ValueError(f"not a cache of the results folder: {name}")
        return self.root / name

    def _removable(self):
        """Every run folder and every cache entry."""
        for entry in self.root.iterdir():
            if _ANY_RUN.fullmatch(entry.name) and entry.is_dir():
                yield entry
            elif entry.name in CACHES and entry.is_dir():
                for kind in entry.iterdir():
                    if kind.is_dir():
                        yield from kind.iterdir()

    @staticmethod
    def _remove_stale_temporaries(folder: Path, now: float) -> None:
        for path in list(folder.rglob(".*")):
            try:
                if now - path.stat().st_mtime < STALE_TEMP_S:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                continue

    # ------------------------------------------------------------------ browsers

    def browser_secret(self) -> str:
        """The key `gr.BrowserState` encrypts the owner token with, kept in the results folder so
        that it outlives restarts (a new key would make every browser's token unreadable)."""
        path = self.root / "browser-state.key"
        with self._lock:
            try:
                return path.read_text().strip()
            except OSError:
                from pipelines.io import atomic_path

                key = secrets.token_hex(16)
                with atomic_path(path, "the browser-state key") as temp:  # mkstemp: readable by us only
                    temp.write_text(key)
                return key
