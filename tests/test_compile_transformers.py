"""torch.compile on the transformer families: no graph break, no recompilation between steps, and
the eager result (the UNet counterpart is tests/test_compile.py).

Each test runs 3 forwards of a tiny transformer's denoiser (a new timestep each, the inputs a
pipeline would pass) once eagerly and once compiled (``fullgraph=True``, ``backend="eager"``:
Dynamo's tracing and guards without code generation), with steps 2 and 3 under
``error_on_recompile``:

- heatmap capture on tiny-pixart (cross-attention), tiny-sd3 (joint attention, [image, text])
  and tiny-flux (dual-stream [text, image] and single-stream blocks, whose text length is
  ``state.n_txt`` and whose grid comes from ``img_ids``, resolved once per ids tensor in the
  pre-hook: the same ids tensor is passed at every step, as the pipeline does); joint layers
  read `AttentionCall.text_probs` with both norms;
- MedSteer record and steer on tiny-pixart (the paper's backbone; MedSteer takes PixArt and SD
  UNets only).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from attention_processors import ControlState, attach
from attention_processors.core import attention_layer_names
from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers
from attention_processors.medsteer import MedSteer, cross_attention_layers
from pipelines import models
from pipelines.backbones.flux import latent_image_ids

STEPS = 3
N_TEXT = 12


@functools.lru_cache(maxsize=None)
def denoiser(name):
    return models.denoiser(models.load(name, device="cpu", dtype=torch.float32))


def roles(name):
    return ("cond",) if name == "tiny-flux" else ("uncond", "cond")


def inputs(name, den):
    """(positional args, per-step kwargs builder) of one forward, as the family's pipeline calls it."""
    g = torch.Generator().manual_seed(0)
    cfg = den.config
    if name == "tiny-pixart":
        sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
        fixed = dict(encoder_hidden_states=torch.randn(2, N_TEXT, cfg.caption_channels, generator=g),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None})

        def step(i):
            return dict(timestep=torch.full((2,), 999.0 - 333 * i))
    elif name == "tiny-sd3":
        sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
        fixed = dict(encoder_hidden_states=torch.randn(2, N_TEXT, cfg.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g))

        def step(i):
            return dict(timestep=torch.full((2,), 999.0 - 333 * i))
    elif name == "tiny-flux":
        h = w = 4  # packed token grid of a 64 px image
        sample = torch.randn(1, h * w, cfg.in_channels, generator=g)
        fixed = dict(
            encoder_hidden_states=torch.randn(1, N_TEXT, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
            txt_ids=torch.zeros(N_TEXT, 3),
            # one ids tensor for every step, as the pipeline passes it (the grid is read once per tensor)
            img_ids=latent_image_ids(h, w, torch.device("cpu"), torch.float32),
            guidance=torch.full((1,), 3.5) if cfg.guidance_embeds else None,
        )

        def step(i):
            return dict(timestep=torch.full((1,), (999.0 - 333 * i) / 1000))
    else:
        raise ValueError(name)
    return sample, fixed, step


def heatmaps(den, name, norm="text_softmax"):
    layers = text_attention_layers(attention_layer_names(den))
    return CrossAttentionHeatmaps(layers, keep=5, norm=norm, state=ControlState(row_roles=roles(name)))


def record(den, name):
    return MedSteer(cross_attention_layers(attention_layer_names(den)), "record", state=ControlState(row_roles=roles(name)))


def steer(den, name):
    layers = cross_attention_layers(attention_layer_names(den))
    directions = {}
    for i, layer in enumerate(layers):
        d = torch.randn(STEPS, den.get_submodule(layer).to_out[0].out_features, generator=torch.Generator().manual_seed(i))
        directions[layer] = d / d.norm(dim=-1, keepdim=True)
    return MedSteer(layers, "steer", directions=directions, beta=2.0, state=ControlState(row_roles=roles(name)))


def result(controller):
    if isinstance(controller, CrossAttentionHeatmaps):
        return controller.maps()
    if isinstance(controller, MedSteer) and controller.mode == "record":
        return torch.cat(list(controller.means().values()), -1)
    return None


def denoise(name, den, controller, compiled=False):
    sample, fixed, step = inputs(name, den)
    outputs = []
    with attach(den, controller):
        for i in range(STEPS):
            with torch._dynamo.config.patch(error_on_recompile=compiled and i > 0):
                outputs.append(den(sample, **fixed, **step(i), return_dict=False)[0])
    assert controller.state.step == STEPS - 1  # a new step per forward
    if isinstance(controller, CrossAttentionHeatmaps):  # every selected layer (FLUX: single-stream too), every step
        assert controller.count == STEPS * len(controller.layers)
    return outputs, result(controller)


def check(name, make):
    den = denoiser(name)
    eager_out, eager_result = denoise(name, den, make(den, name))
    torch._dynamo.reset()
    counters.clear()
    den.compile(fullgraph=True, backend="eager")
    try:
        out, res = denoise(name, den, make(den, name), compiled=True)
    finally:
        den._compiled_call_impl = None
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one frame, compiled once for every step
    for a, b in zip(eager_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if eager_result is not None:
        torch.testing.assert_close(res, eager_result, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_compiled_heatmaps(name):
    check(name, heatmaps)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_compiled_heatmaps_with_full_row_norm(name):
    check(name, functools.partial(heatmaps, norm="full_row"))


@pytest.mark.parametrize("make", [record, steer], ids=lambda f: f.__name__)
def test_compiled_medsteer_on_pixart(make):
    check("tiny-pixart", make)
