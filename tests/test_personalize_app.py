"""Personalize from the outside: the CLI (train, resume, generate, bad input), gradio_client and a
real browser that starts a short training and watches the loss and the maps update."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import (assert_user_error, browser_page, error_badges, launched_app,  # noqa: E402
                        require_browser)
from app_server import run_app as run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_app(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if "--model" not in args:
        args = (*args, "--model", "tiny")  # the CLI's default is the built-in trained model
    return run_cli(*args, cwd=cwd)


def write_photo(path: Path, size=(96, 80)) -> Path:
    rng = np.random.RandomState(0)
    array = (rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)
    array[8:40, 8:40] = [230, 40, 40]
    array[40:72, 50:90] = [40, 40, 230]
    Image.fromarray(array).save(path)
    return path


@pytest.mark.timeout(600)
def test_cli_train_resume_generate_and_bad_input(tmp_path):
    write_photo(tmp_path / "photo.png")
    train = ["personalize", "train", "--image", "photo.png", "--concepts", "cat,dog", "--prior-images", "1",
             "--prior-steps", "2", "--batch-size", "1", "--grad-accum", "1", "--output", "run"]
    proc = run_app(*train, "--steps", "2", "--checkpoint-every", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trained 2 steps" in proc.stdout and (tmp_path / "run" / "learned.safetensors").is_file()
    proc = run_app(*train, "--steps", "3", cwd=tmp_path)  # same folder: resumes
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps, resumed from step 2" in proc.stdout

    gen = ["personalize", "generate", "--concept", "run/learned.safetensors", "--seed", "5", "--steps", "2"]
    proc = run_app(*gen, "--prompt", "a <new1> cat", "--output", "cat.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "seed 5" in proc.stdout
    with Image.open(tmp_path / "cat.png") as image:
        assert image.size == (64, 64)
    assert (tmp_path / "cat.json").is_file()

    proc = run_app("personalize", "train", "--image", "photo.png", "--concepts", "cat,dog", "--method", "attencraft",
                   "--tau", "0.05", "--steps", "1", "--prior-images", "1", "--prior-steps", "2", "--output", "ac",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    # bad input: one sentence each, no traceback, no partial output
    write_photo(tmp_path / "small.png", size=(40, 40))
    assert_user_error(run_app(*gen, "--prompt", "a cat", "--output", "bad.png", cwd=tmp_path), "none of the learned tokens")
    assert_user_error(run_app(*gen, "--prompt", "a <new1> cat", "--output", "bad.png", "--model", "tiny-sd2",
                              cwd=tmp_path), "trained on the model 'tiny'")
    bad_train = ["personalize", "train", "--steps", "1", "--output", "bad"]
    assert_user_error(run_app(*bad_train, "--image", "small.png", "--concepts", "cat,dog", cwd=tmp_path), "at least 64")
    assert_user_error(run_app(*bad_train, "--image", "photo.png", "--concepts", "teddybear,dog", cwd=tmp_path),
                      "single-token word such as 'bear'")
    assert_user_error(run_app(*bad_train, "--image", "photo.png", "--concepts", "cat,dog,bird", "--method",
                              "attencraft", cwd=tmp_path), "at most 2 concepts")
    assert_user_error(run_app(*bad_train, "--image", "photo.png", "--concepts", "cat,bird", "--output", "run",
                              cwd=tmp_path), "other settings")
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def server():
    with launched_app("--model", "tiny") as running:
        yield running


@pytest.mark.timeout(300)
def test_gradio_client_train_generate_upload_and_errors(server, tmp_path):
    from gradio_client import Client, handle_file

    photo = write_photo(tmp_path / "photo.png")
    client = Client(server.url, verbose=False)
    job = client.submit(model="tiny", image=handle_file(str(photo)), class_words="cat,dog", method="disendiff",
                        steps=3, prior_images=1, tau=0.1, seed=0, run_folder="", api_name="/personalize_train")
    outputs = job.result(timeout=240)
    status, maps, masks, learned, folder = outputs
    assert "Step 3/3" in status and "loss" in status
    assert len(maps) == 4 and Path(learned).name == "learned-step3.safetensors"
    updates = job.outputs()
    assert len(updates) >= 3  # one update per step (streamed)

    image, seed, files = client.predict(model="tiny", learned_file=handle_file(learned), run_folder="",
                                        prompt="a <new1> cat", seed=4, steps=2, guidance=0,
                                        api_name="/personalize_generate")
    assert seed == 4
    with Image.open(image) as im:
        assert im.size == (64, 64)
    # same settings and folder: resumes (already done)
    status, *_ = client.predict(model="tiny", image=handle_file(str(photo)), class_words="cat,dog",
                                method="disendiff", steps=3, prior_images=1, tau=0.1, seed=0, run_folder=folder,
                                api_name="/personalize_train")
    assert "Already trained 3 steps" in status
    # cancel keeps the last checkpoint: a long run is cancelled after its step-50 checkpoint,
    # and the same settings then resume from it
    long = dict(model="tiny", image=handle_file(str(photo)), class_words="cat,dog", method="disendiff",
                steps=2000, prior_images=1, tau=0.1, seed=1)
    job = client.submit(**long, run_folder="", api_name="/personalize_train")
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        outs = [o for o in job.outputs() if isinstance(o, (list, tuple))]
        done = re.search(r"Step (\d+)/", outs[-1][0]) if outs else None
        if done and int(done.group(1)) > 52:
            break
        time.sleep(0.2)
    run_folder = outs[-1][4]
    job.cancel()
    time.sleep(2)
    # the run is named, never located by a server path; resuming it proves the checkpoint is there
    assert run_folder.startswith("personalize-") and "/" not in run_folder, run_folder
    resumed = client.submit(**dict(long, steps=51), run_folder=run_folder, api_name="/personalize_train")
    status = resumed.result(timeout=120)[0]
    assert "resumed from step 50" in status and "Step 51/51" in status, status

    for kwargs, fragment in ((dict(class_words="teddybear,dog"), "single-token"),
                             (dict(class_words="cat"), "at least 2")):
        args = dict(model="tiny", image=handle_file(str(photo)), class_words="cat,dog", method="disendiff",
                    steps=1, prior_images=0, tau=0.1, seed=0, run_folder="")
        args.update(kwargs)
        with pytest.raises(Exception) as caught:
            client.predict(**args, api_name="/personalize_train")
        assert fragment in str(caught.value)
    with pytest.raises(Exception) as caught:
        client.predict(model="tiny", learned_file=handle_file(learned), run_folder="", prompt="a cat", seed=4,
                       steps=2, guidance=0, api_name="/personalize_generate")
    assert "learned tokens" in str(caught.value)


@pytest.mark.timeout(300)
def test_the_cancel_endpoint_stops_a_run_at_a_step_and_loses_nothing(server, tmp_path):
    """An API client names the run (streamed from the first update) to /personalize_cancel; the
    run stops after its current step with a checkpoint there, and the same settings resume from
    exactly that step (not from the last periodic checkpoint)."""
    from gradio_client import Client, handle_file

    photo = write_photo(tmp_path / "photo.png")
    client = Client(server.url, verbose=False)
    long = dict(model="tiny", image=handle_file(str(photo)), class_words="cat,dog", method="disendiff",
                steps=2000, prior_images=1, tau=0.1, seed=2)
    job = client.submit(**long, run_folder="", api_name="/personalize_train")
    deadline, name = time.monotonic() + 200, None
    while time.monotonic() < deadline:
        outs = [o for o in job.outputs() if isinstance(o, (list, tuple))]
        if outs:
            name = outs[-1][4]
            done = re.search(r"Step (\d+)/", outs[-1][0])
            if done and int(done.group(1)) >= 3:
                break
        time.sleep(0.2)
    assert name and name.startswith("personalize-"), outs
    assert "Stopping" in client.predict(run_folder=name, api_name="/personalize_cancel")
    status = job.result(timeout=120)[0]
    stopped = re.search(r"Stopped at step (\d+)/2000", status)
    assert stopped, status
    step = int(stopped.group(1))
    assert 3 <= step < 50, status  # before the first periodic checkpoint: only the stop saved it
    assert "No training" in client.predict(run_folder=name, api_name="/personalize_cancel")
    resumed = client.submit(**dict(long, steps=step + 1), run_folder=name, api_name="/personalize_train")
    status = resumed.result(timeout=120)[0]
    assert f"resumed from step {step}" in status and f"Step {step + 1}/{step + 1}" in status, status


@pytest.mark.timeout(300)
def test_personalize_tab_in_a_real_browser(server, tmp_path):
    require_browser()
    from playwright.sync_api import expect

    photo = write_photo(tmp_path / "photo.png")
    with browser_page(server.url, viewport={"width": 1280, "height": 1400}) as page:
        page.get_by_role("tab", name="Personalize").click()
        page.locator("#pz-image input[type=file]").set_input_files(str(photo))
        page.locator("#pz-steps input").fill("40")
        page.locator("#pz-settings").get_by_text("Training settings").click()  # closed at first
        page.locator("#pz-prior input").fill("1")
        page.locator("#pz-train").click()
        seen: set[str] = set()
        map_sources: set[str] = set()
        first_map = page.locator("#pz-maps img").first
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            text = page.locator("#pz-status").inner_text()
            if "Step" in text:
                seen.add(text.split("·")[0].strip())
            if first_map.count():
                source = first_map.get_attribute("src")
                if source:
                    map_sources.add(source)
            if "Step 40/40" in text:
                break
            time.sleep(0.05)
        assert "Step 40/40" in text and "loss" in text, text
        assert len(seen) >= 2, seen  # the loss line updated while training
        assert len(map_sources) >= 2, map_sources  # and so did the attention maps
        expect(page.locator("#pz-maps img")).to_have_count(4, timeout=30_000)
        expect(page.locator('#pz-learned-out a[href$=".safetensors"]')).to_have_count(1)
        page.locator("#pz-gen-steps input").fill("2")
        expect(page.locator("#pz-seed-row")).to_be_hidden()  # no "Seed used 0" before a generation
        page.locator("#pz-generate").click()
        expect(page.locator("#pz-result img")).to_have_count(1, timeout=120_000)
        expect(page.locator("#pz-seed-row")).to_be_visible()
        assert page.locator("#pz-seed-used input").input_value() == "42"
        page.locator("#pz-seed input").fill("-1")
        page.locator("#pz-reuse-seed").click()
        expect(page.locator("#pz-seed input")).to_have_value("42")


@pytest.mark.timeout(300)
def test_cancel_without_a_name_stops_this_clients_run_only(server, tmp_path):
    """/personalize_cancel with no run name stops the training of the calling client (its
    session), at a step with a checkpoint; another client's cancel finds nothing of its own."""
    from gradio_client import Client, handle_file

    photo = write_photo(tmp_path / "photo.png")
    client, other = Client(server.url, verbose=False), Client(server.url, verbose=False)
    job = client.submit(model="tiny", image=handle_file(str(photo)), class_words="cat,dog", method="disendiff",
                        steps=2000, prior_images=1, tau=0.1, seed=3, run_folder="", api_name="/personalize_train")
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        outs = [o for o in job.outputs() if isinstance(o, (list, tuple))]
        if outs and re.search(r"Step (\d+)/", outs[-1][0]):
            break
        time.sleep(0.2)
    assert "Nothing of yours" in other.predict(run_folder="", api_name="/personalize_cancel")
    asked = time.monotonic()
    assert "Stopping" in client.predict(run_folder="", api_name="/personalize_cancel")
    status = job.result(timeout=120)[0]
    assert re.search(r"Stopped at step \d+/2000 \(checkpoint saved\)", status), status
    assert time.monotonic() - asked < 60  # one training step: about 0.1 s here


