"""Counterfactual steer from the outside: the CLI, gradio_client and a real browser (tiny models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_user_error, built_tab, launch_chromium, launched_app, require_browser, run_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = dict(model="tiny-pixart", positive="a photo of a cat", negative="a photo of a dog", samples=2, steps=2,
            guidance=4.5, width=64, height=64)


@pytest.mark.timeout(300)
def test_cli_directions_pairs_resume_and_bad_input(tmp_path):
    model = ["--model", "tiny-pixart"]
    proc = run_app("steer", "directions", "--positive", "a cat", "--negative", "a dog", "--samples", "2",
                   "--steps", "2", "--output", "d.safetensors", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.safetensors").is_file() and "2 steps x 2 layers" in proc.stdout

    proc = run_app("steer", "pairs", "--directions", "d.safetensors", "--prompt", "a cat", "--beta", "2",
                   "--seeds", "0-1", "--output", "out", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 pairs written, 0 already done" in proc.stdout
    proc = run_app("steer", "pairs", "--directions", "d.safetensors", "--prompt", "a cat", "--beta", "2",
                   "--seeds", "0-2", "--output", "out", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 pairs written, 2 already done" in proc.stdout
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [0, 1, 2] and all(m["beta"] == 2.0 for m in manifest)
    for name in ("orig_seed2.png", "steered_seed2.png", "diff_seed2.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == (64, 64)

    # bad input: one sentence each, no traceback, no partial output file
    pairs = ["steer", "pairs", "--directions", "d.safetensors", "--prompt", "a cat", "--output", "bad"]
    assert_user_error(run_app(*pairs, "--beta", "12", *model, cwd=tmp_path), "beta must be between 0 and 10")
    assert_user_error(run_app(*pairs, "--model", "tiny", cwd=tmp_path), "made for tiny-pixart")
    (tmp_path / "junk.safetensors").write_text("hello")
    assert_user_error(run_app("steer", "pairs", "--directions", "junk.safetensors", "--prompt", "a cat",
                              "--output", "bad", *model, cwd=tmp_path), "not a readable directions file")
    assert_user_error(run_app("steer", "directions", "--positive", "a cat", "--negative", "a cat",
                              "--output", "same.safetensors", *model, cwd=tmp_path), "identical")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "same.safetensors").exists()


@pytest.fixture(scope="module")
def server():
    with launched_app("--model", "tiny") as running:
        yield running


@pytest.mark.timeout(600)
def test_gradio_client_directions_pair_upload_and_errors(server):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    status, path = client.predict(**PAIR, api_name="/steer_directions")
    assert "estimated now" in status and path.endswith(".safetensors")
    status, _ = client.predict(**PAIR, api_name="/steer_directions")
    assert "from the cache" in status

    original, steered, heatmap, seed, files, status = client.predict(
        **PAIR, directions_file=None, prompt="a photo of a cat", seed=5, randomize_seed=False, beta=2.0,
        steer="both", api_name="/steer_pair")
    assert seed == 5 and "from the cache" in status
    with Image.open(original) as a, Image.open(steered) as b, Image.open(heatmap) as h:
        assert a.size == b.size == h.size == (64, 64)
        assert a.tobytes() != b.tobytes()
    assert sorted(Path(f).name for f in files) == ["diff_seed5.png", "orig_seed5.png", "pair_seed5.json",
                                                   "steered_seed5.png"]

    # uploaded directions; beta 0 gives two identical images
    original, steered, *_ , status = client.predict(
        **dict(PAIR, positive="", negative=""), directions_file=handle_file(path), prompt="a photo of a cat",
        seed=5, randomize_seed=False, beta=0.0, steer="both", api_name="/steer_pair")
    assert "uploaded file" in status
    with Image.open(original) as a, Image.open(steered) as b:
        assert a.tobytes() == b.tobytes()

    for bad, fragment in ((dict(beta=11.0), "11"), (dict(prompt=" "), "prompt to steer")):
        args = dict(PAIR, directions_file=None, prompt="a cat", seed=0, randomize_seed=False, beta=2.0,
                    steer="both")
        args.update(bad)
        with pytest.raises(Exception) as caught:
            client.predict(**args, api_name="/steer_pair")
        assert fragment in str(caught.value) and "Traceback" not in str(caught.value)
    with pytest.raises(Exception) as caught:
        client.predict(**dict(PAIR, negative=PAIR["positive"]), api_name="/steer_directions")
    assert "identical" in str(caught.value)
    with pytest.raises(Exception) as caught:  # a PixArt file on the SD model
        client.predict(**dict(PAIR, model="tiny"), directions_file=handle_file(path), prompt="a cat", seed=0,
                       randomize_seed=False, beta=2.0, steer="both", api_name="/steer_pair")
    assert "made for tiny-pixart" in str(caught.value)


@pytest.mark.timeout(600)
def test_steer_tab_in_a_real_browser(server):
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.get_by_role("tab", name="Counterfactual steer").click()
            page.locator("#st-positive textarea").fill("a photo of a cat")
            page.locator("#st-negative textarea").fill("a photo of a dog")
            page.locator("#st-samples input").fill("2")
            page.locator("#st-steps input").fill("2")
            page.locator("#st-width input").fill("64")
            page.locator("#st-height input").fill("64")
            page.locator("#st-prompt textarea").fill("a photo of a cat")
            page.locator("#st-seed input").fill("3")
            page.locator("#st-generate").click()
            for elem in ("st-original", "st-steered", "st-heatmap"):
                expect(page.locator(f"#{elem} img")).to_have_count(1, timeout=120_000)
            expect(page.locator("#st-status")).to_contain_text("estimated now")
            assert page.locator("#st-seed-used input").input_value() == "3"
            expect(page.locator('#st-files a[href$="steered_seed3.png"]')).to_have_count(1)
            page.locator("#st-estimate").click()
            expect(page.locator("#st-status")).to_contain_text("from the cache", timeout=60_000)
            expect(page.locator('#st-directions-out a[href$="directions.safetensors"]')).to_have_count(1)
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_the_tabs_zero_guidance_and_size_mean_the_models(tmp_path):
    """What a browser sends for the untouched guidance and size boxes (0) estimates with the
    model's guidance and size, not with CFG 0."""
    from pipelines.steering import Directions
    from ui.steer_tab import build_tab, make_handlers

    controls, ctx = built_tab(build_tab, tmp_path)
    assert controls["st-guidance"].value == controls["st-width"].value == controls["st-height"].value == 0
    steer_directions, _ = make_handlers(ctx)
    status, path = steer_directions("tiny", "a red circle", "a blue circle", 1, 2, 0, 0, 0,
                                    progress=lambda *a, **k: None)
    meta = Directions.load(path).meta
    assert meta["guidance"] == 7.5 and "estimated now" in status
