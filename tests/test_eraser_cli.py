"""`python app.py erase`: single image, folder mode with a shared or per-image mask, resume,
the split across accelerate processes, and every bad input as one `error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from ui import eraser_cli  # noqa: E402

FAST = ["--model", "tiny", "--steps", "3", "--strength", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_scene(folder: Path, name: str, size=(96, 64), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    path = folder / name
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(path)
    return path


def write_mask(path: Path, size=(96, 64), box=(30, 20, 60, 45)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)
    return path


def erase_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `app.py erase ...` in this process: (exit status, stdout, stderr)."""
    try:
        status = app.main(["erase", *args])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]


def test_single_image(tmp_path, capsys):
    image = write_scene(tmp_path, "photo.png")
    mask = write_mask(tmp_path / "mask.png")
    out = tmp_path / "out" / "clean.png"
    status, stdout, err = erase_cli(capsys, "--image", str(image), "--mask", str(mask), "--output", str(out),
                                    "--seed", "4", *FAST)
    assert status == 0, err
    with Image.open(out) as result:
        assert result.size == (96, 64)
    params = json.loads(out.with_suffix(".json").read_text())
    assert params["seed"] == 4 and params["steps"] == 3 and params["guidance"] == 9.0
    assert str(out) in stdout and "seed: 4" in stdout


def test_folder_with_a_shared_mask_then_resume(tmp_path, capsys):
    images = tmp_path / "in"
    for i in range(3):
        write_scene(images, f"img{i}.png", seed=i)
    (images / "readme.txt").write_text("not an image")
    mask = write_mask(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["--image", str(images), "--mask", str(mask), "--output", str(out), "--seed", "1", *FAST]
    status, stdout, err = erase_cli(capsys, *args)
    assert status == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    assert "readme.txt" in err and "done: 3, skipped: 0, failed: 0" in stdout
    # rerun: everything is skipped, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    status, stdout, _ = erase_cli(capsys, *args)
    assert status == 0 and "done: 0, skipped: 3, failed: 0" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # an interrupted batch: only the missing output is made
    (out / "img1.png").unlink()
    status, stdout, _ = erase_cli(capsys, *args)
    assert status == 0 and "done: 1, skipped: 2, failed: 0" in stdout and (out / "img1.png").is_file()


def test_folder_with_per_image_masks_reports_a_missing_one(tmp_path, capsys):
    images, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    for i in range(3):
        write_scene(images, f"img{i}.png", seed=i)
    write_mask(masks / "img0.png")
    write_mask(masks / "img1_mask.png", box=(10, 10, 40, 40))
    status, stdout, err = erase_cli(capsys, "--image", str(images), "--mask", str(masks), "--output", str(out),
                                    "--seed", "0", *FAST)
    assert_one_error_line(status, err, "1 of 3")
    assert "img2.png" in err and "no mask" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png"]
    assert "done: 2, skipped: 0, failed: 1" in stdout


class FakeState:
    """accelerate's PartialState as seen by process `process_index` of `num_processes`."""

    from accelerate import PartialState

    split_between_processes = PartialState.split_between_processes  # accelerate's own split

    def __init__(self, process_index: int = 0, num_processes: int = 1):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device = torch.device("cpu")


def test_split_across_processes_is_contiguous_and_complete():
    items = [f"img{i}.png" for i in range(7)]
    shares = [eraser_cli.process_share(items, FakeState(i, 3)) for i in range(3)]
    assert shares == [items[0:3], items[3:5], items[5:7]]
    assert eraser_cli.process_share(items, FakeState()) == items
    assert [eraser_cli.process_share(items[:2], FakeState(i, 3)) for i in range(3)] == [items[:1], items[1:2], []]


def test_folder_mode_under_two_fake_processes(tmp_path, capsys, monkeypatch):
    import accelerate

    images, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_scene(images, f"img{i}.png", seed=i)
    mask = write_mask(tmp_path / "mask.png")
    args = ["--image", str(images), "--mask", str(mask), "--output", str(out), "--seed", "0", *FAST]
    made = []
    for index in range(2):
        monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False, index=index: FakeState(index, 2))
        status, stdout, err = erase_cli(capsys, *args)
        assert status == 0, err
        made.append(sorted(p.name for p in out.glob("*.png")))
        assert f"[process {index}/2]" in stdout
    assert made == [["img0.png", "img1.png"], ["img0.png", "img1.png", "img2.png"]]


