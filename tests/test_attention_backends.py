"""Controlled layers run their fused attention through diffusers' attention dispatcher, with the
backend the user chose for the model (`core.fused_attention`, `core.attention_backend_for`).

A recording backend replaces one registry entry; each test checks that the recorder ran right
before every controlled capture (i.e. from a controlled layer), for every processor family."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

from attention_processors import AttentionController, ControlState, attach
from attention_processors import core
from pipelines import models

FAMILIES = ["tiny", "tiny-pixart", "tiny-sd3", "tiny-flux"]
RECORDED = AttentionBackendName._NATIVE_MATH  # any backend that runs on the CPU


class Recorder:
    def __init__(self, events, fn):
        self.events, self.fn = events, fn

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        self.events.append(("dispatch", tuple(query.shape), attn_mask is not None))
        return self.fn(query, key, value, attn_mask=attn_mask, **kwargs)


@contextlib.contextmanager
def recording(backend, events, fn=None):
    backends = _AttentionBackendRegistry._backends
    missing = backend not in backends  # e.g. a diffusers without that backend: add it for the test
    original = backends.get(backend)
    backends[backend] = Recorder(events, fn or original)
    try:
        yield
    finally:
        if missing:
            del backends[backend]
        else:
            backends[backend] = original


class Observer(AttentionController):
    def __init__(self, events, state, bias=False):
        super().__init__(state)
        self.events, self.with_bias = events, bias

    def select(self, name):
        return True

    def bias(self, call):
        return torch.zeros(call.key.shape[2], dtype=call.query.dtype) if self.with_bias else None

    def capture(self, call):
        # the dispatcher's layout is (B, N, heads, D)
        self.events.append(("capture", (call.batch_size, call.query.shape[2], *call.query.shape[1:2], call.query.shape[3])))


def run(pipe):
    extra = models.backbone(pipe).call_defaults(pipe)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="latent", **extra).images


def roles(pipe):
    return ("cond",) if models.family(pipe) == "flux" else ("uncond", "cond")


def assert_dispatched_before_every_capture(events):
    captures = [i for i, e in enumerate(events) if e[0] == "capture"]
    assert captures, "no controlled layer ran"
    for i in captures:
        before = events[i - 1] if i else None
        assert before is not None and before[0] == "dispatch", f"capture {i} was not preceded by a dispatch"
        assert before[1] == events[i][1], (before, events[i])


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return models.load(request.param, device="cpu", dtype=torch.float32)


def test_the_active_backend_runs_in_controlled_layers(pipe):
    """`attention_backend(...)` (the registry's active backend) is what controlled layers call, and
    the result equals the default path."""
    den = models.denoiser(pipe)
    with attach(den, Observer([], ControlState(row_roles=roles(pipe)))):
        reference = run(pipe)
    events = []
    with recording(RECORDED, events), attention_backend(RECORDED):
        with attach(den, Observer(events, ControlState(row_roles=roles(pipe)))):
            out = run(pipe)
    assert_dispatched_before_every_capture(events)
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)  # math vs fused CPU kernel


def test_a_backend_set_on_the_model_is_carried_into_controlled_processors(pipe):
    """`model.set_attention_backend(...)` before `attach`: our processors carry the stock processor's
    `_attention_backend`; set while attached, it lands on ours (they have the attribute)."""
    den = models.denoiser(pipe)
    active = _AttentionBackendRegistry._active_backend
    stock_has_it = any(hasattr(m.processor, "_attention_backend") for m in den.modules() if hasattr(m, "set_processor"))
    events = []
    try:
        with recording(RECORDED, events):
            den.set_attention_backend(RECORDED.value)
            _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # only the model's setting
            controller = Observer(events, ControlState(row_roles=roles(pipe)))
            with attach(den, controller):
                if stock_has_it:
                    ours = [m.processor for m in den.modules() if hasattr(m, "set_processor")]
                    assert all(p._attention_backend == RECORDED for p in ours)
                else:  # UNet/PixArt stock AttnProcessor2_0 has no backend: set it while attached
                    den.set_attention_backend(RECORDED.value)
                    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
                run(pipe)
    finally:
        den.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    assert_dispatched_before_every_capture(events)


def test_a_mask_with_a_maskless_backend_falls_back_to_native(pipe):
    """A flash-type backend takes no float mask: masked controlled calls use `native`, unmasked ones
    keep the chosen backend."""
    den = models.denoiser(pipe)
    flash_calls, native_calls = [], []

    def no_mask(query, key, value, attn_mask=None, scale=None, **kwargs):
        assert attn_mask is None, "a mask reached a backend that takes none"
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)),
                                                               scale=scale)
        return out.transpose(1, 2)

    flash = AttentionBackendName.FLASH
    with recording(flash, flash_calls, no_mask), recording(AttentionBackendName.NATIVE, native_calls):
        # set directly: attention_backend("flash") would check that flash-attn is installed
        active = _AttentionBackendRegistry._active_backend
        _AttentionBackendRegistry.set_active_backend(flash)
        try:
            with attach(den, Observer([], ControlState(row_roles=roles(pipe)), bias=True)):
                run(pipe)
            assert native_calls and all(masked for _, _, masked in native_calls)
            assert not flash_calls
            with attach(den, Observer([], ControlState(row_roles=roles(pipe)), bias=False)):
                run(pipe)
        finally:
            _AttentionBackendRegistry.set_active_backend(active)
    assert flash_calls, "unmasked controlled calls did not keep the chosen backend"


def test_fused_attention_chooses_the_backend():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5)
    assert core.attention_backend_for("flash", None) == "flash"
    assert core.attention_backend_for("flash", mask) == AttentionBackendName.NATIVE
    assert core.attention_backend_for(AttentionBackendName._NATIVE_MATH, mask) == AttentionBackendName._NATIVE_MATH
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(core.fused_attention(q, k, v, attn_mask=mask, scale=0.3), expected)
