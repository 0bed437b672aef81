"""SaaS (self-adaptive attention scaling): the attention side, read as the method's specification.

Spec: docs/methods/instruction.md (section numbers below refer to it).  Everything runs on CPU
with tiny seeded models (pipelines/tiny_models.py) and takes a few seconds.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
from diffusers.models.transformers.transformer_omnigen import OmniGenAttnProcessor2_0

from attention_processors import ControlState, attach, attention_layer_names
from attention_processors import saas
from attention_processors.saas import (
    PAPER_DEFAULTS,
    SaaSController,
    SaaSLoop,
    SaaSOmniGenProcessor,
    SaaSOmniGenState,
    blur_minmax,
    clip_spans,
    compute_gains,
    install_omnigen,
    otsu_threshold,
    part_masks,
    quantise8,
    sd_layers,
    split_instruction,
    validate_parts,
)
from pipelines.errors import UserInputError
from pipelines.tiny_models import build_tiny, tiny_omnigen_transformer
from pipelines.tokenizers import clip_tokenizer

EXAMPLE = "make the circle blue, and make the square red, and make the background striped"


# ----------------------------------------------------------------------------- 3.4 / 4: the identities


def test_rescale_then_renormalise_equals_a_log_gain_bias():
    """P * g renormalised per row == softmax(S + log g) (spec 3.4), fp32, atol 1e-6."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, 12)
    g = torch.ones(2, 3, 10, 12)
    g[..., 2:5, 4:7] = 3.7
    g[..., 6:, :2] = 0.4
    explicit = logits.softmax(-1) * g
    explicit = explicit / explicit.sum(-1, keepdim=True)
    assert torch.allclose(explicit, (logits + g.log()).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "additive"])
