"""The Remove-object pipeline (pipelines/eraser.py): SARG, the latent processes, masks, sizes, inputs.

Tiny models on CPU, 2-4 steps, 64-128 px; hand-computed values for the algebra.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from pipelines import backbones, io, models
from pipelines.eraser import (
    EraserBackbone,
    add_noise,
    backbone,
    describe_work,
    ddim_scheduler,
    dilate_mask,
    erase,
    executed_timesteps,
    feather_weights,
    grow_mask,
    inverse_scheduler,
    plan_region,
    predicted_noise,
    prepare,
    repaste,
    run_sarg,
    sarg,
)
from pipelines.errors import UserInputError

FAST = dict(steps=3, strength=1.0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(width=96, height=64, seed=0):
    """A textured image and a box mask in its middle."""
    rng = np.random.RandomState(seed)
    image = (rng.rand(height, width, 3) * 255).astype(np.uint8)
    mask = np.zeros((height, width), bool)
    mask[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = True
    return image, mask


# ------------------------------------------------------------------------------ algebra


def test_sarg_combination_hand_values():
    e0, e1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert sarg(e0, e1, 9.0).tolist() == [19.0, -25.0]
    assert torch.equal(sarg(e0, e1, 0.0), e0)
    assert torch.equal(sarg(e0, e1, 1.0), e1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    # linear in s
    torch.testing.assert_close(sarg(a, b, 5.0) - sarg(a, b, 2.0), 3.0 * (b - a))


def test_repaste_and_add_noise_hand_values(tiny_pipe):
    z = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    background = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [False, True]])
    assert repaste(z, background, mask).tolist() == [[5.0, 2.0], [3.0, 8.0]]
    scheduler = ddim_scheduler(tiny_pipe("tiny"), 50)
    a = scheduler.alphas_cumprod[780].item()
    noised = add_noise(scheduler, torch.tensor([1.0]), torch.tensor([2.0]), 780)
    assert noised.item() == pytest.approx(math.sqrt(a) + 2 * math.sqrt(1 - a), rel=1e-6)


def alphas(scheduler, *timesteps):
    """alpha-bar at each timestep as a float; below 0 the first training alpha (set_alpha_to_one=False)."""
    return [scheduler.alphas_cumprod[max(t, 0)].item() for t in timesteps]


@pytest.mark.parametrize("name, prediction", [("tiny", "epsilon"), ("tiny-sd2", "v_prediction")])
def test_a_step_is_ddim_eta_0_with_the_model_prediction_type(tiny_pipe, name, prediction):
    """z_{t-20} = sqrt(a') x0 + sqrt(1 - a') eps, with x0 and eps from the model's output at t."""
    scheduler = ddim_scheduler(tiny_pipe(name), 50)
    assert scheduler.config.prediction_type == prediction
    g = torch.Generator().manual_seed(0)
    z, out = torch.randn(1, 4, 8, 8, generator=g).double(), torch.randn(1, 4, 8, 8, generator=g).double()
    for t in (980, 500, 20, 0):
        a, a_prev = alphas(scheduler, t, t - 20)
        if prediction == "epsilon":
            eps, x0 = out, (z - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:
            eps, x0 = math.sqrt(a) * out + math.sqrt(1 - a) * z, math.sqrt(a) * z - math.sqrt(1 - a) * out
        want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        got = scheduler.step(out.float(), t, z.float(), eta=0.0).prev_sample
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_inversion_converts_to_noise_at_the_timestep_the_model_was_told(tiny_pipe, name):
    """DIP: z_{t-20} -> z_t with the model evaluated at t; v is turned into noise with t's alpha."""
    scheduler = ddim_scheduler(tiny_pipe(name), 50)
    inverse = inverse_scheduler(scheduler)
    g = torch.Generator().manual_seed(1)
    z, out = torch.randn(1, 4, 8, 8, generator=g).double(), torch.randn(1, 4, 8, 8, generator=g).double()
    for t in (0, 20, 500, 980):
        a_from, a = alphas(scheduler, t - 20, t)
        eps = out if name == "tiny" else math.sqrt(a) * out + math.sqrt(1 - a) * z
        x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
        want = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        noise = predicted_noise(scheduler, out.float(), t, z.float())
        got = inverse.step(noise, t, z.float()).prev_sample
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_ddim_is_configured_as_the_paper_on_a_copy_per_call(tiny_pipe):
    pipe = tiny_pipe("tiny")
    own = pipe.scheduler
    before = (dict(own.config), own.timesteps, own.alphas_cumprod)
    scheduler = ddim_scheduler(pipe, 50)
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert not config.clip_sample and not config.set_alpha_to_one and config.steps_offset == 0
    assert config.timestep_spacing == "leading"
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    assert inverse_scheduler(scheduler).timesteps.tolist() == list(range(0, 981, 20))
    add_noise(scheduler, torch.zeros(1), torch.ones(1), 500)
    # the cached pipeline's scheduler is read, never changed
    assert scheduler is not own and pipe.scheduler is own and own.config.steps_offset == 1
    assert dict(own.config) == before[0] and own.timesteps is before[1] and own.alphas_cumprod is before[2]


@pytest.mark.parametrize("steps, strength, executed", [
    (50, 0.8, list(range(780, -1, -20))), (50, 1.0, list(range(980, -1, -20))), (4, 0.75, [500, 250, 0]),
    (3, 1.0, [666, 333, 0]), (10, 0.25, [100, 0]),
])
def test_strength_runs_the_last_steps_of_the_schedule(tiny_pipe, steps, strength, executed):
    assert executed_timesteps(ddim_scheduler(tiny_pipe("tiny"), steps), strength) == executed


def test_an_unknown_prediction_type_is_a_one_sentence_error():
    class Model:  # only the scheduler is read
        scheduler = DDIMScheduler(prediction_type="flow")

    with pytest.raises(UserInputError) as error:
        ddim_scheduler(Model(), 10)
    assert "prediction type 'flow'" in one_sentence(error)


# ------------------------------------------------------------------------- latent processes


def test_sip_pastes_z0_back_outside_the_mask_and_draws_noise_once(tiny_pipe):
    pipe = tiny_pipe("tiny")
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 20:44, 12:40] = True
    seen = []
    z = run_sarg(pipe, z0, noise, masks, steps=4, strength=0.75, callback=seen.append, progress=False)
    m_lat = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m_lat[..., 2:6, 1:5] = True
    outside = ~m_lat.expand_as(z)
    assert torch.equal(z[outside], z0[outside])
    assert not torch.allclose(z[~outside], z0[~outside])
    assert len(seen) == 3 and all(info["noise"] is seen[0]["noise"] for info in seen)
    torch.testing.assert_close(seen[0]["noise"], noise)
    # between steps the background is the same noise at the next timestep
    background = add_noise(ddim_scheduler(pipe, 4), z0, noise, 250)
    torch.testing.assert_close(seen[0]["latents"][outside], background[outside])


