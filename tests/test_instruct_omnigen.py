"""Instruction edit on OmniGen, the SaaS paper's backbone, at pipeline level: the tiny offline
OmniGen pipeline, the parts' token spans from character offsets, SaaS against plain sampling,
processors installed and restored, stopping, the tab and the CLI.

The attention mechanism on OmniGen (untouched rows, neutral gains, capture, non-square grids) is
specified at transformer level in tests/test_saas_attention.py; here it is the task around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_user_error, run_app  # noqa: E402
from edit_fixtures import pixels as _pixels, squash as _squash  # noqa: E402

from attention_processors.saas import SaaSOmniGenProcessor, split_instruction  # noqa: E402
from pipelines import backbones, models  # noqa: E402
from pipelines.builtin import world  # noqa: E402
from pipelines.errors import UserInputError  # noqa: E402

PAPER_EXAMPLE = "make the bike rusty, and add a graffiti on the wall, and make the weather rainy"
FAST = dict(steps=4)  # rescaled steps 1..ceil(0.4 * 4) = 2; quality is not these tests' concern


@pytest.fixture(scope="module")
def pipe():
    return models.load("tiny-omnigen", device="cpu")


@pytest.fixture(scope="module")
def source():
    return Image.fromarray(world.make_edit(1_095_003).source.render(64))


# ----------------------------------------------------------------------------- the tiny pipeline


def test_tiny_omnigen_is_a_real_omnigen_pipeline_built_offline_with_fixed_weights(pipe):
    from diffusers import OmniGenPipeline

    assert type(pipe) is OmniGenPipeline and models.is_tiny("tiny-omnigen")
    assert backbones.of(pipe) is backbones.OMNIGEN and models.backbone_without_loading("tiny-omnigen") is backbones.OMNIGEN
    assert models.describe("tiny-omnigen") == "OmniGen transformer (tiny, random weights)"
    assert "tiny-omnigen" in models.EDIT_MODELS and "tiny-omnigen" not in models.TINY_MODELS
    assert models.default_size(pipe) == (64, 64) and backbones.OMNIGEN.size_multiple(pipe) == 16
    rebuilt = models.build_tiny("tiny-omnigen").transformer.state_dict()
    assert all(torch.equal(value, rebuilt[key]) for key, value in pipe.transformer.state_dict().items())
    # the tokenizer behaves as Phi-3's where OmniGen's processor and the spans rely on it
    tokenizer = pipe.tokenizer
    assert len(tokenizer) <= pipe.transformer.config.vocab_size
    ids = tokenizer("<|user|>\nmake it red<|end|>\n<|assistant|>\n<|diffusion|>").input_ids
    assert ids[0] == 1 and tokenizer.convert_ids_to_tokens(ids[1]) == "<|user|>"
    assert sum(t in ("<|end|>", "<|assistant|>") for t in tokenizer.convert_ids_to_tokens(ids)) == 2
    encoded = tokenizer("make the circle red", return_offsets_mapping=True)
    words = [tokenizer.decode([i]).strip() for i in encoded.input_ids[1:]]
    assert words == ["make", "the", "circle", "red"]
    assert [tuple(o) for o in encoded.offset_mapping[1:]] == [(0, 4), (4, 8), (8, 15), (15, 19)]


def test_a_saved_tiny_omnigen_loads_as_a_folder_through_diffusers(pipe, source, tmp_path):
    """The real loading path: `save_pretrained` layout, `DiffusionPipeline.from_pretrained`."""
    from pipelines.instruct import working_size

    folder = models.save_tiny("tiny-omnigen", tmp_path / "omnigen")
    assert models.backbone_without_loading(str(folder)) is backbones.OMNIGEN
    reloaded = models.load(str(folder), device="cpu")
    assert type(reloaded) is type(pipe) and backbones.of(reloaded) is backbones.OMNIGEN
    text = "<|user|>\nmake the bike rusty, and add a graffiti<|end|>"
    assert reloaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids
    # the pipeline's own 1024 px default is not saved; the edit side is capped by the position
    # table (16 patches of 16 px) below the paper's 512 px
    assert working_size(reloaded, 640, 480) == (256, 192)
    layout, parts, data = _layout(reloaded, source, PAPER_EXAMPLE)
    for span, part in zip(layout.spans, parts):
        assert _squash(reloaded.tokenizer.decode(data["input_ids"][0, span].tolist())) == _squash(part)


def test_text_to_image_tasks_refuse_omnigen(pipe):
    from pipelines.attention_maps import generate_with_attention_maps

    assert backbones.OMNIGEN not in backbones.TEXT_TO_IMAGE
    with pytest.raises(UserInputError, match="not with this OmniGen transformer"):
        generate_with_attention_maps(pipe, "a red circle", seed=0)


# ----------------------------------------------------------------------------- spans from offsets


def _layout(pipe, image, instruction):
    omnigen = backbones.OMNIGEN
    call = omnigen.edit_kwargs(image, instruction, *image.size)
    at = len(omnigen.edit_prompt(""))
    ranges = split_instruction(instruction)
    layout = omnigen.instruction_layout(pipe, call, [(a + at, b + at) for a, b in ranges])
    # what the pipeline itself hands the transformer, computed independently of the layout
    data = pipe.multimodal_processor(call["prompt"], call["input_images"], height=call["height"], width=call["width"],
                                     use_img_cfg=True)
    return layout, [instruction[a:b] for a, b in ranges], data


@pytest.mark.parametrize("instruction", [
    PAPER_EXAMPLE,
    # the second part follows a bare comma: the reference code's fixed skip of two tokens (the
    # comma and "and") would start that span after its first word, "add"
    "make the bike rusty, add a graffiti on the wall",
    # long enough that the cond row is the longest (no left padding), with unknown words and bytes
    "turn the bicycle into copper with rust everywhere, and paint a colourful graffiti mural on the brick "
    "wall behind it, and make the weather a heavy thunderstorm with rain — très mouillé",
])
def test_spans_from_offsets_cover_exactly_each_parts_words(pipe, source, instruction):
    layout, parts, data = _layout(pipe, source, instruction)
    ids = data["input_ids"][0]
    assert len(layout.spans) == len(parts)
    for span, part in zip(layout.spans, parts):
        assert _squash(pipe.tokenizer.decode(ids[span].tolist())) == _squash(part)
        first_token = _squash(pipe.tokenizer.decode(ids[span.start : span.start + 1].tolist()))
        assert first_token and _squash(part.split()[0]).startswith(first_token)  # the span starts at the first word
    # the input image's tokens sit just before the text, and the spans follow one another in order
    assert layout.input_images == [slice(*data["input_image_sizes"][0][0])]
    assert layout.input_images[0].stop <= layout.spans[0].start
    assert all(a.stop < b.start for a, b in zip(layout.spans, layout.spans[1:]))
    assert layout.seq_len == ids.shape[0] + 1 + 16  # text, the time token, a 64 px output's 4x4 tokens
    if instruction.startswith("make the bike rusty, add"):
        between = ids[layout.spans[0].stop : layout.spans[1].start].tolist()
        assert pipe.tokenizer.decode(between).strip() == ","  # only the comma: "add" is in the span


def test_spans_are_read_in_the_padded_row(pipe, source):
    """A short instruction gives a cond row shorter than the negative prompt's: the processor
    left-pads it, and the spans are positions in the padded row the transformer receives."""
    layout, parts, data = _layout(pipe, source, "make it red, and make it blue")
    pad = data["input_ids"].shape[1] - layout.text_tokens
    assert pad > 0 and (data["input_ids"][0, :pad] == 2).all()  # the collator pads with id 2
    for span, part in zip(layout.spans, parts):
        assert span.start > pad and _squash(pipe.tokenizer.decode(data["input_ids"][0, span].tolist())) == _squash(part)


# ----------------------------------------------------------------------------- the task


def test_saas_edits_differently_from_plain_sampling_which_is_the_stock_pipeline(pipe, source):
    from pipelines.instruct import edit_by_instruction

    first = edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=3, **FAST)
    again = edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=3, **FAST)
    assert np.array_equal(_pixels(first.edited), _pixels(again.edited))
    assert not np.array_equal(_pixels(first.edited), _pixels(first.plain))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # OmniGen encodes the input image with the global RNG
        stock = pipe(prompt=f"<img><|image_1|></img> {PAPER_EXAMPLE}", input_images=[source], height=64, width=64,
                     num_inference_steps=4, guidance_scale=2.5, img_guidance_scale=1.6, max_input_image_size=64,
                     generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(_pixels(first.plain), _pixels(stock))
    # the paper's settings: its gain rule, its sampling, its window (steps 1..ceil(0.4 * 4))
    params = first.params
    assert (params["gain"], params["guidance"], params["image_guidance"]) == ("paper", 2.5, 1.6)
    assert params["saas_steps"] and set(params["saas_steps"]) <= {1, 2}
    assert first.parts == ["make the bike rusty", "add a graffiti on the wall", "make the weather rainy"]
    assert len(first.masks) == len(first.gains) == len(params["saas_steps"])
    assert all(m.shape == (3, 4, 4) and m.dtype == bool for m in first.masks)
    assert all(len(g) == 3 and all(x > 0 for x in g) for g in first.gains)
    assert any(m.any() for m in first.masks)


def test_one_part_is_plain_under_equalize_and_boosted_against_the_image_under_the_papers_rule(pipe, source):
    from pipelines.instruct import edit_by_instruction

    one = edit_by_instruction(pipe, source, "make the bike rusty", seed=1, gain="equalize", **FAST)
    assert one.notes and "one part" in one.notes[0] and not one.masks
    assert np.array_equal(_pixels(one.edited), _pixels(one.plain))
    # no baseline asked for: the SaaS loop itself runs, and its gains of 1 leave the stock path
    alone = edit_by_instruction(pipe, source, "make the bike rusty", seed=1, gain="equalize", compare=False, **FAST)
    assert alone.plain is None and np.array_equal(_pixels(alone.edited), _pixels(one.plain))
    # the paper's rule measures the part against the input image's tokens: one part is boosted too
    paper = edit_by_instruction(pipe, source, "make the bike rusty", seed=1, **FAST)
    assert not paper.notes and paper.params["saas_steps"]
    assert not np.array_equal(_pixels(paper.edited), _pixels(paper.plain))
    assert np.array_equal(_pixels(paper.plain), _pixels(one.plain))
    off = edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=1, saas=False, **FAST)
    assert off.plain is None and not off.masks


def test_processors_are_installed_on_the_papers_layers_only_and_restored_also_after_an_error(pipe, source):
    from pipelines.instruct import edit_by_instruction, omnigen_saas_layers

    assert omnigen_saas_layers(32, tuple(range(8, 32))) == tuple(range(8, 32))  # the paper's, on OmniGen v1
    assert omnigen_saas_layers(4, tuple(range(8, 32))) == (1, 2, 3)
    blocks = pipe.transformer.layers
    before = [block.self_attn.get_processor() for block in blocks]
    seen = []

    def look(_module, _args):
        seen.append([isinstance(block.self_attn.get_processor(), SaaSOmniGenProcessor) for block in blocks])

    handle = pipe.transformer.register_forward_pre_hook(look)
    try:
        edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert seen == [[False, True, True, True]] * 4
    assert all(a is b for a, b in zip(before, [block.self_attn.get_processor() for block in blocks]))

    def fail(_module, _args):
        if len(seen) == 6:
            raise RuntimeError("a failure inside the sampling loop")
        seen.append(None)

    handle = pipe.transformer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the sampling loop"):
            edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert all(a is b for a, b in zip(before, [block.self_attn.get_processor() for block in blocks]))


def test_a_stop_asked_during_a_step_ends_the_edit_before_the_next_one(pipe, source):
    """The app's Stop button sets a flag from another thread while a step runs; OmniGen's loop has
    no interrupt flag of its own, so `stop_between_steps` stops it before the next denoiser call."""
    from pipelines.instruct import edit_by_instruction
    from pipelines.stopping import Stopped, stop_between_steps

    calls, flag = [], []

    def count_and_press_stop_in_step_two(_module, _args, _output):
        calls.append(1)
        if len(calls) == 2:
            flag.append(True)

    handle = pipe.transformer.register_forward_hook(count_and_press_stop_in_step_two)
    before = [block.self_attn.get_processor() for block in pipe.transformer.layers]
    try:
        with pytest.raises(Stopped) as stopped, stop_between_steps(pipe, lambda: bool(flag), total=4):
            edit_by_instruction(pipe, source, PAPER_EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert stopped.value.step == 2 and len(calls) == 2  # step 3 never started
    assert all(a is b for a, b in zip(before, [block.self_attn.get_processor() for block in pipe.transformer.layers]))


def test_any_aspect_is_edited_on_omniGens_16_px_grid(pipe):
    from pipelines.instruct import edit_by_instruction

    wide = Image.fromarray(world.make_scene(7).render(128)).resize((192, 96))
    result = edit_by_instruction(pipe, wide, "make the background white, make the circle red", seed=0, **FAST)
    assert result.edited.size == result.source.size == result.plain.size == (64, 32)
    assert all(m.shape == (2, 2, 4) for m in result.masks)


@pytest.mark.parametrize("instruction, fragment", [
    ("", "Please write an instruction"),
    ("make the circle blue, , make the square red", "Part 2 of the instruction is empty"),
    (", ".join(["make the circle blue"] * 9), "at most 8"),
    ("make <|image_2|> blue, and make the square red", "image tag"),
    # 5 tokens a repeat: past the 4,096 positions of OmniGen's short-context rotary embedding
    ("make the circle blue and " * 900, "shorten the instruction"),
], ids=["empty", "empty part", "nine parts", "image tag", "too long"])
def test_bad_instructions_get_one_sentence(pipe, source, instruction, fragment):
    from pipelines.instruct import edit_by_instruction

    with pytest.raises(UserInputError) as caught:
        edit_by_instruction(pipe, source, instruction, seed=0, **FAST)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_other_models_are_refused_naming_both_edit_families(source):
    from pipelines.instruct import edit_by_instruction

    with pytest.raises(UserInputError, match="works with InstructPix2Pix, OmniGen and FLUX Kontext models, not with this SD"):
        edit_by_instruction(models.load("tiny", device="cpu"), source, PAPER_EXAMPLE, seed=0)


# ----------------------------------------------------------------------------- the tab and the CLI


def test_the_tab_edits_with_tiny_omnigen_and_names_each_run_on_its_progress_bar(tmp_path, source):
    from ui.common import AppContext, OutputStore
    from ui.instruct_tab import make_handler

    ctx = AppContext(outputs=OutputStore(tmp_path))
    assert "tiny-omnigen" in ctx.edit_model_choices
    seen = []
    edited, plain, masks, seed, files, status = make_handler(ctx)(
        "tiny-omnigen", source, PAPER_EXAMPLE, 5, False, True, 3,
        progress=lambda value, desc=None, **_: seen.append((value, desc)))
    named = [desc for _, desc in seen if desc and "step" in desc]
    assert named[0] == "plain editing, for comparison: step 1/3" and named[-1] == "editing with SaaS: step 3/3", seen
    assert seed == 5 and "3 parts" in status and masks
    record = json.loads(next(Path(f) for f in files if f.endswith("result.json")).read_text())
    assert record["model"] == "tiny-omnigen" and record["gain"] == "paper" and record["steps"] == 3


@pytest.mark.timeout(300)
def test_cli_edits_with_an_omnigen_model_and_refuses_bad_input(tmp_path, source, capsys):
    import app

    source.save(tmp_path / "in.png")
    # the edit in this process (`app.main`, the CLI's own entry; the model is already loaded) ...
    status = app.main(["instruct", "--model", "tiny-omnigen", "--image", str(tmp_path / "in.png"), "--instruction",
                       PAPER_EXAMPLE, "--steps", "2", "--output", str(tmp_path / "out.png"),
                       "--plain", str(tmp_path / "plain.png")])
    assert status == 0 and "3 parts" in capsys.readouterr().out
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["model"] == "tiny-omnigen" and record["saas"] is True and record["gain"] == "paper"
    with Image.open(tmp_path / "out.png") as edited, Image.open(tmp_path / "plain.png") as plain:
        assert edited.size == plain.size == (64, 64)
    # ... and a bad instruction in a real process: exit status 2, one `error: ...` line, no traceback
    assert_user_error(run_app("instruct", "--model", "tiny-omnigen", "--image", "in.png", "--instruction",
                              "put <|image_1|> on the wall, and make it red", "--output", "bad.png", cwd=tmp_path),
                      "image tag")
    assert not (tmp_path / "bad.png").exists()
