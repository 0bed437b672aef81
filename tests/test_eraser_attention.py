"""AAS (attention_processors/attentive_eraser.py) against its specification (eraser.md §2.2-2.4, §6).

Unit tests build attention calls from small random tensors and compare with an explicit float64
softmax written out here; pipeline-level tests run the tiny UNets with the policy attached.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from attention_processors import ControlState, attach, token_grid
from attention_processors.attentive_eraser import AAS, NORMAL, AttentiveEraserAAS, is_aas_layer
from attention_processors.core import AttentionCall, controlled_attention
from attention_processors.processors import ControlledAttnProcessor
from pipelines.eraser import run_sarg

LAYER = "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
HEADS, D = 2, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: one thread is faster, and much faster on a shared, busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_qkv(batch, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, n, D, generator=g).to(dtype) for _ in range(3)]


def box_masks(grid, boxes):
    """(B, h, w) bool masks with one filled box (y0, y1, x0, x1) each."""
    masks = torch.zeros(len(boxes), *grid, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def aas_call(q, k, v, grid, roles=(NORMAL, AAS), step=0):
    state = ControlState(row_roles=roles, latent_hw=grid)
    state.step = step
    call = AttentionCall(LAYER, "self", q, k, v, slice(0, q.shape[2]), None, state)
    return call, state


def run_aas(masks, q, k, v, grid, step=0, ss_steps=9, ss_scale=0.3, roles=(NORMAL, AAS)):
    call, state = aas_call(q, k, v, grid, roles, step)
    controller = AttentiveEraserAAS(masks, ss_steps=ss_steps, ss_scale=ss_scale, state=state)
    return controlled_attention(controller, call), controller


def reference_aas(q, k, v, token_masks, lam=None):
    """float64 softmax(lam * S + b) V, b = -inf on masked keys, per sample."""
    q, k, v = q.double(), k.double(), v.double()
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if lam is not None:
        logits = lam * logits
    logits = logits.masked_fill(token_masks[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v


# ------------------------------------------------------------------------- unit: one call


@pytest.mark.parametrize("shared", [True, False], ids=["one-mask", "per-sample-masks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_keys_get_no_attention(shared, dtype):
    grid, b = (4, 6), 2
    boxes = [(1, 3, 1, 4)] * b if shared else [(1, 3, 1, 4), (0, 2, 3, 6)]
    masks = box_masks(grid, boxes)
    q, k, _ = random_qkv(2 * b, 24, dtype)
    q = q * 4  # sharp attention: the suppression must hold against large logits too
    tokens = masks.flatten(1)
    # V = indicator of the masked keys: the output is the attention mass on them
    indicator = torch.cat([torch.zeros_like(tokens), tokens]).to(dtype)[:, None, :, None].expand(-1, HEADS, -1, D)
    for step in (0, 20):  # with and without similarity suppression
        out, _ = run_aas(masks, q, k, indicator.contiguous(), grid, step=step)
        assert torch.isfinite(out).all()
        assert out[b:].float().max().item() < 1e-6


def test_normal_rows_are_bit_identical_to_plain_sdpa():
    grid = (4, 6)
    q, k, v = random_qkv(4, 24)
    out, _ = run_aas(box_masks(grid, [(1, 3, 1, 4)] * 2), q, k, v, grid)
    assert torch.equal(out[:2], F.scaled_dot_product_attention(q[:2], k[:2], v[:2]))
    assert torch.equal(out[:2], F.scaled_dot_product_attention(q, k, v)[:2])


def test_normal_half_of_a_real_layer_is_bit_identical_to_the_stock_processor():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=HEADS, dim_head=16).eval()
    x = torch.randn(4, 24, 32)
    state = ControlState(row_roles=(NORMAL, AAS), latent_hw=(4, 6))
    state.step = 0
    controller = AttentiveEraserAAS(box_masks((4, 6), [(1, 3, 1, 4)]), state=state)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        ours = ControlledAttnProcessor(LAYER, controller)(attn, x)
    assert torch.equal(ours[:2], stock[:2])
    assert not torch.allclose(ours[2:], stock[2:])


@pytest.mark.parametrize("shared", [True, False], ids=["one-mask", "per-sample-masks"])
def test_aas_and_similarity_suppression_match_float64_reference(shared):
    grid, b, lam = (5, 4), 2, 0.3
    boxes = [(1, 4, 1, 3)] * b if shared else [(1, 4, 1, 3), (0, 2, 0, 4)]
    masks = box_masks(grid, boxes)
    tokens = masks.flatten(1)
    q, k, v = random_qkv(2 * b, 20, seed=3)
    plain, _ = run_aas(masks, q, k, v, grid, step=10)  # after ss_steps: plain AAS
    torch.testing.assert_close(plain[b:].double(), reference_aas(q[b:], k[b:], v[b:], tokens), atol=1e-5, rtol=1e-5)
    ss, controller = run_aas(masks, q, k, v, grid, step=9)  # last SS step (0..9 inclusive)
    assert controller.counts[(9, "ss")] == 1
    fg = reference_aas(q[b:], k[b:], v[b:], tokens, lam=lam)
    inside = tokens[:, None, :, None].expand_as(fg)
    torch.testing.assert_close(ss[b:].double()[inside], fg[inside], atol=1e-5, rtol=1e-5)
    # out-of-mask queries are exactly plain AAS
    assert torch.equal(ss[b:][~inside], plain[b:][~inside])
    # and the scaled variant really differs from plain AAS inside
    assert not torch.allclose(ss[b:][inside], plain[b:][inside])


def test_lambda_one_equals_plain_aas():
    grid = (4, 4)
    masks = box_masks(grid, [(0, 2, 0, 2)])
    q, k, v = random_qkv(2, 16, seed=5)
    with_ss, _ = run_aas(masks, q, k, v, grid, step=0, ss_scale=1.0)
    plain, _ = run_aas(masks, q, k, v, grid, step=50, ss_scale=1.0)
    assert torch.equal(with_ss, plain)


def test_fully_masked_grid_falls_back_to_plain_attention():
    grid = (2, 2)
    q, k, v = random_qkv(4, 4, seed=7)
    masks = torch.stack([torch.ones(8, 8, dtype=torch.bool), box_masks((8, 8), [(0, 4, 0, 4)])[0]])
    out, controller = run_aas(masks, q, k, v, grid)
    assert torch.isfinite(out).all()
    # sample 0 covers every token of the 2x2 grid: its AAS row attends normally
    assert torch.equal(out[2], F.scaled_dot_product_attention(q[2:3], k[2:3], v[2:3])[0])
    assert controller.warnings and "every token" in controller.warnings[0]
    # sample 1 is still edited: the top-left token (its mask) gets no attention
    tokens = torch.tensor([True, False, False, False])
    torch.testing.assert_close(out[3].double(), reference_aas(q[3:], k[3:], v[3:], tokens[None], lam=0.3)[0]
                               .where(tokens[None, :, None], reference_aas(q[3:], k[3:], v[3:], tokens[None])[0]),
                               atol=1e-5, rtol=1e-5)


def test_empty_mask_and_rows_without_aas_are_untouched():
    grid = (4, 4)
    q, k, v = random_qkv(2, 16)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    out, _ = run_aas(empty, q, k, v, grid)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    normal_only, _ = run_aas(box_masks(grid, [(0, 2, 0, 2)]), q[:1], k[:1], v[:1], grid, roles=(NORMAL,))
    assert torch.equal(normal_only, F.scaled_dot_product_attention(q[:1], k[:1], v[:1]))


def test_fp16_bias_gives_finite_outputs():
    grid = (4, 4)
    q, k, v = random_qkv(4, 16, dtype=torch.float16, seed=2)
    masks = box_masks(grid, [(0, 3, 0, 3), (1, 4, 1, 4)])  # per-sample: the finfo.min bias path
    for step in (0, 20):
        out, _ = run_aas(masks, q * 30, k, v, grid, step=step)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- token grids


@pytest.mark.parametrize("latent_hw", [(128, 128), (96, 72), (80, 120)])
def test_token_masks_fit_every_grid_and_dilate(latent_hw):
    h, w = latent_hw
    pixels = torch.zeros(1, 8 * h, 8 * w, dtype=torch.bool)
    pixels[0, 8 * h // 3, 8 * w // 5] = True  # one pixel
    controller = AttentiveEraserAAS(pixels)
    for level in range(4):
        grid = (math.ceil(h / 2**level), math.ceil(w / 2**level))
        n = grid[0] * grid[1]
        assert token_grid(n, latent_hw) == grid  # from the latent size, never sqrt(N)
        gm = controller.grid_masks(grid, 1, torch.device("cpu"))
        assert gm.tokens.shape == (1, n)
        # the one masked pixel marks exactly the cell that contains it
        assert gm.tokens.sum() == 1
        cell = gm.tokens[0].view(grid).nonzero()[0].tolist()
        assert cell == [(8 * h // 3) * grid[0] // (8 * h), (8 * w // 5) * grid[1] // (8 * w)]


# --------------------------------------------------------------- placement, steps, real runs


def aas_names(unet) -> set[str]:
    return {n for n, m in unet.named_modules() if hasattr(m, "set_processor") and n.startswith("up_blocks")
            and n.endswith("attn1")}


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_processors_go_on_decoder_self_attention_only_and_are_restored(tiny_pipe, name):
    unet = tiny_pipe(name).unet
    before = unet.attn_processors
    expected = {f"{n}.processor" for n in aas_names(unet)}
    assert expected and all(is_aas_layer(n.removesuffix(".processor")) for n in expected)
    assert not any(is_aas_layer(k.removesuffix(".processor")) for k in set(before) - expected)
    with attach(unet, AttentiveEraserAAS(torch.ones(1, 8, 8))):
        during = unet.attn_processors
        changed = {k for k in before if during[k] is not before[k]}
        assert changed == expected
        assert all(type(during[k]).__name__ == "ControlledAttnProcessor" for k in changed)
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any("forward" in vars(m) for m in unet.modules())


class MassProbe(AttentiveEraserAAS):
    """AAS that also measures, on every edited call, the attention mass on masked keys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mass: dict[tuple[str, int], float] = {}

    def attend(self, call):
        out = super().attend(call)
        if out is not None:
            rows = call.rows(AAS)
            gm = self.grid_masks(call.grid, rows.stop - rows.start, call.query.device)
            ones = torch.zeros_like(call.value)
            ones[rows] = gm.tokens.to(call.value.dtype)[:, None, :, None].expand_as(call.value[rows])
            probe = super().attend(replace(call, value=ones))
            self.mass[(call.name, call.state.step)] = probe[rows].max().item()
        return out


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_every_edited_layer_suppresses_masked_keys_in_a_real_run(tiny_pipe, name, monkeypatch):
    import pipelines.eraser as eraser

    pipe = tiny_pipe(name)
    probes = []

    def make(*args, **kwargs):
        probes.append(MassProbe(*args, **kwargs))
        return probes[-1]

    monkeypatch.setattr(eraser, "AttentiveEraserAAS", make)
    z0 = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 8:40, 16:48] = True
    masks[1, 30:60, 50:90] = True
    run_sarg(pipe, z0, torch.randn_like(z0), masks, steps=4, strength=1.0, ss_steps=1, progress=False)
    probe = probes[0]
    layers = {layer for layer, _ in probe.mass}
    assert layers == aas_names(pipe.unet)
    assert {step for _, step in probe.mass} == {0, 1, 2, 3}
    assert max(probe.mass.values()) < 1e-6