def test_dip_inversion_then_reconstruction_returns_z0():
    """DDIM sanity (AAS off, s = 1): a UNet with small, smooth outputs inverts almost exactly."""
    pipe = models.build_tiny("tiny")
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    everything = torch.ones(1, 64, 64, dtype=torch.bool)  # no re-paste: pure inversion + denoising
    z = run_sarg(pipe, z0, torch.zeros_like(z0), everything, steps=10, strength=1.0, guidance=1.0,
                 mode="dip", aas=False, progress=False)
    assert ((z - z0).norm() / z0.norm()).item() < 0.05


def test_dip_keeps_the_background_exactly(tiny_pipe):
    pipe = tiny_pipe("tiny")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:32, 8:32] = True
    z = run_sarg(pipe, z0, torch.zeros_like(z0), masks, steps=3, strength=1.0, mode="dip", progress=False)
    outside = torch.ones_like(z, dtype=torch.bool)
    outside[..., 1:4, 1:4] = False
    assert torch.equal(z[outside], z0[outside])


def test_batch_of_two_masks_equals_two_single_runs(tiny_pipe):
    pipe = tiny_pipe("tiny-sdxl")
    g = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 8:40] = True
    masks[1, 30:60, 20:50] = True
    both = run_sarg(pipe, z0, noise, masks, steps=3, strength=1.0, ss_steps=1, progress=False)
    for i in range(2):
        one = run_sarg(pipe, z0[i:i + 1], noise[i:i + 1], masks[i:i + 1], steps=3, strength=1.0, ss_steps=1,
                       progress=False)
        # float32 rounding (a different SDPA path for per-sample masks, batch size), amplified by s = 9
        torch.testing.assert_close(both[i:i + 1], one, atol=5e-5, rtol=1e-5)


