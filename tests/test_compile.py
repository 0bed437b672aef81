"""torch.compile with every method attached: no graph break, no recompilation between steps, and
the eager result.

Each test runs 3 denoising steps of a tiny model's denoiser (the loop drives the denoiser
directly, with a new timestep per step) once eagerly and once compiled (`backend="eager"`:
Dynamo's tracing and guards without code generation, fast on a CPU) with ``fullgraph=True``,
which raises on any graph break; steps 2 and 3 run under ``error_on_recompile``."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from attention_processors import ControlState, attach
from attention_processors.attentive_eraser import AttentiveEraserAAS
from attention_processors.core import attention_layer_names
from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers
from attention_processors.medsteer import MedSteer, cross_attention_layers
from attention_processors.personalize import PersonalizeAttention, unet_personalization_layers
from attention_processors.refam import RefAMCapture, choose_layers
from attention_processors.saas import SaaSController, sd_layers, sd_window
from pipelines import models

STEPS = 3
ROLES = ("uncond", "cond")


@pytest.fixture(scope="module")
def unet():
    return models.denoiser(models.load("tiny", device="cpu", dtype=torch.float32))


def heatmaps(den):
    names = attention_layer_names(den)
    return CrossAttentionHeatmaps(text_attention_layers(names), keep=5, state=ControlState(row_roles=ROLES))


def eraser(den):
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:40, 20:50] = 1
    return AttentiveEraserAAS(mask, ss_steps=1, state=ControlState(row_roles=("normal", "aas")))


def record(den):
    return MedSteer(cross_attention_layers(attention_layer_names(den)), "record", state=ControlState(row_roles=ROLES))


def steer(den):
    layers = cross_attention_layers(attention_layer_names(den))
    directions = {}
    for i, name in enumerate(layers):
        d = torch.randn(STEPS, den.get_submodule(name).to_out[0].out_features, generator=torch.Generator().manual_seed(i))
        directions[name] = d / d.norm(dim=-1, keepdim=True)
    return MedSteer(layers, "steer", directions=directions, beta=2.0, state=ControlState(row_roles=ROLES))


def refam(den):
    target = torch.zeros(77, dtype=torch.bool)
    target[1:4] = True
    return RefAMCapture(choose_layers(attention_layer_names(den), unet_levels=(0, 1)), target, early_exit=False,
                        state=ControlState(row_roles=ROLES))


def personalize(den):
    layers = unet_personalization_layers(den)
    return PersonalizeAttention(layers["attn2"], layers["capture"], layers["self"], capture_self=True,
                                state=ControlState(row_roles=("instance", "prior")))


def saas(den):
    """Two parts, the tiny UNet's default levels (0, 1), capture and rescale at every step of the
    3 (the window covers them all); the gains move off 1 from step 1 on."""
    layers = sd_layers(attention_layer_names(den), len(den.down_blocks))
    return SaaSController([slice(1, 4), slice(5, 8)], layers, window=sd_window(STEPS, 1.0), map_level=0,
                          state=ControlState(row_roles=ROLES))


def result(controller):
    if isinstance(controller, CrossAttentionHeatmaps):
        return controller.maps()
    if isinstance(controller, MedSteer) and controller.mode == "record":
        return torch.cat(list(controller.means().values()), -1)
    if isinstance(controller, RefAMCapture):
        return controller.heat()
    if isinstance(controller, PersonalizeAttention):
        return controller.self_map()
    if isinstance(controller, SaaSController):  # the masks and gains each step measured, and which steps rescaled
        history = controller.history
        assert controller.loop.rescaled_steps == [1, 2] and any((h["gains"] > 1).any() for h in history)
        return torch.cat([torch.cat([h["masks"].float().flatten(), h["gains"].flatten()]) for h in history])
    return None


def denoise(den, controller, compiled=None):
    """3 steps; `compiled`: "model" (torch.compile of the denoiser) or "blocks" (compile_repeated_blocks)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, den.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, den.config.cross_attention_dim, generator=g)
    track = not isinstance(controller, AttentiveEraserAAS)  # the eraser's loop sets state.step itself
    outputs = []
    with attach(den, controller, track_steps=track):
        for i in range(STEPS):
            if not track:
                controller.state.step = i
            with torch._dynamo.config.patch(error_on_recompile=compiled is not None and i > 0):
                outputs.append(den(sample, torch.tensor(999 - 333 * i), encoder_hidden_states=text).sample)
    return outputs, result(controller)


