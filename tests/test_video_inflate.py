"""The inflated video UNet (pipelines/video/inflate.py) and sparse-causal attention, as specified
in docs/methods/video.md ("The video UNet")."""

from __future__ import annotations

import pytest
import torch

from attention_processors.core import AttentionCall, ControlState
from attention_processors.video import SparseCausalAttention, sparse_causal
from pipelines.video.inflate import (
    FrameJointGroupNorm,
    inflate,
    self_attention_layers,
    temporal_parameters,
    video_call,
)


def _inputs(unet, frames, batch=1, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, side, side, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, text


def _run(video, x, t, text):
    controller = SparseCausalAttention(self_attention_layers(video))
    with torch.no_grad(), video_call(video, controller):
        return video(x, t, encoder_hidden_states=text).sample


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_inflated_equals_framewise_unet_at_initialisation(tiny_pipe, name):
    unet = tiny_pipe(name).unet
    video = inflate(unet)
    t = torch.tensor(400)
    # one frame: sparse-causal keys [f0 | f0] are plain self-attention, temporal attention adds 0
    x, text = _inputs(unet, 1)
    with torch.no_grad():
        plain = unet(x[:, :, 0], t, encoder_hidden_states=text).sample
    assert torch.allclose(_run(video, x, t, text)[:, :, 0], plain, atol=1e-5)
    # identical frames: frame-joint GroupNorm has per-frame statistics, [f0 | f(f-1)] duplicates the frame
    clip = x.repeat(1, 1, 4, 1, 1)
    out = _run(video, clip, t, text)
    assert out.shape == clip.shape
    for f in range(4):
        assert torch.allclose(out[:, :, f], plain, atol=1e-5)


def test_builtin_inflates_and_matches_at_one_frame():
    from pipelines import models

    unet = models.load("builtin", device="cpu").unet
    video = inflate(unet)
    x, text = _inputs(unet, 1, side=16)
    t = torch.tensor(700)
    with torch.no_grad():
        plain = unet(x[:, :, 0], t, encoder_hidden_states=text).sample
    assert torch.allclose(_run(video, x, t, text)[:, :, 0], plain, atol=1e-5)


def test_inflate_copies_and_leaves_the_cached_unet_as_it_was(tiny_pipe):
    unet = tiny_pipe("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    n_modules = len(list(unet.modules()))
    video = inflate(unet)
    assert video is not unet
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(video.parameters(), unet.parameters()))
    x, text = _inputs(unet, 3)
    _run(video, x, torch.tensor(10), text)
    assert len(list(unet.modules())) == n_modules
    assert unet.attn_processors == processors
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not any(isinstance(m, FrameJointGroupNorm) for m in unet.modules())
    with pytest.raises(ValueError, match="inflated already"):
        inflate(video)


def test_the_copy_runs_its_own_forward_when_the_shared_unet_has_a_compiled_one(tiny_pipe):
    """A forward replaced on the shared UNet's instance (``unet.forward = torch.compile(unet.forward)``)
    is bound to it: deep-copied into the video UNet it would run the shared 2-D UNet instead, and the
    record of `models.compile_denoiser` would claim the copy compiled.  The copy drops both."""
    import copy

    plain = tiny_pipe("tiny").unet
    unet = copy.deepcopy(plain)
    unet.forward = torch.compile(unet.forward, backend="eager")
    unet._project_compiled, unet._project_compile_options = True, {"backend": "eager"}
    video = inflate(unet)
    assert "forward" not in vars(video) and not getattr(video, "_project_compiled", False)
    x, text = _inputs(plain, 3)
    torch.testing.assert_close(_run(video, x, torch.tensor(10), text), _run(inflate(plain), x, torch.tensor(10), text))
    torch._dynamo.reset()


def test_temporal_attention_is_zero_at_init_and_mixes_frames_once_trained(tiny_pipe):
    video = inflate(tiny_pipe("tiny").unet)
    temporal = [m for n, m in video.named_modules() if n.endswith("attn_temp")]
    assert temporal and all(not m.to_out[0].weight.any() and not m.to_out[0].bias.any() for m in temporal)
    h = torch.randn(6, 5, temporal[0].to_q.in_features)
    assert torch.equal(temporal[0](h), torch.zeros_like(h))
    x, text = _inputs(video, 4)
    t = torch.tensor(300)
    changed = x.clone()
    changed[:, :, 3] += 1.0
    # untrained, with per-frame GroupNorm (frame-joint statistics would couple the frames): frame 0
    # sees only itself (its sparse-causal keys are [f0 | f0], the temporal output is 0)
    per_frame = inflate(tiny_pipe("tiny").unet, per_frame_groupnorm=True)
    assert torch.equal(_run(per_frame, x, t, text)[:, :, 0], _run(per_frame, changed, t, text)[:, :, 0])
    # a trained temporal block makes frame 0 see frame 3
    with torch.no_grad():
        for p in temporal_parameters(per_frame).values():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_run(per_frame, x, t, text)[:, :, 0], _run(per_frame, changed, t, text)[:, :, 0])


