"""The app-wide keyboard shortcuts (ui/common.SHORTCUTS_JS) in a real browser: Ctrl+Enter presses
the visible tab's primary button, Escape its Stop button while a job runs, and neither fires
where it should not.  Skipped without chromium, except on CI (tests/app_server.require_browser).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import browser_page, launched_app, open_tab, require_browser  # noqa: E402

from ui.common import STOPPING  # noqa: E402

#: records, in the page, the id of every button clicked (by the user or by the shortcut script)
RECORD_CLICKS = """() => {
  window.clickedButtons = [];
  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("button[id]");
    if (button) window.clickedButtons.push(button.id);
  }, true);
}"""


def clicked(page) -> list[str]:
    return page.evaluate("() => window.clickedButtons.splice(0)")  # and forget them


@pytest.mark.timeout(300)
def test_ctrl_enter_runs_the_tab_and_escape_stops_it():
    require_browser()
    from playwright.sync_api import expect

    with launched_app("--model", "tiny") as server, browser_page(server.url) as page:
        generate, stop = page.locator("#am-generate"), page.locator("#am-stop")
        # the keys are told where they act: in the buttons' tooltips
        expect(generate).to_have_attribute("title", re.compile(r"Ctrl\+Enter"))
        expect(stop).to_have_attribute("title", re.compile("Esc"))
        page.evaluate(RECORD_CLICKS)

        prompt = page.locator("#am-prompt textarea")
        prompt.fill("a photo of a cat")
        page.locator("#am-settings").get_by_text("Settings").click()
        page.locator("#am-steps input").fill("2")
        page.locator("#am-width input").fill("64")
        page.locator("#am-height input").fill("64")

        # nothing runs: Escape presses nothing (no "Nothing of yours is running" note); plain
        # Enter in the (two-line) prompt is typing, a new line, not a run
        prompt.press("Escape")
        prompt.press("End")
        prompt.press("Enter")
        assert clicked(page) == []
        assert prompt.input_value() == "a photo of a cat\n"
        prompt.fill("a photo of a cat")

        # Ctrl+Enter in the prompt runs the tab once (the textbox's own Enter submit does not
        # fire as well), and the result appears; typing was not altered by it
        prompt.press("Control+Enter")
        assert clicked(page) == ["am-generate"]
        page.locator("#am-image img").first.wait_for(state="visible", timeout=60_000)
        expect(page.locator("#am-seed-used input")).to_have_value("0")
        assert prompt.input_value() == "a photo of a cat"

        # a long run: Escape while it runs presses Stop, and the server had a job to stop
        page.locator("#am-steps input").fill("100")
        page.locator("#am-width input").fill("256")
        page.locator("#am-height input").fill("256")
        page.locator("#am-steps input").press("Control+Enter")
        page.locator('#am-image [data-testid="status-tracker"]:not(.hide)').wait_for(state="visible",
                                                                                    timeout=30_000)
        page.keyboard.press("Escape")
        assert clicked(page) == ["am-generate", "am-stop"]
        expect(page.locator("#am-stop-note")).to_have_text(STOPPING, timeout=10_000)
        expect(page.get_by_text(re.compile("Stopped at step")).first).to_be_visible(timeout=60_000)

        # a tab with two jobs: the primary button next to the focused field is the one pressed
        open_tab(page, "Personalize")
        page.locator("#pz-prompt textarea").press("Control+Enter")
        assert clicked(page) == ["pz-generate"]
