"""The controller verbs (bias, temperature, rescale, post), grids and heatmaps, as specifications.

Unit tests call a controlled processor on a real diffusers `Attention` module with small random
tensors and compare with an explicit float64 computation written out here.
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from attention_processors import AttentionController, ControlState, attach, attention_layer_names, mask_to_tokens, token_grid
from attention_processors.core import masked_value
from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers
from attention_processors.processors import ControlledAttnProcessor, ControlledFluxAttnProcessor
from pipelines import models

torch.manual_seed(0)
B, N_IMG, N_TXT, DIM, CTX = 2, 12, 7, 32, 16


@pytest.fixture(scope="module")
def cross_attention():
    torch.manual_seed(0)
    return Attention(query_dim=DIM, cross_attention_dim=CTX, heads=2, dim_head=16).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, N_IMG, DIM, generator=g), torch.randn(B, N_TXT, CTX, generator=g)


def reference(attn, x, text, bias=None, scale=None):
    """float64 softmax(QK^T * scale + bias) V through the module's own projections."""
    attn = attn.double()
    try:
        q = attn.to_q(x.double()).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_k(text.double()).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(text.double()).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias.double()
        probs = logits.softmax(-1)
        out = (probs @ v).transpose(1, 2).flatten(2)
        return attn.to_out[0](out).float(), probs.float()
    finally:
        attn.float()


def controlled(attn, controller, x, text):
    return ControlledAttnProcessor("layer", controller)(attn, x, encoder_hidden_states=text)


class Verbs(AttentionController):
    def __init__(self, bias=None, scale=None, gain=None, explicit=False, post=None):
        super().__init__(ControlState())
        self._bias, self._scale, self._gain, self._explicit, self._post = bias, scale, gain, explicit, post
        self.captured = None

    def bias(self, call):
        return self._bias

    def softmax_scale(self, call):
        return self._scale

    def needs_probabilities(self, call):
        return self._explicit or self._gain is not None

    def rescale(self, call, probs):
        if self._gain is None:
            return probs
        probs = probs * self._gain
        return probs / probs.sum(-1, keepdim=True)

    def capture(self, call):
        self.captured = call.text_probs()

    def post(self, call, output):
        return output if self._post is None else self._post(output)


def test_bias_masks_keys_and_matches_reference(cross_attention, inputs):
    x, text = inputs
    bias = torch.zeros(1, 1, 1, N_TXT)
    bias[..., 2:5] = masked_value(torch.float32)
    controller = Verbs(bias=bias)
    out = controlled(cross_attention, controller, x, text)
    want, want_probs = reference(cross_attention, x, text, bias=bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert controller.captured[..., 2:5].max() < 1e-6  # masked keys get no attention
    torch.testing.assert_close(controller.captured, want_probs, atol=1e-6, rtol=1e-5)


def test_temperature_is_the_sdpa_scale(cross_attention, inputs):
    x, text = inputs
    out = controlled(cross_attention, Verbs(scale=0.05), x, text)
    want, _ = reference(cross_attention, x, text, scale=0.05)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_explicit_path_equals_sdpa_path(cross_attention, inputs):
    x, text = inputs
    fused = controlled(cross_attention, Verbs(), x, text)
    explicit = controlled(cross_attention, Verbs(explicit=True), x, text)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)


def test_rescale_and_renormalise_equals_log_gain_bias(cross_attention, inputs):
    """A probability gain g with renormalisation is the same as adding log g to the logits."""
    x, text = inputs
    gain = torch.ones(N_TXT)
    gain[3] = 4.0
    rescaled = controlled(cross_attention, Verbs(gain=gain), x, text)
    biased = controlled(cross_attention, Verbs(bias=gain.log()), x, text)
    torch.testing.assert_close(rescaled, biased, atol=1e-5, rtol=1e-4)


def test_post_edits_what_the_block_adds_to_its_residual(cross_attention, inputs):
    x, text = inputs
    shift = torch.full((DIM,), 0.25)
    plain = controlled(cross_attention, Verbs(), x, text)
    shifted = controlled(cross_attention, Verbs(post=lambda out: out + shift), x, text)
    torch.testing.assert_close(shifted - plain, shift.expand_as(plain), atol=1e-6, rtol=0)


def test_single_stream_with_wrong_text_length_raises():
    pipe = models.load("tiny-flux")
    block = pipe.transformer.single_transformer_blocks[0].attn
    state = ControlState(latent_hw=(4, 4), n_txt=5)
    processor = ControlledFluxAttnProcessor("single_transformer_blocks.0.attn", Verbs())
    processor.controller.state = state
    hidden = torch.randn(1, 5 + 16, block.query_dim)
    processor(block, hidden)  # 5 text + 4x4 image tokens: fine
    state.n_txt = 6
    with pytest.raises(ValueError, match="do not split"):
        processor(block, hidden)


