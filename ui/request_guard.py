"""Which files a request may name, which numbers it may send, and which server paths a visitor may see.

The app's `gr.Blocks` is a `GuardedBlocks`: before any component reads its input, every file
reference in a request (a `{"path": ...}` object at any depth, for every input component) must
name a file that this server process received as an upload or wrote itself (its results, its
examples); anything else gets one sentence and never reaches a component or a handler.  NaN
and infinity are refused for every Number and Slider.  Every message a visitor gets back has
absolute server paths reduced to file names.

Why this is needed on top of Gradio (measured on gradio 6.31.0, the newest release, through raw
HTTP against `python app.py`):

- Gradio checks incoming file references in `processing_utils.async_move_files_to_cache`, which
  only visits objects that *carry* `"meta": {"_type": "gradio.FileData"}`.  `FileData` (File,
  Video, the ImageEditor's layers) refuses objects without that field, but `ImageData` (every
  `gr.Image` input) fills it in by default.  So `{"path": "/any/file.png"}` sent to an image input
  skips the check, validates, and `gr.Image.preprocess` opens the server's file with PIL: the
  handler then works on (and shows back) any image the server can read.
- Gradio's refusals and its pre-processing errors name absolute server paths ("Cannot move
  /etc/hostname to the gradio cache dir ...", "cannot identify image file '/tmp/gradio/...'").
- Gradio's upload and cache folder (`/tmp/gradio`) is shared by every Gradio process on the
  machine and outlives them, and everything in it is served by `/gradio_api/file=`.  `serve`
  therefore gives each process a private one (`app.private_gradio_folder`), removed at exit.

A `gradio_client.Client` on the same machine as the server that is given `{"path": "/etc/x",
"meta": ...}` uploads *its own* copy of that file (the client reads it, not the server): that is
an ordinary upload and is accepted like any other.

Uploads are known per process, not per visitor: Gradio's upload route carries no session.  Every
path that can be named is unguessable without its content (uploads are stored under the SHA-256
of their bytes; results under a hash salted with a per-installation secret), so a visitor can
name only files it uploaded or was given.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import gradio as gr
from gradio.exceptions import AppError, ComponentProcessingError

logger = logging.getLogger("app")

NOT_AN_UPLOAD = ("The {what} must be a file uploaded through this app; server paths, URLs and files "
                 "from other sessions of the server are not accepted.")

# An absolute POSIX path (or a Windows drive path) that is not part of a larger word or URL.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])(?:[A-Za-z]:[\\/]|/)(?:[^\s'\"`,;:()\[\]{}<>|]+[\\/])+"
                            r"([^\s'\"`,;:()\[\]{}<>|\\/]*)")


def without_server_paths(text: str) -> str:
    """`text` with every absolute path replaced by its last part ("/tmp/gradio/ab/cat.png" ->
    "cat.png"), so a message never tells a visitor how the server's disk is laid out."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "a server folder", str(text))


def _is_file_component(component) -> bool:
    """True for inputs whose value is a file reference (Image, ImageEditor, Video, File, ...)."""
    try:
        return '"path"' in repr(component.api_info()).replace("'", '"')
    except Exception:  # a component without API info takes no files
        return False