def test_sdpa_with_one_hot_values_gives_group_sums_of_probabilities(mask_kind):
    """SDPA with a one-hot indicator value matrix == explicit group sums of P (spec 4), also with
    a causal or an additive (0 / dtype-min / bias) mask."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8)
    mask = None
    if mask_kind == "causal":
        mask = torch.zeros(9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    elif mask_kind == "additive":
        mask = torch.randn(1, 1, 9, 9)
        mask[..., 3] = torch.finfo(torch.float32).min
    groups = [slice(0, 2), [slice(3, 5), slice(7, 8)], slice(5, 7)]
    ind = saas.span_indicator(groups, 9, pad_to=8)
    assert ind.shape == (8, 9)
    got = F.scaled_dot_product_attention(q, k, ind.t().expand(1, 4, 9, 8), attn_mask=mask)[..., :3]
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + (0 if mask is None else mask)
    p = logits.softmax(-1)
    want = torch.stack([p[..., 0:2].sum(-1), p[..., 3:5].sum(-1) + p[..., 7:8].sum(-1), p[..., 5:7].sum(-1)], -1)
    assert torch.allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- 3.1: spans


def test_the_example_instruction_splits_into_three_parts_and_three_clip_spans():
    parts = split_instruction(EXAMPLE)
    assert [EXAMPLE[a:b] for a, b in parts] == [
        "make the circle blue", "make the square red", "make the background striped"]
    tokenizer = clip_tokenizer()
    spans = clip_spans(tokenizer, EXAMPLE, parts)
    ids = tokenizer(EXAMPLE, padding="max_length", max_length=77).input_ids
    assert len(spans) == 3 and spans[0].start == 1  # right after BOS
    for span, (a, b) in zip(spans, parts):
        decoded = tokenizer.decode(ids[span])
        assert decoded.split() == EXAMPLE[a:b].split()
        assert "," not in decoded and "and" not in decoded.split()


def test_separators_and_empty_parts():
    text = "Make it red; and add a hat ,make it sunny."
    assert [text[a:b] for a, b in split_instruction(text)] == ["Make it red", "add a hat", "make it sunny"]
    other = "black and white cat, a hat"
    assert [other[a:b] for a, b in split_instruction(other)] == ["black and white cat", "a hat"]
    assert [("x and y")[a:b] for a, b in split_instruction("x and y", split_and=True)] == ["x", "y"]
    with pytest.raises(UserInputError, match="^Part 2 of the instruction is empty"):
        validate_parts("make it red, , add a hat", split_instruction("make it red, , add a hat"))
    with pytest.raises(UserInputError, match="instruction is empty"):
        validate_parts("  ", split_instruction("  "))


def test_a_part_past_the_clip_window_is_refused():
    text = "make it red, " + " ".join(["word"] * 80)
    with pytest.raises(UserInputError, match="^Part 2 of the instruction lies past the 75 text tokens"):
        clip_spans(clip_tokenizer(), text, split_instruction(text))


# ----------------------------------------------------------------------------- 3.3: maps, Otsu, gains


def _reference_otsu(levels: np.ndarray) -> int:
    """Textbook Otsu over 256 levels: argmax_t w0 w1 (mu0 - mu1)^2, classes <= t and > t."""
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(256):
        w0, w1 = hist[: t + 1].sum(), hist[t + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (hist[: t + 1] * np.arange(t + 1)).sum() / w0
        mu1 = (hist[t + 1 :] * np.arange(t + 1, 256)).sum() / w1
        var = w0 * w1 * (mu0 - mu1) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def test_otsu_matches_a_reference_and_splits_a_bimodal_map():
    gen = torch.Generator().manual_seed(0)
    maps = []
    for low, high in [(0.2, 0.8), (0.1, 0.5), (0.3, 0.9)]:
        m = low + 0.05 * torch.randn(16, 24, generator=gen)
        m[4:12, 6:18] = high + 0.05 * torch.randn(8, 12, generator=gen)
        maps.append(m.clamp(0, 1))
    maps = torch.stack(maps)
    got = otsu_threshold(maps)
    assert got.shape == (3,)
    for m, t, (low, high) in zip(maps, got.tolist(), [(0.2, 0.8), (0.1, 0.5), (0.3, 0.9)]):
        assert abs(t - _reference_otsu(quantise8(m).numpy())) <= 1
        assert low * 255 < t < high * 255
        mask = quantise8(m) > t
        assert mask[4:12, 6:18].all() and mask.sum() == 8 * 12
    rand = torch.rand(2, 7, 5, generator=gen)
    for m, t in zip(rand, otsu_threshold(rand).tolist()):
        assert abs(t - _reference_otsu(quantise8(m).numpy())) <= 1


def test_blur_minmax_and_masks():
    m = torch.zeros(1, 12, 10)
    m[0, 3:7, 2:6] = 1.0
    normed, valid = blur_minmax(m)
    assert valid.tolist() == [True] and normed.min() == 0 and normed.max() == 1
    masks, thresholds = part_masks(torch.stack([m[0], torch.full((12, 10), 0.3)]))
    assert masks[0, 4:6, 3:5].all() and not masks[0, 10:, 8:].any()
    assert not masks[1].any()  # a constant map: no mask
    fixed, _ = part_masks(m, threshold=0.5)
    assert fixed[0, 4:6, 3:5].all() and not fixed[0, 0, 9]


def test_paper_gain_is_image_mass_over_span_mass_in_the_mask():
    """M_img = 0.5 and M_k = 0.1 on B_k give lambda = 5; an empty B_k gives no rescale (spec 10.5)."""
    masks = torch.zeros(1, 2, 20, dtype=torch.bool)
    masks[0, 0, 5:9] = True  # part 2: empty mask
    parts = torch.zeros(1, 2, 20)
    parts[0, 0, 5:9] = 0.1
    parts[0, 1] = 0.2
    reference = torch.full((1, 20), 0.5)
    gains, active = compute_gains("paper", parts, masks, reference)
    assert gains[0, 0].item() == pytest.approx(5.0, rel=1e-5) and active.tolist() == [[True, False]]
    assert gains[0, 1].item() == 1.0
    bias = saas.log_gain_bias(masks, gains, active, [slice(1, 3), slice(4, 6)], 8)
    assert bias.shape == (1, 1, 20, 8)
    assert torch.allclose(bias[0, 0, 5:9, 1:3], torch.tensor(math.log(5.0)), atol=1e-5)
    assert (bias[0, 0, :, 3:] == 0).all() and (bias[0, 0, :5] == 0).all()


def test_sd_gain_modes_are_clipped_to_one_and_g_max():
    masks = torch.ones(1, 3, 4, dtype=torch.bool)
    parts = torch.tensor([[[0.4] * 4, [0.1] * 4, [0.01] * 4]])
    gains, _ = compute_gains("equalize", parts, masks, g_max=3.0)
    assert gains.tolist() == [[1.0, 3.0, 3.0]]  # 4 and 40, clipped to g_max
    gains, _ = compute_gains("equalize", parts[:, :2], masks[:, :2], g_max=5.0)
    assert gains[0].tolist() == [1.0, pytest.approx(4.0)]
    sot = torch.full((1, 4), 0.8)
    gains, _ = compute_gains("sink_ratio", parts, masks, sot, g_max=3.0)
    assert gains[0].tolist() == [pytest.approx(2.0), 3.0, 3.0]
    gains, _ = compute_gains("sink_ratio", torch.full((1, 1, 4), 0.9), masks[:, :1], sot, g_max=3.0)
    assert gains.item() == 1.0  # never below 1
    gains, _ = compute_gains("fixed", parts, masks, gain=1.5)
    assert (gains == 1.5).all()


def test_self_adaptivity_in_a_toy_loop():
    """The masses are measured after the rescale (spec 3.2), so the gain of step t is the ratio
    left over after step t-1's boost.  Toy: one query region whose logits are 0 on the image
    tokens and s_t on the part; the content takes over the boost it received (the edit takes
    hold: s_{t+1} = s_t + log lambda applied at step t).  Then lambda falls monotonically to 1:
    the paper's ratio 5, 1, 1, ...; the clipped ratio (g_max 2) 2, 2, 1.25, 1, ...  With a frozen
    model instead, the paper's rule alternates between the full ratio and 1 (a property of the
    rule, see docs/methods/instruction.md)."""

    def run(mode: str, adopt: bool, g_max=None, steps: int = 6) -> list[float]:
        loop = SaaSLoop(1, window=(0, steps), gain_mode=mode, g_max=g_max)
        s, gains = -math.log(5.0), []
        for step in range(steps):
            loop.advance(step)
            bias = math.log(loop.gains[0, 0].item()) if loop.rescaling(step) else 0.0
            p = torch.tensor([0.0, s + bias]).softmax(0)  # (image, part) for every query of the region
            groups = torch.zeros(1, 64, 2)
            groups[0, 20:40] = p  # the region; elsewhere nothing attends to image or part
            loop.add(step, (8, 8), groups)
            loop.finalise()
            gains.append(loop.gains[0, 0].item())
            if adopt:
                s += bias
        return gains

    def approx(values):
        return [pytest.approx(v, rel=1e-4) for v in values]

    assert run("paper", adopt=True) == approx([5, 1, 1, 1, 1, 1])
    assert run("sink_ratio", adopt=True, g_max=2.0) == approx([2, 2, 1.25, 1, 1, 1])
    assert run("paper", adopt=False) == approx([5, 1, 5, 1, 5, 1])


# ----------------------------------------------------------------------------- 6-7: SD family (ours)


@pytest.fixture(scope="module")
def tiny_sd():
    return build_tiny("tiny")


def _names(unet):
    return attention_layer_names(unet)


def test_layer_levels_follow_the_unet_layout(tiny_sd):
    unet = tiny_sd.unet
    depth = len(unet.config.down_block_types)
    assert saas.default_levels(_names(unet), depth) == (0, 1)
    chosen = sd_layers(_names(unet), depth)
    assert chosen and all(n.endswith("attn2") and not n.startswith("mid_block") for n in chosen)
    # SD 1.5's layout (names only): attn2 at 64, 32, 16 (encoder) and the 8x8 mid block
    sd15 = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    sd15 += ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    sd15 += [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(1, 4) for a in range(3)]
    assert saas.default_levels(sd15, 4) == (1, 2)
    picked = sd_layers(sd15, 4)
    blocks = {n.split(".attentions")[0] for n in picked}
    assert blocks == {"down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2"}


def _unet_inputs(unet, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, unet.config.in_channels, 8, 8, generator=gen)
    text = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, text


def _spans():
    return [slice(1, 4), slice(5, 8)]


def _run_two_steps(unet, controller, sample, text):
    """Two denoiser forwards (steps 0 and 1) with the controller attached, and the stock outputs."""
    with torch.no_grad():
        stock = [unet(sample, t, text).sample for t in (900, 800)]
        with attach(unet, controller):
            ours = [unet(sample, t, text).sample for t in (900, 800)]
    return stock, ours


@pytest.mark.parametrize("roles", [("uncond", "cond"), ("cond", "image", "uncond")])
def test_sd_only_the_cond_rows_change_and_other_rows_are_bit_identical(tiny_sd, roles):
    unet = tiny_sd.unet
    if len(roles) == 3:  # an InstructPix2Pix UNet: 8 input channels (latent + image latent)
        unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 8})
    depth = len(unet.config.down_block_types)
    controller = SaaSController(_spans(), sd_layers(_names(unet), depth), window=(0, 3), gain_mode="fixed", gain=2.5,
                                state=ControlState(row_roles=roles))
    sample, text = _unet_inputs(unet, len(roles))
    stock, ours = _run_two_steps(unet, controller, sample, text)
    assert torch.equal(stock[0], ours[0])  # step 0 only records
    cond = roles.index("cond")
    for row in range(len(roles)):
        if row == cond:
            assert not torch.equal(stock[1][row], ours[1][row])
        else:
            assert torch.equal(stock[1][row], ours[1][row])
    entry = controller.history[0]
    assert entry["step"] == 0 and entry["masks"].shape == (1, 2, 8, 8) and entry["masks"].dtype == torch.bool
    assert entry["gains"].shape == (1, 2) and entry["mass"].shape == (1, 2)
    assert controller.loop.captured_steps == [0, 1] and controller.loop.rescaled_steps == [1]


def test_sd_bias_touches_only_cond_rows_and_span_keys(tiny_sd):
    unet = tiny_sd.unet
    controller = SaaSController(_spans(), sd_layers(_names(unet), 3), window=(0, 3), gain_mode="fixed", gain=2.0)
    seen = []
    real_attend = controller.attend

    def spy(call):
        bias = controller.bias_for(call)
        if bias is not None:
            seen.append(bias)
        return real_attend(call)

    controller.attend = spy
    sample, text = _unet_inputs(unet, 2)
    _run_two_steps(unet, controller, sample, text)
    assert seen
    for bias in seen:
        assert (bias[0] == 0).all()  # the uncond row
        assert (bias[1, ..., [0, 4, *range(8, 77)]] == 0).all()  # SOT, the gap, padding: no bias
        values = bias[1].unique()
        assert ((values == 0) | (values - math.log(2.0)).abs().lt(1e-6)).all()
        assert (bias[1] != 0).any()


def test_sd_neutral_gain_reproduces_stock_and_no_mask_is_bit_identical(tiny_sd):
    unet = tiny_sd.unet
    layers = sd_layers(_names(unet), 3)
    sample, text = _unet_inputs(unet, 2)
    # scale * lambda = 1 on one part: the biased path runs and matches stock to float rounding
    neutral = SaaSController(_spans(), layers, window=(0, 3), gain_mode="fixed", gain=2.0, scale=0.5)
    with torch.no_grad(), attach(unet, neutral):
        first = unet(sample, 900, text).sample
        neutral.loop.finalise()
        masks = neutral.loop.masks.clone()
        masks[:, 1] = False  # part 2: flagged active with gain 4, but no query is in its mask
        neutral.loop.override(masks, torch.tensor([[2.0, 4.0]]), active=torch.tensor([[True, True]]))
        second = unet(sample, 800, text).sample
    stock, _ = _run_two_steps(unet, SaaSController(_spans(), layers, window=(0, 0)), sample, text)
    assert neutral.loop.rescaled_steps == [1] and torch.equal(stock[0], first)
    assert torch.allclose(stock[1], second, atol=1e-6)
    # scale * lambda = 1 on every masked part: no rescale at all, the stock path (bit-identical)
    all_neutral = SaaSController(_spans(), layers, window=(0, 3), gain_mode="fixed", gain=2.0, scale=0.5)
    _, ours = _run_two_steps(unet, all_neutral, sample, text)
    assert all_neutral.loop.rescaled_steps == [] and torch.equal(stock[1], ours[1])
    # no mask at all (every part's mask empty): nothing is rescaled and the stock path runs
    empty = SaaSController(_spans(), layers, window=(0, 3), gain_mode="fixed", gain=2.0)
    with torch.no_grad(), attach(unet, empty):
        first = unet(sample, 900, text).sample
        empty.loop.finalise()
        empty.loop.override(torch.zeros(1, 2, 8, 8, dtype=torch.bool), torch.full((1, 2), 2.0))
        second = unet(sample, 800, text).sample
    assert empty.loop.rescaled_steps == [] and torch.equal(stock[0], first) and torch.equal(stock[1], second)


def test_sd_schedule_captures_then_rescales_in_a_pipeline(tiny_sd):
    """Captures at 0..thre-1, rescales at 1..thre, nothing after; step 0 is bit-identical."""
    pipe = tiny_sd
    layers = sd_layers(_names(pipe.unet), 3)
    spans = clip_spans(pipe.tokenizer, EXAMPLE, split_instruction(EXAMPLE))
    latents = []

    def keep(p, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    def run(controller=None):
        latents.clear()
        kwargs = dict(num_inference_steps=5, height=64, width=64, guidance_scale=4.0, output_type="latent",
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=keep)
        if controller is None:
            pipe(EXAMPLE, **kwargs)
        else:
            with attach(pipe.unet, controller):
                pipe(EXAMPLE, **kwargs)
        return list(latents)

    stock = run()
    controller = SaaSController(spans, layers, window=(0, 2), gain_mode="fixed", gain=3.0)
    ours = run(controller)
    assert controller.loop.captured_steps == [0, 1] and controller.loop.rescaled_steps == [1, 2]
    assert torch.equal(stock[0], ours[0]) and not torch.equal(stock[1], ours[1])
    history = controller.history
    assert [h["step"] for h in history] == [0, 1] and history[1]["rescaled"] and not history[0]["rescaled"]
    assert history[0]["masks"].shape == (1, 3, 8, 8)


def test_ip2p_pipeline_runs_with_its_row_roles(tiny_sd):
    unet = UNet2DConditionModel.from_config({**tiny_sd.unet.config, "in_channels": 8})
    pipe = StableDiffusionInstructPix2PixPipeline(**{**tiny_sd.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    spans = clip_spans(pipe.tokenizer, EXAMPLE, split_instruction(EXAMPLE))
    controller = SaaSController(spans, sd_layers(_names(unet), 3), window=saas.sd_window(3),
                                state=ControlState(row_roles=("cond", "image", "uncond")))
    image = torch.rand(1, 3, 64, 64)
    with attach(pipe.unet, controller):
        pipe(EXAMPLE, image=image, num_inference_steps=3, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    assert controller.loop.captured_steps == [0, 1] and [h["step"] for h in controller.history] == [0, 1]
    gains = torch.stack([h["gains"] for h in controller.history])
    assert ((gains >= 1) & (gains <= 3)).all()


def test_sd_controller_refuses_a_missing_role_and_overlapping_spans():
    with pytest.raises(ValueError, match="row role 'cond'"):
        SaaSController(_spans(), ["x"], state=ControlState(row_roles=("uncond", "image")))
    with pytest.raises(ValueError, match="overlap"):
        SaaSController([slice(1, 4), slice(3, 6)], ["x"])


# ----------------------------------------------------------------------------- 2-4: OmniGen (paper)


N_PRE, N_POST = 5, 4


def _omnigen_inputs(out_hw=(8, 8), in_hw=(8, 8), seed=0):
    """Three CFG rows [cond, uncond, img_cond] as OmniGen's pipeline builds them: the cond row is
    text, input-image tokens, text; the uncond row is left-padded text only; then the time token
    and the output-image tokens.  Mask: causal over the condition, bidirectional inside each
    image, output (and time) tokens see everything unpadded."""
    gen = torch.Generator().manual_seed(seed)
    n_in = (in_hw[0] // 2) * (in_hw[1] // 2)
    n_out = (out_hw[0] // 2) * (out_hw[1] // 2)
    lc = N_PRE + n_in + N_POST
    seq = lc + 1 + n_out
    ids = torch.randint(1, 1000, (3, lc), generator=gen)
    pad = lc - 6
    ids[1, :pad] = 0
    sizes = {0: [[N_PRE, N_PRE + n_in]], 2: [[3, 3 + n_in]]}
    mask = torch.ones(seq, seq).tril().repeat(3, 1, 1)
    for row, spans in sizes.items():
        for a, b in spans:
            mask[row, a:b, a:b] = 1
    mask[:, lc:, :] = 1
    mask[1, :, :pad] = 0
    return dict(
        hidden_states=torch.randn(3, 4, *out_hw, generator=gen),
        timestep=torch.full((3,), 0.9),
        input_ids=ids,
        input_img_latents=[torch.randn(1, 4, *in_hw, generator=gen) for _ in range(2)],
        input_image_sizes=sizes,
        attention_mask=mask,
        position_ids=torch.arange(seq).repeat(3, 1),
    ), [slice(1, 3), slice(lc - 3, lc - 1)]


@pytest.fixture(scope="module")
def omnigen():
    return tiny_omnigen_transformer()


def _layer_call(omnigen, inputs, seed=1):
    """Inputs of one self-attention call: normed hidden states, additive mask, rotary embedding."""
    gen = torch.Generator().manual_seed(seed)
    seq = inputs["attention_mask"].shape[-1]
    hidden = torch.randn(3, seq, omnigen.config.hidden_size, generator=gen)
    mask = ((1 - inputs["attention_mask"]) * torch.finfo(torch.float32).min).unsqueeze(1)
    rope = omnigen.rope(hidden, inputs["position_ids"])
    return hidden, mask, rope


def _state_with_masks(spans, inputs, gain, layers=(0,), out_grid=(4, 4)):
    state = SaaSOmniGenState(spans, capture_layers=layers, scale_layers=layers, window=(0, 5))
    seq = inputs["attention_mask"].shape[-1]
    state.begin_forward(batch_size=3, out_grid=out_grid, input_image_sizes=inputs["input_image_sizes"],
                        seq_len=seq, step=0)
    masks = torch.zeros(1, len(spans), *out_grid, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[0, 1, 1:3, 1:] = True
    state.loop.override(masks, torch.full((1, len(spans)), gain))
    state.begin_forward(batch_size=3, out_grid=out_grid, input_image_sizes=inputs["input_image_sizes"],
                        seq_len=seq, step=1)
    return state


def test_omnigen_processor_changes_only_the_cond_rows_output_queries(omnigen):
    inputs, spans = _omnigen_inputs()
    attn = omnigen.layers[0].self_attn
    hidden, mask, rope = _layer_call(omnigen, inputs)
    with torch.no_grad():
        stock = OmniGenAttnProcessor2_0()(attn, hidden, hidden, mask, rope)
        state = _state_with_masks(spans, inputs, gain=4.0)
        ours = SaaSOmniGenProcessor(state, 0)(attn, hidden, hidden, mask, rope)
        inactive = SaaSOmniGenProcessor(state, 1)(attn, hidden, hidden, mask, rope)  # not a SaaS layer
    n_out = 16
    assert torch.equal(ours[1:], stock[1:])
    assert torch.equal(ours[0, :-n_out], stock[0, :-n_out])  # condition and time queries of row 0
    assert not torch.allclose(ours[0, -n_out:], stock[0, -n_out:])
    assert torch.equal(inactive, stock)
    entry = state.history[-1]  # step 1 was captured (after its boost)
    assert entry["step"] == 1 and entry["masks"].shape == (1, 2, 4, 4)


def test_omnigen_neutral_gain_and_no_mask(omnigen):
    inputs, spans = _omnigen_inputs()
    attn = omnigen.layers[0].self_attn
    hidden, mask, rope = _layer_call(omnigen, inputs)
    with torch.no_grad():
        stock = OmniGenAttnProcessor2_0()(attn, hidden, hidden, mask, rope)
        neutral = SaaSOmniGenProcessor(_state_with_masks(spans, inputs, gain=1.0), 0)(attn, hidden, hidden, mask, rope)
        state = SaaSOmniGenState(spans, capture_layers=(0,), scale_layers=(0,), window=(0, 5))
        state.begin_forward(batch_size=3, out_grid=(4, 4), input_image_sizes=inputs["input_image_sizes"],
                            seq_len=mask.shape[-1], step=1)
        no_mask = SaaSOmniGenProcessor(state, 0)(attn, hidden, hidden, mask, rope)
    assert torch.equal(neutral, stock)  # scale * lambda == 1 everywhere: the stock path
    assert not state.rescales(0) and torch.equal(no_mask, stock)
    # one part neutral, the other flagged active but with an empty mask: the biased path runs with
    # a zero bias and matches stock to float rounding
    state = _state_with_masks(spans, inputs, gain=1.0)
    masks = state.loop.masks.clone()
    masks[:, 1] = False
    state.loop.override(masks, torch.tensor([[1.0, 3.0]]), active=torch.tensor([[True, True]]))
    state.begin_forward(batch_size=3, out_grid=(4, 4), input_image_sizes=inputs["input_image_sizes"],
                        seq_len=mask.shape[-1], step=2)
    with torch.no_grad():
        biased = SaaSOmniGenProcessor(state, 0)(attn, hidden, hidden, mask, rope)
    assert state.rescales(0) and torch.allclose(biased, stock, atol=1e-6)


def test_omnigen_capture_measures_image_and_span_mass_of_the_output_queries(omnigen):
    inputs, spans = _omnigen_inputs()
    attn = omnigen.layers[0].self_attn
    hidden, mask, rope = _layer_call(omnigen, inputs)
    state = SaaSOmniGenState(spans, capture_layers=(0,), scale_layers=(), window=(0, 5))
    state.begin_forward(batch_size=3, out_grid=(4, 4), input_image_sizes=inputs["input_image_sizes"],
                        seq_len=mask.shape[-1], step=0)
    with torch.no_grad():
        SaaSOmniGenProcessor(state, 0)(attn, hidden, hidden, mask, rope)
        q = attn.to_q(hidden[:1]).view(1, -1, 4, 8).transpose(1, 2)
        k = attn.to_k(hidden[:1]).view(1, -1, 4, 8).transpose(1, 2)
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = (apply_rotary_emb(x, rope, use_real_unbind_dim=-2) for x in (q, k))
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + mask[:1]).softmax(-1)[:, :, -16:].mean(1)[0]
    got = state.loop.sums.at((4, 4))[0]
    assert torch.allclose(got[:, 0], p[:, N_PRE : N_PRE + 16].sum(-1), atol=1e-6)
    for k_, span in enumerate(spans, start=1):
        assert torch.allclose(got[:, k_], p[:, span].sum(-1), atol=1e-6)


def test_omnigen_transformer_with_a_non_square_output_and_processors_restored(omnigen):
    """Output 8x12 latent (4x6 tokens, a 2:3 image) with a square input image: the masks are 4x6;
    only the cond row's output changes; the original processors come back (spec 10.3, 10.10, 10.11)."""
    inputs, spans = _omnigen_inputs(out_hw=(8, 12), in_hw=(8, 8))
    before = [block.self_attn.get_processor() for block in omnigen.layers]
    state = SaaSOmniGenState(spans, capture_layers=(1, 2, 3), scale_layers=(2, 3), window=(0, 2), gain_mode="fixed",
                             gain=3.0)
    with torch.no_grad():
        stock = [omnigen(**{**inputs, "timestep": torch.full((3,), t)}).sample for t in (0.9, 0.8, 0.7)]
        with install_omnigen(omnigen, state):
            installed = [block.self_attn.get_processor() for block in omnigen.layers]
            assert installed[0] is before[0]
            assert all(isinstance(p, SaaSOmniGenProcessor) for p in installed[1:])
            assert "image_rotary_emb" in inspect.signature(installed[1].__call__).parameters
            ours = [omnigen(**{**inputs, "timestep": torch.full((3,), t)}).sample for t in (0.9, 0.8, 0.7)]
    assert all(a is b for a, b in zip(before, [block.self_attn.get_processor() for block in omnigen.layers]))
    assert torch.equal(stock[0], ours[0])
    assert torch.equal(stock[1][1:], ours[1][1:]) and not torch.equal(stock[1][0], ours[1][0])
    assert state.loop.captured_steps == [0, 1] and state.loop.rescaled_steps == [1, 2]
    assert [h["masks"].shape for h in state.history] == [(1, 2, 4, 6)] * 2


