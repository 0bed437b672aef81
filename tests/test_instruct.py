"""Instruction edit (SaaS on InstructPix2Pix): the world's exact edits, the task's contract, the
built-in edit model, the CLI, the API and the tab in a real browser.

The attention mechanism itself (spans, Otsu, gains, bias identity, untouched rows) is specified
in tests/test_saas_attention.py; here it is the task around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_user_error, browser_page, launched_app, require_browser, run_app  # noqa: E402

from pipelines.builtin import world  # noqa: E402
from pipelines.errors import UserInputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=4)  # a few steps keep these tests quick; quality is benchmarks/quality.py's job


# ----------------------------------------------------------------------------- the world's edits


def test_world_edits_are_exact_and_their_checker_tells_done_from_not_done():
    """Every part of an edit passes the checker on the exact edited scene, at any size, and no
    part passes on the untouched source: the checker measures the edit, not the scene."""
    counts = {1: 0, 2: 0, 3: 0}
    for edit in world.edits(0, 300):
        counts[len(edit.parts)] += 1
        assert all(world.check_edit(edit, edit.target.render(64)))
        assert all(world.check_edit(edit, edit.target.render(128)))
        assert not any(world.check_edit(edit, edit.source.render(64))), edit.instruction
        assert world.edit_preservation_error(edit, edit.target.render(64)) == 0.0
        # doing nothing costs nothing outside the edited parts: only the parts' checks fail
        assert world.edit_preservation_error(edit, edit.source.render(64)) == 0.0
    assert min(counts.values()) >= 60, counts  # every part count is well represented
    assert world.make_edit(123) == world.make_edit(123) and world.make_edit(123) != world.make_edit(124)
    assert world.make_edit(5).source == world.make_scene(5, len(world.make_edit(5).source.objects))


def test_world_edit_parts_are_what_the_task_splits():
    from pipelines.instruct import instruction_parts

    for edit in world.edits(world.TEST_SEED_START, 100):
        assert instruction_parts(edit.instruction) == [part.text for part in edit.parts]


def test_preservation_error_counts_only_pixels_no_part_may_change():
    edit = next(e for e in world.edits(world.TEST_SEED_START, 50)
                if len(e.source.objects) >= 2 and all(p.kind == "colour" for p in e.parts) and len(e.parts) == 1)
    source = edit.source.render(64)
    # leaving the named object alone costs nothing here (its pixels are not counted) ...
    assert world.edit_preservation_error(edit, source) == 0.0
    # ... while repainting an object no part names does
    other = next(i for i in range(len(edit.source.objects)) if i != edit.parts[0].target)
    damaged = source.copy()
    damaged[edit.source.mask(other, 64)] = (0, 0, 0)
    assert world.edit_preservation_error(edit, damaged) > 0.01


# ----------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def edit_pipe():
    from pipelines import models

    return models.load("builtin-edit")


def test_builtin_edit_is_an_instruct_pix2pix_model_that_text_to_image_tasks_refuse(edit_pipe):
    from pipelines import backbones, models
    from pipelines.attention_maps import generate_with_attention_maps

    assert backbones.of(edit_pipe) is backbones.INSTRUCT_PIX2PIX
    assert models.denoiser(edit_pipe).config.in_channels == 8
    assert backbones.of(edit_pipe).row_roles(edit_pipe, 7.5, 1.5) == ("cond", "image", "uncond")
    size = sum(p.stat().st_size for p in models.BUILTIN_EDIT_DIR.rglob("*.safetensors"))
    assert size <= 40e6, size
    card = json.loads((models.BUILTIN_EDIT_DIR / "training.json").read_text())
    assert card["inference_defaults"]["image_guidance_scale"] == 1.5
    with pytest.raises(UserInputError, match="not with this InstructPix2Pix"):
        generate_with_attention_maps(edit_pipe, "a red circle", seed=0)


def test_one_seed_gives_the_same_edit_and_plain_is_the_stock_pipeline(edit_pipe):
    import torch

    from pipelines.instruct import edit_by_instruction

    edit = world.make_edit(1_095_003)
    source = Image.fromarray(edit.source.render(64))
    first = edit_by_instruction(edit_pipe, source, edit.instruction, seed=3, **FAST)
    again = edit_by_instruction(edit_pipe, source, edit.instruction, seed=3, **FAST)
    assert np.array_equal(np.asarray(first.edited), np.asarray(again.edited))
    assert first.parts == [p.text for p in edit.parts] and first.seed == 3
    stock = edit_pipe(prompt=edit.instruction, image=source, num_inference_steps=4,
                      guidance_scale=7.5, image_guidance_scale=1.5, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(first.plain), np.asarray(stock))
    # SaaS acted: masks and gains for steps 1..ceil(0.4 * 4) = 2, and a different image
    assert first.params["saas_steps"] and set(first.params["saas_steps"]) <= {1, 2}
    assert all(len(g) == 2 and all(1.0 <= x <= 3.0 for x in g) for g in first.gains)
    assert first.masks[0].shape[0] == 2 and first.masks[0].any()
    assert not np.array_equal(np.asarray(first.edited), np.asarray(first.plain))


def test_saas_off_is_plain_sampling_and_one_part_says_saas_changes_nothing(edit_pipe):
    from pipelines.instruct import edit_by_instruction

    image = world.make_edit(1_095_003).source.render(64)
    off = edit_by_instruction(edit_pipe, image, "make the circle orange, and make the triangle purple", seed=1,
                              saas=False, **FAST)
    on = edit_by_instruction(edit_pipe, image, "make the circle orange, and make the triangle purple", seed=1, **FAST)
    assert off.plain is None and not off.masks
    assert np.array_equal(np.asarray(off.edited), np.asarray(on.plain))
    one = edit_by_instruction(edit_pipe, image, "make the circle orange", seed=1, **FAST)
    assert one.notes and "one part" in one.notes[0]
    alone = edit_by_instruction(edit_pipe, image, "make the circle orange", seed=1, compare=False, **FAST)
    assert alone.plain is None  # no baseline asked for: the SaaS loop itself ran
    assert np.array_equal(np.asarray(one.edited), np.asarray(one.plain))
    assert np.array_equal(np.asarray(alone.edited), np.asarray(one.plain))


def test_one_part_is_still_boosted_by_a_rule_that_does_not_equalize(edit_pipe):
    """Only `equalize` at scale 1 leaves a single part alone; a fixed gain boosts it."""
    from pipelines.instruct import edit_by_instruction

    image = world.make_edit(1_095_003).source.render(64)
    fixed = edit_by_instruction(edit_pipe, image, "make the circle orange", seed=1, gain="fixed", max_gain=4, **FAST)
    assert not fixed.notes and fixed.params["gain"] == "fixed" and fixed.params["saas_steps"]
    assert all(g == [4.0] for g in fixed.gains)
    assert not np.array_equal(np.asarray(fixed.edited), np.asarray(fixed.plain))


def test_any_aspect_is_edited_at_the_models_side_on_its_grid(edit_pipe):
    from pipelines.instruct import edit_by_instruction

    wide = Image.fromarray(world.make_scene(7).render(128)).resize((192, 96))
    result = edit_by_instruction(edit_pipe, wide, "make the background white, make the circle red", seed=0, **FAST)
    assert result.edited.size == (64, 32) == result.source.size == result.plain.size
    if result.masks:
        assert result.masks[0].shape[1:] == (8, 16)  # the 16x16 grid of a 64 px square, halved in height


@pytest.mark.parametrize("instruction, fragment", [
    ("", "Please write an instruction"),
    ("   ", "Please write an instruction"),
    ("make the circle blue, , make the square red", "Part 2 of the instruction is empty"),
    (", ".join(["make the circle blue"] * 9), "at most 8"),
    ("make the circle blue " * 40, "tokens long"),
])
def test_bad_instructions_get_one_sentence(edit_pipe, instruction, fragment):
    from pipelines.instruct import edit_by_instruction

    with pytest.raises(UserInputError) as caught:
        edit_by_instruction(edit_pipe, world.make_scene(1).render(64), instruction, seed=0, **FAST)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_bad_images_models_and_settings_get_one_sentence(edit_pipe):
    from pipelines import models
    from pipelines.instruct import edit_by_instruction

    ok = "make the circle blue, and make the square red"
    cases = [
        (lambda: edit_by_instruction(edit_pipe, np.zeros((1, 1, 3), np.uint8), ok), "at least"),
        (lambda: edit_by_instruction(edit_pipe, None, ok), "Please provide an image"),
        (lambda: edit_by_instruction(models.load("tiny"), world.make_scene(1).render(64), ok),
         "works with InstructPix2Pix, OmniGen and FLUX Kontext models"),
        (lambda: edit_by_instruction(edit_pipe, world.make_scene(1).render(64), ok, window=0), "above 0"),
        (lambda: edit_by_instruction(edit_pipe, world.make_scene(1).render(64), ok, gain="loud"), "one of"),
        (lambda: edit_by_instruction(edit_pipe, world.make_scene(1).render(64), ok, image_guidance=float("nan")),
         "finite"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserInputError) as caught:
            call()
        assert fragment in str(caught.value), (fragment, str(caught.value))


@pytest.mark.timeout(600)
def test_the_tab_names_each_run_and_step_on_its_progress_bar(tmp_path):
    """Progress names the stage: plain sampling (the comparison) first, then SaaS, by step."""
    from ui.common import AppContext, OutputStore
    from ui.instruct_tab import make_handler

    seen = []
    handler = make_handler(AppContext(outputs=OutputStore(tmp_path)))
    edit = world.make_edit(1_095_003)  # two parts
    handler("builtin-edit", Image.fromarray(edit.source.render(64)), edit.instruction, 0, False, True, 3,
            progress=lambda value, desc=None, **_: seen.append((value, desc)))
    named = [desc for _, desc in seen if desc and "step" in desc]
    assert named[0] == "plain editing, for comparison: step 1/3", seen
    assert named[-1] == "editing with SaaS: step 3/3", seen
    fractions = [value for value, desc in seen if desc in named]
    assert fractions == sorted(fractions) and 0 <= fractions[0] < fractions[-1] <= 1


def test_result_saves_every_file_with_settings_and_gains(edit_pipe, tmp_path):
    from pipelines.instruct import edit_by_instruction

    edit = world.make_edit(1_095_010)
    result = edit_by_instruction(edit_pipe, edit.source.render(64), edit.instruction, seed=2, **FAST)
    written = result.save(tmp_path)
    assert sorted(p.name for p in written) == ["edited.png", "plain.png", "result.json", "source.png"]
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["parts"] == [p.text for p in edit.parts] and record["seed"] == 2 and record["model"] == "builtin-edit"
    assert record["gains_per_step"] == result.gains and record["steps"] == 4
    gallery = result.mask_gallery()
    assert len(gallery) == len(result.masks) * 3 and "gain" in gallery[0][1]


# ----------------------------------------------------------------------------- a prompt of parts (spec section 7)


@pytest.fixture(scope="module")
def draw_pipe():
    from pipelines import models

    return models.load("builtin")


def test_a_prompt_of_parts_is_drawn_with_saas_on_the_cond_row_and_plain_is_the_stock_pipeline(draw_pipe, tmp_path):
    import torch

    from pipelines.instruct import generate_by_parts

    prompt = "a red circle, a blue square and a green triangle on a striped background"
    result = generate_by_parts(draw_pipe, prompt, seed=3, **FAST)
    assert result.parts == ["a red circle", "a blue square", "a green triangle on a striped background"]
    stock = draw_pipe(prompt=prompt, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                      generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(result.plain), np.asarray(stock))
    assert result.params["saas_steps"] and set(result.params["saas_steps"]) <= {1, 2}
    assert all(len(g) == 3 and all(1.0 <= x <= 3.0 for x in g) for g in result.gains)
    assert any(x > 1.0 for g in result.gains for x in g)  # a part was boosted, so the image changed
    assert not np.array_equal(np.asarray(result.edited), np.asarray(result.plain))
    # no input image: nothing called source is written, and the masks are shown over the result
    assert sorted(p.name for p in result.save(tmp_path)) == ["edited.png", "plain.png", "result.json"]
    assert len(result.mask_gallery()) == 3 * len(result.masks)
    # one part: every gain is 1, so SaaS is the stock path and the result is the plain one
    one = generate_by_parts(draw_pipe, "a red circle on a striped background", seed=3, **FAST)
    assert one.notes and np.array_equal(np.asarray(one.edited), np.asarray(one.plain))
    off = generate_by_parts(draw_pipe, prompt, seed=3, saas=False, **FAST)
    assert off.plain is None and np.array_equal(np.asarray(off.edited), np.asarray(result.plain))


def test_a_prompt_of_parts_on_sdxl_reads_both_encoders_tokens_at_the_same_positions():
    """SDXL concatenates its two CLIP encoders' states per token, so one set of spans serves both:
    the second tokenizer gives the same ids at every part's positions.  Plain is the stock SDXL
    pipeline bit for bit; SaaS boosts a part and changes the image."""
    import torch

    from attention_processors.saas import clip_spans, split_instruction
    from pipelines import models
    from pipelines.instruct import generate_by_parts

    pipe = models.load("tiny-sdxl")
    prompt = "a red circle, a blue square and a green triangle on a striped background"
    spans = clip_spans(pipe.tokenizer, prompt, split_instruction(prompt, split_and=True))
    first = pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    second = pipe.tokenizer_2(prompt, padding="max_length", max_length=77).input_ids
    assert [first[span] for span in spans] == [second[span] for span in spans]
    result = generate_by_parts(pipe, prompt, seed=3, **FAST)
    run = result.params
    stock = pipe(prompt=prompt, num_inference_steps=4, guidance_scale=run["guidance"], height=run["height"],
                 width=run["width"], generator=torch.Generator().manual_seed(3)).images[0]
    assert run["guidance"] > 1  # the ("uncond", "cond") batch: only the cond row is rescaled
    assert np.array_equal(np.asarray(result.plain), np.asarray(stock))
    assert result.params["saas_steps"] and any(x > 1.0 for g in result.gains for x in g)
    assert not np.array_equal(np.asarray(result.edited), np.asarray(result.plain))


def test_a_prompt_of_parts_refuses_what_it_cannot_do(draw_pipe, edit_pipe):
    from pipelines.instruct import generate_by_parts

    cases = [
        (lambda: generate_by_parts(edit_pipe, "a red circle and a blue square"), "works with SD 1.x/2.x"),
        (lambda: generate_by_parts(draw_pipe, "  "), "Please write a prompt"),
        (lambda: generate_by_parts(draw_pipe, "a red circle, , a blue square"), "Part 2"),
        (lambda: generate_by_parts(draw_pipe, "a red circle and a blue square", width=100), "multiple"),
        (lambda: generate_by_parts(draw_pipe, " and ".join(["a red circle"] * 40)), "parts"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserInputError) as caught:
            call()
        assert fragment in str(caught.value), (fragment, str(caught.value))


@pytest.mark.timeout(300)
def test_the_tab_and_the_cli_draw_a_prompt_of_parts_with_a_text_to_image_model(tmp_path):
    from ui.common import AppContext, OutputStore
    from ui.instruct_tab import make_handler

    handler = make_handler(AppContext(outputs=OutputStore(tmp_path / "results")))
    seen = []
    edited, plain, masks, seed, files, status = handler(
        "builtin", None, "a red circle and a blue square on a striped background", 2, False, True, 3,
        progress=lambda value, desc=None, **_: seen.append(desc))
    assert "2 parts" in status and seed == 2 and plain is not None and masks
    assert "plain generating, for comparison: step 1/3" in seen and "generating with SaaS: step 3/3" in seen
    assert sorted(Path(f).name for f in files) == ["edited.png", "plain.png", "result.json"]
    with pytest.raises(Exception) as caught:  # an edit model still needs its image
        handler("builtin-edit", None, "make the circle blue", 0, False, True, 3)
    assert "upload an image" in str(caught.value)
    from ui.instruct_tab import follow_model  # the text box and the button say which mode the model is in

    text, button = follow_model("builtin")
    assert text["label"].startswith("Prompt of parts") and button["value"] == "Generate"
    text, button = follow_model("builtin-edit")
    assert text["label"].startswith("Instruction") and button["value"] == "Edit"

    proc = run_app("instruct", "--prompt", "a red circle and a blue square on a striped background", "--steps", "3",
                   "--output", "drawn.png", "--plain", "plain.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "drawn.json").read_text())
    assert record["model"] == "builtin" and record["task"] == "parts" and len(record["parts"]) == 2
    assert_user_error(run_app("instruct", "--prompt", "a red circle", "--image", "x.png", "--output", "o.png",
                              cwd=tmp_path), "either --prompt")
    assert_user_error(run_app("instruct", "--output", "o.png", cwd=tmp_path), "--prompt")


# ----------------------------------------------------------------------------- CLI, API, browser


@pytest.mark.timeout(300)
def test_cli_writes_the_edit_and_the_baseline_and_refuses_bad_input(tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(world.make_edit(1_095_003).source.render(64)).save(source)
    instruction = world.make_edit(1_095_003).instruction
    proc = run_app("instruct", "--image", str(source), "--instruction", instruction, "--steps", "4", "--seed", "5",
                   "--output", "out.png", "--plain", "plain.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 parts" in proc.stdout and "(seed 5)" in proc.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["saas"] is True and record["model"] == "builtin-edit" and record["seed"] == 5
    with Image.open(tmp_path / "out.png") as edited, Image.open(tmp_path / "plain.png") as plain:
        assert edited.size == plain.size == (64, 64)
    assert_user_error(run_app("instruct", "--image", str(source), "--instruction", "make it blue,, and red",
                              "--output", "bad.png", cwd=tmp_path), "Part 2")
    assert_user_error(run_app("instruct", "--image", str(source), "--instruction", instruction, "--no-saas",
                              "--plain", "p.png", "--output", "bad.png", cwd=tmp_path), "--no-saas")
    assert not (tmp_path / "bad.png").exists()


@pytest.fixture(scope="module")
def server():
    with launched_app("--model", "tiny") as running:
        yield running


@pytest.mark.timeout(600)
def test_api_edits_with_the_builtin_edit_model_and_offers_no_text_to_image_tab_it(server):
    from gradio_client import Client, handle_file

    from app_server import api_info

    source = Path(server.log_path).with_name("instruct_in.png")
    Image.fromarray(world.make_edit(1_095_003).source.render(64)).save(source)
    client = Client(server.url, verbose=False)
    edited, plain, masks, seed, files, status = client.predict(
        model="builtin-edit", image=handle_file(str(source)), instruction=world.make_edit(1_095_003).instruction,
        seed=4, randomize_seed=False, saas=True, steps=4, guidance=0, image_guidance=0, window=0.4, gain="equalize",
        max_gain=3.0, api_name="/instruct")
    assert seed == 4 and "2 parts" in status
    with Image.open(edited) as a, Image.open(plain) as b:
        assert a.size == b.size == (256, 256)  # 64 px enlarged 4x for the page, pixels kept sharp
        saved = next(f for f in files if f.endswith("edited.png"))
        with Image.open(saved) as c:
            assert c.size == (64, 64) and a.resize((64, 64), Image.NEAREST).tobytes() == c.tobytes()
    assert sorted(Path(f).name for f in files) == ["edited.png", "plain.png", "result.json", "source.png"]
    assert masks  # the gallery of masks and gains
    # builtin-edit is offered by this tab only; the text-to-image tabs do not list it
    info = api_info(server.url)["named_endpoints"]
    generate_model = next(p for p in info["/attention_maps"]["parameters"] if p["parameter_name"] == "model")
    assert "builtin-edit" not in json.dumps(generate_model)
    with pytest.raises(Exception) as caught:
        client.predict(model="builtin-edit", prompt="a red circle", negative_prompt="", seed=0, randomize_seed=False,
                       steps=1, guidance=7.5, width=64, height=64, layers="all", overlay_alpha=0.5,
                       api_name="/attention_maps")
    assert "not in the list of choices" in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.timeout(600)
def test_instruct_tab_in_a_real_browser(server):
    require_browser()
    from playwright.sync_api import expect

    from ui import instruct_tab

    with browser_page(server.url, {"width": 1400, "height": 1000}) as page:  # fails on a page error
        page.get_by_role("tab", name="Instruction edit").click()
        # the first example fills the image and the instruction
        first = world.make_edit(instruct_tab.EXAMPLE_EDITS[0])
        assert len(first.parts) == 2
        page.get_by_text(first.instruction).first.click()
        expect(page.locator("#in-text textarea")).to_have_value(first.instruction)
        page.locator("#in-seed input").fill("6")
        page.locator("#in-settings").get_by_text("Settings").click()
        page.locator("#in-steps input").fill("4")
        page.locator("#in-run").click()
        for elem in ("in-edited", "in-plain"):
            expect(page.locator(f"#{elem} img")).to_have_count(1, timeout=120_000)
        expect(page.locator("#in-status")).to_contain_text("2 parts")
        assert page.locator("#in-seed-used input").input_value() == "6"
        expect(page.locator('#in-files a[href$="edited.png"]')).to_have_count(1)
        # a bad instruction: one sentence, no result lost
        page.locator("#in-text textarea").fill("make it blue, , and red")
        page.locator("#in-run").click()
        expect(page.get_by_text("Part 2 of the instruction is empty").first).to_be_visible(timeout=60_000)
