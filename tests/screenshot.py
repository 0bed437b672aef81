"""Save the README screenshots with the built-in model: the Attention maps tab after one
generation, Remove object, Segment by text, Edit video and Instruction edit after running their first example,
and the other tabs as they open.

    python tests/screenshot.py [--output assets/screenshots/attention_maps.png] [--model builtin]
    python tests/screenshot.py --only "Edit video"      # one tab's screenshot again

Not a test (pytest does not collect it): it reuses the browser-test machinery, needs Debian's
chromium, and writes a palette PNG kept under 300 KB.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import ROOT, generate_attention_maps_in_browser, launch_chromium, launched_app  # noqa: E402

MAX_BYTES = 300 * 1024
# tab label -> file name, for the tabs shown as they open
OTHER_TABS = {"Remove object": "remove_object.png", "Segment by text": "segment_by_text.png",
              "Counterfactual steer": "counterfactual_steer.png", "Personalize": "personalize.png",
              "Edit video": "edit_video.png", "Instruction edit": "instruction_edit.png"}
# tab label -> (examples block, run button, result image) to run the first example before the shot
RUN_EXAMPLE = {"Remove object": ("#er-examples", "#er-run", "#er-compare img"),
               "Segment by text": ("#seg-examples", "#seg-run", "#seg-mask img"),
               "Edit video": ("#ev-examples", "#ev-run", "#ev-edited video"),
               "Instruction edit": ("#in-examples", "#in-run", "#in-edited img")}


def save_small_png(png: bytes, output: Path) -> None:
    """Save a screenshot as a palette PNG, scaled down until it fits MAX_BYTES."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        small = image.resize(size, Image.LANCZOS) if scale < 1 else image
        buffer = io.BytesIO()
        small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES or scale < 0.3:
            break
        scale *= 0.85
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buffer.getvalue())
    print(f"{output} ({buffer.tell() // 1024} KB, {size[0]}x{size[1]})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path,
                        default=ROOT / "assets" / "screenshots" / "attention_maps.png")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--prompt", default="a red circle and a blue square on a striped background")
    parser.add_argument("--only", metavar="TAB", choices=sorted(OTHER_TABS),
                        help="redo only this tab's screenshot (its label, e.g. 'Edit video')")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with launched_app("--model", args.model) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            if args.only is None:
                generate_attention_maps_in_browser(page, server.url, args.prompt, steps=None)
                page.wait_for_timeout(1000)  # let thumbnails finish painting
                save_small_png(page.screenshot(full_page=True), args.output)
            else:
                page.goto(server.url)
            for label, name in OTHER_TABS.items():
                if args.only not in (None, label):
                    continue
                page.get_by_role("tab", name=label).click()
                page.wait_for_timeout(1500)
                if label in RUN_EXAMPLE:
                    examples, run, result = RUN_EXAMPLE[label]
                    # Gradio renders multi-input examples as table rows, single ones as buttons.
                    page.locator(f"{examples} tbody tr, {examples} button.gallery-item").first.click()
                    page.wait_for_timeout(2000)
                    page.locator(run).click()
                    page.locator(result).first.wait_for(state="visible", timeout=600_000)
                    page.evaluate("window.scrollTo(0, 0)")
                    page.wait_for_timeout(6000)  # let the result paint and the notice fade
                save_small_png(page.screenshot(), args.output.parent / name)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
