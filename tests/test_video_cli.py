"""`python app.py edit-video`: a working run, one sentence with exit status 2 per bad input, and
the folder mode (every clip of a folder of video files; resumable, a bad clip reported and
skipped, exit status 2 if any failed)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    import imageio.v3 as iio

    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.RandomState(0)
    frames = (rng.rand(4, 32, 32, 3) * 255).astype(np.uint8)
    iio.imwrite(folder / "clip.mp4", frames, fps=12, codec="libx264", macro_block_size=1)
    iio.imwrite(folder / "one.mp4", frames[:1], fps=12, codec="libx264", macro_block_size=1)
    (folder / "empty").mkdir()
    (folder / "broken.mp4").write_bytes(b"not a video" * 50)
    return folder


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "edit-video", "--model", "tiny", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=240)


BASE = ("--source-prompt", "a photo of a cat", "--prompt", "a photo of a dog")


def test_an_edit_writes_the_clip_the_side_by_side_heatmaps_and_a_sidecar(clips, tmp_path):
    out = tmp_path / "edited.mp4"
    done = _run("--video", str(clips / "clip.mp4"), *BASE, "--box", "dog:0,0,16,16@0", "--box", "dog:16,16,32,32@3",
                "--output", str(out), "--steps", "2", "--tune-steps", "1", "--refine-iterations", "1",
                "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and (tmp_path / "edited_side_by_side.mp4").is_file()
    assert (tmp_path / "edited_attn_0_dog.mp4").is_file()
    record = json.loads((tmp_path / "edited.json").read_text())
    assert record["fps"] == pytest.approx(12) and record["boxes"][0]["keyframes"] == [0, 3]
    assert record["boxes"][0]["tokens"] == [5] and record["settings"]["steps"] == 2
    from pipelines.video import read_clip

    clip = read_clip(out)
    assert len(clip.frames) == 4 and clip.fps == pytest.approx(12, abs=0.5)


BAD = {
    "no frames": (("--video", "{clips}/empty"), "has no frames"),
    "one frame": (("--video", "{clips}/one.mp4"), "only one frame"),
    "unreadable": (("--video", "{clips}/broken.mp4"), "not a readable video"),
    "outside": (("--box", "dog:0,0,40,16"), "outside the 32x32 frame"),
    "zero area": (("--box", "dog:5,5,5,20"), "zero area"),
    "word": (("--box", "horse:0,0,16,16"), "'horse' is not in the prompt"),
    "more boxes": (("--prompt", "dog", "--box", "dog:0,0,8,8", "--box", "cat:0,0,8,8"), "only 1 word"),
    "nan box": (("--box", "dog:0,nan,16,16"), "finite numbers"),
    "nan setting": (("--guidance", "nan"), "finite number"),
    "bad frame": (("--box", "dog:0,0,16,16@9"), "has 4 frames"),
    "no such file": (("--video", "{clips}/missing.mp4"), "no video file"),
    "output": (("--output", "{clips}/out.gif"), ".mp4 file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_input_is_one_sentence_with_status_2(clips, tmp_path, case, capsys):
    extra, expected = BAD[case]
    extra = tuple(a.format(clips=clips) for a in extra)
    given = dict(zip(extra[::2], extra[1::2]))
    args = ["--video", given.pop("--video", str(clips / "clip.mp4")), "--output", given.pop("--output",
            str(tmp_path / "o.mp4")), "--source-prompt", "a photo of a cat",
            "--prompt", given.pop("--prompt", "a photo of a dog"), "--steps", "2", "--tune-steps", "1",
            "--cache-dir", str(tmp_path / "cache")]
    boxes = [a for i, a in enumerate(extra) if i % 2 and extra[i - 1] == "--box"] or ["dog:0,0,16,16"]
    for box in boxes:
        args += ["--box", box]
    for flag, value in given.items():
        if flag != "--box":
            args += [flag, value]
    import app

    with pytest.raises(SystemExit) as exited:  # in-process: the same main() as `python app.py`
        app.main(["edit-video", "--model", "tiny", *args])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert exited.value.code == 2, stderr
    assert len(errors) == 1 and expected in errors[0], stderr


# ------------------------------------------------------------------------------ folder mode

FOLDER_ARGS = (*BASE, "--box", "dog:0,0,16,16", "--steps", "2", "--tune-steps", "0", "--refine-iterations", "1")


def _in_process(*args) -> tuple[int, str, str]:
    """`python app.py edit-video --model tiny ARGS` in this process: (exit status, stdout, stderr)."""
    import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = app.main(["edit-video", "--model", "tiny", *args])
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def _write_clips(folder: Path, *names: str, frames: int = 3) -> Path:
    """Small random clips (32x32, `frames` frames): .mp4 through pipelines.io.write_video, .gif with PIL."""
    from PIL import Image

    from pipelines.io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        rng = np.random.RandomState(seed)
        images = [Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)) for _ in range(frames)]
        if name.endswith(".gif"):
            images[0].save(folder / name, save_all=True, append_images=images[1:], duration=125, loop=0)
        else:
            write_video(images, folder / name, fps=12)
    return folder


def _stamps(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _no_model(monkeypatch) -> None:
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("pipelines.models.load", load)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A folder of two clips (an .mp4 and a .gif) and a stray text file, edited once:
    (input folder, output folder, cache folder, (status, stdout, stderr))."""
    root = tmp_path_factory.mktemp("batch")
    videos = _write_clips(root / "clips", "a.mp4", "b.gif")
    (videos / "notes.txt").write_text("not a clip")
    out, cache = root / "edited", root / "cache"
    run = _in_process("--video", str(videos), "--output", str(out), "--cache-dir", str(cache), *FOLDER_ARGS)
    return videos, out, cache, run