def _file_references(value: Any):
    """Every `{"path": ...}` object inside a request value, at any depth."""
    if isinstance(value, dict):
        if "path" in value or ("url" in value and "meta" in value):
            yield value
        for item in value.values():
            yield from _file_references(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _file_references(item)


def _label(component) -> str:
    label = getattr(component, "label", None)
    name = type(component).__name__
    return f"'{label}' input" if label else f"{name} input"


class GuardedBlocks(gr.Blocks):
    """`gr.Blocks` that lets only this process's uploads and results reach a component, and
    shows visitors no absolute server path (see the module docstring for why)."""

    def known_files(self) -> set[str]:
        """Files this process received as uploads or wrote into its cache (results, examples)."""
        known: set[str] = set()
        for files in self.temp_file_sets:
            known.update(files)
        for block in self.blocks.values():
            known.update(getattr(block, "keep_in_cache", ()) or ())
        return known

    def check_file_references(self, block_fn, inputs: list) -> None:
        known = None
        for component, value in zip(block_fn.inputs, inputs):
            if isinstance(value, str) and _is_file_component(component):
                raise _refusal(NOT_AN_UPLOAD.format(what=_label(component)))
            for reference in _file_references(value):
                path, url = reference.get("path"), reference.get("url")
                if path is None:
                    # an image sent inline as a data: URL carries its own bytes; nothing else may
                    # stand in for a path (a URL would make the server fetch it)
                    if url is None or (isinstance(url, str) and url.startswith("data:")):
                        continue
                    raise _refusal(NOT_AN_UPLOAD.format(what=_label(component)))
                if known is None:
                    known = self.known_files()
                if not isinstance(path, str) or path not in known:
                    raise _refusal(NOT_AN_UPLOAD.format(what=_label(component)))

    @staticmethod
    def check_types(block_fn, inputs: list) -> None:
        """Text boxes take text and checkboxes true or false: Gradio turns anything into text
        (a prompt sent as {"text": 1} became the prompt "{'text': 1}")."""
        for component, value in zip(block_fn.inputs, inputs):
            if value is None:
                continue
            if isinstance(component, gr.Textbox) and not isinstance(value, str):
                raise _refusal(f"The {_label(component)} must be text, not {type(value).__name__}.")
            if isinstance(component, gr.Checkbox) and not isinstance(value, bool):
                raise _refusal(f"The {_label(component)} must be true or false, not {type(value).__name__}.")

    @staticmethod
    def check_numbers(block_fn, inputs: list) -> None:
        """NaN and infinity pass Gradio's Number and Slider checks (every comparison with NaN is
        false) and then fail deep inside a task; refuse them here, for every numeric input."""
        for component, value in zip(block_fn.inputs, inputs):
            if (isinstance(component, (gr.Number, gr.Slider)) and isinstance(value, float)
                    and not math.isfinite(value)):
                raise _refusal(f"The {_label(component)} must be a finite number, not {value}.")

    #: the server's request limits (`ui.common.Limits`), set by app.build_app; None: no size limit
    limits = None

    def check_image_sizes(self, block_fn, inputs: list) -> None:
        """Uploaded images (Image, ImageEditor) within --max-image-side, read from the file's
        header before any component decodes it (a 10,000 px upload is refused in milliseconds)."""
        if self.limits is None:
            return
        from PIL import Image

        for component, value in zip(block_fn.inputs, inputs):
            if not isinstance(component, (gr.Image, gr.ImageEditor)):
                continue
            for reference in _file_references(value):
                path = reference.get("path")
                if not isinstance(path, str):
                    continue
                try:
                    with Image.open(path) as image:
                        width, height = image.size
                except Exception:  # noqa: BLE001 (unreadable: the component says so in one sentence)
                    continue
                try:
                    self.limits.check_image_side(width, height, str(getattr(component, "label", None) or "image"))
                except ValueError as error:  # UserInputError
                    raise _refusal(str(error)) from None

    async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):
        self.check_file_references(block_fn, list(inputs or []))
        self.check_numbers(block_fn, list(inputs or []))
        self.check_types(block_fn, list(inputs or []))
        self.check_image_sizes(block_fn, list(inputs or []))
        try:
            return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except ComponentProcessingError as error:
            # Gradio's message spans many lines and quotes the payload and its server path
            index = re.search(r"at index (\d+)", str(error))
            component = block_fn.inputs[int(index.group(1))] if index else None
            what = _label(component) if component is not None else "input"
            cause = error.__cause__ or error
            raise _refusal(f"Could not read the {what} ({type(cause).__name__}: {cause}).") from None

    async def process_api(self, *args, **kwargs):
        try:
            return await super().process_api(*args, **kwargs)
        except AppError as error:
            error.message = " ".join(without_server_paths(error.message).split())
            if getattr(error, "print_exception", False):  # Gradio's own refusals (a value not among the choices)
                error.print_exception = False
                logger.info("user error: %s", error.message)
            raise
        except Exception as error:
            from pipelines.errors import out_of_memory_message, release_memory

            if (message := out_of_memory_message(error)) is not None:
                # out of memory outside a handler (Gradio's pre- or post-processing): not a bug
                release_memory(error)
                logger.warning("out of memory in a request: %s", message)
                raise gr.Error(message, title="Out of memory", print_exception=False) from None
            # a bug, not a mistake of the visitor's: its traceback goes to the log, one sentence to them
            logger.exception("unexpected error in a request")
            raise gr.Error(" ".join(without_server_paths(f"{type(error).__name__}: {error}").split()),
                           print_exception=False) from error


def _refusal(message: str) -> gr.Error:
    """A request refused before its handler ran: one sentence to the visitor, one line in the log."""
    message = " ".join(without_server_paths(message).split())
    logger.info("user error: %s", message)
    return gr.Error(message, print_exception=False)