def compile_and_run(den, make, how):
    torch._dynamo.reset()
    counters.clear()
    compiled = [den]
    if how == "model":
        den.compile(fullgraph=True, backend="eager")
    else:
        den.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = [m for m in den.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    try:
        return denoise(den, make(den), how)
    finally:
        for module in compiled:
            module._compiled_call_impl = None
        torch._dynamo.reset()


def check(den, make, how="model"):
    eager_out, eager_result = denoise(den, make(den))
    out, res = compile_and_run(den, make, how)
    assert not counters["graph_break"], dict(counters["graph_break"])
    if how == "model":
        assert counters["stats"]["unique_graphs"] == 1  # one frame, compiled once for every step
    for a, b in zip(eager_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if eager_result is not None:
        torch.testing.assert_close(res, eager_result, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    heatmaps, record, steer,
    eraser,
    refam,
    personalize,
    saas,
], ids=lambda f: f.__name__)
def test_compiled_denoiser_has_no_graph_break_and_no_recompile(unet, make):
    check(unet, make)


@pytest.mark.parametrize("make", [heatmaps, steer, saas], ids=lambda f: f.__name__)
def test_compiled_repeated_blocks(unet, make):
    check(unet, make, how="blocks")


def test_attach_accepts_a_compiled_module(unet):
    compiled = torch.compile(unet, backend="eager")
    controller = heatmaps(unet)
    with attach(compiled, controller):
        assert any(type(m.processor).__name__.startswith("Controlled")
                   for m in unet.modules() if hasattr(m, "set_processor"))
    torch._dynamo.reset()


def test_compile_flag_compiles_each_model_once_as_it_is_loaded(monkeypatch):
    """`--compile` (models.compile_on_load): a model entering the registry's cache gets its
    denoiser compiled once; a model already cached is returned as it is."""
    import app

    assert app.build_parser().parse_args(["serve", "--compile"]).compile
    monkeypatch.setattr(models, "_cache", {})
    monkeypatch.setattr(models, "_compile_options", None)
    plain = models.load("tiny", device="cpu", dtype=torch.float32)
    assert not getattr(models.denoiser(plain), "_project_compiled", False)
    monkeypatch.setattr(models, "_cache", {})
    models.compile_on_load(backend="eager")
    compiled = models.load("tiny", device="cpu", dtype=torch.float32)
    assert models.denoiser(compiled)._project_compiled
    assert models.load("tiny", device="cpu", dtype=torch.float32) is compiled


# ------------------------------------------------------------------ RefAM: grounding's noisy forwards


def refam_grounding(den, variant):
    """RefAM as grounding runs it (one "cond" row, early exit on), with low sink thresholds so that
    sinks are flagged and excluded; "suppress" adds the sink-key bias, "full_row_refine" the
    chunked joint normaliser and the self-attention of the refinement layers."""
    from attention_processors.refam import self_attention_layers

    names = attention_layer_names(den)
    target = torch.zeros(77, dtype=torch.bool)
    target[1:4] = True
    words = torch.zeros(77, dtype=torch.bool)
    words[:6] = True
    options = dict(among=words, visible=words, candidates=words, l_gas=0.0, tau_mass=1.0, tau_cv=10.0)
    if variant == "suppress":
        options.update(gas_mode="suppress", suppress_keys=torch.isin(torch.arange(77), torch.tensor([2, 5])))
    elif variant == "full_row_refine":
        options.update(norm="full_row", refine_layers=self_attention_layers(names, 0))
    return RefAMCapture(choose_layers(names, unet_levels=(0, 1)), target, early_exit=True,
                        state=ControlState(row_roles=("cond",)), **options)


def refam_forwards(den, variant, compiled=False, forwards=2):
    """`forwards` noisy forwards at grounding's one timestep (new noise each: `n_noise`, the next
    image or frame); the second one under ``error_on_recompile`` when compiled.  Returns the
    controller and, per forward, whether it ran to its end (False: stopped by the early exit)."""
    from attention_processors.refam import StopForward

    controller = refam_grounding(den, variant)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, den.config.cross_attention_dim, generator=g)
    ran = []
    with attach(den, controller):
        for i in range(forwards):
            controller.reset_forward()
            sample = torch.randn(1, den.config.in_channels, 8, 8, generator=g)
            with torch._dynamo.config.patch(error_on_recompile=compiled and i > 0):
                try:
                    den(sample, torch.tensor(500), encoder_hidden_states=text)
                    ran.append(True)
                except StopForward:
                    ran.append(False)
    return controller, ran