def test_a_folder_of_clips_gives_each_clip_the_outputs_of_a_single_edit(batch):
    _, out, _, (status, stdout, stderr) = batch
    assert status == 0, stderr
    for stem in ("a", "b"):  # b.gif -> b.mp4
        assert {f"{stem}.mp4", f"{stem}_side_by_side.mp4", f"{stem}_attn_0_dog.mp4", f"{stem}.json"} <= _stamps(out).keys()
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["prompt"] == "a photo of a dog" and record["boxes"][0]["word"] == "dog"
        assert record["frames"] == 3 and record["settings"]["steps"] == 2
        assert str(out / f"{stem}.mp4") in stdout.splitlines()
    assert json.loads((out / "a.json").read_text())["fps"] == pytest.approx(12)
    assert "clip 1/2: a.mp4" in stderr.splitlines() and "clip 2/2: b.gif" in stderr.splitlines()
    assert "notes.txt" in stderr and "not videos" in stderr  # the stray file: one warning
    assert stdout.splitlines()[-1] == "done: 2, skipped: 0, failed: 0"


def test_a_rerun_skips_every_finished_clip_without_loading_a_model(batch, monkeypatch):
    videos, out, cache, first = batch
    assert first[0] == 0, first[2]
    before = _stamps(out)
    _no_model(monkeypatch)
    status, stdout, stderr = _in_process("--video", str(videos), "--output", str(out), "--cache-dir", str(cache),
                                         *FOLDER_ARGS)
    assert status == 0, stderr
    assert stdout.splitlines()[-1] == "done: 0, skipped: 2, failed: 0"
    assert "clip 1/2: a.mp4: skipped" in stderr and "clip 2/2: b.gif: skipped" in stderr
    assert _stamps(out) == before  # nothing rewritten


def test_a_half_written_clip_is_edited_again(batch, tmp_path):
    videos, out, cache, first = batch
    assert first[0] == 0, first[2]
    again = tmp_path / "edited"
    shutil.copytree(out, again)
    (again / "a.json").unlink()  # stopped between the MP4s and the JSON, which is written last
    (again / ".a.tmp1234.mp4").write_bytes(b"partial")  # an interrupted atomic write's leftover
    before = _stamps(again)
    status, stdout, stderr = _in_process("--video", str(videos), "--output", str(again), "--cache-dir", str(cache),
                                         *FOLDER_ARGS)
    assert status == 0, stderr
    assert stdout.splitlines()[-1] == "done: 1, skipped: 1, failed: 0"
    after = _stamps(again)
    assert (again / "a.json").is_file() and after["a.mp4"] != before["a.mp4"]
    assert all(after[name] == before[name] for name in before if name.startswith("b"))


