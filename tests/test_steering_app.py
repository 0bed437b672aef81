"""Counterfactual steer from the outside: the CLI, gradio_client and a real browser (tiny models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_user_error, built_tab, browser_page, launched_app, require_browser, run_app, shown_box  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = dict(model="tiny-pixart", positive="a photo of a cat", negative="a photo of a dog", samples=2, steps=2,
            guidance=4.5, width=64, height=64)


def test_the_prompt_pair_flags_say_what_they_are_and_the_papers_names_still_work():
    # "--negative" would read as a Stable Diffusion negative prompt; MedSteer's names stay aliases
    import argparse

    from ui.steer_cli import add_steer_args

    parser = argparse.ArgumentParser()
    add_steer_args(parser)
    rest = ["--output", "d.safetensors"]
    ours = parser.parse_args(["directions", "--concept", "a cat", "--replacement", "a dog", *rest])
    papers = parser.parse_args(["directions", "--positive", "a cat", "--negative", "a dog", *rest])
    assert (ours.positive, ours.negative) == (papers.positive, papers.negative) == ("a cat", "a dog")


@pytest.mark.timeout(300)
def test_cli_directions_pairs_resume_and_bad_input(tmp_path):
    model = ["--model", "tiny-pixart"]
    proc = run_app("steer", "directions", "--concept", "a cat", "--replacement", "a dog", "--samples", "2",
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
    """At 1400 x 900: the examples open above the fold, no "Seed used" before a run, a failed run
    leaves no "Error" badge, the pair shows at 256 px or more."""
    require_browser()
    from playwright.sync_api import expect

    with browser_page(server.url) as page:
        page.get_by_role("tab", name="Counterfactual steer").click()
        examples = page.locator("#st-examples").bounding_box()
        assert examples and examples["y"] + examples["height"] <= 900, examples
        expect(page.locator("#st-seed-used")).to_be_hidden()
        expect(page.locator("#st-positive textarea")).to_have_attribute("placeholder",
                                                                       "a red circle on a striped background")
        page.locator("#st-generate").click()  # nothing typed: one notice, no badge on the outputs
        expect(page.locator(".toast-body")).to_contain_text("Please enter the concept to remove")
        page.wait_for_timeout(500)
        for elem in ("st-original", "st-steered", "st-heatmap", "st-status", "st-files"):
            assert "Error" not in page.locator(f"#{elem}").inner_text(), elem
        page.locator("#st-positive textarea").fill("a photo of a cat")
        page.locator("#st-negative textarea").fill("a photo of a dog")
        page.locator("#st-prompt textarea").fill("a photo of a cat")
        page.locator("#st-settings").get_by_text("Settings").click()
        page.locator("#st-samples input").fill("2")
        page.locator("#st-steps input").fill("2")
        page.locator("#st-width input").fill("64")
        page.locator("#st-height input").fill("64")
        page.locator("#st-seed input").fill("3")
        page.locator("#st-generate").click()
        for elem in ("st-original", "st-steered", "st-heatmap"):
            expect(page.locator(f"#{elem} img")).to_have_count(1, timeout=120_000)
            box = shown_box(page.locator(f"#{elem} img"))
            assert box["width"] >= 256 and box["height"] >= 256, (elem, box)
        expect(page.locator("#st-status")).to_contain_text("estimated now")
        expect(page.locator("#st-seed-used")).to_be_visible()
        assert page.locator("#st-seed-used input").input_value() == "3"
        expect(page.locator('#st-files a[href$="steered_seed3.png"]')).to_have_count(1)
        page.locator("#st-directions").get_by_text("Directions file").click()
        page.locator("#st-estimate").click()
        expect(page.locator("#st-status")).to_contain_text("from the cache", timeout=60_000)
        expect(page.locator('#st-directions-out a[href$="directions.safetensors"]')).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_tabs_words_placeholders_and_results(tmp_path):
    """The two concepts have task names ("negative prompt" keeps its usual meaning: it is not
    on the tab), the placeholders follow the model, the results are large with sharp pixels."""
    import gradio as gr

    from ui.steer_tab import EXAMPLE_LABELS, EXAMPLES, PAPER_PLACEHOLDERS, SHAPES_PLACEHOLDERS, build_tab, placeholder_updates

    controls, _ = built_tab(build_tab, tmp_path)
    assert controls["st-positive"].label.startswith("Concept to remove")
    assert controls["st-negative"].label.startswith("Replace with")
    labels = [str(getattr(block, "label", "") or "") for block in controls.values()]
    assert not [label for label in labels if "negative" in label.lower()], labels
    assert (controls["st-positive"].placeholder, controls["st-negative"].placeholder,
            controls["st-prompt"].placeholder) == SHAPES_PLACEHOLDERS  # the tiny and built-in models
    assert tuple(update.placeholder for update in placeholder_updates("builtin")) == SHAPES_PLACEHOLDERS
    assert tuple(update.placeholder for update in placeholder_updates("PixArt-alpha/PixArt-XL-2-512x512")) == \
        PAPER_PLACEHOLDERS
    for elem in ("st-original", "st-steered", "st-heatmap"):
        assert "pixel-result" in controls[elem].elem_classes and controls[elem].height >= 256, elem
    assert len(EXAMPLE_LABELS) == len(EXAMPLES) and "st-examples" in controls
    row = controls["st-seed-row"]
    assert isinstance(row, gr.Row) and row.visible is False  # no "Seed used: 0" before a run


@pytest.mark.timeout(300)
def test_the_tab_speaks_of_the_concepts_and_names_its_progress(tmp_path):
    from pipelines.errors import UserInputError
    from ui.steer_tab import make_handlers

    steer_directions, steer_pair = make_handlers(built_tab(lambda ctx: None, tmp_path)[1])
    quiet = dict(progress=lambda *a, **k: None)
    with pytest.raises(Exception, match="Please enter the concept to remove"):
        steer_directions("tiny", " ", "a blue circle", 1, 2, 0, 0, 0, **quiet)
    with pytest.raises(Exception, match="Please enter what replaces it"):
        steer_directions("tiny", "a red circle", "", 1, 2, 0, 0, 0, **quiet)
    with pytest.raises(Exception, match="concept to remove and its replacement are identical"):
        steer_directions("tiny", "a red circle", "A red  circle", 1, 2, 0, 0, 0, **quiet)
    assert UserInputError  # the handlers turn it into gr.Error (one sentence)

    stages = []

    def progress(value, desc=None, **_):
        stages.append((value, desc))

    *_, status = steer_pair("tiny", "a red circle", "a blue circle", 2, 2, 0, 64, 64, None, "a red circle", 0,
                            False, 2.0, "both", progress=progress)
    descs = [desc for _, desc in stages]
    assert descs[0] == "Loading the model" and "estimated now" in status
    assert "Estimating the direction: sampling 2/4 (step 1/2)" in descs
    assert "Estimating the direction: sampling 4/4 (step 2/2)" in descs
    # the tiny model's PNDM scheduler calls the model 3 times for 2 steps: counted in steps
    assert descs[descs.index("Generating the pair"):] == ["Generating the pair", "Generating the pair: step 1/2",
                                                          "Generating the pair: step 1/2",
                                                          "Generating the pair: step 2/2"]
    assert all(value is None or 0 <= value <= 1 for value, _ in stages)


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
