"""The Remove object tab: the `/erase` endpoint through gradio_client, and a real browser that
brushes a stroke on the ImageEditor canvas, presses Remove and sees the result."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import launch_chromium, launched_app, require_browser  # noqa: E402

pytestmark = pytest.mark.timeout(600)
UPLOAD_LIMIT_MB = 0.2
FAST = dict(model="tiny", grow=0, seed=0, randomize_seed=False, steps=3, strength=1.0, guidance=9,
            ss_steps=9, ss_scale=0.3, mode="sip", num_images=1)


@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process is fastest
    with launched_app("--model", "tiny", "--max-upload-mb", str(UPLOAD_LIMIT_MB)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eraser_app")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 96, 3) * 255).astype(np.uint8)).save(folder / "photo.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[20:45, 30:60] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.full((64, 96), 255, np.uint8)).save(folder / "full.png")
    Image.fromarray((rng.rand(400, 400, 3) * 255).astype(np.uint8)).save(folder / "big.png")  # > 0.2 MB
    (folder / "notes.txt").write_text("not an image")
    return folder


def editor(path) -> dict:
    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def test_erase_endpoint_returns_before_after_results_mask_seed_and_files(client, files):
    pair, gallery, overlay, seed, written = client.predict(
        image=editor(files / "photo.png"), mask=handle_file(str(files / "mask.png")), **{**FAST, "num_images": 2},
        api_name="/erase")
    before, after = (Image.open(p) for p in pair)
    assert before.size == after.size == (96, 64)
    original = np.asarray(Image.open(files / "photo.png"))
    assert np.array_equal(np.asarray(before.convert("RGB")), original)
    assert not np.array_equal(np.asarray(after.convert("RGB")), original)
    assert [item["caption"] for item in gallery] == ["seed 0", "seed 1"]
    assert Image.open(overlay).size == (96, 64)
    assert seed == 0
    assert sorted(Path(f).name for f in written) == ["result_0.json", "result_0.png", "result_1.json", "result_1.png"]


def test_stroke_layers_are_the_mask(client, files, tmp_path):
    strokes = np.zeros((64, 96, 4), np.uint8)
    strokes[25:40, 35:55] = (255, 48, 48, 180)
    Image.fromarray(strokes, "RGBA").save(tmp_path / "layer.png")
    value = {"background": handle_file(str(files / "photo.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
             "composite": None}
    pair, *_ = client.predict(image=value, mask=None, **FAST, api_name="/erase")
    after = np.asarray(Image.open(pair[1]).convert("RGB")).astype(int)
    original = np.asarray(Image.open(files / "photo.png")).astype(int)
    assert (after[25:40, 35:55] != original[25:40, 35:55]).any()
    assert np.array_equal(after[:, :10], original[:, :10])  # far from the stroke: exact


@pytest.mark.parametrize("case, fragment", [
    ("full-mask", "whole image"), ("no-image", "upload an image"), ("text-file", "image"),
    ("too-large", "maximum file size"),
])
def test_user_mistakes_come_back_as_one_sentence(client, files, case, fragment):
    image, mask = editor(files / "photo.png"), handle_file(str(files / "mask.png"))
    if case == "full-mask":
        mask = handle_file(str(files / "full.png"))
    elif case == "no-image":
        image = {"background": None, "layers": [], "composite": None}
    elif case == "text-file":
        image = editor(files / "notes.txt")
    elif case == "too-large":
        image = editor(files / "big.png")
    with pytest.raises(Exception) as caught:
        client.predict(image=image, mask=mask, **FAST, api_name="/erase")
    message = str(caught.value)
    assert fragment.lower() in message.lower() and "Traceback" not in message, message


def test_empty_mask_returns_the_input(client, files):
    pair, *_ = client.predict(image=editor(files / "photo.png"), mask=None, **FAST, api_name="/erase")
    assert np.array_equal(np.asarray(Image.open(pair[1]).convert("RGB")), np.asarray(Image.open(files / "photo.png")))




def test_brush_a_stroke_remove_and_see_the_result(server, tmp_path):
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    rng = np.random.RandomState(1)
    Image.fromarray((rng.rand(128, 192, 3) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.get_by_role("tab", name="Remove object").click()
            canvas_box = page.locator("#er-editor")
            canvas_box.get_by_text("Upload an image").wait_for()
            time.sleep(1)  # the editor finishes mounting after its placeholder appears
            canvas_box.locator("input[type=file]").first.set_input_files(str(tmp_path / "photo.png"))
            canvas_box.get_by_text("Upload an image").wait_for(state="hidden")
            time.sleep(1)
            box = canvas_box.locator("canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.mouse.down()
            for i in range(1, 21):
                page.mouse.move(x + 6 * i, y + (i % 3), steps=2)
            page.mouse.up()
            # the dilated mask appears over the image while painting
            page.locator("#er-mask-preview img").first.wait_for(state="visible", timeout=60_000)
            page.locator("#er-advanced").click()
            page.locator("#er-steps input[type=number]").fill("2")
            page.locator("#er-run").click()
            page.locator("#er-compare img").first.wait_for(state="visible", timeout=120_000)
            page.locator("#er-results img").first.wait_for(state="visible", timeout=60_000)
            expect(page.locator('#er-files a[href$="result.png"]')).to_have_count(1)
            assert page.locator("#er-seed-used input").input_value() == "0"
            # successive removals: the result becomes the input, and one step back is possible
            page.locator("#er-use-result").click()
            expect(page.locator("#er-history")).to_contain_text("1 earlier input")
            page.locator("#er-step-back").click()
            expect(page.locator("#er-history")).to_contain_text("empty")
            assert not errors, errors
        finally:
            browser.close()
