"""Instruction edit on FLUX Kontext, a second backbone for SaaS (our extrapolation, not the
paper's): the tiny offline `FluxKontextPipeline`, the parts' T5 spans from character offsets, the
joint sequence's layout against what the transformer receives, SaaS against plain sampling,
processors installed and restored, stopping, the CLI.

The processor itself (untouched queries bit-identical, the bias on the cond row's output queries)
is specified at attention level in tests/test_saas_attention.py; here it is the task around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import assert_user_error, run_app  # noqa: E402
from edit_fixtures import pixels as _pixels, squash as _squash  # noqa: E402

from attention_processors.saas import SaaSFluxKontextProcessor, flux_attention_modules, split_instruction  # noqa: E402
from pipelines import backbones, models  # noqa: E402
from pipelines.builtin import world  # noqa: E402
from pipelines.errors import UserInputError  # noqa: E402

EXAMPLE = "make the circle blue, and make the background beige"
FAST = dict(steps=4)  # rescaled steps 1..ceil(0.4 * 4) = 2; quality is not these tests' concern


@pytest.fixture(scope="module")
def pipe():
    return models.load("tiny-flux-kontext", device="cpu")


@pytest.fixture(scope="module")
def source():
    return Image.fromarray(world.make_edit(1_095_003).source.render(64))


def _processors(pipe) -> list:
    return [module.get_processor() for module in flux_attention_modules(pipe.transformer)]


# ----------------------------------------------------------------------------- the tiny pipeline


def test_tiny_flux_kontext_is_a_real_kontext_pipeline_around_tiny_fluxs_parts(pipe):
    from diffusers import FluxKontextPipeline, FluxPipeline

    assert type(pipe) is FluxKontextPipeline and models.is_tiny("tiny-flux-kontext")
    assert backbones.of(pipe) is backbones.FLUX_KONTEXT
    assert models.backbone_without_loading("tiny-flux-kontext") is backbones.FLUX_KONTEXT
    assert backbones.by_pipeline_class("FluxKontextPipeline") is backbones.FLUX_KONTEXT
    assert "tiny-flux-kontext" in models.EDIT_MODELS and "tiny-flux-kontext" not in models.TINY_MODELS
    assert backbones.FLUX_KONTEXT not in backbones.TEXT_TO_IMAGE
    assert models.default_size(pipe) == (64, 64) and backbones.FLUX_KONTEXT.size_multiple(pipe) == 16
    # the same seeded weights as tiny-flux: Kontext is FLUX.1's architecture, only the pipeline differs
    flux = models.build_tiny("tiny-flux").transformer.state_dict()
    assert all(torch.equal(value, flux[key]) for key, value in pipe.transformer.state_dict().items())
    # the denoiser alone says FLUX: a text-to-image view of the same parts is FLUX again
    assert backbones.of(FluxPipeline.from_pipe(pipe)) is backbones.FLUX


# ----------------------------------------------------------------------------- the layout


def _layout(pipe, image, instruction):
    kontext = backbones.FLUX_KONTEXT
    call = {**kontext.edit_kwargs(image, instruction, *image.size), "max_sequence_length": kontext.text_length(pipe)}
    ranges = split_instruction(instruction)
    return kontext.instruction_layout(pipe, call, ranges), [instruction[a:b] for a, b in ranges]


@pytest.mark.parametrize("instruction", [
    EXAMPLE,
    # a bare comma between parts, words outside the tiny vocabulary (spelt letter by letter), a
    # non-ASCII character (T5's <unk>) inside a part, and a trailing full stop
    "make the bike rusty, add a graffiti on the wall; make the weather rainy.",
    "turn the square into copper, and paint the background très sombre",
])
def test_spans_from_offsets_cover_exactly_each_parts_words(pipe, source, instruction):
    layout, parts = _layout(pipe, source, instruction)
    # the ids the pipeline's own T5 encoding gives the transformer, computed independently
    ids = pipe.tokenizer_2(instruction, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(layout.spans) == len(parts) and layout.text_tokens == 512
    for span, part in zip(layout.spans, parts):
        decoded = pipe.tokenizer_2.decode(ids[span])
        if "è" in part:  # T5 has no piece for it: <unk>, decoded as such
            decoded = decoded.replace(pipe.tokenizer_2.unk_token, "è")
        assert _squash(decoded) == _squash(part)
        first = _squash(pipe.tokenizer_2.decode(ids[span.start : span.start + 1]))
        assert first and _squash(part.split()[0]).startswith(first)  # the span starts at the first word
    # separators lie between the spans, in no span
    for a, b in zip(layout.spans, layout.spans[1:]):
        between = _squash(pipe.tokenizer_2.decode(ids[a.stop : b.start]))
        assert a.stop < b.start and between in (",", ",and", ";")


def test_the_layout_is_what_the_transformer_and_its_attention_receive(pipe):
    """A 2:1 reference gives a 2x4 output grid; the text, output and reference token counts and
    the position ids' kinds (0: output, 1: reference) are read at the transformer and at the
    attention of a dual-stream and a single-stream block."""
    wide = Image.fromarray(world.make_scene(7).render(128)).resize((64, 32))
    layout, _ = _layout(pipe, wide, EXAMPLE)
    assert layout.out_grid == (2, 4) and layout.output == slice(512, 520) and layout.reference == slice(520, 528)
    assert layout.seq_len == 528
    seen = {}

    def at_transformer(_module, _args, kwargs):
        seen["text"] = kwargs["encoder_hidden_states"].shape[1]
        seen["image"] = kwargs["hidden_states"].shape[1]
        seen["ids"] = kwargs["img_ids"]

    def at_attention(name):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states")
            seen[name] = hidden.shape[1] + (0 if text is None else text.shape[1])
        return hook

    transformer = pipe.transformer
    handles = [transformer.register_forward_pre_hook(at_transformer, with_kwargs=True),
               transformer.transformer_blocks[0].attn.register_forward_pre_hook(at_attention("dual"), with_kwargs=True),
               transformer.single_transformer_blocks[0].attn.register_forward_pre_hook(at_attention("single"),
                                                                                      with_kwargs=True)]
    try:
        pipe(**backbones.FLUX_KONTEXT.edit_kwargs(wide, EXAMPLE, 64, 32), num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    assert seen["text"] == layout.text_tokens
    assert seen["image"] == layout.seq_len - layout.text_tokens
    assert seen["dual"] == seen["single"] == layout.seq_len
    kinds = seen["ids"][:, 0].tolist()
    n_out = layout.output.stop - layout.output.start
    assert kinds == [0.0] * n_out + [1.0] * (layout.reference.stop - layout.reference.start)
    assert (int(seen["ids"][:n_out, 1].max()) + 1, int(seen["ids"][:n_out, 2].max()) + 1) == layout.out_grid
    # and SaaS edits at that aspect (a 128x64 image at tiny's 64 px working side), masks on the 2x4 grid
    from pipelines.instruct import edit_by_instruction

    result = edit_by_instruction(pipe, wide.resize((128, 64)), EXAMPLE, seed=0, compare=False, steps=3)
    assert result.edited.size == result.source.size == (64, 32)
    assert result.masks and all(m.shape == (2, 2, 4) for m in result.masks)


# ----------------------------------------------------------------------------- the task


def test_saas_edits_differently_from_plain_sampling_which_is_the_stock_pipeline(pipe, source):
    from pipelines.instruct import edit_by_instruction

    first = edit_by_instruction(pipe, source, EXAMPLE, seed=3, gain="fixed", max_gain=8, **FAST)
    again = edit_by_instruction(pipe, source, EXAMPLE, seed=3, gain="fixed", max_gain=8, **FAST)
    assert np.array_equal(_pixels(first.edited), _pixels(again.edited))
    assert not np.array_equal(_pixels(first.edited), _pixels(first.plain))
    stock = pipe(image=source, prompt=EXAMPLE, height=64, width=64, max_area=64 * 64, _auto_resize=False,
                 num_inference_steps=4, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(_pixels(first.plain), _pixels(stock))
    assert first.parts == ["make the circle blue", "make the background beige"]
    assert first.params["saas_steps"] and set(first.params["saas_steps"]) <= {1, 2}
    assert len(first.masks) == len(first.gains) == len(first.params["saas_steps"])
    assert all(m.shape == (2, 4, 4) and m.dtype == bool for m in first.masks)
    assert any(m.any() for m in first.masks)
    # "auto" is the paper's rule with the reference tokens as the competitor; the pipeline's own sampling
    paper = edit_by_instruction(pipe, source, EXAMPLE, seed=3, image_guidance=1.6, **FAST)
    assert (paper.params["gain"], paper.params["guidance"], paper.params["image_guidance"]) == ("paper", 3.5, None)
    assert np.array_equal(_pixels(paper.plain), _pixels(stock))
    assert paper.gains and all(len(g) == 2 and all(x > 0 for x in g) for g in paper.gains)


def test_one_part_under_equalize_is_plain_sampling_bit_for_bit(pipe, source):
    from pipelines.instruct import edit_by_instruction

    one = edit_by_instruction(pipe, source, "make the circle blue", seed=1, gain="equalize", **FAST)
    assert one.notes and "one part" in one.notes[0] and not one.masks
    # no baseline asked for: the SaaS processors run, and a gain of 1 leaves the stock path
    alone = edit_by_instruction(pipe, source, "make the circle blue", seed=1, gain="equalize", compare=False, **FAST)
    assert alone.plain is None and np.array_equal(_pixels(alone.edited), _pixels(one.plain))
    off = edit_by_instruction(pipe, source, EXAMPLE, seed=1, saas=False, **FAST)
    assert off.plain is None and not off.masks


def test_processors_are_on_both_block_kinds_during_the_call_and_restored_also_after_an_error(pipe, source):
    from pipelines.instruct import edit_by_instruction, flux_kontext_saas_layers
    from pipelines.tiny_models import flux_kontext_dev_config

    # FLUX.1's 19 + 38 blocks: the paper's last three quarters, dual-stream blocks 14-18 and every single one
    config = flux_kontext_dev_config()
    block = SimpleNamespace(attn=None)
    full = SimpleNamespace(transformer_blocks=[block] * config["num_layers"],
                           single_transformer_blocks=[block] * config["num_single_layers"])
    assert flux_kontext_saas_layers(full, tuple(range(8, 32))) == tuple(range(14, 57))
    assert flux_kontext_saas_layers(pipe.transformer, tuple(range(8, 32))) == (0, 1)
    before = _processors(pipe)
    seen = []

    def look(_module, _args):
        seen.append([isinstance(p, SaaSFluxKontextProcessor) for p in _processors(pipe)])

    handle = pipe.transformer.register_forward_pre_hook(look)
    try:
        edit_by_instruction(pipe, source, EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert seen == [[True, True]] * 4
    assert all(a is b for a, b in zip(before, _processors(pipe)))

    def fail(_module, _args):
        raise RuntimeError("a failure inside the sampling loop")

    handle = pipe.transformer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the sampling loop"):
            edit_by_instruction(pipe, source, EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert all(a is b for a, b in zip(before, _processors(pipe)))


def test_a_stop_asked_during_a_step_ends_the_edit_before_the_next_one(pipe, source):
    from pipelines.instruct import edit_by_instruction
    from pipelines.stopping import Stopped, stop_between_steps

    calls, flag = [], []

    def count_and_press_stop_in_step_two(_module, _args, _output):
        calls.append(1)
        if len(calls) == 2:
            flag.append(True)

    handle = pipe.transformer.register_forward_hook(count_and_press_stop_in_step_two)
    before = _processors(pipe)
    try:
        with pytest.raises(Stopped) as stopped, stop_between_steps(pipe, lambda: bool(flag), total=4):
            edit_by_instruction(pipe, source, EXAMPLE, seed=0, compare=False, **FAST)
    finally:
        handle.remove()
    assert stopped.value.step == 2 and len(calls) == 2  # step 3 never started
    assert all(a is b for a, b in zip(before, _processors(pipe)))


@pytest.mark.parametrize("instruction, fragment", [
    ("make the circle blue, , make the square red", "Part 2 of the instruction is empty"),
    # past the 512 T5 tokens the pipeline reads (it would cut the rest silently)
    ("make the circle blue and " * 100, "reads at most 512"),
], ids=["empty part", "past the T5 window"])
def test_bad_instructions_get_one_sentence(pipe, source, instruction, fragment):
    from pipelines.instruct import edit_by_instruction

    with pytest.raises(UserInputError) as caught:
        edit_by_instruction(pipe, source, instruction, seed=0, **FAST)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- the tab and the CLI


def test_the_tab_edits_with_tiny_flux_kontext(pipe, tmp_path, source):
    from ui.common import AppContext, OutputStore
    from ui.instruct_tab import make_handler

    ctx = AppContext(outputs=OutputStore(tmp_path))
    assert "tiny-flux-kontext" in ctx.edit_model_choices
    seen = []
    edited, plain, masks, seed, files, status = make_handler(ctx)(
        "tiny-flux-kontext", source, EXAMPLE, 5, False, True, 3,
        progress=lambda value, desc=None, **_: seen.append((value, desc)))
    named = [desc for _, desc in seen if desc and "step" in desc]
    assert named[0] == "plain editing, for comparison: step 1/3" and named[-1] == "editing with SaaS: step 3/3", seen
    assert seed == 5 and "2 parts" in status and masks and plain is not None
    record = json.loads(next(Path(f) for f in files if f.endswith("result.json")).read_text())
    assert record["model"] == "tiny-flux-kontext" and record["gain"] == "paper" and record["steps"] == 3


@pytest.mark.timeout(300)
def test_cli_edits_with_tiny_flux_kontext_and_refuses_bad_input(pipe, tmp_path, source, capsys):
    import app

    source.save(tmp_path / "in.png")
    status = app.main(["instruct", "--model", "tiny-flux-kontext", "--image", str(tmp_path / "in.png"),
                       "--instruction", EXAMPLE, "--steps", "2", "--output", str(tmp_path / "out.png"),
                       "--plain", str(tmp_path / "plain.png")])
    assert status == 0 and "2 parts" in capsys.readouterr().out
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["model"] == "tiny-flux-kontext" and record["saas"] is True and record["gain"] == "paper"
    with Image.open(tmp_path / "out.png") as edited, Image.open(tmp_path / "plain.png") as plain:
        assert edited.size == plain.size == (64, 64)
    # a bad instruction in a real process: exit status 2, one `error: ...` line, no traceback
    assert_user_error(run_app("instruct", "--model", "tiny-flux-kontext", "--image", "in.png", "--instruction",
                              "make the circle blue and " * 100, "--output", "bad.png", cwd=tmp_path),
                      "reads at most 512")
    assert not (tmp_path / "bad.png").exists()
