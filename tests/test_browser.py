"""One real-browser test of the Attention maps tab: Playwright driving Debian's chromium.

Skipped when chromium is missing, except on CI (environment variable CI set), where a skipped
browser test would hide a broken tab: there it fails instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import browser_page, generate_attention_maps_in_browser, launched_app, require_browser  # noqa: E402


@pytest.mark.timeout(600)
def test_attention_maps_tab_in_a_real_browser():
    require_browser()
    from playwright.sync_api import expect

    with (launched_app("--model", "tiny") as server,
          browser_page(server.url, viewport={"width": 1280, "height": 1000}) as page):
        generate_attention_maps_in_browser(page, server.url, "a photo of a cat")

        captions = page.locator("#am-heatmaps .thumbnail-item .caption-label")
        assert captions.all_inner_texts() == ["0: a", "1: photo", "2: of", "3: a", "4: cat"]
        assert page.locator("#am-heatmaps .thumbnail-item img").count() == 5
        assert page.locator("#am-seed-used input").input_value() == "0"
        expect(page.locator('#am-files a[href$="heatmaps.zip"]')).to_have_count(1)