@pytest.mark.parametrize("variant", ["exclude", "suppress", "full_row_refine"])
def test_compiled_refam_forward_has_no_graph_break_and_the_next_forward_does_not_recompile(unet, variant):
    """Grounding runs one noisy forward per image and noise draw: compiled (fullgraph), that
    forward has no graph break and the next one does not recompile.  The early exit is eager
    only: eagerly each forward stops after the last captured layer, compiled it runs to its end
    (an exception inside a compiled graph is a graph break); the maps are the same."""
    eager, eager_ran = refam_forwards(unet, variant)
    assert eager_ran == [False, False]
    torch._dynamo.reset()
    counters.clear()
    unet.compile(fullgraph=True, backend="eager")
    try:
        compiled, compiled_ran = refam_forwards(unet, variant, compiled=True)
    finally:
        unet._compiled_call_impl = None
        torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled_ran == [True, True]
    assert compiled.layer_count == eager.layer_count > 0
    torch.testing.assert_close(compiled.heat(), eager.heat(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.token_maps(), eager.token_maps(), rtol=1e-5, atol=1e-6)
    sinks = eager.sink_columns()
    assert sinks is not None and sinks.any() and not sinks.all()
    assert torch.equal(compiled.sink_columns(), sinks)
    if variant == "full_row_refine":
        (a, grid_a), (b, grid_b) = compiled.self_attention(), eager.self_attention()
        assert grid_a == grid_b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ SaaS: Instruction edit with --compile


def test_instruction_edit_on_a_compiled_denoiser_equals_eager_and_compiles_once_whatever_the_steps():
    """`--compile` with Instruction edit on `builtin-edit`: SaaS knows its mask grid before the
    first step (`map_level`), so the compiled blocks run the same graphs at every step, capture or
    rescale or neither.  fullgraph (no graph break); the number of graphs does not grow with the
    steps (a per-step recompile would add some); the edit, its masks and gains equal eager."""
    import copy

    import numpy as np

    from pipelines.builtin import world
    from pipelines.instruct import edit_by_instruction

    shared = models.load("builtin-edit")
    pipe = copy.copy(shared)
    pipe.unet = copy.deepcopy(shared.unet)  # the shared model is never compiled by this test
    edit = world.make_edit(1_095_010)
    source = edit.source.render(64)
    eager = {steps: edit_by_instruction(shared, source, edit.instruction, seed=2, steps=steps) for steps in (2, 5)}
    graphs = {}
    limit = torch._dynamo.config.recompile_limit
    models.compile_denoiser(pipe, backend="eager", fullgraph=True)
    try:
        for steps in (2, 5):
            torch._dynamo.reset()
            counters.clear()
            compiled = edit_by_instruction(pipe, source, edit.instruction, seed=2, steps=steps)
            assert not counters["graph_break"], dict(counters["graph_break"])
            graphs[steps] = counters["stats"]["unique_graphs"]
            reference = eager[steps]
            assert compiled.params["saas_steps"] == reference.params["saas_steps"] != []
            for a, b in zip(compiled.masks, reference.masks):
                assert np.array_equal(a, b)
            np.testing.assert_allclose(compiled.gains, reference.gains, rtol=1e-4)
            pixels = np.abs(np.asarray(compiled.edited, float) - np.asarray(reference.edited, float))
            assert pixels.max() <= 2, pixels.max()  # rounding of the resized sums only
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
    assert graphs[2] == graphs[5] > 0, graphs


def test_saas_under_compile_without_its_mask_grid_says_what_it_needs(unet):
    """Without `map_level` (or `map_grid`) the mask grid is known only after the first step's
    capture, too late for a graph that must be the same at every step: one sentence, not a
    recompile per phase."""
    def bare(den):
        layers = sd_layers(attention_layer_names(den), len(den.down_blocks))
        return SaaSController([slice(1, 4), slice(5, 8)], layers, window=sd_window(STEPS, 1.0),
                              state=ControlState(row_roles=ROLES))

    with pytest.raises(Exception, match="needs its mask grid before the first step"):
        compile_and_run(unet, bare, "model")
