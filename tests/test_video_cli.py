"""`python app.py edit-video`: a working run, and one sentence with exit status 2 per bad input."""

from __future__ import annotations

import json
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