def test_frame_joint_groupnorm_equals_groupnorm_on_the_5d_tensor():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    joint = FrameJointGroupNorm.sharing(norm)
    assert joint.weight is norm.weight and joint.bias is norm.bias
    clips = torch.randn(2, 8, 3, 5, 6) * torch.linspace(0.5, 3, 3).view(1, 1, 3, 1, 1)
    expected = norm(clips)  # nn.GroupNorm on (B, C, F, H, W): statistics over (F, H, W)
    folded = clips.transpose(1, 2).reshape(6, 8, 5, 6)
    joint.frame_state = ControlState(frames=3)
    out = joint(folded).view(2, 3, 8, 5, 6).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, norm(folded).view(2, 3, 8, 5, 6).transpose(1, 2), atol=1e-3)  # not per frame
    joint.frame_state = None
    with pytest.raises(RuntimeError, match="video_call"):
        joint(folded)


def test_groupnorm_option_swaps_the_resnet_norms_only(tiny_pipe):
    joint = inflate(tiny_pipe("tiny").unet)
    swapped = {n for n, m in joint.named_modules() if isinstance(m, FrameJointGroupNorm)}
    assert swapped and all(n.endswith(("norm1", "norm2")) or n == "conv_norm_out" for n in swapped)
    assert not any(isinstance(m, FrameJointGroupNorm) for n, m in joint.named_modules() if ".attentions." in n)
    per_frame = inflate(tiny_pipe("tiny").unet, per_frame_groupnorm=True)
    assert not any(isinstance(m, FrameJointGroupNorm) for m in per_frame.modules())


def test_frame_count_comes_from_the_call_state(tiny_pipe):
    video = inflate(tiny_pipe("tiny").unet)
    x, text = _inputs(video, 2)
    with pytest.raises(RuntimeError, match="video_call"):  # outside a call the GroupNorms refuse to guess
        with torch.no_grad():
            video(x[:, :, 0], torch.tensor(1), encoder_hidden_states=text)
    controller = SparseCausalAttention(self_attention_layers(video))
    with video_call(video, controller), pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        video(x[:, :, 0], torch.tensor(1), encoder_hidden_states=text)
    with pytest.raises(ValueError, match="frame-wise"):
        with video_call(video, SparseCausalAttention(self_attention_layers(video)[:1])):
            pass


def _hand_sparse_causal(q, k, v, frames):
    """Explicit softmax attention, frame f attending to frames 0 and max(f-1, 0)."""
    rows = q.shape[0]
    out = torch.empty_like(q)
    for r in range(rows):
        clip, f = divmod(r, frames)
        anchor, prev = clip * frames, clip * frames + max(f - 1, 0)
        keys = torch.cat([k[anchor], k[prev]], dim=-2)
        values = torch.cat([v[anchor], v[prev]], dim=-2)
        probs = (q[r] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        out[r] = probs @ values
    return out


def test_sparse_causal_attention_matches_a_hand_computation_and_is_local():
    frames, clips, heads, n, d = 5, 2, 2, 6, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(clips * frames, heads, n, d, generator=g) for _ in range(3))
    state = ControlState(row_roles=("cond",), frames=frames)
    controller = SparseCausalAttention(["a.attn1"], state)

    def attend(q, k, v):
        return controller.attend(AttentionCall("a.attn1", "self", q, k, v, slice(0, n), None, state))

    out = attend(q, k, v)
    assert torch.allclose(out, _hand_sparse_causal(q, k, v, frames), atol=1e-5)
    keys = sparse_causal(k, frames)
    assert keys.shape == (clips * frames, heads, 2 * n, d)
    assert torch.equal(keys[3, :, :n], k[0]) and torch.equal(keys[3, :, n:], k[2])
    assert torch.equal(keys[frames, :, :n], k[frames]) and torch.equal(keys[frames, :, n:], k[frames])
    # perturbing frame 3 of the first clip changes frames 3 and 4 only
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[3] += 1.0
    changed = attend(q2, k2, v2)
    same = [0, 1, 2] + list(range(frames, 2 * frames))
    assert torch.equal(changed[same], out[same])
    assert not torch.allclose(changed[3], out[3]) and not torch.allclose(changed[4], out[4])
