"""What the attention core tells a method about one call, beyond images: video frames, named key
segments, the batch rows' roles per backbone, and a quiet view that leaves the shared pipeline
as it was."""

from __future__ import annotations

import inspect

import pytest
import torch

from attention_processors import AttentionController, ControlState, attach
from attention_processors import core
from attention_processors.core import AttentionCall
from pipelines import backbones, models


class _Recorder(AttentionController):
    def __init__(self):
        super().__init__()
        self.seen = []

    def select(self, name):
        return True

    def capture(self, call):
        self.seen.append((call.kind, dict(call.segments)))


def test_five_d_latents_set_the_frame_count_and_the_grid():
    """A video denoiser's input (B, C, F, H, W) gives state.frames = F and the H x W grid; a
    later image input resets frames to 1.  (The pre-hook that attach() installs, on a stand-in.)"""

    class Denoiser(torch.nn.Module):
        def forward(self, sample, timestep=None):
            return sample

    denoiser, controller = Denoiser(), AttentionController()
    hook = core._denoiser_state_hook(controller, inspect.signature(denoiser.forward), track_steps=True)
    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        denoiser(torch.zeros(2, 4, 6, 8, 10), timestep=torch.tensor([5.0]))
        assert (controller.state.frames, controller.state.latent_hw, controller.state.step) == (6, (8, 10), 0)
        denoiser(torch.zeros(2, 4, 8, 10), timestep=torch.tensor([4.0]))
        assert (controller.state.frames, controller.state.latent_hw, controller.state.step) == (1, (8, 10), 1)
    finally:
        handle.remove()


def _call(kind, n_img=16, n_txt=7, text_first=False):
    q = torch.zeros(1, 2, n_img + (n_txt if kind in ("joint", "single") else 0), 8)
    keys = {"cross": n_txt, "self": n_img}.get(kind, n_img + n_txt)
    k = torch.zeros(1, 2, keys, 8)
    if kind == "cross":
        image, text = slice(0, n_img), slice(0, n_txt)
    elif kind == "self":
        image, text = slice(0, n_img), None
    elif text_first:
        image, text = slice(n_txt, n_txt + n_img), slice(0, n_txt)
    else:
        image, text = slice(0, n_img), slice(n_img, n_img + n_txt)
    return AttentionCall("layer", kind, q, k, k, image, text, ControlState())


@pytest.mark.parametrize("kind, text_first, expected", [
    ("cross", False, {"text": slice(0, 7)}),
    ("self", False, {"image": slice(0, 16)}),
    ("joint", False, {"text": slice(16, 23), "image": slice(0, 16)}),
    ("single", True, {"text": slice(0, 7), "image": slice(7, 23)}),
])
def test_default_key_segments_name_text_and_image_keys(kind, text_first, expected):
    call = _call(kind, text_first=text_first)
    assert call.segments == expected
    for name, where in expected.items():
        assert call.keys(name) == where
    with pytest.raises(KeyError, match="no 'input_image' keys"):
        call.keys("input_image")


def test_a_backbone_can_name_its_own_key_segments():
    """OmniGen-style: one sequence of text, input-image and output-image keys."""
    q = k = torch.zeros(1, 2, 30, 8)
    segments = {"text": slice(0, 6), "input_image": slice(6, 18), "output_image": slice(18, 30)}
    call = AttentionCall("layer", "joint", q, k, k, slice(18, 30), slice(0, 6), ControlState(),
                         key_segments=dict(segments))
    assert call.keys("input_image") == slice(6, 18) and "image" not in call.segments


@pytest.mark.parametrize("name", [*models.TINY_MODELS])
def test_processors_report_the_segments_of_every_family(tiny_pipe, name):
    pipe = tiny_pipe(name)
    recorder = _Recorder()
    with attach(models.denoiser(pipe), recorder):
        pipe("a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
             output_type="latent", **models.backbone(pipe).call_defaults(pipe, exact_size=True))
    kinds = {kind for kind, _ in recorder.seen}
    assert kinds
    for kind, segments in recorder.seen:
        assert ("text" in segments) == (kind != "self")
        assert ("image" in segments) == (kind != "cross")


@pytest.mark.parametrize("name, guidance, roles", [
    ("tiny", 4.0, ("uncond", "cond")),
    ("tiny", 1.0, ("cond",)),
    ("tiny-sd3", 4.0, ("uncond", "cond")),
    ("tiny-flux", 4.0, ("cond",)),  # guidance is an embedding: no CFG rows
])
def test_row_roles_come_from_the_backbone(tiny_pipe, name, guidance, roles):
    pipe = tiny_pipe(name)
    assert models.backbone(pipe).row_roles(pipe, guidance) == roles
    assert backbones.of(pipe).uses_cfg_batch(pipe, guidance) == ("uncond" in roles)


def test_quiet_view_shares_components_and_leaves_the_pipeline_unchanged(tiny_pipe):
    pipe = tiny_pipe("tiny")
    before = dict(getattr(pipe, "_progress_bar_config", {}))
    had = hasattr(pipe, "_progress_bar_config")
    view = models.quiet_view(pipe)
    assert view._progress_bar_config["disable"] is True
    assert view.unet is pipe.unet and view.scheduler is pipe.scheduler and view.vae is pipe.vae
    out = view("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    again = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert (out == again).all()
    assert hasattr(pipe, "_progress_bar_config") == had
    assert dict(getattr(pipe, "_progress_bar_config", {})) == before