@pytest.mark.parametrize("case, fragment", [
    ("missing-image", "no image file"), ("text-file", "not a readable image"), ("tiny-image", "at least 64"),
    ("full-mask", "whole image"), ("text-mask", "not a readable mask"), ("bad-output", ".png"),
    ("bad-steps", "steps"), ("empty-folder", "no images"), ("folder-to-file", "folder"),
])
def test_bad_inputs_are_one_error_line_and_no_output(tmp_path, capsys, case, fragment):
    image = write_scene(tmp_path, "photo.png")
    mask = write_mask(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    extra = []
    if case == "missing-image":
        image = tmp_path / "nope.png"
    elif case == "text-file":
        image = tmp_path / "photo.txt"
        image.write_text("hello")
    elif case == "tiny-image":
        image = write_scene(tmp_path, "small.png", size=(40, 40))
    elif case == "full-mask":
        mask = write_mask(tmp_path / "full.png", box=(0, 0, 96, 64))
    elif case == "text-mask":
        mask = tmp_path / "mask.txt"
        mask.write_text("hello")
    elif case == "bad-output":
        out = tmp_path / "out.jpg"
    elif case == "bad-steps":
        extra = ["--steps", "0"]
    elif case == "empty-folder":
        image = tmp_path / "empty"
        image.mkdir()
        out = tmp_path / "outdir"
    elif case == "folder-to-file":
        image = tmp_path / "folder"
        write_scene(image, "a.png")
        out.write_bytes(b"")
    status, _, err = erase_cli(capsys, "--image", str(image), "--mask", str(mask), "--output", str(out),
                               *FAST, *extra)
    assert_one_error_line(status, err, fragment)
    assert not out.exists() or out.stat().st_size == 0
    assert not list(tmp_path.glob("out*.json")) and not list(tmp_path.glob(".*"))


def test_empty_mask_writes_the_input_with_a_warning(tmp_path, capsys):
    image = write_scene(tmp_path, "photo.png")
    mask = write_mask(tmp_path / "mask.png", box=(0, 0, 0, 0))
    out = tmp_path / "out.png"
    status, _, err = erase_cli(capsys, "--image", str(image), "--mask", str(mask), "--output", str(out), *FAST)
    assert status == 0 and "warning:" in err and "empty" in err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(image)))


@pytest.mark.timeout(300)
def test_as_a_subprocess_with_help(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    image = write_scene(tmp_path, "photo.png")
    mask = write_mask(tmp_path / "mask.png", size=(48, 32))  # another size: resized, with a warning
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "erase", "--image", str(image), "--mask", str(mask),
                           "--output", str(tmp_path / "o.png"), "--num-images", "2", "--seed", "3", *FAST],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "resized" in proc.stderr and "seed: 3, 4" in proc.stdout
    assert (tmp_path / "o_0.png").is_file() and (tmp_path / "o_1.png").is_file()
    help_text = subprocess.run([sys.executable, str(ROOT / "app.py"), "erase", "--help"], capture_output=True,
                               text=True, timeout=120, env=env).stdout
    for flag in ("--image", "--mask", "--output", "--model", "--seed", "--steps", "--strength", "--guidance"):
        assert flag in help_text


@pytest.mark.timeout(300)
def test_two_real_processes_split_the_folder(tmp_path):
    """Two processes of one torch.distributed job (what `accelerate launch` starts on GPUs)."""
    images, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_scene(images, f"img{i}.png", seed=i)
    mask = write_mask(tmp_path / "mask.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "app.py"),
         "erase", "--image", str(images), "--mask", str(mask), "--output", str(out), "--seed", "0", *FAST],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    assert "[process 0/2] done: 2," in proc.stdout and "[process 1/2] done: 1," in proc.stdout
