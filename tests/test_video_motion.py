"""Edit video on AnimateDiff (pipelines/video/motion.py; beyond the paper): the motion UNet is
the SD UNet plus residual motion modules, built as a new module; the same ReAtCo sampling,
inversion and (optional) fine-tune run on it through `video_call`; the adapter enters the cache
keys; every bad adapter is one sentence; the CLI flag and the app's server-side adapter menu."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
import pytest
import torch

from attention_processors import attention_layer_names
from attention_processors import layers as vocabulary
from attention_processors.video import ReAtCoAttention, SparseCausalAttention
from pipelines.errors import UserInputError
from pipelines.tiny_models import save_tiny_motion_adapter, tiny_motion_adapter
from pipelines.video import edit_video, motion
from pipelines.video.inflate import frame_record, inflate, sparse_causal_layers, video_call
from pipelines.video.reatco import capture_layers
from pipelines.video.tune import VideoTuner, trainable_parameters
from pipelines.video_settings import VideoSettings

import test_video_pipeline

#: the 4-frame 32 px clip fixture of tests/test_video_pipeline.py, shared
frames = test_video_pipeline.frames

#: a cheap edit: no fine-tune (the adapter's default), 2 steps, one refinement iteration
FAST = dict(steps=2, refine_iterations=1, window=3)
EDIT = ("a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"])


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """The tiny motion adapter saved as a diffusers folder (what --motion-adapter takes)."""
    return save_tiny_motion_adapter(tmp_path_factory.mktemp("adapters") / "tiny-motion")


@pytest.fixture(scope="module")
def other_adapter_dir(tmp_path_factory):
    """A second adapter of the same layout with other weights."""
    adapter = tiny_motion_adapter()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01)
    folder = tmp_path_factory.mktemp("adapters") / "other-motion"
    adapter.save_pretrained(folder, safe_serialization=True)
    return folder


def _inputs(unet, frames, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, side, side, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return x, text


def _run(video, x, t, text, controller=None):
    controller = controller or SparseCausalAttention(sparse_causal_layers(video))
    with torch.no_grad(), video_call(video, controller):
        return video(x, t, encoder_hidden_states=text).sample


def _motion_modules_zeroed(video):
    with torch.no_grad():
        for name, p in video.named_parameters():
            if ".motion_modules." in name and ".proj_out." in name:
                p.zero_()
    return video


# ----------------------------------------------------------------------------- the motion UNet


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_the_motion_unet_is_the_framewise_unet_when_its_motion_outputs_are_zero(tiny_pipe, adapter_dir, name):
    """The motion modules are residual (x + proj_out(...)): with their output projections zeroed the
    motion UNet is the SD UNet run frame by frame, up to float rounding (1e-5; measured 1e-6)."""
    unet = tiny_pipe(name).unet
    adapter = motion.load_adapter(str(adapter_dir))
    video = motion.motion_unet(unet, adapter, str(adapter_dir))
    x, text = _inputs(unet, 3)
    t = torch.tensor(400)
    changed = x.clone()
    changed[:, :, 2] += 1.0
    # as loaded, the motion modules mix the frames: frame 0 sees a change of frame 2
    assert not torch.allclose(_run(video, x, t, text)[:, :, 0], _run(video, changed, t, text)[:, :, 0], atol=1e-4)
    _motion_modules_zeroed(video)
    out = _run(video, x, t, text)
    with torch.no_grad():
        for f in range(3):
            plain = unet(x[:, :, f], t, encoder_hidden_states=text).sample
            assert torch.allclose(out[:, :, f], plain, atol=1e-5), f


def test_the_motion_unet_is_a_copy_sharing_nothing_with_the_shared_unet_or_the_adapter(tiny_pipe, adapter_dir):
    unet = tiny_pipe("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    adapter = motion.load_adapter(str(adapter_dir))
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    rng = torch.get_rng_state()
    video = motion.motion_unet(unet, adapter, str(adapter_dir))
    assert torch.equal(torch.get_rng_state(), rng)  # its random initialisation ran in a forked RNG
    assert video is not unet and not any(p.requires_grad for p in video.parameters())
    theirs = {p.data_ptr() for p in [*unet.parameters(), *adapter.parameters()]}
    assert not any(p.data_ptr() in theirs for p in video.parameters())
    with torch.no_grad():  # an in-place change of the copy (what a fine-tune does) leaks nowhere
        for p in video.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(torch.equal(adapter_before[k], v) for k, v in adapter.state_dict().items())
    assert unet.attn_processors == processors and not unet._forward_pre_hooks and not unet._forward_hooks
    assert next(adapter.parameters()).device.type == "cpu"  # the cached adapter stays on the CPU
    record = frame_record(video)
    assert record.takes_frames and record.name == motion.BACKBONE and record.max_frames == 8
    assert not frame_record(inflate(unet)).takes_frames


def test_rad_reads_spatial_cross_attention_only_and_attach_reads_the_frames(tiny_pipe, adapter_dir):
    unet = tiny_pipe("tiny").unet
    video = motion.motion_unet(unet, motion.load_adapter(str(adapter_dir)), str(adapter_dir))
    names = attention_layer_names(video)
    motion_layers = [n for n in names if ".motion_modules." in n]
    assert motion_layers and all(n.endswith((".attn1", ".attn2")) for n in motion_layers)
    # the layer vocabulary does not parse the motion modules' layers, so no named set holds them
    assert all(vocabulary.parse(n) is None for n in motion_layers)
    assert not set(motion_layers) & set(vocabulary.select(names))
    layers, level = capture_layers(video)
    assert (layers, level) == capture_layers(unet) and not any("motion_modules" in n for n in layers)
    assert sparse_causal_layers(video) == []  # AnimateDiff keeps per-frame spatial self-attention
    controller = ReAtCoAttention(sparse_causal_layers(video), layers)
    x, text = _inputs(unet, 3)
    z = x.clone().requires_grad_(True)
    with video_call(video, controller):
        controller.capturing = True
        video(z, torch.tensor(300), encoder_hidden_states=text)
        maps = controller.attention_maps()
        (grad,) = torch.autograd.grad(maps[0, :, 5].sum(), z)  # row 0: frame 0's map
        controller.capturing = False
    assert controller.state.frames == 3  # attach's pre-hook read the frame count from the 5-D input
    assert maps.shape == (3, 16, 77) and torch.allclose(maps.sum(-1), torch.ones(3, 16), atol=1e-5)
    # spatial layers and GroupNorms are per frame: only the motion modules carry frame 0's map back
    # to the latents of frames 1 and 2
    assert grad[:, :, 1:].abs().sum() > 0
    assert not video._forward_pre_hooks and not video._forward_hooks  # removed after the call


# ----------------------------------------------------------------------------- the edit


def test_an_edit_on_animatediff_runs_rad_and_irjs_without_a_fine_tune(tiny_pipe, frames, adapter_dir, tmp_path,
                                                                       monkeypatch):
    pipe = tiny_pipe("tiny")
    unet = pipe.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)

    def no_training(*args, **kwargs):
        raise AssertionError("a fine-tune ran")

    monkeypatch.setattr(VideoTuner, "run", no_training)
    result = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(adapter_dir), record_inputs=True,
                        **FAST)
    params = result.params
    assert params["video_backbone"] == "animatediff" and params["motion_adapter"] == str(adapter_dir)
    assert params["fine_tune_steps"] == 0 and not params["fine_tune_ran"] and not params["fine_tune_cached"]
    assert params["motion_adapter_fingerprint"] == motion.adapter_fingerprint(motion.load_adapter(str(adapter_dir)))
    assert params["settings"]["tune_steps"] is None and params["settings"]["motion_adapter"] == str(adapter_dir)
    assert len(result.frames) == 4 and result.frames[0].shape == (32, 32, 3) and list(result.heatmaps) == ["dog"]
    assert params["gradient_passes"] > 0 and params["rad_losses"]  # RAD ran
    # IRJS: outside the box the model input is the re-noised source, bit for bit
    sampler = params["_sampler"]
    mask = sampler.irjs_mask.bool()
    assert sampler.model_inputs
    for _, a, z_in, source_t in sampler.model_inputs:
        outside = ~mask[a:a + z_in.shape[2]].view(1, 1, *z_in.shape[2:]).expand_as(z_in)
        assert torch.equal(z_in[outside], source_t[outside]) and not torch.equal(z_in[~outside], source_t[~outside])
    # the same run with IRJS off: the model sees its own latents outside the box, and the edit differs
    off = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(adapter_dir), record_inputs=True,
                     preserve_background=False, **FAST)
    assert off.params["inversion_cached"]  # IRJS is not part of the inversion's key
    _, a, z_in, source_t = off.params["_sampler"].model_inputs[0]
    outside = ~mask[a:a + z_in.shape[2]].view(1, 1, *z_in.shape[2:]).expand_as(z_in)
    assert not torch.equal(z_in[outside], source_t[outside])
    assert any(not np.array_equal(x, y) for x, y in zip(result.frames, off.frames))
    # the shared pipeline's UNet: parameters bit-identical, the same processors, no hooks left
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert unet.attn_processors == processors and not unet._forward_pre_hooks and not unet._forward_hooks


def test_a_fine_tune_asked_for_trains_spatial_q_and_motion_attention_of_the_copy(tiny_pipe, frames, adapter_dir,
                                                                                tmp_path):
    pipe = tiny_pipe("tiny")
    adapter = motion.load_adapter(str(adapter_dir))
    video = motion.motion_unet(pipe.unet, adapter, str(adapter_dir))
    names = set(trainable_parameters(video))
    assert any(".motion_modules." in n and ".attn1.to_k." in n for n in names)
    assert any(".attentions." in n and n.endswith(".attn2.to_q.weight") for n in names)
    assert all((".motion_modules." in n and (".attn1." in n or ".attn2." in n))
               or (".attentions." in n and n.endswith((".attn1.to_q.weight", ".attn2.to_q.weight"))) for n in names)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 4, 3, 4, 4, generator=g)
    text = torch.randn(1, 77, video.config.cross_attention_dim, generator=g)
    settings = VideoSettings(motion_adapter=str(adapter_dir), tune_steps=1).validated()
    before = {n: p.clone() for n, p in video.named_parameters()}
    VideoTuner(pipe, video, mean, torch.full_like(mean, 0.1), text, settings, None, torch.device("cpu")).run()
    changed = {n for n, p in video.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names and any(".motion_modules." in n for n in changed)
    assert not any(p.requires_grad for p in video.parameters())
    # through edit_video: the shared UNet and the cached adapter are left as they were
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapter_state = {k: v.clone() for k, v in adapter.state_dict().items()}
    result = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(adapter_dir), tune_steps=1,
                        **FAST)
    assert result.params["fine_tune_steps"] == 1 and result.params["fine_tune_ran"]
    assert all(torch.equal(state[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(adapter_state[k], v) for k, v in motion.load_adapter(str(adapter_dir)).state_dict().items())
    assert not pipe.unet.is_gradient_checkpointing


def test_the_adapter_enters_the_fine_tune_and_inversion_keys(tiny_pipe, frames, adapter_dir, other_adapter_dir,
                                                             tmp_path, monkeypatch):
    pipe = tiny_pipe("tiny")
    assert motion.adapter_fingerprint(motion.load_adapter(str(adapter_dir))) != \
        motion.adapter_fingerprint(motion.load_adapter(str(other_adapter_dir)))

    def inversions():
        return sorted(p.name for p in (tmp_path / "inversion").glob("*.safetensors"))

    plain = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, tune_steps=0, **FAST)
    assert plain.params["video_backbone"] == "tune-a-video" and len(inversions()) == 1
    first = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(adapter_dir), **FAST)
    assert not first.params["inversion_cached"] and len(inversions()) == 2
    other = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(other_adapter_dir), **FAST)
    assert not other.params["inversion_cached"] and len(inversions()) == 3
    again = edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(adapter_dir), **FAST)
    assert again.params["inversion_cached"] and len(inversions()) == 3
    # the fine-tune's key: one folder per adapter, and another for the inflated UNet
    for folder in (adapter_dir, other_adapter_dir, None):
        edit_video(pipe, frames, *EDIT, cache_dir=tmp_path, motion_adapter=str(folder) if folder else None,
                   tune_steps=1, **FAST)
    assert len([p for p in (tmp_path / "tune").iterdir() if (p / "tuned.safetensors").is_file()]) == 3


def test_a_changed_adapter_folder_is_loaded_again(tmp_path):
    folder = save_tiny_motion_adapter(tmp_path / "adapter")
    first = motion.load_adapter(str(folder))
    assert motion.load_adapter(str(folder)) is first  # cached
    save_tiny_motion_adapter(folder, max_frames=4)  # rewritten in place: new file versions
    second = motion.load_adapter(str(folder))
    assert second is not first and second.config.motion_max_seq_length == 4
    assert motion.adapter_fingerprint(second) != motion.adapter_fingerprint(first)


def test_fine_tune_steps_default_to_the_papers_200_inflated_and_0_with_an_adapter():
    assert VideoSettings().tune_steps is None and VideoSettings().fine_tune_steps() == 200
    assert VideoSettings(motion_adapter="adapter").fine_tune_steps() == 0
    assert VideoSettings(motion_adapter="adapter", tune_steps=5).fine_tune_steps() == 5
    assert VideoSettings(tune_steps=0).fine_tune_steps() == 0


# ----------------------------------------------------------------------------- bad input


def _bad_adapters(root):
    """(name, folder, settings, expected sentence fragment) of every bad adapter input."""
    empty = root / "empty"
    empty.mkdir()
    other = root / "not-an-adapter"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    from diffusers import MotionAdapter

    widths = root / "widths"
    MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                  motion_num_attention_heads=2, motion_max_seq_length=8).save_pretrained(widths)
    layers = root / "layers"
    MotionAdapter(block_out_channels=(32, 32, 64), motion_layers_per_block=2, motion_norm_num_groups=8,
                  motion_num_attention_heads=2, motion_max_seq_length=8).save_pretrained(layers)
    short = save_tiny_motion_adapter(root / "short", max_frames=2)
    three = save_tiny_motion_adapter(root / "three", max_frames=3)
    return [
        ("missing", root / "missing", {}, "There is no motion adapter folder"),
        ("empty folder", empty, {}, "holds no motion adapter"),
        ("another model's folder", other, {}, "is not a diffusers MotionAdapter's"),
        ("block widths", widths, {}, "does not fit this model's UNet"),
        ("layers per block", layers, {}, "does not fit this model's UNet"),
        ("window", short, {}, "The window of 3 frames is longer than the 2 frames"),
        ("fine-tune run", three, {"tune_steps": 1}, "The fine-tune run of 4 frames is longer than the 3 frames"),
        ("blank", "  ", {}, "The motion adapter is empty"),
    ]


def test_every_bad_adapter_is_one_sentence(tiny_pipe, frames, tmp_path):
    pipe = tiny_pipe("tiny")
    for case, folder, extra, fragment in _bad_adapters(tmp_path):
        with pytest.raises(UserInputError) as caught:
            edit_video(pipe, frames, *EDIT, cache_dir=tmp_path / "cache", motion_adapter=str(folder),
                       **{**FAST, **extra})
        message = str(caught.value)
        assert fragment in message and "\n" not in message, (case, message)
    assert not (tmp_path / "cache").exists()  # refused before any work
    with pytest.raises(UserInputError, match="works with SD 1.x/2.x models"):
        edit_video(tiny_pipe("tiny-sdxl"), frames, *EDIT, cache_dir=tmp_path / "cache",
                   motion_adapter=str(save_tiny_motion_adapter(tmp_path / "fits-sd")), **FAST)


# ----------------------------------------------------------------------------- the CLI and the app


def _cli(args, capsys):
    import app

    with pytest.raises(SystemExit) as exited:
        app.main(args)
    return exited.value.code, capsys.readouterr().err


def test_the_cli_flag_edits_on_animatediff_and_fails_in_one_line(frames, adapter_dir, tmp_path, capsys):
    import app
    from PIL import Image

    clip = tmp_path / "clip"
    clip.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(clip / f"{i:03d}.png")
    out = tmp_path / "edited.mp4"
    args = ["edit-video", "--model", "tiny", "--video", str(clip), "--source-prompt", EDIT[0], "--prompt", EDIT[1],
            "--box", "dog:0,0,16,16", "--output", str(out), "--steps", "2", "--refine-iterations", "1",
            "--window", "3", "--cache-dir", str(tmp_path / "cache")]
    assert app.main([*args, "--motion-adapter", str(adapter_dir)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["video_backbone"] == "animatediff" and record["motion_adapter"] == str(adapter_dir)
    assert record["fine_tune_steps"] == 0 and not record["fine_tune_ran"]
    for bad, fragment in ((tmp_path / "missing", "There is no motion adapter folder"),
                          (tmp_path, "holds no motion adapter")):
        code, err = _cli([*args, "--motion-adapter", str(bad)], capsys)
        errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


def test_the_server_offers_only_the_adapters_it_was_started_with(clip_file, adapter_dir, tmp_path, capsys):
    import app
    from ui import video_tab
    from ui.common import AppContext, OutputStore

    args = app.build_parser(only="serve").parse_args(["serve", "--allow-motion-adapter", str(adapter_dir)])
    assert args.allow_motion_adapter == [str(adapter_dir.resolve())]
    code, err = _cli(["serve", "--allow-motion-adapter", str(tmp_path / "missing")], capsys)
    assert code == 2 and err.startswith("error: ") and "MotionAdapter" in err and len(err.strip().splitlines()) == 1

    ctx = AppContext(default_model="tiny", outputs=OutputStore(tmp_path / "outputs"),
                     motion_adapters=tuple(args.allow_motion_adapter))
    with gr.Blocks() as demo:
        video_tab.build_tab(ctx)
    menu = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ev-motion-adapter")
    assert [choice[0] for choice in menu.choices] == [video_tab.NO_ADAPTER, "tiny-motion"]
    assert menu.value == video_tab.NO_ADAPTER
    # the fine-tune steps box starts empty (None: 200 without an adapter, 0 with one), the API's default too
    steps_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ev-tune-steps")
    assert steps_box.value is None
    handler = video_tab.make_handler(ctx, cache=tmp_path / "cache")
    base = dict(model="tiny", video=str(clip_file), source_prompt=EDIT[0], prompt=EDIT[1],
                boxes=[["dog", 0, 0, 16, 16, 0]], **FAST, progress=lambda *a, **k: None)
    # a request names a menu choice, never a path: the adapter's own folder is refused too
    for name in (str(adapter_dir), "../tiny-motion", "tiny-motion (2)"):
        with pytest.raises(gr.Error) as caught:
            list(handler(**base, motion_adapter=name))
        message = str(caught.value)
        assert "is not a motion adapter this app offers" in message and "\n" not in message, message
    outputs = list(handler(**base, motion_adapter="tiny-motion"))
    summary, edited = outputs[-1][0], outputs[-1][1]
    assert "Fine-tune: off (0 steps)" in summary and edited
    record = json.loads(next((tmp_path / "outputs").rglob("edited.json")).read_text())
    assert record["video_backbone"] == "animatediff" and record["motion_adapter"] == str(adapter_dir.resolve())


@pytest.fixture
def clip_file(tmp_path, frames):
    from PIL import Image

    from pipelines.io import write_video

    path = tmp_path / "clip.mp4"
    write_video([Image.fromarray(f) for f in frames], path, 12)
    return path