def test_omnigen_state_refuses_two_cond_rows_and_a_wrong_length():
    state = SaaSOmniGenState([slice(1, 3)], seq_len=40)
    with pytest.raises(ValueError, match="one cond row"):
        state.begin_forward(batch_size=6, out_grid=(4, 4), input_image_sizes={}, seq_len=40, step=0)
    with pytest.raises(ValueError, match="received 41 tokens"):
        state.begin_forward(batch_size=3, out_grid=(4, 4), input_image_sizes={}, seq_len=41, step=0)


def test_paper_defaults_are_the_released_settings():
    assert PAPER_DEFAULTS.capture_layers == tuple(range(8, 32)) == PAPER_DEFAULTS.scale_layers
    assert (PAPER_DEFAULTS.begin, PAPER_DEFAULTS.thre, PAPER_DEFAULTS.steps) == (0, 20, 50)
    assert PAPER_DEFAULTS.scale == 1.0 and PAPER_DEFAULTS.mask_threshold == "auto"
    assert saas.sd_window(50) == (0, 20) and saas.sd_window(100) == (0, 40)


# ----------------------------------------------------------------------------- FLUX Kontext (ours)


@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux").transformer


def _kontext_call(flux, n_txt=6, out_grid=(2, 3), n_ref=4, seed=2):
    """One joint sequence [text, output image, reference image] as FLUX Kontext lays it out:
    normed text and image streams of one row and the rotary embedding of their position ids
    (text 0, output (0, r, c), reference (1, r, c))."""
    gen = torch.Generator().manual_seed(seed)
    dim = flux.config.num_attention_heads * flux.config.attention_head_dim
    n_out = out_grid[0] * out_grid[1]
    text = torch.randn(1, n_txt, dim, generator=gen)
    image = torch.randn(1, n_out + n_ref, dim, generator=gen)
    out_ids = torch.stack(torch.meshgrid(torch.arange(out_grid[0]), torch.arange(out_grid[1]), indexing="ij"), -1)
    out_ids = torch.cat([torch.zeros(n_out, 1), out_ids.reshape(n_out, 2).float()], -1)
    ref_ids = torch.cat([torch.ones(n_ref, 1), torch.stack([torch.zeros(n_ref), torch.arange(n_ref)], -1)], -1)
    rope = flux.pos_embed(torch.cat([torch.zeros(n_txt, 3), out_ids, ref_ids]))
    return text, image, rope


