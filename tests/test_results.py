"""Results that last (#17 item 3): every run is written to a results folder that survives page
reloads and server restarts, is listed back only to whoever made it, can be reopened (a
personalization run resumes), deleted, and is cleaned up by age and size as the server's owner
chose; shutdown keeps the results and leaves no temporary files."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

DAY = 86400


def request(session: str, username: str | None = None):
    """What a handler sees of a browser page (its Gradio session) or a login."""
    return SimpleNamespace(session_hash=session, username=username)


def make_run(store, task: str, owner: str, files=("result.png",), age_s: float = 0, size: int = 10):
    folder = store.new_run_dir(task, owner=owner, about=f"{task} of {owner}")
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    if age_s:
        stamp = time.time() - age_s
        for path in [*folder.rglob("*"), folder]:
            os.utime(path, (stamp, stamp))
    return folder


# ----------------------------------------------------------------------------- the store


def test_a_run_is_recorded_with_its_owner_and_listed_only_to_that_owner(tmp_path):
    from ui.results import OutputStore, browser_owner

    store = OutputStore(tmp_path / "results")
    alice, bob = browser_owner("a" * 32), browser_owner("b" * 32)
    first = make_run(store, "erase", alice, files=("result.png", "result.json", "tokens/circle.png"))
    time.sleep(0.01)
    second = make_run(store, "segment", alice)
    make_run(store, "erase", bob)
    (first / ".result.x1y2.png").write_bytes(b"half")  # an atomic write in progress

    record = json.loads((first / "run.json").read_text())
    assert record["task"] == "erase" and record["owner"] == alice and "a" * 32 not in json.dumps(record)
    runs = store.runs(alice)
    assert [run.name for run in runs] == [second.name, first.name]  # newest first
    assert runs[1].files == ("result.json", "result.png", "tokens/circle.png")  # no record, no temporaries; top first
    assert store.runs(None) == [] and store.runs("session:x") == []
    assert store.run(first.name, bob) is None and store.run(first.name, alice).task == "erase"
    for name in ("../" + first.name, str(first), first.name + "/..", "", None):
        assert store.run(name, alice) is None
    assert not store.delete(first.name, bob) and first.is_dir()  # not Bob's
    assert store.delete(first.name, alice) and not first.exists()


def test_owners_are_the_login_then_the_browser_then_the_api_session():
    from ui.common import AppContext
    from ui.results import browser_owner

    ctx = AppContext()
    token = "c" * 32
    assert ctx.owner(request("page1"), token) == browser_owner(token)
    assert ctx.owner(request("page1")) == "session:page1"  # an API client, or a page not registered yet
    ctx.register_page(request("page1"), token)
    assert ctx.owner(request("page1")) == browser_owner(token)  # the tabs' handlers know only the page
    assert ctx.owner(request("page1", username="ada"), token) == "user:ada"  # --auth: the person
    ctx.register_page(request("page2"), "not a token")
    assert ctx.owner(request("page2")) == "session:page2"
    assert browser_owner("C" * 32) is None and browser_owner(None) is None


def test_the_clean_up_removes_old_runs_then_the_oldest_until_under_the_cap(tmp_path):
    from ui.results import MIN_AGE_S, OutputStore

    root = tmp_path / "results"
    store = OutputStore(root, keep_days=30, max_bytes=2800)
    owner = "user:ada"
    ancient = make_run(store, "erase", owner, age_s=40 * DAY, size=100)
    old = make_run(store, "erase", owner, age_s=20 * DAY, size=1000)
    older_in_use = make_run(store, "personalize", owner, age_s=25 * DAY, size=1000)
    middle = make_run(store, "segment", owner, age_s=10 * DAY, size=1000)
    fresh = make_run(store, "steer", owner, age_s=MIN_AGE_S / 2, size=1000)  # being written, maybe
    other = root / "my-notes"  # not a run: never touched
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with store.in_use(older_in_use):
        removed = store.clean()
    # oldest first: the 40-day run by age; then, over the cap, the 20- and 10-day runs; the
    # 25-day run trains (in use), and the fresh one may be being written
    assert removed == [ancient.name, old.name, middle.name]
    assert older_in_use.exists() and fresh.exists() and (other / "keep.txt").exists()
    assert store.clean() == []  # under the cap now
    unlimited = OutputStore(root, keep_days=0, max_bytes=0)  # 0: keep everything
    keep = make_run(unlimited, "erase", owner, age_s=400 * DAY, size=10_000)
    assert unlimited.clean() == [] and keep.exists()


def test_temporary_files_a_killed_process_left_are_removed_once_stale(tmp_path):
    from ui.results import STALE_TEMP_S, OutputStore

    store = OutputStore(tmp_path / "results")
    run = make_run(store, "erase", "user:ada")
    stale, fresh = run / ".result.ab12.png", run / ".mask.cd34.png"
    stale_dir = run / ".edited.zz"  # a video's temporary folder
    stale_dir.mkdir()
    (stale_dir / "frame.png").write_bytes(b"x")
    for path in (stale, fresh):
        path.write_bytes(b"half written")
    then = time.time() - STALE_TEMP_S - 60
    for path in (stale, stale_dir / "frame.png", stale_dir):
        os.utime(path, (then, then))
    store.clean()
    assert not stale.exists() and not stale_dir.exists() and fresh.exists()
    assert (run / "result.png").exists() and (run / "run.json").exists()


def test_the_results_folder_must_be_a_folder(tmp_path, capsys):
    from tests.app_server import cli_in_process

    (tmp_path / "file").write_text("x")
    code, err = cli_in_process(capsys, "serve", "--output-dir", str(tmp_path / "file"), "--model", "tiny")
    assert code == 2 and err.startswith("error: The results folder cannot be used") and "Traceback" not in err
    code, err = cli_in_process(capsys, "serve", "--keep-results-days", "nan")
    assert code == 2 and "--keep-results-days" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the tab


def _results_handlers(store):
    from ui import results_tab
    from ui.common import AppContext

    ctx = AppContext(default_model="tiny", outputs=store)
    return ctx, results_tab.make_handlers(ctx)


def test_the_results_tab_lists_a_browsers_runs_after_a_reload_and_a_restart(tmp_path):
    from gradio import SelectData

    from ui.results import OutputStore

    root = tmp_path / "results"
    ctx, (register, list_runs, show_run, delete_run) = _results_handlers(OutputStore(root))
    token = register(None, request("page1"))  # a new browser gets its token
    assert len(token) == 32 and register(token, request("page1")) == token
    folder = ctx.new_run_dir("erase", request("page1"), about="SIP, 50 steps, seed 3")
    Image.new("RGB", (64, 64), "red").save(folder / "result.png")
    ctx.new_run_dir("erase", request("someone-else"), about="not yours")

    # a reload is a new page of the same browser; a restart is a new app on the same folder
    ctx2, (register2, list_runs2, show_run2, delete_run2) = _results_handlers(OutputStore(root))
    assert register2(token, request("page2")) == token
    table, names, note = list_runs2(token, request("page2"))
    assert names == [folder.name] and "1 run(s)" in note, note
    assert table[0][1:] == ["Remove object", "SIP, 50 steps, seed 3", 1]
    select = SelectData(None, {"index": [0, 2], "value": "x"})
    chosen, text, gallery, files, video, reopen, delete = show_run2(names, token, select, request("page2"))
    assert chosen == folder.name and "Remove object" in text
    assert [Path(path).name for path, _ in gallery] == ["result.png"]
    assert reopen["visible"] is False and delete["visible"] is True
    # another browser sees nothing, and cannot open or delete the run by its name
    assert list_runs2("d" * 32, request("page3"))[1] == []
    assert show_run2(names, "d" * 32, select, request("page3"))[0] is None
    delete_run2(folder.name, "d" * 32, request("page3"))
    assert folder.exists()
    delete_run2(folder.name, token, request("page2"))
    assert not folder.exists() and list_runs2(token, request("page2"))[1] == []


@pytest.mark.timeout(300)
def test_a_stopped_training_run_reopens_after_a_restart_and_resumes(tmp_path, monkeypatch):
    """Train stops at step 2 of 4; after a server restart the browser's Results tab lists the run,
    "Open in Personalize" fills the tab with the run's image and settings, and Train resumes
    from step 2 instead of starting over."""
    from gradio import SelectData

    from pipelines.personalize import Trainer
    from ui import personalize_tab, results_tab
    from ui.common import AppContext
    from ui.results import OutputStore

    monkeypatch.setattr(Trainer, "_generate_prior",  # the prior images are not under test
                        lambda self, prompt, index: Image.new("RGB", (64, 64), (40 * index, 90, 120)))
    root = tmp_path / "results"
    ctx = AppContext(default_model="tiny", outputs=OutputStore(root))
    token = results_tab.make_handlers(ctx)[0](None, request("page1"))
    train, _, _ = personalize_tab.make_handlers(ctx)
    photo = Image.new("RGB", (80, 72), "white")
    photo.paste((230, 40, 40), (8, 8, 40, 40))
    photo.paste((40, 40, 230), (44, 30, 76, 66))
    outputs = []
    for output in train("tiny", photo, "cat,dog", "disendiff", 4, 1, 0.0, 7, None, request=request("page1"),
                        progress=lambda *a, **k: None):
        outputs.append(output)
        if output[0].startswith("Step 1/4"):
            ctx.stops.stop(request("page1"), "personalize")  # the Stop button: it stops after the next step
    assert outputs[-1][0].startswith("Stopped at step 2/4"), outputs[-1][0]

    # the server restarts; the same browser opens a new page
    ctx2 = AppContext(default_model="tiny", outputs=OutputStore(root))
    register, list_runs, show_run, _ = results_tab.make_handlers(ctx2)
    register(token, request("page2"))
    _, names, _ = list_runs(token, request("page2"))
    assert len(names) == 1
    _, text, *_, reopen_button, _ = show_run(names, token, SelectData(None, {"index": [0, 0], "value": ""}),
                                              request("page2"))
    assert "trained 2 of 4 steps" in text and reopen_button["visible"] is True
    reopen = results_tab.make_reopen(ctx2, switch=False)  # what connect() wires to the button
    values = reopen(names[0], token, request("page2"))
    model, image, words, method, steps, prior, tau, seed, run_name, status = values[:10]
    assert (model, words, method, steps, prior, seed, run_name) == ("tiny", "cat,dog", "disendiff", 4, 1, 7, names[0])
    assert "trained 2 of 4 steps" in status
    train2, _, _ = personalize_tab.make_handlers(ctx2)
    resumed = list(train2(model, image, words, method, steps, prior, tau, seed, run_name, request=request("page2"),
                          progress=lambda *a, **k: None))
    assert "(resumed from step 2)" in resumed[-1][0] and resumed[-1][0].startswith("Step 4/4"), resumed[-1][0]
    assert resumed[-1][-1] == names[0]  # the same run folder, now complete



# ----------------------------------------------------------------------------- in a browser


@pytest.mark.timeout(600)
def test_a_browser_finds_its_runs_after_a_reload_and_a_server_restart_and_another_browser_does_not(tmp_path):
    from playwright.sync_api import sync_playwright

    from app_server import (VIEWPORT, free_port, generate_attention_maps_in_browser, launch_chromium,
                            launched_app, open_tab, require_browser)

    require_browser()
    port = free_port()
    args = ("--model", "tiny", "--output-dir", str(tmp_path / "results"))
    cells = "#rs-table [role=gridcell]"  # the rows shown (the table's own td rows only size it)

    def listed(page) -> int:
        open_tab(page, "Results")
        page.wait_for_timeout(1000)
        return page.locator(cells).filter(has_text="a red circle").locator("visible=true").count()

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            mine = browser.new_context(viewport=VIEWPORT).new_page()
            with launched_app(*args, port=port) as server:
                generate_attention_maps_in_browser(mine, server.url, prompt="a red circle")
                assert listed(mine) == 1
                mine.reload()
                assert listed(mine) == 1  # a reload: a new page of the same browser
            with launched_app(*args, port=port) as server:  # a restart on the same address
                mine.goto(server.url)
                assert listed(mine) == 1
                mine.locator(cells).filter(has_text="a red circle").locator("visible=true").first.click()
                mine.locator("#rs-gallery img").first.wait_for(state="visible", timeout=30_000)
                assert "Attention maps" in mine.locator("#rs-chosen").inner_text()
                assert "image.png" in mine.locator("#rs-files").inner_text().replace("\n", "")
                other = browser.new_context(viewport=VIEWPORT).new_page()  # another person's browser
                other.goto(server.url)
                assert listed(other) == 0
                assert "No runs yet" in other.locator("#rs-note").inner_text()
        finally:
            browser.close()


def test_the_video_cache_is_cleaned_up_entry_by_entry_with_the_runs(tmp_path):
    from ui.results import OutputStore

    store = OutputStore(tmp_path / "results", keep_days=30)
    cache = store.cache_dir("video-cache")
    old_tune, new_tune = cache / "tune" / "aaa", cache / "tune" / "bbb"
    old_inversion = cache / "inversion" / "aaa.safetensors"
    for folder in (old_tune, new_tune):
        folder.mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"x" * 100)
    old_inversion.parent.mkdir(parents=True)
    old_inversion.write_bytes(b"x" * 100)
    then = time.time() - 40 * DAY
    for path in (old_tune / "weights.safetensors", old_tune, old_inversion):
        os.utime(path, (then, then))
    assert sorted(store.clean()) == ["aaa", "aaa.safetensors"]
    assert new_tune.exists() and not old_tune.exists() and not old_inversion.exists()
    with pytest.raises(ValueError):
        store.cache_dir("../elsewhere")