# ----------------------------------------------------------------------------- the tab's defaults, progress, layout


def _controls(tmp_path, model: str) -> dict:
    import gradio as gr

    from ui.common import AppContext, OutputStore
    from ui.personalize_tab import build_tab

    ctx = AppContext(default_model=model, outputs=OutputStore(tmp_path / model))
    with gr.Blocks() as demo:
        build_tab(ctx)
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_the_tab_starts_with_words_steps_and_a_prompt_the_model_can_draw(tmp_path):
    from ui import personalize_tab as tab

    builtin = _controls(tmp_path, "builtin")  # the shapes world: no cats, and a CPU
    assert builtin["pz-classes"].value == "circle,square" and builtin["pz-steps"].value == tab.UI_BUILTIN_STEPS
    assert builtin["pz-prompt"].value == builtin["pz-prompt"].placeholder == "a <new1> circle on a striped background"
    other = _controls(tmp_path, "tiny")  # any other model: the paper's
    assert other["pz-classes"].value == "cat,dog" and other["pz-steps"].value == 250
    assert other["pz-prompt"].value == "a <new1> cat on the beach"
    # every long job has a Stop (Train's keeps its id and endpoint, personalize_cancel)
    assert builtin["pz-cancel"].value == builtin["pz-generate-stop"].value == "Stop"
    assert builtin["pz-seed-row"].visible is False  # no "Seed used 0" before a generation


