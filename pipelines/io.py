"""Reading what users send and writing what they get back, validated, in one place.

Every function raises `UserInputError` with one sentence for anything a user can get wrong
(unreadable file, wrong kind of file, too small or too large, empty video).  Results are written
atomically (to a temporary name, then renamed), so an interrupted run never leaves a partial
file that a resumed batch would mistake for a finished one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import UserInputError

MIN_SIDE = 64  # smaller images have too few latent cells for any method here
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard; large photos go through crop strategies
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif"}

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _describe(source) -> str:
    return f"'{Path(source).name}'" if isinstance(source, (str, os.PathLike)) else "the image"


def _open_image_file(source, what: str) -> Image.Image:
    """A fully read, EXIF-rotated image from a path, or one sentence saying what is wrong."""
    path = Path(source)
    if not path.is_file():
        raise UserInputError(f"There is no {what} file at '{path}'.")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > MAX_PIXELS:  # from the header, before decoding it
                raise UserInputError(f"{_describe(source)} is {opened.width}x{opened.height} pixels, more than "
                                     f"{MAX_PIXELS} in all; scale it down first.")
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as error:
        raise UserInputError(f"{_describe(source)} has more than {MAX_PIXELS} pixels.") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UserInputError(f"{_describe(source)} is not a readable {what} file.") from error


def load_image(source, what: str = "image", min_side: int = MIN_SIDE) -> Image.Image:
    """An RGB image from a path, a PIL image or an (H, W[, C]) uint8 array, EXIF-rotated."""
    if source is None:
        raise UserInputError(f"Please provide an {what}.")
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise UserInputError(f"The {what} array must be (height, width) or (height, width, channels).")
        image = Image.fromarray(source.astype(np.uint8) if source.dtype != np.uint8 else source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = _open_image_file(source, what)
    if min(image.size) < min_side:
        raise UserInputError(
            f"The {what} is {image.width}x{image.height} pixels; both sides must be at least {min_side}."
        )
    if image.width * image.height > MAX_PIXELS:
        raise UserInputError(f"The {what} has more than {MAX_PIXELS} pixels.")
    return image.convert("RGB")


def load_mask(source, size: tuple[int, int] | None = None, threshold: int = 127) -> tuple[np.ndarray, str | None]:
    """A boolean (H, W) mask (True = selected) and a note for the user, or None.

    Accepts a path, a PIL image or an array; colour or alpha masks count any channel above
    `threshold` (an RGBA brush layer marks strokes in alpha).  With `size` = (width, height),
    a mask of another size is resized (nearest) and the note says so.
    """
    if source is None:
        raise UserInputError("Please provide a mask.")
    if isinstance(source, np.ndarray):
        array = source
    else:
        image = source if isinstance(source, Image.Image) else _open_image_file(source, "mask")
        if image.mode in ("RGBA", "LA") and np.asarray(image.getchannel("A")).min() < 255:
            array = np.asarray(image.getchannel("A"))
        else:
            array = np.asarray(image.convert("L"))
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    note = None
    if size is not None and (array.shape[1], array.shape[0]) != tuple(size):
        note = (
            f"The mask ({array.shape[1]}x{array.shape[0]}) was resized to the image size "
            f"({size[0]}x{size[1]})."
        )
        array = np.asarray(Image.fromarray(np.uint8(array > threshold) * 255).resize(size, Image.NEAREST))
    return array > threshold, note


def mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean mask as a black-and-white image."""
    return Image.fromarray(np.uint8(mask) * 255)


#: errors of a write that ran out of room: a full disk (ENOSPC), a full quota (EDQUOT) or a
#: file-size limit (EFBIG: `ulimit -f`, RLIMIT_FSIZE, a filesystem's largest file)
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# the same errors as writers that do not raise OSError word them: safetensors (Rust: "... (os error
# 27)"), and the C library's texts where only a message is left
_NO_ROOM_TEXT = re.compile(r"\(os error (?:%s)\)|No space left on device|File too large|Disk quota exceeded"
                           % "|".join(str(number) for number in sorted(_NO_ROOM)))