def test_schedule_ss_on_steps_0_to_9_and_aas_on_all_40(tiny_pipe):
    import pipelines.eraser as eraser

    pipe = tiny_pipe("tiny")
    seen = []
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:40, 16:40] = True

    def record(info):
        seen.append(info["timestep"])
        controller = info["controller"]
        record.counts = controller.counts

    run_sarg(pipe, z0, torch.randn_like(z0), masks, steps=50, strength=0.8, callback=record, progress=False)
    assert seen == list(range(780, -1, -20)) and len(seen) == 40
    counts = record.counts
    n_layers = len(aas_names(pipe.unet))
    assert sorted(s for s, kind in counts if kind == "aas") == list(range(40))
    assert sorted(s for s, kind in counts if kind == "ss") == list(range(10))
    # the index advances once per step: every edited layer ran exactly once per step
    assert all(count == n_layers for count in counts.values())
    assert eraser.executed_timesteps(eraser.ddim_scheduler(pipe, 50), 0.8)[:2] == [780, 760]


def test_normal_branch_of_the_unet_is_bit_identical_to_stock(tiny_pipe):
    pipe = tiny_pipe("tiny-sdxl")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    z_in = torch.cat([z, z])
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        stock = unet(z_in, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
        masks = torch.zeros(1, 64, 64, dtype=torch.bool)
        masks[0, 10:40, 20:50] = True
        state = ControlState(row_roles=(NORMAL, AAS))
        state.step = 0
        with attach(unet, AttentiveEraserAAS(masks, state=state), track_steps=False):
            ours = unet(z_in, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
    assert torch.equal(ours[:1], stock[:1])
    assert not torch.allclose(ours[1:], stock[1:])


def test_layer_name_pattern():
    assert is_aas_layer("up_blocks.0.attentions.2.transformer_blocks.9.attn1")
    for name in ("up_blocks.0.attentions.2.transformer_blocks.9.attn2", "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                 "mid_block.attentions.0.transformer_blocks.0.attn1"):
        assert not is_aas_layer(name)
    assert re.search(r"up_blocks", LAYER)