def test_the_suggestions_follow_the_model_menu_unless_the_user_edited_them():
    from ui.personalize_tab import follow_model

    words, prompt, steps = follow_model("tiny", "circle,square", "a <new1> circle on a striped background", 100)
    assert (words["value"], words["placeholder"]) == ("cat,dog", "cat,dog")
    assert prompt["value"] == prompt["placeholder"] == "a <new1> cat on the beach"
    assert steps["value"] == 250
    words, prompt, steps = follow_model("builtin", "cat,dog", "", 250.0)  # an empty box is not an edit
    assert (words["value"], prompt["value"], steps["value"]) == ("circle,square",
                                                                  "a <new1> circle on a striped background", 100)
    # the user's own words, prompt and steps stay; only the placeholders change
    words, prompt, steps = follow_model("builtin", "bear,cup", "a <new2> cup", 30)
    assert "value" not in words and "value" not in prompt and words["placeholder"] == "circle,square"
    assert steps == {"__type__": "update"}  # gr.skip()


@pytest.mark.timeout(300)
def test_the_progress_bar_names_each_stage(tmp_path, monkeypatch):
    """Preparing the prior images counts images ("preparing 2 prior images 1/2"), then AttenCraft's
    masks, then training counts optimiser steps, and generation counts its denoising steps: no
    stage shows another's count."""
    from pipelines.personalize import Trainer
    from tests.app_server import built_tab
    from ui import personalize_tab

    _, ctx = built_tab(personalize_tab.build_tab, tmp_path / "outputs")
    train, generate, _ = personalize_tab.make_handlers(ctx)
    # the prior images' sampling is not under test: a flat image each, at once
    monkeypatch.setattr(Trainer, "_generate_prior",
                        lambda self, prompt, index: Image.new("RGB", (64, 64), (40 * index, 90, 120)))
    calls = []

    def progress(value, desc=None, total=None, unit="steps"):
        calls.append((value, desc, unit))

    with Image.open(write_photo(tmp_path / "photo.png")) as photo:
        outputs = list(train("tiny", photo.convert("RGB"), "cat,dog", "attencraft", 2, 2, 0.0, 0, None,
                             progress=progress))
    assert "Step 2/2" in outputs[-1][0], outputs[-1][0]
    stages = list(dict.fromkeys(desc for _, desc, _ in calls))
    assert stages == ["loading the model", "preparing 2 prior images", "preparing AttenCraft's masks", "training"]
    by_stage = {stage: [(value, unit) for value, desc, unit in calls if desc == stage] for stage in stages}
    assert ((1, 2), "images") in by_stage["preparing 2 prior images"]
    assert by_stage["preparing 2 prior images"][-1] == ((2, 2), "images")
    assert by_stage["training"][-1] == ((2, 2), "steps") and ((1, 2), "steps") in by_stage["training"]

    calls.clear()
    image, seed, _ = generate("tiny", None, outputs[-1][4], "a <new1> cat", 4, 3, 0, progress=progress)
    assert seed == 4
    assert list(dict.fromkeys(desc for _, desc, _ in calls)) == ["loading the model", "generating"]
    steps = [value for value, desc, _ in calls if desc == "generating"]
    assert steps[:3] == [(0, 3), (1, 3), (2, 3)] and all(total == 3 for _, total in steps)


@pytest.mark.timeout(300)
def test_the_tab_opens_with_its_examples_in_view(server):
    """At 1400x900 the examples' table fits its column (tests/test_browser_tabs.py checks that the
    first example is on screen and nothing sticks out sideways, for every tab), and a refused
    run leaves no "Error" badge."""
    require_browser()
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="Personalize").click()
        page.locator("#pz-examples tbody tr").first.wait_for(state="visible", timeout=30_000)
        table = page.evaluate("(() => { const t = document.querySelector('#pz-examples table');"
                              " return [t.scrollWidth, t.parentElement.clientWidth]; })()")
        assert table[0] <= table[1], table  # the table fits its box: no sideways scrolling
        # a refused run (no image) is one notice; no output keeps an "Error" badge
        page.locator("#pz-train").click()
        page.locator(".toast-title.error").first.wait_for(state="visible", timeout=30_000)
        page.wait_for_timeout(1500)
        assert error_badges(page) == 0