def test_token_grids_follow_the_latent_aspect_ratio():
    assert token_grid(96 * 64, (96, 64)) == (96, 64)
    assert token_grid(48 * 32, (96, 64)) == (48, 32)
    assert token_grid(13 * 7, (25, 13)) == (13, 7)  # odd sizes: UNets round up
    with pytest.raises(ValueError):
        token_grid(50, (96, 64))


def test_hard_masks_dilate_when_shrinking():
    mask = torch.zeros(64, 96)
    mask[10, :] = 1  # a one-pixel line must survive on an 8x12 grid
    tokens = mask_to_tokens(mask, (8, 12))
    assert tokens.shape == (96,)
    assert tokens.view(8, 12)[1].eq(1).all() and tokens.sum() == 12


def test_layer_groups():
    unet = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    assert text_attention_layers(unet) == set(unet[1:])
    assert text_attention_layers(unet, "mid") == {unet[2]}
    flux = [f"transformer_blocks.{i}.attn" for i in range(3)] + [f"single_transformer_blocks.{i}.attn" for i in range(3)]
    assert text_attention_layers(flux, "down") == set(flux[:2])
    assert text_attention_layers(flux, "up") == set(flux[4:])  # single-stream blocks run last


class PlantedHeatmaps(CrossAttentionHeatmaps):
    """Forces image queries left of the centre onto one token and the rest onto another."""

    def __init__(self, left_token, right_token, **kwargs):
        super().__init__(**kwargs)
        self.left_token, self.right_token = left_token, right_token

    def bias(self, call):
        h, w = call.grid
        left = (torch.arange(w) < w / 2).repeat(h)  # row-major token order: p = row * w + col
        bias = torch.full((call.n_image, call.key.shape[2]), masked_value(torch.float32))
        bias[left, self.left_token] = 0
        bias[~left, self.right_token] = 0
        return bias


def test_heatmaps_land_where_attention_was_planted_on_a_non_square_image():
    pipe = models.load("tiny")
    layers = text_attention_layers(attention_layer_names(pipe.unet))
    controller = PlantedHeatmaps(2, 5, layers=layers, keep=7, state=ControlState(row_roles=("uncond", "cond")))
    with attach(pipe.unet, controller):
        pipe("a photo of a cat", num_inference_steps=2, height=64, width=96, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    maps = controller.maps()[0]  # (7 tokens, 8, 12)
    assert maps.shape == (7, 8, 12)
    # coarse layers (a 2x3 grid here) are upsampled bilinearly and blur the centre columns
    assert maps[2, :, :4].mean() > 0.95 and maps[2, :, 8:].mean() < 0.05
    assert maps[5, :, 8:].mean() > 0.95 and maps[5, :, :4].mean() < 0.05


def test_maps_are_float32_when_the_model_runs_in_bfloat16():
    pipe = models.load("tiny", dtype=torch.bfloat16)
    layers = text_attention_layers(attention_layer_names(pipe.unet))
    controller = CrossAttentionHeatmaps(layers, state=ControlState(row_roles=("uncond", "cond")))
    with attach(pipe.unet, controller):
        pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    maps = controller.maps()
    assert maps.dtype == torch.float32 and maps.shape == (1, 77, 8, 8)
    # every pixel's attention over all 77 keys still sums to one after averaging and resizing
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 8, 8), atol=1e-4, rtol=0)


def test_attend_replaces_the_attention_computation(cross_attention, inputs):
    """A policy can compute the attention itself, e.g. two temperatures blended per query."""

    class Blend(AttentionController):
        def attend(self, call):
            sharp = torch.nn.functional.scaled_dot_product_attention(call.query, call.key, call.value, scale=0.5)
            plain = torch.nn.functional.scaled_dot_product_attention(call.query, call.key, call.value)
            first_half = (torch.arange(call.query.shape[2]) < N_IMG // 2)[:, None]
            return torch.where(first_half, sharp, plain)

    out = controlled(cross_attention, Blend(ControlState()), x := inputs[0], text := inputs[1])
    sharp, _ = reference(cross_attention, x, text, scale=0.5)
    plain, _ = reference(cross_attention, x, text)
    torch.testing.assert_close(out[:, : N_IMG // 2], sharp[:, : N_IMG // 2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, N_IMG // 2 :], plain[:, N_IMG // 2 :], atol=1e-5, rtol=1e-4)
