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
from app_server import cli_in_process, browser_page, launched_app, require_browser, shown_box  # noqa: E402

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
    # the first paragraph is what the tab shows in plain view; the diagnostics follow it
    from ui.segment_tab import headline

    assert headline(summary).startswith("Mask: ") and headline(summary).endswith("% of the image.")
    assert "Sinks" in summary and "Prompt read by the model" in summary and "magnet words" in summary
    with pytest.raises(Exception) as caught:
        client.predict(model="tiny-flux", image=handle_file(str(image)), video=None, expression="the of",
                       api_name="/segment")
    assert "stop words" in str(caught.value)


# ------------------------------------------------------------------------------------ the tab, in-process


def test_the_hand_off_checks_what_it_sends():
    """"Remove this object" sends only a mask made from the image shown, never an empty one, and
    one over half the image only on a second press."""
    from ui.segment_tab import fingerprint, hand_off_check

    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 96, 3), np.uint8))
    small, large = np.zeros((64, 96), np.uint8), np.zeros((64, 96), np.uint8)
    small[10:30, 10:40], large[:, :70] = 255, 255
    source = fingerprint(image)
    verdict, message, share = hand_off_check(image, Image.fromarray(small), source, False)
    assert verdict == "send" and "10 % of the image" in message and "Mask box" in message
    assert round(share, 3) == round(20 * 30 / (64 * 96), 3)
    verdict, message, share = hand_off_check(image, Image.fromarray(large), source, False)
    assert verdict == "ask" and "covers 73 % of the image" in message and "Send anyway" in message
    assert hand_off_check(image, Image.fromarray(large), source, True)[0] == "send"
    assert hand_off_check(image, Image.fromarray(np.zeros_like(small)), source, True)[:2][0] == "refuse"
    other = Image.fromarray(np.asarray(image)[:, ::-1].copy())
    verdict, message, _ = hand_off_check(other, Image.fromarray(small), source, True)
    assert verdict == "refuse" and "not made from the image shown" in message
    assert hand_off_check(image, Image.fromarray(small), None, True)[0] == "refuse"  # a video's mask
    assert hand_off_check(None, None, None, False)[0] == "refuse"


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    """The Segment tab's components by elem_id and its AppContext (tiny model), no server."""
    from app_server import built_tab
    from ui.segment_tab import build_tab

    return built_tab(build_tab, tmp_path_factory.mktemp("outputs"))


def _inside_closed_details(block) -> bool:
    import gradio as gr

    while block is not None:
        if isinstance(block, gr.Accordion) and block.label == "Details":
            return not block.open
        block = getattr(block, "parent", None)
    return False


def test_magnet_words_and_token_maps_are_only_under_details(tab, tmp_path):
    """Plain view: the mask's share of the image; the prompt as read (with its magnet words),
    the sinks and the per-token maps are in the closed Details section."""
    from ui.segment_tab import headline, make_handler

    controls, ctx = tab
    assert _inside_closed_details(controls["seg-tokens"]) and _inside_closed_details(controls["seg-details-text"])
    for plain in ("seg-summary", "seg-heatmap", "seg-mask", "seg-remove", "seg-files"):
        assert not _inside_closed_details(controls[plain]), plain
    stages = []
    heat, mask, gallery, video, files, summary = make_handler(ctx)(
        "tiny", Image.open(picture(tmp_path / "in.png")), None, "the red circle", size=64,
        progress=lambda *a, desc=None, **k: stages.append(desc))
    shown = headline(summary)
    assert shown.startswith("Mask: ") and "magnet" not in shown and "Prompt" not in shown
    magnets = [caption.split(": ", 1)[1].split(" (")[0] for _, caption in gallery if "(magnet)" in caption]
    assert magnets and f"magnet words appended to soak up the background: {', '.join(magnets)}" in summary
    # progress names its stage, no step counter of the pipeline's own
    assert stages == ["Loading the model", "Reading the attention: one noisy pass"]


