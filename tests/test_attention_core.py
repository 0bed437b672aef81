"""The attention-control core, specified on every attention shape the project supports.

For each tiny model (SD 1.x UNet, SDXL UNet, PixArt, SD3 joint, FLUX dual + single stream):
- a controller that selects layers but changes nothing leaves the model output equal to the
  stock processors;
- captured probabilities equal an explicit float64 softmax of the same logits, for both
  normalisations, and cross-attention rows sum to one;
- the text keys the processor reports are the projections of the text input (sequence order);
- every layer gets its original processor object back, after a normal exit and after an error.
"""

import pytest
import torch

from attention_processors import AttentionController, ControlState, attach
from attention_processors.core import AttentionCall
from pipelines import models

FAMILIES = ["tiny", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"]
PROMPT = "a red circle on the left"


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def run(pipe, height=64, width=64, steps=2, seed=0):
    extra = models.backbone(pipe).call_defaults(pipe)
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        PROMPT, num_inference_steps=steps, height=height, width=width, generator=generator,
        output_type="latent", **extra,
    ).images


def cfg_roles(pipe):
    return ("cond",) if models.family(pipe) == "flux" else ("uncond", "cond")


class Observer(AttentionController):
    """Selects every attention layer, changes nothing, and checks each captured slice."""

    def __init__(self, state=None, check=None):
        super().__init__(state)
        self.check = check
        self.calls: list[tuple[str, str, int]] = []

    def select(self, name):
        return True

    def capture(self, call: AttentionCall):
        self.calls.append((call.name, call.kind, call.state.step))
        if call.text_keys is not None:
            call.text_probs(call.rows("cond"))  # the capture path runs but must change nothing
        if self.check:
            self.check(call)


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return models.load(request.param)


def test_observing_controller_leaves_output_unchanged(pipe):
    stock = run(pipe)
    observer = Observer(ControlState(row_roles=cfg_roles(pipe)))
    with attach(denoiser_of(pipe), observer):
        observed = run(pipe)
    assert observer.calls, "no controlled layer ran"
    assert (observed - stock).abs().max().item() < 1e-5


def reference_probs(call: AttentionCall, rows: slice, norm: str) -> torch.Tensor:
    """Explicit float64 softmax over all keys (full_row) or over the text keys only."""
    q = call.query[rows].double()
    k = call.key[rows].double()
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if call.attn_mask is not None:
        logits = logits + call.attn_mask[rows if call.attn_mask.shape[0] > 1 else slice(None)].double()
    logits = logits[:, :, call.image_queries]
    if norm == "full_row":
        return logits.softmax(-1)[..., call.text_keys]
    return logits[..., call.text_keys].softmax(-1)


def test_captured_probabilities_match_float64_reference(pipe):
    checked = []

    def check(call):
        if call.text_keys is None:
            return
        rows = call.rows("cond")
        for norm in ("text_softmax", "full_row"):
            for chunk in (3, 1024):  # the chunked normaliser must not depend on the chunk size
                got = call.text_probs(rows, norm=norm, chunk=chunk)
                assert got.dtype == torch.float32
                want = reference_probs(call, rows, norm)
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
        if call.kind == "cross":  # UNet/PixArt: every key is text, rows are true distributions
            sums = call.text_probs(rows).sum(-1)
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        checked.append(call.kind)

    with attach(denoiser_of(pipe), Observer(ControlState(row_roles=cfg_roles(pipe)), check)):
        run(pipe, steps=2)
    assert checked


