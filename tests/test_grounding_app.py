"""Segment by text through its front doors: the CLI, the `/segment` API and a real browser.

One app server (tiny models) serves the API and the browser tests; CLI mistakes are checked
in-process through `app.main`, which is what `python app.py` runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import cli_in_process, launch_chromium, launched_app, require_browser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "refseg_sample"
pytestmark = pytest.mark.timeout(600)


def picture(path: Path, width=96, height=64, seed=0) -> Path:
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8)).save(path)
    return path


cli = cli_in_process


# ------------------------------------------------------------------------------------ CLI


def test_cli_image_writes_mask_sidecar_and_heatmap(tmp_path):
    image = picture(tmp_path / "in.png")
    out, heat = tmp_path / "out" / "mask.png", tmp_path / "out" / "heat.png"
    done = subprocess.run([sys.executable, "app.py", "segment", "--image", str(image), "--text", "the red circle",
                           "--output", str(out), "--heatmap", str(heat), "--model", "tiny-flux", "--size", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as mask:
        assert mask.size == (96, 64) and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert out.with_suffix(".json").is_file() and heat.is_file()


def test_cli_video_and_folder_modes(tmp_path, capsys):
    from pipelines.io import write_video

    video = tmp_path / "clip.mp4"
    write_video([Image.open(picture(tmp_path / f"f{i}.png", seed=i)) for i in range(3)], video, fps=4)
    code, err = cli(capsys, "segment", "--video", str(video), "--text", "the red circle",
                    "--output", str(tmp_path / "masks.mp4"), "--model", "tiny-flux", "--size", "64")
    assert code == 0, err
    from pipelines.io import read_video

    assert len(read_video(tmp_path / "masks.mp4")[0]) == 3
    assert (tmp_path / "masks_overlay.mp4").is_file() and (tmp_path / "masks.json").is_file()

    out = tmp_path / "folder"
    code, err = cli(capsys, "segment", "--folder", str(SAMPLE), "--output", str(out), "--model", "tiny", "--size", "64")
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 12  # 6 scenes x 2 expressions
    code, _ = cli(capsys, "segment", "--folder", str(SAMPLE), "--output", str(out), "--model", "tiny", "--size", "64")
    assert code == 0  # resumed: everything already there


@pytest.mark.parametrize("text, message", [
    ("", "--text"), ("the of a", "only stop words"), ("red " * 600, "too long"),
])
def test_cli_bad_expressions_are_one_line_and_write_nothing(tmp_path, capsys, text, message):
    out = tmp_path / "mask.png"
    code, err = cli(capsys, "segment", "--image", str(picture(tmp_path / "in.png")), "--text", text,
                    "--output", str(out), "--model", "tiny-flux", "--size", "64")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".mask*"))


def test_cli_bad_files_are_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    code, err = cli(capsys, "segment", "--video", str(broken), "--text", "the dog", "--output",
                    str(tmp_path / "o.mp4"), "--model", "tiny-flux")
    assert code == 2 and "not a readable video" in err
    code, err = cli(capsys, "segment", "--image", str(picture(tmp_path / "in.png")), "--text", "the dog",
                    "--output", str(tmp_path / "o.jpg"))
    assert code == 2 and ".png" in err
    code, err = cli(capsys, "segment", "--folder", str(tmp_path), "--output", str(tmp_path / "o"))
    assert code == 2 and "expressions.json" in err


# ------------------------------------------------------------------------------------ API


@pytest.fixture(scope="module")
def server():
    with launched_app("--model", "tiny", "--allow-model", "tiny-flux") as running:
        yield running


def test_segment_endpoint_returns_heatmap_mask_tokens_and_files(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    assert "/segment" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    image = picture(tmp_path / "in.png")
    heat, mask, gallery, video, files, summary = client.predict(
        model="tiny-flux", image=handle_file(str(image)), video=None, expression="the red circle", size=64,
        noise=0.3, gas="exclude", norm="text_softmax", magnets=4, threshold=0, refine=False, seed=0,
        api_name="/segment")
    with Image.open(mask) as m:
        assert m.size == (96, 64) and set(np.unique(np.asarray(m.convert("L")))) <= {0, 255}
    captions = [item["caption"] for item in gallery]
    assert "1: red (content)" in captions and any("(magnet)" in c for c in captions)
    assert {Path(f).name for f in files} == {"mask.png", "mask.json", "heatmap.png", "token_maps.zip"}
    assert "Sinks" in summary
    with pytest.raises(Exception) as caught:
        client.predict(model="tiny-flux", image=handle_file(str(image)), video=None, expression="the of",
                       api_name="/segment")
    assert "stop words" in str(caught.value)


# ------------------------------------------------------------------------------------ browser




def test_segment_tab_in_a_real_browser(server):
    """Pick an example, type an expression, see the mask; send it to the Remove object tab."""
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.get_by_role("tab", name="Segment by text").click()
            page.locator("#seg-image input[type=file]").set_input_files(str(SAMPLE / "images" / "0000.png"))
            page.locator("#seg-image img").first.wait_for(state="visible", timeout=60_000)
            page.locator("#seg-text textarea").fill("the red square")
            page.locator("#seg-run").click()
            page.locator("#seg-mask img").first.wait_for(state="visible", timeout=120_000)
            page.locator("#seg-tokens .thumbnail-item img").first.wait_for(state="visible", timeout=60_000)
            expect(page.locator("#seg-summary")).to_contain_text("Mask:")
            expect(page.locator('#seg-files a[href$="mask.png"]')).to_have_count(1)
            if page.locator("#er-mask").count():
                page.locator("#seg-remove").click()
                page.locator("#er-mask img").first.wait_for(state="visible", timeout=30_000)
            assert not errors, errors
        finally:
            browser.close()
