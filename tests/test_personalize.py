"""DisenDiff / AttenCraft: the attention policy and the loss math, as docs/methods/personalize.md
states them."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from attention_processors import ControlState, attach
from attention_processors.personalize import (
    PersonalizeAttention,
    accept_refresh,
    attencraft_loss_maps,
    attencraft_masks,
    detach_sot,
    disendiff_attention_loss,
    gaussian_kernel_1d,
    gaussian_kernel_2d,
    jsd,
    minmax,
    personalization_layers,
    smooth,
    soft_iou,
    ssim,
    unet_personalization_layers,
)
from pipelines.personalize import concept_spans, masked_mse, uniform_subset_sampler

# ----------------------------------------------------------------------------- layers


def test_layer_rule_gives_the_spec_names_on_an_sd_layout_unet():
    from diffusers import UNet2DConditionModel

    # SD 1.5's block layout with tiny widths: the rule must pick exactly the spec's layers
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
        attention_head_dim=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    layers = unet_personalization_layers(unet)
    tb = "transformer_blocks.0"
    assert sorted(layers["capture"]) == sorted(
        [f"down_blocks.2.attentions.{i}.{tb}.attn2" for i in (0, 1)]
        + [f"up_blocks.1.attentions.{i}.{tb}.attn2" for i in (0, 1, 2)])
    assert sorted(layers["self"]) == sorted(
        [f"down_blocks.1.attentions.{i}.{tb}.attn1" for i in (0, 1)]
        + [f"up_blocks.2.attentions.{i}.{tb}.attn1" for i in (0, 1, 2)])
    assert len(layers["attn2"]) == 16  # SD 1.5: 16 cross-attention layers


def test_layer_rule_on_the_tiny_model(tiny_pipe):
    layers = unet_personalization_layers(tiny_pipe("tiny").unet)
    tb = "transformer_blocks.0"
    # levels: 8x8 (down 0, up 2), 4x4 (down 1, up 1), mid 2x2: the second-coarsest is 4x4
    assert sorted(layers["capture"]) == [f"down_blocks.1.attentions.0.{tb}.attn2",
                                         f"up_blocks.1.attentions.0.{tb}.attn2", f"up_blocks.1.attentions.1.{tb}.attn2"]
    assert sorted(layers["self"]) == [f"down_blocks.0.attentions.0.{tb}.attn1",
                                      f"up_blocks.2.attentions.0.{tb}.attn1", f"up_blocks.2.attentions.1.{tb}.attn1"]
    assert personalization_layers(["mid_block.attentions.0.transformer_blocks.0.attn2"], 3, 3)["capture"] == []


# ----------------------------------------------------------------------------- processor


class _Holder(torch.nn.Module):
    """One cross-attention layer as a tiny 'denoiser' for attach()."""

    def __init__(self, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.attn2 = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, bias=bias)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states)


def _inputs(batch=2, n_img=16, n_txt=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, n_img, 16, generator=g), torch.randn(batch, n_txt, 8, generator=g)


def _controller(capture=True, roles=("instance", "prior"), sot=True):
    state = ControlState(row_roles=roles, latent_hw=(4, 4))
    return PersonalizeAttention(["attn2"], ["attn2"] if capture else [], sot_detach=sot, state=state)


def test_capture_fidelity_and_other_layers_bit_identical():
    holder = _Holder()
    x, ctx = _inputs()
    holder.attn2.set_processor(AttnProcessor2_0())
    stock = holder(x, ctx)
    controller = _controller()
    with attach(holder, controller, track_steps=False):
        captured = holder(x, ctx)
    assert torch.allclose(captured, stock, atol=1e-6, rtol=0)
    # the stored head-mean equals an explicit float64 reference, for the instance row only
    attn = holder.attn2
    q = attn.to_q(x).double().view(2, 16, 2, 8).transpose(1, 2)
    k = attn.to_k(ctx).double().view(2, 6, 2, 8).transpose(1, 2)
    reference = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1).mean(1)[:1]
    kept = controller.cross["attn2"]
    assert kept.shape == (1, 16, 6) and kept.requires_grad
    assert torch.allclose(kept.double(), reference, atol=1e-6)
    assert controller.cross_maps().shape == (1, 6, 4, 4)
    # a non-capture attn2 (SOT detach only) runs SDPA: bit-identical to the stock processor
    with attach(holder, _controller(capture=False), track_steps=False):
        plain = holder(x, ctx)
    assert torch.equal(plain, stock)
    assert type(holder.attn2.processor) is AttnProcessor2_0  # restored


def test_sot_detach_blocks_every_gradient_through_the_start_token():
    for sot, expect_zero in ((True, True), (False, False)):
        holder = _Holder(bias=False)
        x, ctx = _inputs()
        ctx[:, 1:] = 0  # keys/values of tokens 1.. are 0 whatever W is: only SOT depends on W
        controller = _controller(sot=sot)
        with attach(holder, controller, track_steps=False):
            out = holder(x, ctx)
        loss = controller.cross["attn2"][..., 0].sum() + out.sum()
        loss.backward()
        for proj in (holder.attn2.to_k, holder.attn2.to_v):
            grad = proj.weight.grad
            zero = grad is None or not grad.any()
            assert zero == expect_zero, (sot, proj)


def test_detach_sot_keeps_values():
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = detach_sot(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert not x.grad[:, :, 0].any() and (x.grad[:, :, 1:] == 1).all()


def test_self_capture_is_no_grad_and_head_mean():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)

    class Self(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1 = attn

        def forward(self, hidden_states):
            return self.attn1(hidden_states)

    holder = Self()
    x = torch.randn(2, 16, 16, requires_grad=True)
    state = ControlState(row_roles=("instance", "prior"), latent_hw=(4, 4))
    controller = PersonalizeAttention([], [], ["attn1"], capture_self=True, state=state)
    with attach(holder, controller, track_steps=False):
        holder(x)
    s = controller.self_map()
    q = attn.to_q(x[:1]).double().view(1, 16, 2, 8).transpose(1, 2)
    k = attn.to_k(x[:1]).double().view(1, 16, 2, 8).transpose(1, 2)
    reference = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1).mean(1)
    assert s.shape == (1, 16, 16) and not s.requires_grad
    assert torch.allclose(s.double(), reference, atol=1e-6)
    assert controller.stored_bytes() == 16 * 16 * 4


# ----------------------------------------------------------------------------- DisenDiff math


def test_gaussian_kernel_is_disendiffs():
    g = gaussian_kernel_1d()
    assert torch.allclose(g, torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4)
    k = gaussian_kernel_2d()
    assert torch.allclose(k, torch.outer(torch.tensor([0.2119, 0.5761, 0.2119]),
                                         torch.tensor([0.2119, 0.5761, 0.2119])), atol=1e-4)
    assert abs(float(k.sum()) - 1) < 1e-6
    # reflect padding: a constant map stays constant; a centre impulse spreads as the kernel
    assert torch.allclose(smooth(torch.full((5, 5), 0.3)), torch.full((5, 5), 0.3))
    impulse = torch.zeros(5, 5)
    impulse[2, 2] = 1
    assert torch.allclose(smooth(impulse)[1:4, 1:4], k, atol=1e-6)


def test_soft_iou_hand_values():
    x = torch.zeros(4, 4)
    x[:2] = 1  # 8 cells
    assert float(soft_iou(x, x)) == 1.0
    y = torch.zeros(4, 4)
    y[2:, :1] = 1  # 2 cells, disjoint
    assert float(soft_iou(x, y)) == pytest.approx(1 / (8 + 2 + 1))
    a = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    # sum ab = 0.5 + 1 = 1.5; sum a = 2, sum b = 2.5 -> (1.5 + 1) / (2 + 2.5 - 1.5 + 1) = 2.5 / 4
    assert float(soft_iou(a, b)) == pytest.approx(0.625)


def test_binding_stop_gradient_and_separation_gradients():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 4, 4, generator=g, requires_grad=True)
    c = torch.rand(2, 4, 4, generator=g, requires_grad=True)
    bind = (1 - soft_iou(c.detach(), m)).sum()
    bind.backward()
    assert c.grad is None and m.grad.abs().sum() > 0
    m.grad = None
    separate = soft_iou(c[0], c[1])
    separate.backward()
    assert c.grad[0].abs().sum() > 0 and c.grad[1].abs().sum() > 0
    # the combined loss: binding terms + the pairwise separation, with three concepts the mean
    m3, c3 = torch.rand(3, 4, 4, generator=g), torch.rand(3, 4, 4, generator=g)
    expected = sum(1 - soft_iou(c3[i], m3[i]) for i in range(3)) + (
        soft_iou(c3[0], c3[1]) + soft_iou(c3[0], c3[2]) + soft_iou(c3[1], c3[2])) / 3
    assert torch.allclose(disendiff_attention_loss(m3, c3), expected)


def test_loss_scale_paper_is_channels_times_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(masked_mse(pred, target, ones, "paper"), 4 * masked_mse(pred, target, ones, "mean"))
    assert torch.allclose(masked_mse(pred, target, ones, "mean"), ((pred - target) ** 2).mean())
    half = ones.clone()
    half[:, :, :4] = 0
    expected = (((pred - target) ** 2)[:, :, 4:].sum((1, 2, 3)) / 32).mean()
    assert torch.allclose(masked_mse(pred, target, half, "paper"), expected)


def test_minmax():
    x = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    assert torch.allclose(minmax(x), torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6)


# ----------------------------------------------------------------------------- AttenCraft math


def _blobs(grid=8):
    """Two planted blobs and the background on a grid; cross maps of (A, B, SoT)."""
    a = torch.zeros(grid, grid)
    b = torch.zeros(grid, grid)
    a[1:4, 1:4] = 1
    b[4:7, 4:7] = 1
    bg = 1 - torch.maximum(a, b)
    return a, b, bg


def test_attencraft_masks_recover_planted_blobs_and_assignment():
    a, b, bg = _blobs()
    # the cross maps of the tokens (concepts first, SoT last), listed in another token order
    cross = torch.stack([b, a, bg]) * 0.8 + 0.05
    identity = torch.eye(64)
    masks, assignment, _ = attencraft_masks(cross, identity, (8, 8), tau=0.1)
    assert assignment == [0, 1, 2]
    assert torch.equal(masks[0], b) and torch.equal(masks[1], a) and torch.equal(masks[2], bg)
    # upsampling from a coarser cross grid (4x4 -> 8x8) still finds the blobs' cores
    coarse = torch.nn.functional.adaptive_avg_pool2d(cross[None], 4)[0]
    masks, assignment, _ = attencraft_masks(coarse, identity, (8, 8), tau=0.1)
    assert assignment == [0, 1, 2] and masks[0][4:7, 4:7].sum() >= 4 and masks[1][1:4, 1:4].sum() >= 4


def test_attencraft_margin_leaves_ambiguous_pixels_unlabeled():
    a, b, bg = _blobs()
    a2 = a.clone()
    a2[5, 5] = 1.0  # a pixel of B where token A is as strong as B: inside the margin
    cross = torch.stack([a2, b, bg])
    masks, assignment, _ = attencraft_masks(cross, torch.eye(64), (8, 8), tau=0.1)
    assert assignment == [0, 1, 2]
    assert masks[:, 5, 5].sum() == 0  # unlabeled: in no mask
    assert masks.sum(0).max() <= 1  # labels are exclusive


def test_attencraft_duplicate_assignment_is_rejected():
    a, b, bg = _blobs()
    # token 1 is weak everywhere: its mask goes to token 0, a duplicate
    cross = torch.stack([a + b, 0.5 * b, bg])
    masks, assignment, _ = attencraft_masks(cross, torch.eye(64), (8, 8), tau=0.1)
    assert assignment is None
    assert not accept_refresh(None, masks, assignment, 2)


def test_self_attention_random_walk_spreads_within_an_object():
    # S links all cells of blob A: a cross map touching one cell of A labels the whole blob
    a, b, bg = _blobs()
    n = 64
    s = torch.eye(n)
    cells = a.flatten().nonzero().flatten()
    for i in cells:
        s[i, cells] = 1
    s = s / s.sum(-1, keepdim=True)
    seed = torch.zeros(8, 8)
    seed[2, 2] = 1
    masks, assignment, _ = attencraft_masks(torch.stack([seed, b, bg * 0.5]), s, (8, 8), tau=0.1)
    assert assignment == [0, 1, 2] and torch.equal(masks[0], a)


def test_ssim_gate_keeps_old_masks_when_new_ones_move():
    old = torch.zeros(2, 32, 32)
    old[0, 4:14, 4:14] = 1
    old[1, 18:28, 18:28] = 1
    assert ssim(old[0], old[0]) == pytest.approx(1.0)
    assert accept_refresh(old, old.clone(), [0, 1, 2], 2)
    shifted = torch.roll(old, shifts=8, dims=-1)
    assert ssim(shifted[0], old[0]) < 0.8
    assert not accept_refresh(old, shifted, [0, 1, 2], 2)


def test_jsd_hand_values():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([1.0, 0.0])
    m = torch.tensor([0.75, 0.25])
    expected = 0.5 * (float((p * (p / m).log()).sum()) + math.log(1 / 0.75))
    assert float(jsd(p, q)) == pytest.approx(expected, abs=1e-6)
    assert float(jsd(p, q)) == pytest.approx(0.215762, abs=1e-6)
    assert float(jsd(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 10, generator=g).softmax(-1), torch.rand(5, 10, generator=g).softmax(-1)
    assert torch.allclose(jsd(x, y), jsd(y, x)) and (jsd(x, y) <= math.log(2)).all()


def test_loss_maps_keep_the_graph():
    cross = torch.rand(3, 4, 4, requires_grad=True)
    maps = attencraft_loss_maps(cross, (8, 8))
    assert maps.shape == (3, 8, 8) and maps.requires_grad
    assert float(maps.detach().amin()) >= -1e-6 and float(maps.detach().amax()) <= 1 + 1e-6


def test_subset_sampler_is_uniform_and_forces_the_full_prompt():
    g = torch.Generator().manual_seed(0)
    counts = {"0": 0, "1": 0, "01": 0}
    orders = set()
    for step in range(1, 30001):
        if step % 20 == 0:
            assert uniform_subset_sampler(step, {}, 2, g) == [0, 1]
            continue
        s = uniform_subset_sampler(step, {}, 2, g)
        counts["".join(map(str, sorted(s)))] += 1
        orders.add(tuple(s))
    total = sum(counts.values())
    for value in counts.values():
        assert abs(value / total - 1 / 3) < 0.02
    assert (0, 1) in orders and (1, 0) in orders


def test_concept_spans_identical_under_both_paddings(tiny_pipe):
    import copy

    from pipelines.personalize import personal_tokenizer

    sd1 = personal_tokenizer(tiny_pipe("tiny").tokenizer, 2)  # pads with EoT
    sd2 = copy.deepcopy(sd1)
    sd2.pad_token = "!"  # SD 2.x pads with "!"
    prompt = "a photo of <new1> and <new2>"
    spans = []
    for tok in (sd1, sd2):
        ids = tok(prompt, padding="max_length", max_length=77).input_ids
        spans.append(concept_spans(ids, tok))
    assert spans[0] == spans[1] == [[4], [6]]
    ids = sd1("a photo of <new1> cat and big <new2> dog", padding="max_length", max_length=77).input_ids
    assert concept_spans(ids, sd1) == [[4, 5], [7, 8, 9]]
