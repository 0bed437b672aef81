"""A model's own defaults for a task's settings, measured on that model.

The paper's defaults live in each task's settings dataclass (`pipelines/*_settings.py`), and
they are what every model gets.  A model folder may ship a `task_defaults.json` that replaces
some of them for that model only, because they were measured to fail on it:

    {"eraser": {"strength": 1.0, "guidance": 1.0}, "grounding": {"timestep": 100, "threshold": 0.6}}

The built-in model does (its model card says what was measured, on which scenes, against
which alternatives).  A value given by the user (a keyword, a CLI flag, a control) always wins;
`Settings.for_model` puts these under it.  Kept free of torch and diffusers so that the
command line's `--help` can show them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["BUILTIN_FOLDERS", "FILE_NAME", "builtin_folder", "model_folder", "task_defaults"]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
#: the trained built-in models and their folders (text-to-image, and the instruction-edit one)
BUILTIN_FOLDERS = {"builtin": ASSETS_DIR / "builtin", "builtin-edit": ASSETS_DIR / "builtin-edit"}
FILE_NAME = "task_defaults.json"


def builtin_folder(name: str) -> Path | None:
    """The folder of a trained built-in model ("builtin", "builtin-edit"), or None for other names."""
    return BUILTIN_FOLDERS.get(name)


def model_folder(model) -> Path | None:
    """The local folder of a model given by name, path or loaded pipeline (its `name_or_path`);
    None for a hub id or anything that is not a folder here."""
    name = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    if not name:
        return None
    name = str(name).strip()
    folder = builtin_folder(name) or Path(name).expanduser()
    return folder if folder.is_dir() else None


def task_defaults(model, task: str) -> dict:
    """{setting: value} that the model's folder sets for `task` ({} when it sets none, or when
    its file cannot be read: the paper's defaults then apply)."""
    folder = model_folder(model)
    return dict(_read(str(folder)).get(task, {})) if folder is not None else {}


@functools.lru_cache(maxsize=32)
def _read(folder: str) -> dict:
    try:
        saved = json.loads((Path(folder) / FILE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {task: values for task, values in saved.items() if isinstance(values, dict)}
