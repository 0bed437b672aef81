"""Save the README screenshots with the built-in models: every tab at 1400x900, after running its
first example where that takes seconds on a CPU (the same walk as tests/test_browser_tabs.py:
`app_server.TAB_WALKS`), as it opens otherwise; then the Results tab with the newest run opened.

    python tests/screenshot.py                          # every tab, into assets/screenshots/
    python tests/screenshot.py --only "Edit video"      # one tab's screenshot again

Not a test (pytest does not collect it): it reuses the browser-test machinery, needs Debian's
chromium, and writes palette PNGs kept under 300 KB.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import ROOT, TAB_WALKS, VIEWPORT, launch_chromium, launched_app, open_tab, run_first_example  # noqa: E402

MAX_BYTES = 300 * 1024
RESULTS = "Results"  # the last tab: the runs of the walk, one of them opened


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
    parser.add_argument("--folder", type=Path, default=ROOT / "assets" / "screenshots")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--only", metavar="TAB", choices=[walk.label for walk in TAB_WALKS] + [RESULTS],
                        help="redo only this tab's screenshot (its label, e.g. 'Edit video')")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with launched_app("--model", args.model) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(server.url)
            page.wait_for_timeout(1500)
            for walk in TAB_WALKS:
                if args.only not in (None, walk.label):
                    continue
                open_tab(page, walk.label)
                if walk.run:
                    run_first_example(page, walk)
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(5000)  # let the result paint and the notices fade
                save_small_png(page.screenshot(), args.folder / walk.screenshot)
            if args.only in (None, RESULTS):
                if args.only == RESULTS:  # something to list: the first example of the first tab
                    run_first_example(page, TAB_WALKS[0])
                open_tab(page, RESULTS)
                page.locator("#rs-table [role=gridcell]").nth(2).click()  # the newest run's "What"
                page.locator("#rs-gallery img").first.wait_for(state="visible", timeout=30_000)
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(3000)
                save_small_png(page.screenshot(), args.folder / "results.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
