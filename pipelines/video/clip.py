"""Clips in and out: reading with OpenCV, writing H.264 MP4 at the source frame rate (with the
source's audio when it has some), and the content hash that keys the caches.

Reading: an .mp4/.webm/.gif/.mov/.avi/.mkv file through `cv2.VideoCapture` (OpenCV's bundled
FFmpeg), or a folder of images (sorted by name; `fps` given by the caller, 8 by default), or a
list of frames (PIL images or (H, W, 3) uint8 arrays).  Every problem is one sentence
(`UserInputError`): no such file, not a video, unreadable (unknown codec or damaged), no frames,
frames of different sizes.

Writing: `pipelines.io.write_video` (imageio's bundled FFmpeg, libx264, atomic).  Audio: when the
source file has an audio stream, the same bundled FFmpeg binary (imageio-ffmpeg, already a
dependency) copies it into the written MP4, cut to the video's length (AAC); a source without
audio, a folder or a list of frames give a silent MP4.  A frame stride other than 1 changes the
timing of the picture, not of the sound: the audio is then left out (and the result says so).
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import UserInputError
from ..io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, atomic_path, write_video

DEFAULT_FPS = 8.0


@dataclass
class Clip:
    """RGB frames (uint8 (H, W, 3) arrays), their frame rate, and the file they came from."""

    frames: list[np.ndarray]
    fps: float
    path: Path | None = None  # the source file (None for a folder or a list of frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        h, w = self.frames[0].shape[:2]
        return w, h


def _as_array(frame, index: int) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] < 3 or array.size == 0:
        raise UserInputError(f"Frame {index} is not an RGB image.")
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def _read_file(path: Path, limit: int | None, stride: int) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UserInputError(f"'{path.name}' is not a readable video (unknown codec or damaged file).")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0) or DEFAULT_FPS
        frames, index = [], 0
        while limit is None or len(frames) < limit:
            ok, frame = capture.read()
            if not ok:
                break
            if index % stride == 0:
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    return frames, fps


def _read_folder(folder: Path, limit: int | None, stride: int) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))[::stride]
    frames = []
    for path in files[:limit]:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise UserInputError(f"'{path.name}' in '{folder.name}' is not a readable image.")
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def read_clip(source, max_frames: int | None = None, stride: int = 1, fps: float | None = None) -> Clip:
    """The first `max_frames` frames (None: all) of `source`, every `stride`-th one (see the module
    docstring for what `source` may be).  `fps` overrides the rate (folders and lists: 8 if None)."""
    if stride < 1:
        raise UserInputError(f"The frame stride must be at least 1, not {stride}.")
    path = None
    if isinstance(source, (list, tuple)):
        frames = [_as_array(f, i) for i, f in enumerate(source)][::stride][:max_frames]
        rate = DEFAULT_FPS
        what = "The list of frames"
    else:
        if source is None:
            raise UserInputError("Please provide a video.")
        given = Path(source)
        if given.is_dir():
            frames, rate = _read_folder(given, max_frames, stride), DEFAULT_FPS
            what = f"The folder '{given.name}'"
        elif not given.is_file():
            raise UserInputError(f"There is no video file or folder of frames at '{given}'.")
        elif given.suffix.lower() not in VIDEO_SUFFIXES:
            raise UserInputError(f"'{given.name}' is not a video; use one of {', '.join(sorted(VIDEO_SUFFIXES))} "
                                 "or a folder of frames.")
        else:
            frames, rate = _read_file(given, max_frames, stride)
            path = given
            what = f"'{given.name}'"
    if not frames:
        raise UserInputError(f"{what} has no frames.")
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) > 1:
        raise UserInputError(f"{what} has frames of different sizes; give frames of one size.")
    if fps is not None:
        rate = float(fps)
    return Clip(frames, rate, path)


def resized(frames: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Frames resized to (width, height) (area filter when shrinking, cubic when growing)."""
    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        if (w, h) == (width, height):
            out.append(frame)
            continue
        interpolation = cv2.INTER_AREA if w * h > width * height else cv2.INTER_CUBIC
        out.append(cv2.resize(frame, (width, height), interpolation=interpolation))
    return out


def clip_hash(frames: list[np.ndarray], fps: float) -> str:
    """The content hash of the working frames (sizes and pixels) that keys the caches."""
    digest = hashlib.sha256()
    digest.update(f"{len(frames)}:{fps:.6f}".encode())
    for frame in frames:
        digest.update(str(frame.shape).encode())
        digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()[:24]


# ----------------------------------------------------------------------------- writing


def _ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 (no bundled binary: no audio, the video is still written)
        return None


def has_audio(path: Path | None) -> bool:
    """Whether the file at `path` has an audio stream (asks the bundled FFmpeg)."""
    exe = _ffmpeg()
    if path is None or exe is None or not Path(path).is_file():
        return False
    probe = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True, timeout=60)
    return any("Audio:" in line for line in probe.stderr.splitlines() if "Stream #" in line)


def write_clip(frames: list, path: str | Path, fps: float, audio_from: Path | None = None) -> Path:
    """Write RGB frames (arrays or PIL images) as an H.264 MP4 at `fps`; with `audio_from`, copy
    that file's audio (if it has any) into it, cut to the video's length."""
    path = Path(path)
    images = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    if audio_from is None or not has_audio(audio_from):
        return write_video(images, path, fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as folder:
        silent = Path(folder) / "silent.mp4"
        write_video(images, silent, fps)
        with atomic_path(path) as temp:
            command = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(silent), "-i", str(audio_from),
                       "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                       "-t", f"{len(images) / fps:.6f}", str(temp)]  # the audio cut to the video, never the video
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise OSError(f"FFmpeg could not add the audio: {done.stderr.strip()[:200]}")
    return path
