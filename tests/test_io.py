"""Reading user files and writing results: one sentence per mistake, no partial outputs."""

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import UserInputError
from pipelines.io import atomic_path, load_image, load_mask, read_video, save_image, write_video


def test_images_are_validated(tmp_path):
    with pytest.raises(UserInputError, match="no image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserInputError, match="not a readable image"):
        load_image(tmp_path / "notes.txt")
    Image.new("RGB", (40, 300)).save(tmp_path / "thin.png")
    with pytest.raises(UserInputError, match="at least 64"):
        load_image(tmp_path / "thin.png")
    Image.new("L", (64, 80)).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


def test_masks_are_resized_with_a_note_and_read_from_alpha():
    strokes = np.zeros((10, 20, 4), np.uint8)
    strokes[2:5, 3:9, 3] = 255  # a brush layer: colour is irrelevant, alpha marks the strokes
    mask, note = load_mask(Image.fromarray(strokes, "RGBA"))
    assert mask.shape == (10, 20) and mask.sum() == 18 and note is None
    mask, note = load_mask(Image.fromarray(strokes, "RGBA"), size=(40, 20))
    assert mask.shape == (20, 40) and mask.sum() == 72 and "resized" in note


def test_failed_writes_leave_no_file(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    written = save_image(Image.new("RGB", (8, 8)), target, {"seed": 3})
    assert [p.name for p in written] == ["out.png", "out.json"]
    assert Image.open(target).text["parameters"] == '{"seed": 3}'


def test_video_round_trip_and_bad_videos(tmp_path):
    frames = [Image.new("RGB", (66, 64), (i * 40, 0, 0)) for i in range(4)]
    path = write_video(frames, tmp_path / "clip.mp4", fps=8)
    read, fps = read_video(path)
    assert len(read) == 4 and read[0].size == (66, 64) and fps == 8
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(UserInputError, match="not a readable video"):
        read_video(tmp_path / "broken.mp4")
    Image.new("RGB", (64, 64)).save(tmp_path / "still.png")
    with pytest.raises(UserInputError, match="not a video"):
        read_video(tmp_path / "still.png")
