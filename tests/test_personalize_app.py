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
from app_server import assert_user_error, launch_chromium, launched_app, require_browser  # noqa: E402
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
    from playwright.sync_api import expect, sync_playwright

    photo = write_photo(tmp_path / "photo.png")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.get_by_role("tab", name="Personalize").click()
            page.locator("#pz-image input[type=file]").set_input_files(str(photo))
            page.locator("#pz-steps input").fill("40")
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
            page.locator("#pz-generate").click()
            expect(page.locator("#pz-result img")).to_have_count(1, timeout=120_000)
            assert page.locator("#pz-seed-used input").input_value() == "42"
            assert not errors, errors
        finally:
            browser.close()


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
