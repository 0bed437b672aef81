"""Launch `python app.py` in a subprocess for the API and browser tests (shared helper, not a test).

    with launched_app("--model", "tiny") as server:
        Client(server.url) ...

The server runs in its own process group with its output in a log file (no pipe to fill up);
it is terminated (then killed) when the block exits, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppServer:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket LISTENing on `port` (Linux /proc/net), e.g. {'127.0.0.1'}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:  # /proc stores IPv6 as four little-endian 32-bit words
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


@contextlib.contextmanager
def launched_app(*args: str, startup_timeout: float = 180.0, env: dict | None = None, port: int | None = None):
    """Run `python app.py --port <free> *args`; yield an `AppServer` once it answers HTTP.
    `env`: extra environment variables (e.g. TMPDIR, to find the folders the server makes);
    `port`: this one instead of a free one (a restart that a browser must find at the same
    address); results go to a temporary folder unless `--output-dir` is among `args`."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    results = None
    if "--output-dir" not in args:  # never the user's own results folder
        results = tempfile.TemporaryDirectory(prefix="app-results-")
        args = (*args, "--output-dir", results.name)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", **(env or {}))
    log_file = tempfile.NamedTemporaryFile("w+b", prefix="app-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = AppServer(url=url, port=port, process=process, log_path=Path(log_file.name))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {startup_timeout}s:\n{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(log_file.name)
        if results is not None:
            results.cleanup()


# --------------------------------------------------------------------------- browser helpers

CHROMIUM_PATH = "/usr/bin/chromium"  # Debian's chromium; we never run `playwright install`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's chromium, or None when it is not installed."""
    import shutil

    if Path(CHROMIUM_PATH).is_file():
        return CHROMIUM_PATH
    return shutil.which("chromium")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=CHROMIUM_ARGS)


def generate_attention_maps_in_browser(page, url: str, prompt: str = "a photo of a cat",
                                       timeout_ms: int = 120_000, steps: str | None = "2") -> None:
    """Open the app, fill the Attention maps tab (2 steps unless told, None = the model's
    default; 64 px), click Generate and wait until the image and the heatmaps are shown."""
    page.goto(url)
    page.locator("#am-prompt textarea").fill(prompt)
    page.locator("#am-settings").get_by_text("Settings").click()  # the closed section with steps and size
    if steps is not None:
        page.locator("#am-steps input").fill(steps)
    page.locator("#am-width input").fill("64")
    page.locator("#am-height input").fill("64")
    page.locator("#am-generate").click()
    page.locator("#am-image img").first.wait_for(state="visible", timeout=timeout_ms)
    page.locator("#am-heatmaps .thumbnail-item img").first.wait_for(state="visible",
                                                                    timeout=timeout_ms)


# --------------------------------------------------------------------------- every tab, as a user meets it

#: The viewport of the visual checks and the README screenshots (a common laptop window).
VIEWPORT = {"width": 1400, "height": 900}


@dataclass(frozen=True)
class TabWalk:
    """How the visual checks (tests/test_browser_tabs.py) and tests/screenshot.py use one tab:
    its examples block, and for the tabs whose first example runs in seconds on a CPU with the
    built-in models, the button that runs it and the element where the result appears."""

    label: str  # the tab's name in the tab bar
    screenshot: str  # file name under assets/screenshots/
    examples: str
    run: str | None = None  # None: the example takes minutes on a CPU; the tab is checked as it opens
    result: str | None = None  # an element that holds the result image (its <img> or <video>)


TAB_WALKS = (
    TabWalk("Attention maps", "attention_maps.png", "#am-examples", "#am-generate", "#am-image"),
    TabWalk("Remove object", "remove_object.png", "#er-examples", "#er-run", "#er-result"),
    TabWalk("Segment by text", "segment_by_text.png", "#seg-examples", "#seg-run", "#seg-mask"),
    TabWalk("Counterfactual steer", "counterfactual_steer.png", "#st-examples"),
    TabWalk("Personalize", "personalize.png", "#pz-examples"),
    TabWalk("Edit video", "edit_video.png", "#ev-examples"),
    TabWalk("Instruction edit", "instruction_edit.png", "#in-examples", "#in-run", "#in-edited"),
)