def test_empty_mask_sample_gets_the_normal_branch_exactly(tiny_pipe):
    """In a batch, a sample without a mask follows eps = eps_normal for any s."""
    pipe = tiny_pipe("tiny")
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 8:40] = True
    seen = []
    for s in (0.0, 9.0):
        seen.append(run_sarg(pipe, z0, noise, masks, steps=2, strength=1.0, guidance=s, mode="dip", progress=False))
    # sample 1 has no mask: DIP pastes its whole trajectory back, whatever s is
    assert torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[1][1], z0[1])


# ------------------------------------------------------------------------------ masks, regions


def test_mask_preprocessing_dilates_and_feathers():
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    assert (grow_mask(mask, 3).sum() > mask.sum()) and (grow_mask(mask, -3).sum() < mask.sum())
    assert not grow_mask(mask, -6).any()
    dilated = dilate_mask(mask, 13)
    assert (dilated >= mask).all() and dilated.sum() > mask.sum()
    weights = feather_weights(dilated, 4)
    assert (weights[dilated] == 1).all() and (weights == 0).any() and ((weights > 0) & (weights < 1)).any()
    sdxl, sd = EraserBackbone(backbones.SDXL, False, 1024, 32), EraserBackbone(backbones.SD, True, 512, 64)
    assert sdxl.blur_kernel(1024) == 77 and sd.blur_kernel(512) == 13 and sdxl.blur_kernel(512) == 39
    assert sd.blur_kernel(64) % 2 == 1


def test_regions_keep_the_aspect_and_crop_large_photos():
    bb = EraserBackbone(backbones.SD, False, 512, 64)
    mask = np.zeros((217, 333), bool)
    mask[50:100, 60:200] = True
    whole = plan_region((333, 217), mask, bb)
    assert not whole.cropped and whole.box == (0, 0, 333, 217)
    assert abs(whole.size[0] / whole.size[1] - 333 / 217) < 0.02
    assert all(p % 64 == 0 and p >= s for p, s in zip(whole.padded, whole.size))
    big = np.zeros((3000, 4000), bool)
    big[1000:1200, 2000:2300] = True
    crop = plan_region((4000, 3000), big, bb)
    x0, y0, x1, y1 = crop.box
    assert crop.cropped and x0 <= 2000 and x1 >= 2300 and y0 <= 1000 and y1 >= 1200
    assert crop.size == crop.region_size == (600, 512)  # at full resolution: no resampling
    assert plan_region((4000, 3000), big, bb, crop="never").box == (0, 0, 4000, 3000)


# ------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["sip", "dip"])
@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_sip_and_dip_run_on_every_backbone(tiny_pipe, name, mode):
    image, mask = scene()
    result = erase(tiny_pipe(name), image, mask, seed=0, mode=mode, **FAST)
    out = np.asarray(result.image)
    assert out.shape == image.shape
    assert (out[~result.changed] == image[~result.changed]).all()
    assert (out[mask] != image[mask]).mean() > 0.5
    assert result.params["mode"] == mode and result.seeds == [0]
    assert result.params["freeu"] == (name == "tiny-sd2")