def test_text_keys_are_the_projected_text_input(pipe):
    """Sequence order: the slice reported as text holds the keys of the text tokens."""
    denoiser = denoiser_of(pipe)
    text_inputs = {}
    hooks = []
    for name, module in denoiser.named_modules():
        if name.endswith(("attn", "attn2")) and hasattr(module, "to_k"):
            def remember(mod, args, kwargs, name=name):
                hs = kwargs.get("hidden_states", args[0] if args else None)
                ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                text_inputs[name] = (mod, hs, ehs)
            hooks.append(module.register_forward_pre_hook(remember, with_kwargs=True))
    checked = []

    def check(call):
        if call.text_keys is None:
            return
        mod, hs, ehs = text_inputs[call.name]
        if call.kind == "single":  # FLUX single stream: text first inside the concatenated input
            text = mod.norm_k(mod.to_k(hs[:, : call.state.n_txt]).unflatten(-1, (-1, mod.head_dim)))
        elif hasattr(mod, "add_k_proj") and mod.add_k_proj is not None:  # joint: separate text stream
            text = mod.add_k_proj(ehs).unflatten(-1, (mod.heads, -1))
            if mod.norm_added_k is not None:
                text = mod.norm_added_k(text if models.family(pipe) == "flux" else text.transpose(1, 2))
                text = text if models.family(pipe) == "flux" else text.transpose(1, 2)
        else:  # cross-attention
            text = mod.to_k(ehs).unflatten(-1, (mod.heads, -1))
        # FLUX text tokens sit at rotary position 0, where the rotation is the identity
        torch.testing.assert_close(call.key[:, :, call.text_keys], text.transpose(1, 2), atol=1e-5, rtol=1e-4)
        assert call.n_image == call.grid[0] * call.grid[1]
        checked.append(call.kind)

    try:
        with attach(denoiser, Observer(ControlState(row_roles=cfg_roles(pipe)), check)):
            run(pipe, steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert checked
    if models.family(pipe) == "flux":
        assert {"joint", "single"} <= set(checked)


def test_processors_restored_after_exit_and_after_error(pipe):
    denoiser = denoiser_of(pipe)
    before = denoiser.attn_processors
    with attach(denoiser, Observer()):
        during = denoiser.attn_processors
        assert all(during[k] is not before[k] for k in before)
    after = denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)

    with pytest.raises(RuntimeError, match="boom"):
        with attach(denoiser, Observer()):
            raise RuntimeError("boom")
    after = denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)
    # no module carries an instance-level forward (we never monkey-patch)
    assert not any("forward" in vars(m) for m in denoiser.modules())


def test_step_index_advances_once_per_denoising_step(pipe):
    """One index per distinct timestep, never per layer call.

    PNDM (the tiny SD scheduler) evaluates its first timestep twice: those two forwards share
    one step index, like CFG passes or recomputations would.
    """
    observer = Observer(ControlState(row_roles=cfg_roles(pipe)))
    with attach(denoiser_of(pipe), observer):
        run(pipe, steps=3)
    distinct_timesteps = len(set(pipe.scheduler.timesteps.tolist()))
    steps = [s for _, _, s in observer.calls]
    assert sorted(set(steps)) == list(range(distinct_timesteps))
    layers = {name for name, _, _ in observer.calls}
    for step in set(steps):
        calls = [name for name, _, s in observer.calls if s == step]
        assert set(calls) == layers and len(calls) % len(layers) == 0


def test_non_square_latents_give_non_square_grids(pipe):
    height, width = 64, 96  # multiples of 16, so DiTs (patch 2 on an 8x latent) accept them too
    grids = set()
    observer = Observer(ControlState(row_roles=cfg_roles(pipe)), lambda call: grids.add(call.grid))
    with attach(denoiser_of(pipe), observer):
        run(pipe, height=height, width=width, steps=2)
    assert grids and all(w * 2 == h * 3 for h, w in grids)  # every layer keeps the 3:2 aspect


class SelectNothing(AttentionController):
    pass


def test_selecting_no_layer_is_an_error():
    pipe = models.load("tiny")
    with pytest.raises(ValueError, match="selected none"):
        with attach(pipe.unet, SelectNothing()):
            pass


@pytest.mark.parametrize("block", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
def test_flux_projections_are_the_same_after_fuse_projections(block):
    """`processors.flux_projections` (our FLUX processors' q, k, v; diffusers keeps its helper
    private) reads the fused weights after `fuse_projections`, as the stock processor does, and
    gets the unfused projections: the text's in a dual-stream block, none in a single-stream one."""
    import copy

    from attention_processors.processors import flux_projections

    attn = copy.deepcopy(models.denoiser(models.load("tiny-flux", device="cpu", dtype=torch.float32))
                         .get_submodule(block))
    g = torch.Generator().manual_seed(0)
    width = attn.to_q.in_features
    image, text = torch.randn(1, 16, width, generator=g), torch.randn(1, 5, width, generator=g)
    plain = flux_projections(attn, image, text)
    attn.fuse_projections()
    assert attn.fused_projections
    fused = flux_projections(attn, image, text)
    dual = block.startswith("transformer_blocks")
    assert (plain[1][0] is not None) == dual and (fused[1][0] is not None) == dual
    for a, b in zip(plain[0] + plain[1], fused[0] + fused[1]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a)
