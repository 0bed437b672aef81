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
from app_server import browser_page, launched_app, require_browser  # noqa: E402

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
    from playwright.sync_api import expect

    rng = np.random.RandomState(1)
    Image.fromarray((rng.rand(128, 192, 3) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    with browser_page(server.url, viewport={"width": 1280, "height": 1000}) as page:
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


# ----------------------------------------------------------------------- issue #18: what the user sees

def _photo_and_mask(size=128, box=(70, 40, 100, 70)):
    rng = np.random.RandomState(3)
    photo = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))
    mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return photo, Image.fromarray(mask)


def _red_pixels(image) -> int:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((rgb[..., 0] - rgb[..., 1]) > 60).sum())


def test_compare_opens_just_left_of_the_edit():
    from ui.eraser_tab import compare_position

    changed = np.zeros((100, 200), bool)
    changed[30:60, 120:150] = True
    position = compare_position(changed)
    assert 100 * 110 / 200 <= position < 100 * 120 / 200  # the whole edit right of the handle
    assert compare_position(np.zeros((10, 10), bool)) == 50  # nothing changed: the middle
    changed[:, 0] = True
    assert compare_position(changed) == 0


def test_remove_shows_the_edit_as_after_and_no_popup_for_a_128_px_image(monkeypatch, tmp_path):
    """The handler (the /erase endpoint) returns the slider opened left of the mask; the region it
    worked on goes to the Details text, not to a warning, and a 128 px image is not "large"."""
    from ui import eraser_tab
    from ui.common import AppContext, OutputStore

    warnings: list[str] = []
    monkeypatch.setattr(eraser_tab.gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    ctx = AppContext(default_model="tiny", device="cpu", outputs=OutputStore(tmp_path / "outputs"))
    photo, mask = _photo_and_mask()
    (before, after), gallery, overlay, seed, files, images, details, handle_at = eraser_tab.make_handler(ctx)(
        "tiny", {"background": photo, "layers": [], "composite": photo}, mask, 0, 0, False, 2, 1.0, 9, 1, 0.3,
        "sip", 1)
    assert before.size == after.size == (128, 128) and seed == 0
    assert 100 * 50 / 128 < handle_at < 100 * 70 / 128  # left of the mask, near it
    changed = np.flatnonzero((np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB"))).any(axis=(0, 2)))
    assert changed.min() >= handle_at * 128 / 100  # every changed column shows "after"
    assert warnings == []
    assert "region around the mask" in details and "pixels outside it are unchanged" in details, details
    assert "image is large" not in details.lower(), details


def test_empty_mask_still_warns(monkeypatch, tmp_path):
    from ui import eraser_tab
    from ui.common import AppContext, OutputStore

    warnings: list[str] = []
    monkeypatch.setattr(eraser_tab.gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    ctx = AppContext(default_model="tiny", device="cpu", outputs=OutputStore(tmp_path / "outputs"))
    photo, _ = _photo_and_mask()
    eraser_tab.make_handler(ctx)("tiny", {"background": photo, "layers": [], "composite": photo}, None, 0, 0,
                                 False, 2, 1.0, 9, 1, 0.3, "sip", 1)
    assert any("mask is empty" in w for w in warnings), warnings


def test_details_text_says_large_only_when_scaled_down():
    from pipelines.eraser import describe_work as details_text

    cropped = details_text({"region": [18, 20, 110, 112], "working_size": [64, 64], "grow": 0, "blur_kernel": 1,
                            "feather_radius": 1.9}, (128, 128))
    assert cropped.startswith("Worked on a 92x92 region around the mask") and "at 64x64 pixels" in cropped
    assert "region is larger than the model's working size" in cropped
    whole = details_text({"region": [0, 0, 64, 64], "working_size": [64, 64], "grow": 4}, (64, 64))
    assert whole.startswith("Worked on the whole 64x64 image") and "larg" not in whole and "grown by 4 px" in whole


def test_grow_preview_is_the_pipelines_growth_without_a_model(monkeypatch):
    from pipelines import eraser, models
    from pipelines.viz import overlay_mask
    from ui import eraser_tab

    def no_model(*args, **kwargs):
        raise AssertionError("the preview must not load a model")

    monkeypatch.setattr(models, "load", no_model)
    assert eraser_tab.grow_mask is eraser.grow_mask  # the pipeline's own growth, not a copy
    photo, mask = _photo_and_mask()
    value = {"background": photo, "layers": [], "composite": photo}
    as_painted = eraser_tab.mask_or_grow_changed(value, mask, 0)
    grown = eraser_tab.mask_or_grow_changed(value, mask, 6)
    shrunk = eraser_tab.mask_or_grow_changed(value, mask, -6)
    assert _red_pixels(shrunk) < _red_pixels(as_painted) < _red_pixels(grown)
    expected = overlay_mask(photo, eraser.grow_mask(np.asarray(mask) > 0, 6))
    assert np.array_equal(np.asarray(grown), np.asarray(expected))
    # an example (or the Segment tab) sets the mask before the editor has its picture: an
    # example's mask is shown over its picture, any other preview is cleared
    empty = {"background": None, "layers": [], "composite": None}
    assert eraser_tab.mask_or_grow_changed(empty, mask, 0) is None
    image_path, mask_path = eraser_tab.example_files(0)
    example = eraser_tab.mask_or_grow_changed(empty, Image.open(mask_path).convert("L"), 0)
    assert example.size == (128, 128) and _red_pixels(example) > _red_pixels(Image.open(image_path))
    brush, size = eraser_tab.example_loaded((0, None))
    assert brush.brush.default_size == 11 and size == [128, 128]


def test_brush_is_sized_to_each_new_picture():
    from ui import eraser_tab

    photo = Image.new("RGB", (256, 192))
    value = {"background": photo, "layers": [], "composite": photo}
    preview, editor_update, size = eraser_tab.editor_changed(value, None, 0, [128, 128])
    assert preview is None and size == [256, 192]
    assert editor_update.brush.default_size == editor_update.eraser.default_size == 16  # 192 / 12
    assert editor_update.brush.colors == [("#ff3030", 0.7)]
    _, same, size = eraser_tab.editor_changed(value, None, 0, [256, 192])
    assert same == eraser_tab.gr.skip() and size == [256, 192]  # a stroke keeps the brush the user chose


def test_tab_at_1400x900_example_result_and_details(server):
    """At 1400x900: the examples are above the fold, the seed row waits for a run, an example shows
    its mask at once, and after Remove the comparison opens left of the object (all of it "after"),
    with no popup and the processed region under Details."""
    require_browser()
    from playwright.sync_api import expect

    from ui import eraser_tab

    _, mask_path = eraser_tab.example_files(0)
    columns = np.flatnonzero((np.asarray(Image.open(mask_path).convert("L")) > 0).any(axis=0))
    mask_left = 100 * columns.min() / Image.open(mask_path).width
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="Remove object").click()
        first = page.locator("#er-examples tbody tr").first
        first.wait_for()
        time.sleep(1)
        box = first.bounding_box()
        assert box["y"] + box["height"] <= 900, box  # visible without scrolling
        expect(page.locator("#er-seed-row")).to_be_hidden()
        first.click()
        page.locator("#er-mask-preview img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#er-run").click()
        after = page.locator("#er-compare img").nth(1)
        after.wait_for(state="visible", timeout=120_000)
        expect(page.locator("#er-seed-row")).to_be_visible()
        # the "after" image is drawn right of its clip inset; the picture fills the box's
        # middle (object-fit: contain), so measure the handle in picture coordinates
        clip, box, natural = after.evaluate(
            "img => [img.style.clipPath, (({x, width, height}) => ({x, width, height}))("
            "img.getBoundingClientRect()), [img.naturalWidth, img.naturalHeight]]")
        shown = min(box["width"], box["height"] * natural[0] / natural[1])
        left = box["x"] + (box["width"] - shown) / 2
        handle_x = box["x"] + box["width"] * float(clip.split()[-1].rstrip("%)")) / 100
        handle = 100 * (handle_x - left) / shown
        assert mask_left - 15 < handle < mask_left, (clip, box, handle, mask_left)
        assert shown >= 256, box  # the result shown big
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        page.locator("#er-details").click()
        expect(page.locator("#er-details-text")).to_contain_text("region around the mask")
        assert not page.locator(".toast-body").filter(has_text="large").count()