def test_output_size_equals_input_size_and_outside_pixels_are_exact(tiny_pipe):
    image, mask = scene(333, 217, seed=1)
    result = erase(tiny_pipe("tiny"), image, mask, seed=5, crop="never", **FAST)
    out = np.asarray(result.image)
    assert result.image.size == (333, 217)
    assert (out[~result.changed] == image[~result.changed]).all()
    assert (result.mask >= mask).all()  # the dilated mask contains the user's
    assert result.changed[mask].all() and not result.changed.all()
    assert result.params["working_size"][0] % 32 == 0 and result.params["working_size"][1] % 32 == 0


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_a_fill_prompt_conditions_every_step_and_the_empty_one_is_the_papers(tiny_pipe, name):
    # ours: the paper's eraser runs with the empty prompt; a fill prompt says what the hole should
    # hold (it is what makes the built-in model stop painting objects into holes: model card)
    image, mask = scene(seed=3)
    pipe = tiny_pipe(name)
    paper = erase(pipe, image, mask, seed=2, **FAST)
    empty = erase(pipe, image, mask, seed=2, fill_prompt="", **FAST)
    filled = erase(pipe, image, mask, seed=2, fill_prompt="an empty background", **FAST)
    assert np.array_equal(np.asarray(paper.image), np.asarray(empty.image))
    assert not np.array_equal(np.asarray(paper.image), np.asarray(filled.image))
    assert filled.params["fill_prompt"] == "an empty background" and paper.params["fill_prompt"] == ""


def test_large_image_goes_through_the_crop_strategy(tiny_pipe):
    image, _ = scene(640, 400, seed=2)
    mask = np.zeros((400, 640), bool)
    mask[200:230, 400:440] = True
    result = erase(tiny_pipe("tiny"), image, mask, seed=1, **FAST)
    out = np.asarray(result.image)
    x0, y0, x1, y1 = result.params["region"]
    assert result.image.size == (640, 400)
    assert (x1 - x0, y1 - y0) != (640, 400) and x0 <= 400 and x1 >= 440 and y0 <= 200 and y1 >= 230
    outside = np.ones((400, 640), bool)
    outside[y0:y1, x0:x1] = False
    assert (out[outside] == image[outside]).all() and (out[~result.changed] == image[~result.changed]).all()
    # told as what was done (Details in the tab, one line on the CLI), not as a warning
    assert not any("region" in note for note in result.notes)
    assert describe_work(result.params, result.input.size).startswith(f"Worked on a {x1 - x0}x{y1 - y0} region")


def test_num_images_two_gives_two_different_images(tiny_pipe):
    image, mask = scene()
    result = erase(tiny_pipe("tiny"), image, mask, seed=7, num_images=2, **FAST)
    assert result.seeds == [7, 8] and len(result.images) == 2
    a, b = (np.asarray(i) for i in result.images)
    assert (a != b).any()
    alone = np.asarray(erase(tiny_pipe("tiny"), image, mask, seed=8, **FAST).image)
    assert np.abs(alone.astype(int) - b.astype(int)).max() <= 2  # same seed, same image (batching aside)


def test_random_seed_is_reported(tiny_pipe):
    image, mask = scene()
    result = erase(tiny_pipe("tiny"), image, mask, seed=None, **FAST)
    assert 0 <= result.seed < 2**31
    again = erase(tiny_pipe("tiny"), image, mask, seed=result.seed, **FAST)
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))


def test_result_saves_png_with_parameters(tiny_pipe, tmp_path):
    image, mask = scene()
    result = erase(tiny_pipe("tiny"), image, mask, seed=3, num_images=2, **FAST)
    written = result.save(tmp_path / "out.png")
    assert [p.name for p in written] == ["out_0.png", "out_0.json", "out_1.png", "out_1.json"]
    with Image.open(tmp_path / "out_1.png") as saved:
        assert '"seed": 4' in saved.text["parameters"]


def test_freeu_is_restored(tiny_pipe):
    pipe = tiny_pipe("tiny-sd2")
    image, mask = scene()
    erase(pipe, image, mask, seed=0, freeu=True, **FAST)
    assert all(getattr(block, "b1", None) is None for block in pipe.unet.up_blocks)


# ------------------------------------------------------------------------------- bad input


def test_mask_of_another_size_is_resized_with_a_note(tiny_pipe):
    image, _ = scene()
    small = np.zeros((32, 48), bool)
    small[10:20, 15:30] = True
    result = erase(tiny_pipe("tiny"), image, small, seed=0, **FAST)
    assert result.image.size == (96, 64) and any("resized" in note for note in result.notes)


