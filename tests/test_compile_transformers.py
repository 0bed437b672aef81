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
  UNets only);
- SaaS (Instruction edit) on tiny-omnigen and tiny-flux-kontext, installed as the pipeline
  installs it, on the inputs the pipeline gives its transformer (recorded from its first
  forward), 4 steps that capture, rescale, or neither, compiled whole and by blocks; and the
  whole edit on a compiled copy of each pipeline (`models.compile_denoiser`).
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


# ------------------------------------------------------------------ SaaS (Instruction edit) on OmniGen and FLUX Kontext

SAAS_STEPS = 4
#: 4 steps with the window 0.5: steps 0 and 1 capture, 1 and 2 rescale, 3 does neither
SAAS_WINDOW = 0.5
EDIT = "make the circle blue, and make the background beige"


class _FirstForward(Exception):
    pass


@functools.lru_cache(maxsize=None)
def saas_case(name):
    """(pipeline, its edit, run, layout, the transformer's keyword arguments of the first forward)
    of an Instruction edit, recorded from the pipeline's own call (which is stopped there): the
    inputs are exactly what the pipeline gives its transformer."""
    from PIL import Image

    from pipelines.builtin import world
    from pipelines.instruct import INSTRUCT, edit_for, edit_run

    pipe = models.load(name, device="cpu")
    edit = edit_for(pipe)
    run = edit_run(pipe, INSTRUCT.replace(steps=SAAS_STEPS, window=SAAS_WINDOW).validated())
    source = Image.fromarray(world.make_edit(1_095_003).source.render(64))
    call = edit.prepare(pipe, source, EDIT, run)
    seen = {}

    def grab(_module, args, kwargs):
        assert not args
        seen.update(kwargs)
        raise _FirstForward

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with edit.seeded(pipe, 0), pytest.raises(_FirstForward):
            pipe(**{k: v for k, v in call.items() if k != "layout"}, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return pipe, edit, run, call["layout"], seen


def saas_forwards(transformer, name, compiled=False):
    """SAAS_STEPS forwards of `transformer` with SaaS installed as the pipeline installs it (a new
    timestep each); with `compiled`, steps after the first under ``error_on_recompile``."""
    from pipelines.instruct import INSTRUCT

    pipe, edit, run, layout, kwargs = saas_case(name)
    state = edit.saas_state(pipe, layout, run, INSTRUCT.replace(steps=SAAS_STEPS, window=SAAS_WINDOW).validated())
    first = kwargs["timestep"]
    outputs = []
    with torch.no_grad(), edit.install(transformer, state):
        for i in range(SAAS_STEPS):
            with torch._dynamo.config.patch(error_on_recompile=compiled and i > 0):
                step = {**kwargs, "timestep": first * (1 - 0.25 * i)}
                outputs.append(transformer(**step)[0])
    return outputs, state


def saas_history(state):
    return [(h["step"], h["masks"], h["gains"], h["active"]) for h in state.history]


def saas_compile(transformer, how, fullgraph=True):
    """Compile `transformer` whole ("model") or its repeated blocks ("blocks": diffusers'
    `compile_repeated_blocks` where the class names them, else, for OmniGen, each of its
    ``layers`` by hand, the same regional compilation); returns the compiled modules."""
    options = dict(fullgraph=fullgraph, backend="eager")
    if how == "model":
        transformer.compile(**options)
    elif getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**options)
    else:
        for block in transformer.layers:
            block.compile(**options)
    return [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def compiled_counters(transformer, how, run, fullgraph=True):
    """`run()`'s result with `transformer` compiled (then uncompiled), and Dynamo's counters of it."""
    torch._dynamo.reset()
    counters.clear()
    modules = saas_compile(transformer, how, fullgraph)
    try:
        result = run()
        return result, {"graph_break": dict(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"]}
    finally:
        for module in modules:
            module._compiled_call_impl = None
        torch._dynamo.reset()


def stock_forwards(transformer, name):
    pipe, edit, run, layout, kwargs = saas_case(name)
    with torch.no_grad():
        return [transformer(**{**kwargs, "timestep": kwargs["timestep"] * (1 - 0.25 * i)})[0]
                for i in range(SAAS_STEPS)]


@pytest.mark.parametrize("name,how", [("tiny-omnigen", "model"), ("tiny-omnigen", "blocks"),
                                      ("tiny-flux-kontext", "model"), ("tiny-flux-kontext", "blocks")])
def test_compiled_saas_on_joint_sequences_is_one_graph_for_every_step_and_the_eager_edit(name, how):
    """SaaS on OmniGen (the paper's backbone) and FLUX Kontext, compiled whole and by blocks (as
    `--compile` does on Kontext), with steps that capture (0, 1), rescale (1, 2) and do neither
    (3): no recompilation between steps, the outputs, masks and gains are eager's.  The pre-hook
    that prepares each forward runs eagerly (outside the graph) in both modes.

    ``fullgraph`` everywhere except OmniGen's whole model: diffusers' OmniGen rotary embedding
    branches on ``torch.max(position_ids)`` (a data-dependent graph break without SaaS too), so
    there the graph breaks must be the stock model's and no more; its blocks, where SaaS runs,
    compile ``fullgraph``."""
    import copy

    pipe = saas_case(name)[0]
    transformer = copy.deepcopy(pipe.transformer)  # the shared model is never compiled by this test
    stock = stock_forwards(transformer, name)
    eager_out, eager = saas_forwards(transformer, name)
    assert eager.loop.captured_steps == [0, 1] and eager.loop.rescaled_steps == [1, 2]
    history = saas_history(eager)
    assert [h[0] for h in history] == [0, 1]
    assert all(m.any() for _, m, _, _ in history)
    assert any(((g - 1).abs() > 1e-2).any() for _, _, g, _ in history)  # the gains move off 1
    # SaaS changes the rescaled steps (so matching eager there means something), not step 0
    assert torch.equal(eager_out[0], stock[0]) and (eager_out[1] - stock[1]).abs().max() > 1e-3
    fullgraph = not (name == "tiny-omnigen" and how == "model")
    (out, compiled), seen = compiled_counters(transformer, how, lambda: saas_forwards(transformer, name, True),
                                              fullgraph)
    if fullgraph:
        assert not seen["graph_break"], seen["graph_break"]
    else:
        _, stock_seen = compiled_counters(transformer, how, lambda: stock_forwards(transformer, name), fullgraph)
        assert sum(stock_seen["graph_break"].values()) == 1  # diffusers' rotary embedding
        assert seen == stock_seen  # SaaS adds no graph break and no graph
    if how == "model" and fullgraph:
        assert seen["graphs"] == 1  # one frame, compiled once for every step
    else:
        assert seen["graphs"] > 0
    for a, b in zip(eager_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (compiled.loop.captured_steps, compiled.loop.rescaled_steps) == ([0, 1], [1, 2])
    for (step_a, masks_a, gains_a, active_a), (step_b, masks_b, gains_b, active_b) in zip(saas_history(compiled),
                                                                                         history, strict=True):
        assert step_a == step_b and torch.equal(masks_a, masks_b) and torch.equal(active_a, active_b)
        torch.testing.assert_close(gains_a, gains_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-omnigen", "tiny-flux-kontext"])
def test_instruction_edit_on_a_compiled_transformer_equals_eager_and_compiles_once_whatever_the_steps(name):
    """`--compile` (`models.compile_denoiser`) with Instruction edit: FLUX Kontext's repeated blocks
    (``fullgraph``), OmniGen's whole transformer (it has no repeated blocks; not ``fullgraph``,
    whose one graph break is diffusers' rotary embedding, see above).  The number of graphs does
    not grow with the steps (a per-step recompile would add some: 2 steps capture then rescale,
    5 steps also run steps that do neither); the edit, its masks and gains equal eager."""
    import copy

    import numpy as np
    from PIL import Image

    from pipelines.builtin import world
    from pipelines.instruct import edit_by_instruction

    shared = models.load(name, device="cpu")
    pipe = copy.copy(shared)
    pipe.transformer = copy.deepcopy(shared.transformer)  # the shared model is never compiled by this test
    source = Image.fromarray(world.make_edit(1_095_003).source.render(64))
    options = dict(seed=3, compare=False)
    eager = {steps: edit_by_instruction(shared, source, EDIT, steps=steps, **options) for steps in (2, 5)}
    fullgraph = name != "tiny-omnigen"
    graphs = {}
    limit = torch._dynamo.config.recompile_limit
    models.compile_denoiser(pipe, backend="eager", fullgraph=fullgraph)
    try:
        for steps in (2, 5):
            torch._dynamo.reset()
            counters.clear()
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = edit_by_instruction(pipe, source, EDIT, steps=steps, **options)
            breaks = dict(counters["graph_break"])
            if fullgraph:
                assert not breaks, breaks
            else:  # diffusers' OmniGen rotary embedding, with or without SaaS
                assert len(breaks) == 1 and "torch.max(position_ids)" in next(iter(breaks)), breaks
            graphs[steps] = counters["stats"]["unique_graphs"]
            reference = eager[steps]
            assert compiled.params["saas_steps"] == reference.params["saas_steps"] != []
            for a, b in zip(compiled.masks, reference.masks, strict=True):
                assert np.array_equal(a, b)
            np.testing.assert_allclose(compiled.gains, reference.gains, rtol=1e-4)
            pixels = np.abs(np.asarray(compiled.edited, float) - np.asarray(reference.edited, float))
            assert pixels.max() <= 1, pixels.max()
    finally:
        den = pipe.transformer
        for module in den.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
    assert graphs[2] == graphs[5] > 0, graphs
