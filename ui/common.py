"""Shared pieces of the Gradio app: the app context, the output folder it owns, the header."""

from __future__ import annotations

import atexit
import functools
import re
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import gradio as gr

from pipelines.errors import UserInputError

#: Every GPU-heavy event of every tab shares this one queue slot.
GPU_CONCURRENCY = {"concurrency_id": "gpu", "concurrency_limit": 1}

REAL_MODEL_HINT = (
    "To see real attention maps, start the app with a real checkpoint: "
    "`python app.py --model stable-diffusion-v1-5/stable-diffusion-v1-5` (a hub id downloaded "
    "beforehand), `--model path/to/diffusers-folder`, or `--model path/to/model.safetensors`; "
    "add more choices for the *Model* menu with `--allow-model NAME`."
)


class OutputStore:
    """A temporary folder the app owns; every run writes into its own subfolder.

    Only this folder is passed to `launch(allowed_paths=...)`; it is removed when the process exits.
    """

    def __init__(self, root: str | Path | None = None):
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="attention-app-")) / "outputs"
            atexit.register(shutil.rmtree, root.parent, ignore_errors=True)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def new_run_dir(self, task: str) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = self.root / f"{task}-{stamp}-{uuid.uuid4().hex}"
        run_dir.mkdir(parents=True)
        return run_dir

    def run_dir_named(self, name: str | None, task: str) -> Path | None:
        """The existing run folder of `task` called `name` (as `new_run_dir` made it), or None.

        Visitors refer to a run by this name, never by a path: anything that is not exactly the
        name of one of this store's `task` folders (a path, `..`, another task's run) is None.
        """
        name = (name or "").strip()
        if not re.fullmatch(rf"{re.escape(task)}-\d{{8}}-\d{{6}}-[0-9a-f]{{32}}", name):
            return None
        folder = self.root / name
        return folder if folder.is_dir() and folder.resolve().parent == self.root else None


def zip_files(paths: list[Path], zip_path: Path) -> Path:
    """Zip `paths` flat (by file name) into `zip_path`."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in paths:
            archive.write(path, arcname=path.name)
    return zip_path


@dataclass
class AppContext:
    """What every tab needs to know about how the app was started.

    The browser and the API may pick only among `model_choices`: the models the server was
    started with (`--model`, `--allow-model`) and the built-in ones.  A free-text model box
    would let any visitor make the server read arbitrary paths or download from the hub.
    """

    default_model: str = "builtin"
    device: str | None = None  # None = let pipelines.models pick
    outputs: OutputStore = field(default_factory=OutputStore)
    extra_models: tuple[str, ...] = ()

    @property
    def model_choices(self) -> list[str]:
        from pipelines import models

        built_in = [n for n in models.BUILTIN_NAMES if n != "builtin" or (models.BUILTIN_DIR / "model_index.json").is_file()]
        return list(dict.fromkeys([self.default_model, *self.extra_models, *built_in]))

    def load(self, name: str | None):
        """Load (cached by pipelines.models) the model chosen in the UI, or the default one."""
        from pipelines import models

        name = (name or "").strip() or self.default_model
        if name not in self.model_choices:
            raise UserInputError(
                f"This app serves only {', '.join(self.model_choices)}; start it with --model or "
                "--allow-model to offer another model."
            )
        return models.load(name, device=self.device)


def user_errors_as_gradio(fn):
    """Turn `UserInputError` into `gr.Error` so the person sees the sentence, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error)) from error

    return wrapper


def header_markdown(default_model: str) -> str:
    text = (
        "# Attention-layer editing with diffusion models\n"
        "Edit and explain images by working inside the attention layers of diffusion models: "
        "see where each prompt word looked (**Attention maps**), erase an object and rebuild the "
        "background (**Remove object**), find what a sentence names (**Segment by text**), and make "
        "same-seed pairs where only one concept changes (**Counterfactual steer**).\n"
    )
    if default_model.startswith("tiny"):
        text += (
            f"\n**Note:** the default model `{default_model}` is a tiny model with *random "
            "weights*, built offline for tests: it runs in seconds on a CPU but its images, "
            f"heatmaps and masks are noise. {REAL_MODEL_HINT}\n"
        )
    elif default_model == "builtin":
        text += (
            "\n**Model:** `builtin`, our own small Stable-Diffusion-architecture model trained on a "
            "world of coloured circles, squares and triangles on plain, striped, checkered and "
            "gradient backgrounds (64 px; see `assets/builtin/README.md`). It runs offline on a CPU "
            "in about a second; prompts like *a red circle and a blue square on a striped "
            f"background* work, photos of cats do not. {REAL_MODEL_HINT}\n"
        )
    return text