def test_empty_mask_returns_the_input_unchanged_with_a_warning(tiny_pipe):
    image, _ = scene()
    result = erase(tiny_pipe("tiny"), image, np.zeros((64, 96), bool), seed=0, num_images=2, **FAST)
    assert all(np.array_equal(np.asarray(i), image) for i in result.images)
    assert any("empty" in note for note in result.notes)


def one_sentence(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message
    return message


def test_bad_inputs_are_one_sentence_errors(tiny_pipe, tmp_path, monkeypatch):
    pipe = tiny_pipe("tiny")
    image, mask = scene()
    with pytest.raises(UserInputError) as error:
        erase(pipe, image, np.ones((64, 96), bool), **FAST)
    assert "whole image" in one_sentence(error)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserInputError) as error:
        erase(pipe, tmp_path / "notes.txt", mask, **FAST)
    assert "not a readable image" in one_sentence(error)
    with pytest.raises(UserInputError) as error:
        erase(pipe, image, tmp_path / "notes.txt", **FAST)
    assert "not a readable mask" in one_sentence(error)
    with pytest.raises(UserInputError) as error:
        erase(pipe, image[:40, :50], mask[:40, :50], **FAST)
    assert "at least 64" in one_sentence(error)
    monkeypatch.setattr(io, "MAX_PIXELS", 5000)
    with pytest.raises(UserInputError) as error:
        erase(pipe, image, mask, **FAST)
    assert "more than 5000 pixels" in one_sentence(error)


@pytest.mark.parametrize("options, fragment", [
    (dict(steps=0), "Steps"), (dict(strength=0.0), "Strength"), (dict(steps=2, strength=0.3), "no step"),
    (dict(guidance=-1), "guidance"), (dict(ss_scale=0.0), "SS scale"), (dict(mode="ddpm"), "Mode"),
    (dict(num_images=0), "number of images"), (dict(grow=1000), "growth"), (dict(crop="maybe"), "Crop"),
    (dict(blur_kernel=4), "odd"), (dict(fill_prompt="a red circle " * 40), "fill prompt is"),
])
def test_bad_options_are_one_sentence_errors(tiny_pipe, options, fragment):
    image, mask = scene()
    with pytest.raises(UserInputError) as error:
        erase(tiny_pipe("tiny"), image, mask, **{**dict(progress=False, steps=2), **options})
    assert fragment.lower() in one_sentence(error).lower()


def test_unknown_options_raise_and_other_families_are_refused(tiny_pipe):
    image, mask = scene()
    with pytest.raises(TypeError):
        erase(tiny_pipe("tiny"), image, mask, rm_guidance_scale=9)  # no silent **kwargs
    with pytest.raises(UserInputError) as error:
        erase(tiny_pipe("tiny-pixart"), image, mask, **FAST)
    assert "SD 1.x/2.x and SDXL" in one_sentence(error)


# -------------------------------------------------------------------------- tiny-sd2 registry


def test_tiny_sd2_is_an_sd2_style_model(tiny_pipe):
    pipe = tiny_pipe("tiny-sd2")
    assert models.family(pipe) == "sd" and models.is_tiny("tiny-sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    unet = pipe.unet.config
    assert unet.use_linear_projection and list(unet.attention_head_dim) == [2, 4, 8]
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size != 32
    assert backbone(pipe).sd2 and not backbone(tiny_pipe("tiny")).sd2
    rebuilt = models.build_tiny("tiny-sd2").unet.state_dict()
    assert all(torch.equal(v, rebuilt[k]) for k, v in pipe.unet.state_dict().items())
    images = pipe("a cat", num_inference_steps=2, height=64, width=96, output_type="np").images
    assert images.shape == (1, 64, 96, 3) and np.isfinite(images).all()


def test_prepare_reports_the_working_geometry(tiny_pipe):
    image, mask = scene(333, 217)
    prepared = prepare(backbone(tiny_pipe("tiny-sdxl")), image, mask, crop="never")
    h, w = prepared.work_mask.shape
    assert prepared.work_image.shape == (h, w, 3) and (w, h) == prepared.region.padded
    assert prepared.mask.shape == (217, 333) and prepared.weights.shape == (217, 333)
