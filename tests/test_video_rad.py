"""RAD and IRJS as docs/methods/video.md specifies them: the loss, its gradient, the capture
layers, the step schedule and the invariant region."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attention_processors.video import ReAtCoAttention, box_loss, gaussian_weights, smooth_3d
from pipelines.tokenizers import clip_tokenizer
from pipelines.video import boxes as box_tools
from pipelines.video.inflate import inflate, self_attention_layers, video_call
from pipelines.video.reatco import Sampler, capture_layers
from pipelines.video_settings import VideoSettings


def _maps(peak_inside: bool, frames=2, grid=(24, 24), token=3):
    """(F, h, w, 77) probabilities whose token `token` holds all the mass in the box (or outside)."""
    inside = torch.zeros(frames, *grid, dtype=torch.bool)
    inside[:, 8:16, 8:16] = True
    logits = torch.zeros(frames, *grid, 77)
    where = inside if peak_inside else ~inside
    logits[..., token] = torch.where(where, 30.0, -30.0)
    logits[..., 10] = torch.where(where, -30.0, 30.0)  # another word holds the rest
    return logits.softmax(-1), inside


def test_gaussian_is_attend_and_excite_kernel_and_keeps_constants():
    assert torch.allclose(gaussian_weights(0.5), torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4)
    constant = torch.full((2, 1, 1, 3), 0.7)  # one-frame and one-cell axes are padded by replication
    assert torch.allclose(smooth_3d(constant), constant)


def test_loss_is_zero_inside_two_outside_and_never_nan():
    maps, inside = _maps(True)
    loss, loss_max, parts = box_loss(maps, [[3]], inside[None])
    # the smoothing spills a little mass onto the ring around the box, which the outside top-k reads
    assert parts["fg"].item() == pytest.approx(1.0, abs=0.01) and parts["bg"].item() == pytest.approx(0.0, abs=0.1)
    assert loss.item() == pytest.approx(0.0, abs=0.1) and loss_max.item() == pytest.approx(0.0, abs=0.01)
    maps, inside = _maps(False)
    loss, _, parts = box_loss(maps, [[3]], inside[None])
    # bg is 1 and fg only the spill onto the box's border cells: L is close to its maximum of 2
    assert parts["bg"].item() == pytest.approx(1.0, abs=0.01) and parts["fg"].item() < 0.3
    assert 1.7 < loss.item() <= 2.0
    for cells in (1, 2, 4):  # boxes of 1 to 4 cells
        small = torch.zeros(1, 2, 24, 24, dtype=torch.bool)
        small[0, :, 0, :cells] = True
        loss, loss_max, _ = box_loss(maps, [[3]], small)
        assert math.isfinite(loss.item()) and math.isfinite(loss_max.item())


def test_loss_gradient_moves_attention_mass_into_the_box():
    _, inside = _maps(True)
    logits = torch.zeros(2, 24, 24, 77)
    logits[..., 3] = torch.randn(2, 24, 24, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)

    def mass_inside(lg):
        p = lg.softmax(-1)[..., 1:76]
        p = (p * 100).softmax(-1)[..., 2]
        return (p * inside).sum() / p.sum()

    before = mass_inside(logits).item()
    for _ in range(20):
        loss, _, _ = box_loss(logits.softmax(-1), [[3]], inside[None])
        (grad,) = torch.autograd.grad(loss, logits)
        logits = (logits - 50 * grad).detach().requires_grad_(True)
    assert mass_inside(logits).item() > before + 0.2


def test_words_resolve_to_token_positions():
    prompt = "A jellyfish and a goldfish are swimming in the blue ocean."
    targets = box_tools.resolve(["jellyfish:0,0,10,10", "Goldfish:5,5,20,20@1"], prompt, clip_tokenizer(), 77, 3,
                                (32, 32))
    assert [(t.word, t.positions) for t in targets] == [("jellyfish", [2]), ("Goldfish", [5])]
    # a static box holds on every frame; keyframes interpolate
    moving = box_tools.resolve(["fish:0,0,10,10@0", "fish:10,0,20,10@2"], "a fish", clip_tokenizer(), 77, 4,
                               (32, 32))[0]
    assert np.allclose(moving.boxes[:, 0], [0, 5, 10, 10]) and np.allclose(targets[0].boxes, [[0, 0, 10, 10]] * 3)


def test_capture_layers_are_the_papers_on_sd1_and_the_deepest_level_elsewhere(tiny_pipe):
    from diffusers import UNet2DConditionModel

    sd1 = UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
                               cross_attention_dim=8, attention_head_dim=2, sample_size=8)  # SD 1.x layout
    layers, level = capture_layers(sd1)
    assert level == 2 and sorted(layers) == sorted(
        [f"down_blocks.2.attentions.{a}.transformer_blocks.0.attn2" for a in (0, 1)]
        + [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2" for a in (0, 1, 2)])
    layers, level = capture_layers(tiny_pipe("tiny").unet)
    assert level == 1 and sorted(layers) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                             "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                             "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]


def _sampler(pipe, video, settings, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers, level = capture_layers(video)
    controller = ReAtCoAttention(self_attention_layers(video), layers)
    x0 = torch.randn(1, 4, frames, 8, 8, generator=g)
    text = torch.randn(1, 77, video.config.cross_attention_dim, generator=g)
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    target = box_tools.resolve(["dog:0,0,32,32"], "a photo of a dog", pipe.tokenizer, 77, frames, (64, 64))
    inside = box_tools.grid_masks(target, 8 * 2 ** level, (4, 4))
    irjs = box_tools.union_mask(target, 8, (8, 8))
    return Sampler(video, controller, scheduler, settings, x0, torch.randn(x0.shape, generator=g), text,
                   torch.zeros_like(text), [target[0].positions], inside, irjs, [(0, frames)],
                   torch.Generator().manual_seed(1), record_inputs=True), controller


def test_capture_keeps_fused_outputs_and_its_maps_reach_the_latents(tiny_pipe):
    pipe = tiny_pipe("tiny")
    video = inflate(pipe.unet)
    sampler, controller = _sampler(pipe, video, VideoSettings(steps=4).validated())
    z = sampler.x0.clone().requires_grad_(True)
    t = sampler.scheduler.timesteps[0]
    with video_call(video, controller):
        with torch.no_grad():
            fused = video(z, t, encoder_hidden_states=sampler.cond).sample
        controller.capturing = True
        explicit = video(z, t, encoder_hidden_states=sampler.cond).sample
        maps = controller.attention_maps()
        (grad,) = torch.autograd.grad(maps[..., 5].sum(), z)
        controller.capturing = False
    assert torch.allclose(explicit, fused, atol=1e-5)
    assert maps.shape == (3, 16, 77) and torch.allclose(maps.sum(-1), torch.ones(3, 16), atol=1e-5)
    assert grad.abs().sum() > 0


def test_one_rad_step_lowers_the_loss_on_a_tiny_unet(tiny_pipe):
    pipe = tiny_pipe("tiny")
    video = inflate(pipe.unet)
    settings = VideoSettings(steps=4, rad_scale=0.5).validated()
    sampler, controller = _sampler(pipe, video, settings)
    t = sampler.scheduler.timesteps[1]
    with video_call(video, controller), torch.enable_grad():
        controller.capturing = True
        z = sampler.x0.clone().requires_grad_(True)
        loss, _, _ = sampler.loss_at(z, t, 0, 3)
        (grad,) = torch.autograd.grad(loss, z)
        lower, _, _ = sampler.loss_at((z - 0.5 * grad).detach(), t, 0, 3)
    assert lower.item() < loss.item()


def test_schedule_and_irjs_inputs(tiny_pipe):
    pipe = tiny_pipe("tiny")
    video = inflate(pipe.unet)
    paper = VideoSettings().validated()
    sampler, _ = _sampler(pipe, video, paper)
    assert sampler.alphas[0] == pytest.approx(20) and sampler.alphas[49] == pytest.approx(20 * math.sqrt(0.5))
    assert [i for i in range(50) if sampler.rad_due(i)] == list(range(25))
    assert sampler.refine == {0: 0.05, 10: 0.5, 20: 0.8}

    # 6 steps: main updates on 0 and 1, refinements (0, 10, 20 of 50) on 0, 1 and 2, none after
    settings = VideoSettings(steps=6, rad_until=0.34, refine_iterations=2).validated()
    sampler, controller = _sampler(pipe, video, settings)
    assert sampler.refine == {0: 0.05, 1: 0.5, 2: 0.8} and sampler.rad_last == 2
    with video_call(video, controller):
        sampler.run()
    steps = [entry["step"] for entry in sampler.losses]
    assert set(steps) == {0, 1, 2} and sampler.gradient_passes == len(steps)
    assert all(steps.count(i) <= 3 for i in range(3))  # at most 2 refinement iterations + the last loss
    assert all(entry["refine"] <= 2 for entry in sampler.losses)
    # IRJS: outside the boxes the model input is the re-noised source, bit for bit; inside it is z
    mask = sampler.irjs_mask.bool().view(1, 1, 3, 8, 8).expand(1, 4, 3, 8, 8)
    assert len(sampler.model_inputs) == 6
    for _, _, z_in, source_t in sampler.model_inputs:
        assert torch.equal(z_in[~mask], source_t[~mask])
        assert not torch.equal(z_in[mask], source_t[mask])
    off = VideoSettings(steps=3, rad=False, preserve_background=False).validated()
    sampler, controller = _sampler(pipe, video, off)
    with video_call(video, controller):
        sampler.run()
    assert sampler.gradient_passes == 0 and not sampler.losses
    z_in, source_t = sampler.model_inputs[0][2], sampler.model_inputs[0][3]
    assert torch.equal(z_in, sampler.z_T) and not torch.equal(z_in[~mask], source_t[~mask])