@contextlib.contextmanager
def browser_page(url: str, viewport: dict | None = None):
    """Chromium on `url` (at `viewport`, the checks' 1400x900 by default); yields the page, and
    fails the test if the page raised a JavaScript error meanwhile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            yield page
            assert not errors, errors
        finally:
            browser.close()


def open_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()
    page.wait_for_timeout(800)


def first_example(page, walk: TabWalk):
    """The first example: a button when the examples have labels, else the first table row."""
    return page.locator(f"{walk.examples} button.gallery-item, {walk.examples} tbody tr").first


def run_first_example(page, walk: TabWalk, timeout_ms: int = 300_000) -> None:
    """Click the tab's first example and its run button; wait until the result is shown."""
    first_example(page, walk).click()
    page.wait_for_timeout(1500)  # the example's values reach the inputs
    page.locator(walk.run).click()
    page.locator(f"{walk.result} img, {walk.result} video").first.wait_for(state="visible", timeout=timeout_ms)
    shown_box(page.locator(f"{walk.result} img, {walk.result} video").first)  # loaded, laid out
    page.wait_for_timeout(1000)  # let it paint


def shown_box(locator, timeout_ms: int = 30_000) -> dict:
    """The bounding box of an image or video once it is laid out and loaded. Measured as soon as
    the element is attached, an image can still be 0 px wide (its file not yet fetched): waiting
    here keeps a size check from depending on the browser's timing."""
    locator.wait_for(state="visible", timeout=timeout_ms)
    locator.page.wait_for_function(
        """element => element.getBoundingClientRect().width > 0
                      && (element.tagName !== 'IMG' || (element.complete && element.naturalWidth > 0))""",
        arg=locator.element_handle(), timeout=timeout_ms)
    return locator.bounding_box()


def error_badges(page) -> int:
    """Outputs still marked "Error" by Gradio (the notices in the corner are not counted)."""
    return page.locator("span.error:not(.toast-title)").filter(has_text="Error").count()


def horizontal_overflow(page) -> int:
    """How many pixels the page is wider than the window (0 when nothing sticks out sideways)."""
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


def require_browser() -> None:
    """Skip a browser test when playwright or chromium is missing, but fail under CI (CI set):
    a green CI run always includes the real-browser tests."""
    import pytest

    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -r requirements-test.txt)")
    if chromium_path() is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + "; on CI it must run, not be skipped", pytrace=False)
        pytest.skip(reason)


def run_app(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python app.py ARGS` offline (HF_HUB_OFFLINE=1), output captured."""
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, exactly one `error: ...` line last on stderr, no traceback; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], proc.stderr
    message = error_lines[0]
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


# --------------------------------------------------------------------------- raw HTTP helpers

FILE_META = {"_type": "gradio.FileData"}
# an absolute POSIX path inside a message (what a visitor must never see)
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s'\"`,;:()\[\]{}<>|]+/)+")


def api_info(url: str) -> dict:
    """The running app's API description (`/gradio_api/info`): endpoints and their parameters."""
    with urllib.request.urlopen(url + "/gradio_api/info", timeout=30) as response:
        return json.load(response)


def upload(url: str, path: Path) -> str:
    """Upload `path` as the browser does (`/gradio_api/upload`); returns the server's path of it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        [uploaded] = json.load(response)
    return uploaded


def call_raw(url: str, endpoint: str, data: list, timeout: float = 120) -> tuple[str, str]:
    """POST /gradio_api/call/<endpoint>, then read its event stream: ("complete"|"error", data)."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}/gradio_api/call{endpoint}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call{endpoint}/{event_id}", timeout=timeout) as response:
        stream = response.read().decode()
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.M)
    final = [(kind, payload) for kind, payload in events if kind in ("complete", "error")]
    assert final, stream
    return final[-1]


def error_message(payload: str) -> str:
    return str((json.loads(payload) or {}).get("error"))


def assert_one_clean_sentence(message: str, *fragments: str) -> None:
    assert message and message != "None", message
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert not ABSOLUTE_PATH.search(message), f"server path in: {message}"
    for fragment in fragments:
        assert fragment in message, message


def cli_in_process(capsys, *argv: str) -> tuple[int, str]:
    """`python app.py ARGV` run in this process: (exit status, stderr)."""
    import app

    try:
        code = app.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def built_tab(build_tab, outputs_dir: Path):
    """(controls by elem_id, the AppContext) of one tab built on the tiny model, without a server."""
    import gradio as gr

    from ui.common import AppContext, OutputStore

    ctx = AppContext(default_model="tiny", outputs=OutputStore(outputs_dir))
    with gr.Blocks() as demo:
        build_tab(ctx)
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}, ctx