def _kontext_state(spans, gain, out_grid=(2, 3), n_txt=6, n_ref=4, layers=(0, 1)):
    from attention_processors.saas import SaaSFluxKontextState

    state = SaaSFluxKontextState(spans, capture_layers=layers, scale_layers=layers, window=(0, 5))
    state.begin_forward(batch_size=1, n_txt=n_txt, out_grid=out_grid, n_reference=n_ref, step=0)
    masks = torch.zeros(1, len(spans), *out_grid, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[0, 1, :, 1:] = True
    state.loop.override(masks, torch.full((1, len(spans)), gain))
    state.begin_forward(batch_size=1, n_txt=n_txt, out_grid=out_grid, n_reference=n_ref, step=1)
    return state


def test_flux_kontext_processor_changes_only_the_output_queries_in_both_block_kinds(flux):
    """Dual-stream and single-stream attention: text and reference-image queries stay
    bit-identical to the stock `FluxAttnProcessor`, the output-image queries follow the log-gain
    bias exactly (explicit softmax), a neutral gain is the stock path bit for bit, and the capture
    measures the reference and span masses of the output queries."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from attention_processors.saas import SaaSFluxKontextProcessor, log_gain_bias

    spans, n_txt, n_out = [slice(1, 3), slice(4, 6)], 6, 6
    text, image, rope = _kontext_call(flux)
    dual, single = flux.transformer_blocks[0].attn, flux.single_transformer_blocks[0].attn
    joint = torch.cat([text, image], dim=1)
    with torch.no_grad():
        stock_img, stock_txt = FluxAttnProcessor()(dual, image, text, None, rope)
        stock_single = FluxAttnProcessor()(single, joint, None, None, rope)
        state = _kontext_state(spans, gain=4.0)
        ours_img, ours_txt = SaaSFluxKontextProcessor(state, 0)(dual, image, text, None, rope)
        ours_single = SaaSFluxKontextProcessor(state, 1)(single, joint, None, None, rope)
        neutral = _kontext_state(spans, gain=1.0)
        assert not neutral.rescales(0)
        neutral_img, neutral_txt = SaaSFluxKontextProcessor(neutral, 0)(dual, image, text, None, rope)
        neutral_single = SaaSFluxKontextProcessor(neutral, 1)(single, joint, None, None, rope)
    assert torch.equal(ours_txt, stock_txt) and torch.equal(ours_img[:, n_out:], stock_img[:, n_out:])
    assert not torch.allclose(ours_img[:, :n_out], stock_img[:, :n_out])
    assert torch.equal(ours_single[:, :n_txt], stock_single[:, :n_txt])
    assert torch.equal(ours_single[:, n_txt + n_out :], stock_single[:, n_txt + n_out :])
    assert torch.equal(neutral_img, stock_img) and torch.equal(neutral_txt, stock_txt)
    assert torch.equal(neutral_single, stock_single)
    # the single-stream output queries against an explicit softmax with log(lambda) on span keys in the mask
    from diffusers.models.embeddings import apply_rotary_emb

    with torch.no_grad():
        q = single.norm_q(single.to_q(joint).unflatten(-1, (-1, single.head_dim)))
        k = single.norm_k(single.to_k(joint).unflatten(-1, (-1, single.head_dim)))
        v = single.to_v(joint).unflatten(-1, (-1, single.head_dim))
        q, k = (apply_rotary_emb(x, rope, sequence_dim=1).transpose(1, 2) for x in (q, k))
        logits = q[:, :, n_txt : n_txt + n_out] @ k.transpose(-1, -2) / math.sqrt(single.head_dim)
        bias = log_gain_bias(state.loop.masks.flatten(-2), state.loop.gains, state.loop.active, spans,
                             k.shape[2])
        p = (logits + bias).softmax(-1)
        expected = (p @ v.transpose(1, 2)).transpose(1, 2).flatten(2)
    assert torch.allclose(ours_single[:, n_txt : n_txt + n_out], expected, atol=1e-5)
    # capture (step 1, after its boost), the single-stream layer alone: group 0 is the reference
    # image's mass, then each part's, head-mean, of the output queries
    single_only = _kontext_state(spans, gain=4.0, layers=(1,))
    with torch.no_grad():
        SaaSFluxKontextProcessor(single_only, 1)(single, joint, None, None, rope)
    got, mean = single_only.loop.sums.at((2, 3))[0], p.mean(1)[0]
    assert got.shape == (n_out, 1 + len(spans))
    assert torch.allclose(got[:, 0], mean[:, n_txt + n_out :].sum(-1), atol=1e-6)
    for k_, span in enumerate(spans, start=1):
        assert torch.allclose(got[:, k_], mean[:, span].sum(-1), atol=1e-6)


def test_flux_kontext_install_reads_the_layout_from_the_transformer_inputs_and_restores(flux):
    from attention_processors.saas import (SaaSFluxKontextProcessor, SaaSFluxKontextState, flux_kontext_image_layout,
                                           install_flux_kontext)

    out_ids = torch.zeros(6, 3)
    out_ids[:, 1], out_ids[:, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    ref_ids = torch.ones(4, 3)
    assert flux_kontext_image_layout(torch.cat([out_ids, ref_ids])) == ((2, 3), 4)
    with pytest.raises(ValueError, match="not \\[output tokens"):
        flux_kontext_image_layout(torch.cat([ref_ids, out_ids]))
    state = SaaSFluxKontextState([slice(0, 2)], capture_layers=(1,), scale_layers=(1,), window=(0, 2),
                                 gain_mode="fixed", gain=2.0, seq_len=7 + 10)
    before = [b.attn.get_processor() for b in (*flux.transformer_blocks, *flux.single_transformer_blocks)]
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 10, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, flux.config.joint_attention_dim, generator=gen),
                  pooled_projections=torch.randn(1, flux.config.pooled_projection_dim, generator=gen),
                  guidance=torch.full((1,), 3.5), txt_ids=torch.zeros(7, 3), img_ids=torch.cat([out_ids, ref_ids]),
                  return_dict=False)
    with torch.no_grad(), install_flux_kontext(flux, state):
        installed = [b.attn.get_processor() for b in (*flux.transformer_blocks, *flux.single_transformer_blocks)]
        assert installed[0] is before[0] and isinstance(installed[1], SaaSFluxKontextProcessor)
        for t in (1.0, 0.5, 0.25):
            flux(timestep=torch.full((1,), t), **kwargs)
    assert state.out_grid == (2, 3) and state.out_queries == slice(7, 13) and state.reference == [slice(13, 17)]
    assert state.loop.captured_steps == [0, 1] and state.loop.rescaled_steps == [1, 2]
    assert [b.attn.get_processor() for b in (*flux.transformer_blocks, *flux.single_transformer_blocks)] == before
    with pytest.raises(ValueError, match="spans were computed for"), install_flux_kontext(flux, state):
        flux(timestep=torch.full((1,), 0.1), **{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :6],
                                                "txt_ids": torch.zeros(6, 3)})
    assert all(a is b for a, b in zip(before, [b.attn.get_processor() for b in (*flux.transformer_blocks,
                                                                              *flux.single_transformer_blocks)]))