def test_a_clip_stopped_while_its_files_are_written_is_not_done(batch, tmp_path, monkeypatch):
    videos, out, cache, first = batch
    assert first[0] == 0, first[2]
    again = tmp_path / "edited"
    shutil.copytree(out, again)
    (again / "a.mp4").unlink()  # a.json (an older run's) stays: a is redone
    from pipelines.video import edit

    calls, write_clip = [], edit.write_clip

    def stopped_at_the_heatmaps(*args, **kwargs):  # Ctrl-C after a.mp4 and its side-by-side
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write_clip(*args, **kwargs)

    monkeypatch.setattr(edit, "write_clip", stopped_at_the_heatmaps)
    args = ("--video", str(videos), "--output", str(again), "--cache-dir", str(cache), *FOLDER_ARGS)
    status, _, stderr = _in_process(*args)
    assert status == 130 and "stopped (Ctrl-C)" in stderr, stderr
    assert (again / "a.mp4").is_file() and (again / "a_side_by_side.mp4").is_file()
    assert not (again / "a.json").exists()  # the older run's record was removed first: a is not done
    monkeypatch.setattr(edit, "write_clip", write_clip)
    status, stdout, stderr = _in_process(*args)
    assert status == 0 and stdout.splitlines()[-1] == "done: 1, skipped: 1, failed: 0", stderr
    assert (again / "a.json").is_file()


def test_a_bad_clip_is_one_warning_the_others_are_done_and_the_status_is_2(batch, tmp_path):
    videos, _, cache, _ = batch
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(videos / "a.mp4", folder / "a.mp4")
    (folder / "broken.mp4").write_bytes(b"not a video" * 50)
    _write_clips(folder, "short.mp4", frames=1)
    out = tmp_path / "edited"
    status, stdout, stderr = _in_process("--video", str(folder), "--output", str(out), "--cache-dir", str(cache),
                                         *FOLDER_ARGS)
    assert status == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert any(line.startswith("warning: broken.mp4: ") and "not a readable video" in line for line in lines), stderr
    assert any(line.startswith("warning: short.mp4: ") and "only one frame" in line for line in lines), stderr
    assert lines[-1] == "error: 2 of 3 clips could not be edited (see the warnings above)."
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert stdout.splitlines()[-1] == "done: 1, skipped: 0, failed: 2"
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json"]


def _refusal_case(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """(--video, --output) of a refused folder run; the clips are never read, so they may be junk."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in {"mixed": ("a.mp4", "frame_000.png"), "clash": ("a.mp4", "a.gif"),
                 "side by side": ("a.mp4", "a_side_by_side.mp4"), "empty": ()}.get(case, ("a.mp4", "b.mp4")):
        (folder / name).write_bytes(b"junk")
    output = {"output .mp4": tmp_path / "edited.mp4", "output is a file": tmp_path / "edited",
              "output is the input": folder}.get(case, tmp_path / "out")
    if case == "output is a file":
        output.write_text("a file")
    return folder, output


REFUSED = {
    "output .mp4": "--output must be a folder",
    "output is a file": "--output must be a folder too",
    "output is the input": "another folder than --video",
    "mixed": "both frames (images) and video files",
    "empty": "has no frames",
    "clash": "'a.gif' and 'a.mp4' would both write 'a.mp4'",
    "side by side": "would both write 'a_side_by_side.mp4'",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_folder_run_that_cannot_work_is_one_sentence_before_any_model_work(tmp_path, case, monkeypatch):
    folder, output = _refusal_case(tmp_path, case)
    _no_model(monkeypatch)
    status, stdout, stderr = _in_process("--video", str(folder), "--output", str(output), *FOLDER_ARGS)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert REFUSED[case] in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and stdout == ""