def out_of_room(error: BaseException | None) -> bool:
    """Whether a failed write ran out of room (see `_NO_ROOM`), also when the writer wrapped the
    OSError in its own error: torch.save's RuntimeError keeps it as `__context__` (when it writes
    through a Python file object, see `save_torch`), safetensors only words it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return True
        if _NO_ROOM_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _no_room(what: str, folder: Path) -> str:
    return (f"The disk is full or a file-size limit was reached: {what} could not be written to '{folder}'; "
            "the previous one (if any) is kept; free some space and run again to resume.")


@contextmanager
def atomic_path(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """A temporary path beside `path` (".<stem>.<random><suffix>") that replaces it only if the
    block succeeds: a failed or interrupted write leaves the previous file as it was.  A full disk
    or a file-size limit becomes `UserInputError` with one sentence naming `what` (default: the
    file's name); the temporary file is removed (a killed process can leave it behind: every
    reader here skips names starting with a dot)."""
    path = Path(path)
    what = what or f"'{path.name}'"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as error:
        if error.errno in _NO_ROOM:
            raise UserInputError(_no_room(what, path.parent)) from error
        raise
    os.close(handle)
    temp = Path(temp)
    try:
        yield temp
        os.replace(temp, path)
    except Exception as error:
        if out_of_room(error):
            raise UserInputError(_no_room(what, path.parent)) from error
        raise
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], None], what: str) -> None:
    """`write(temp)` then rename onto `path` (`atomic_path`): the old file survives a failure, and
    a full disk, a file-size limit or an unwritable folder becomes one sentence naming `what`
    ("the learned file")."""
    path = Path(path)
    try:
        with atomic_path(path, what) as temp:
            write(temp)
    except OSError as error:
        raise UserInputError(f"{what.capitalize()} could not be written to '{path}': {error.strerror or error}.") from error


def save_torch(obj, path: str | Path, what: str) -> Path:
    """`torch.save(obj)` atomically (see `write_atomic`), through a Python file object: torch's
    own file writer reports a full disk only as "file write failed", its Python-file path keeps
    the OSError, so a full disk becomes one sentence and the previous file is kept."""
    import torch

    def write(temp: Path) -> None:
        with open(temp, "wb") as file:
            torch.save(obj, file)

    write_atomic(path, write, what)
    return Path(path)


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str], what: str) -> Path:
    """Write named tensors (as float32 on the CPU) and string metadata as one .safetensors file,
    atomically (see `write_atomic`).  `metadata["format"]` names our file type for `load_tensors`;
    `what` names it without an article ("directions file")."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserInputError(f"The {what} must end in .safetensors, not '{path.name}'.")
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    write_atomic(path, lambda temp: save_file(tensors, str(temp), metadata=metadata), f"the {what}")
    return path


def load_tensors(path: str | Path, file_format: str, what: str, written_by: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a .safetensors file that `save_tensors` wrote with `file_format`.

    `what` names the file type without an article ("directions file"), `written_by` says where
    such a file comes from.  A missing file, another file type or a damaged one is one sentence;
    the caller checks the content it needs (and says what is wrong with it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"Cannot read the {what} {path}: no such file.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != file_format:
                raise ValueError(f"not a {file_format} file")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 (any parse failure is the same user mistake)
        raise UserInputError(f"{path.name} is not a readable {what} ({written_by}).") from error
    return tensors, metadata


def save_image(image: Image.Image, path: str | Path, params: dict | None = None) -> list[Path]:
    """Write a PNG with `params` in its text chunk and a JSON sidecar; returns both paths."""
    path = Path(path)
    info = PngInfo()
    record = json.dumps(params or {}, default=str)
    info.add_text("parameters", record)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG", pnginfo=info)
    written = [path]
    if params is not None:
        sidecar = path.with_suffix(".json")
        with atomic_path(sidecar) as temp:
            temp.write_text(json.dumps(params, indent=2, default=str))
        written.append(sidecar)
    return written


def read_video(source: str | Path, max_frames: int | None = None) -> tuple[list[Image.Image], float]:
    """RGB frames and frames per second of a video file (imageio with its bundled ffmpeg)."""
    import imageio.v3 as iio

    path = Path(source)
    if not path.is_file():
        raise UserInputError(f"There is no video file at '{path}'.")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserInputError(f"'{path.name}' is not a video; use one of {', '.join(sorted(VIDEO_SUFFIXES))}.")
    try:
        meta = iio.immeta(path)
        fps = float(meta.get("fps") or 0) or (1000.0 / meta["duration"] if meta.get("duration") else 8.0)
        frames = []
        for frame in iio.imiter(path):
            frames.append(Image.fromarray(np.asarray(frame)[..., :3]).convert("RGB"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as error:  # imageio raises many kinds for unknown codecs and broken files
        raise UserInputError(f"'{path.name}' is not a readable video (unknown codec or damaged file).") from error
    if not frames:
        raise UserInputError(f"'{path.name}' has no frames.")
    return frames, fps


def write_video(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Write RGB frames as an H.264 MP4 (sides padded to even numbers, as the codec needs)."""
    import imageio.v3 as iio

    path = Path(path)
    arrays = []
    for frame in frames:
        array = np.asarray(frame.convert("RGB"))
        h, w = array.shape[:2]
        arrays.append(np.pad(array, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    with atomic_path(path) as temp:
        iio.imwrite(temp, np.stack(arrays), fps=fps, codec="libx264", macro_block_size=1)
        _check_video(temp, len(arrays), path)
    return path


def _check_video(temp: Path, frames: int, path: Path) -> None:
    """FFmpeg writes the file in another process, and imageio-ffmpeg does not look at how it
    ended: on a full disk (or past a file-size limit) FFmpeg stops and leaves a video without its
    index, and nothing is raised.  Count the frames of what was written (FFmpeg copies the
    stream, about 50 ms) so that a cut-short video never replaces the previous one."""
    import imageio_ffmpeg

    try:
        written, _ = imageio_ffmpeg.count_frames_and_secs(str(temp))
    except Exception:  # noqa: BLE001 (an unreadable file: the same failure)
        written = None
    if written != frames:
        raise UserInputError(
            f"'{path.name}' could not be written completely to '{path.parent}' (FFmpeg stopped early: the disk is "
            "full or a file-size limit was reached); the previous one (if any) is kept; free some space and run again."
        )