def test_the_placeholder_and_the_model_menu_follow_the_model(tab):
    from ui.segment_tab import REAL_PLACEHOLDER, SHAPES_PLACEHOLDER, placeholder

    controls, _ = tab
    assert placeholder("builtin") == placeholder("tiny") == SHAPES_PLACEHOLDER == controls["seg-text"].placeholder
    assert placeholder("stabilityai/stable-diffusion-3-medium-diffusers") == REAL_PLACEHOLDER
    # the model menu names each model's family (ui.common.model_menu)
    assert any("·" in label for label, _ in controls["seg-model"].choices)
    assert "pixel-result" in controls["seg-mask"].elem_classes and controls["seg-mask"].height >= 256


# ------------------------------------------------------------------------------------ browser


def test_segment_tab_in_a_real_browser(server):
    """At 1400 x 900: the examples open above the fold, the results are large; segment an
    upload, see the mask and the per-token maps under Details; a mask over half the image goes
    to Remove object only on the second press, and lands in its Mask box."""
    require_browser()
    from playwright.sync_api import expect

    with browser_page(server.url) as page:
        page.get_by_role("tab", name="Segment by text").click()
        examples = page.locator("#seg-examples").bounding_box()
        assert examples and examples["y"] + examples["height"] <= 900, examples
        page.locator("#seg-image input[type=file]").set_input_files(str(SAMPLE / "images" / "0000.png"))
        page.locator("#seg-image img").first.wait_for(state="visible", timeout=60_000)
        page.locator("#seg-text textarea").fill("the red square")
        page.locator("#seg-run").click()
        page.locator("#seg-mask img").first.wait_for(state="visible", timeout=120_000)
        for result in ("#seg-mask img", "#seg-heatmap img"):
            box = shown_box(page.locator(result))
            assert box["width"] >= 256 and box["height"] >= 256, (result, box)
        expect(page.locator("#seg-summary")).to_contain_text("Mask:")
        expect(page.locator("#seg-summary")).not_to_contain_text("magnet")
        expect(page.locator('#seg-files a[href$="mask.png"]')).to_have_count(1)
        assert not page.locator("#seg-tokens .thumbnail-item img").first.is_visible()
        page.locator("#seg-details").get_by_text("Details").click()
        page.locator("#seg-tokens .thumbnail-item img").first.wait_for(state="visible", timeout=60_000)
        expect(page.locator("#seg-details-text")).to_contain_text("Prompt read by the model")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        if page.locator("#er-mask").count():
            # a low threshold: a mask over most of the image (the random tiny model's heatmap)
            page.locator("#seg-settings").get_by_text("Settings").click()
            page.locator("#seg-threshold input[type=number]").fill("0.05")
            page.locator("#seg-threshold input[type=number]").press("Enter")
            before = page.locator("#seg-summary").inner_text()
            page.locator("#seg-run").click()
            page.wait_for_function("(before) => document.querySelector('#seg-summary').innerText.trim() "
                                   "!== before.trim()", arg=before, timeout=120_000)
            share = float(page.locator("#seg-summary").inner_text().split(":")[1].split("%")[0])
            assert share > 50, share  # tiny's heatmap at threshold 0.05 (seed 0): the whole image
            page.locator("#seg-remove").click()
            expect(page.locator(".toast-body")).to_contain_text("press Send anyway", timeout=30_000)
            expect(page.locator("#seg-remove")).to_have_text("Send anyway")
            expect(page.locator("#er-mask img")).to_have_count(0)
            page.locator("#seg-remove").click()
            page.locator("#er-mask img").first.wait_for(state="visible", timeout=30_000)
            expect(page.locator(".toast-body").last).to_contain_text("sent to Remove object")
            page.get_by_role("tab", name="Segment by text").click()
            expect(page.locator("#seg-remove")).to_have_text("Remove this object")
