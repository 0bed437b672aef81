"""Edit video's pipeline: windows, caches, resumable fine-tune, clip I/O, the shared model."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from pipelines.stopping import Stopped
from pipelines.video import edit_video, read_clip, windowed, windows, write_clip
from pipelines.video import tune as tune_module
from pipelines.video.clip import has_audio
from pipelines.video.inflate import inflate
from pipelines.video.tune import TuneCache, VideoTuner, trainable_parameters
from pipelines.video_settings import VideoSettings

FAST = dict(steps=2, tune_steps=2, refine_iterations=1, window=3)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.RandomState(0)
    return [(rng.rand(32, 32, 3) * 255).astype(np.uint8) for _ in range(4)]


def test_windows_cover_the_clip_with_the_papers_counts():
    views = windows(16, 4, 1)
    assert len(views) == 13 and views[0] == (0, 4) and views[-1] == (12, 16)
    counts = np.zeros(16, int)
    for a, b in views:
        counts[a:b] += 1
    assert counts.tolist() == [1, 2, 3] + [4] * 10 + [3, 2, 1]
    assert windows(10, 4, 3)[-1] == (6, 10) and windows(3, 4, 1) == [(0, 3)]


def test_windowed_averages_overlaps_and_one_view_is_the_plain_call():
    latents = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1, 1).repeat(1, 2, 1, 2, 2)
    out = windowed(latents, [(0, 4), (2, 6)], lambda a, b, z: z + a)  # view (2, 6) adds 2
    assert out[0, 0, :, 0, 0].tolist() == [0, 1, 3, 4, 6, 7]  # frames 2, 3: mean of +0 and +2
    assert torch.equal(windowed(latents, [(0, 6)], lambda a, b, z: z * 3), latents * 3)


def test_edit_caches_the_fine_tune_and_the_inversion(tiny_pipe, frames, tmp_path, monkeypatch):
    pipe = tiny_pipe("tiny")
    first = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                       **FAST)
    assert not first.params["fine_tune_cached"] and not first.params["inversion_cached"]
    assert len(first.frames) == 4 and first.frames[0].shape == (32, 32, 3) and list(first.heatmaps) == ["dog"]

    def no_training(*args, **kwargs):
        raise AssertionError("the fine-tune ran again")

    monkeypatch.setattr(VideoTuner, "run", no_training)
    monkeypatch.setattr(tune_module.VideoTuner, "run", no_training)
    again = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                       **FAST)
    assert again.params["fine_tune_cached"] and again.params["inversion_cached"]
    # the cached run starts from the same z_T and weights; float rounding of the first run's gradient
    # passes (which follow the inversion's forwards) may differ in the last bit, never more
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(first.frames, again.frames))
    third = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                       **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(again.frames, third.frames))  # same inputs: bit-identical
    # a window of the whole clip is the unwindowed path: same result for any window >= the clip (the
    # second reuses the first's inversion, so again up to the last bit of the first's gradient passes)
    whole = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                       **{**FAST, "window": 4})
    wider = edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                       **{**FAST, "window": 9})
    assert whole.params["views"] == wider.params["views"] == [(0, 4)]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(whole.frames, wider.frames))


def test_a_preview_shows_a_few_editing_steps_and_costs_nothing_without_it(tiny_pipe, frames, tmp_path, monkeypatch):
    """`preview` gets the x0 estimate of a few editing steps (never the last, never during the
    fine-tune or the inversion), decoded at the working size; without it the VAE decodes only the
    result, and neither a preview nor a failing one changes the edit."""
    import threading

    from pipelines import models
    from pipelines.video.edit import PREVIEW_FRAMES, preview_frames
    from pipelines.video.reatco import PREVIEWS, preview_steps

    assert preview_steps(50) == [8, 17, 25, 33, 42] and preview_steps(4) == [1, 2, 3]
    assert preview_steps(2) == [1] and preview_steps(1) == [] and all(len(preview_steps(n)) <= PREVIEWS
                                                                      for n in range(1, 200))
    assert preview_frames(4) == [0, 1, 3] and preview_frames(2) == [0, 1] and len(preview_frames(16)) == PREVIEW_FRAMES
    pipe = tiny_pipe("tiny")
    decoded, log = [], []
    real = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: (decoded.append(z.shape[0]), real(z, *a, **k))[1])

    def edit(**kwargs):
        return edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
                          progress=lambda stage, done, total, loss: log.append((stage, done)), **{**FAST, "steps": 4},
                          **kwargs)

    shown = []
    first = edit(preview=lambda step, total, frames: shown.append((step, total, frames, list(log))))
    assert [(step, total) for step, total, _, _ in shown] == [(1, 4), (2, 4), (3, 4)]
    for step, _, frames_, before in shown:
        assert list(frames_) == [0, 1, 3]
        assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames_.values())
        assert before[-1] == ("edit", step) and ("inversion", 2) in before  # during the editing stage only
    assert decoded == [3, 3, 3, 4]  # three previews of 3 frames, then the result's 4
    assert not first.notes or all("preview" not in n for n in first.notes)
    # by the last preview, the estimate is close to the result (the final step changes little)
    last = shown[-1][2]
    assert np.abs(last[3].astype(int) - first.frames[3].astype(int)).mean() < 40

    decoded.clear()
    plain = edit()  # no preview: the result's decode only
    assert decoded == [4]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(first.frames, plain.frames))

    def broken(step, total, frames_):
        raise RuntimeError("the preview broke")

    decoded.clear()
    survived = edit(preview=broken)  # a preview that raises: noted once, the edit goes on unchanged
    assert decoded == [3, 4]
    assert any("preview failed at editing step 1" in n and "the preview broke" in n for n in survived.notes)
    assert all(np.array_equal(a, b) for a, b in zip(plain.frames, survived.frames))

    stops = []
    with pytest.raises(Stopped) as stopped:  # a stop asked during a preview ends the edit at the next step
        edit(preview=lambda step, total, frames_: stops.append(step), stop=lambda: bool(stops))
    assert stopped.value.what == "editing step" and stopped.value.step == 1 and stops == [1]
    lock = models._MODEL_LOCKS[models.denoiser(pipe)]
    free = []
    worker = threading.Thread(target=lambda: free.append(lock.acquire(timeout=5) and (lock.release() or True)))
    worker.start()
    worker.join()
    assert free == [True]  # the shared model's lock was released


def _tuner(pipe, cache, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = inflate(pipe.unet)
    mean = torch.randn(1, 4, 3, 4, 4, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    settings = VideoSettings(tune_steps=steps, checkpoint_every=100, gradient_checkpointing=True).validated()
    return VideoTuner(pipe, unet, mean, torch.full_like(mean, 0.1), text, settings, cache, torch.device("cpu"))


def test_a_long_clip_fine_tunes_on_runs_of_the_papers_16_frames(tiny_pipe):
    """Memory of the fine-tune is bounded like sampling's: a 20-frame clip trains on random runs of
    16 frames (the paper's clip), a short clip on all of it, and tune_frames sets the run."""
    assert VideoSettings().tune_run(48) == 16 and VideoSettings().tune_run(8) == 8
    assert VideoSettings(tune_frames=4).tune_run(48) == 4
    pipe = tiny_pipe("tiny")
    g = torch.Generator().manual_seed(0)
    unet = inflate(pipe.unet)
    mean = torch.randn(1, 4, 20, 4, 4, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    tuner = VideoTuner(pipe, unet, mean, torch.full_like(mean, 0.1), text,
                       VideoSettings(tune_steps=1, gradient_checkpointing=False).validated(), None, torch.device("cpu"))
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[2]),
                                          with_kwargs=True)
    try:
        tuner.run()
    finally:
        hook.remove()
    assert seen == [16]  # (1, C, F, h, w): one step, on 16 of the 20 frames


def test_fine_tune_trains_only_the_q_projections_and_temporal_attention(tiny_pipe):
    pipe = tiny_pipe("tiny")
    tuner = _tuner(pipe, None, 1)
    names = {n for n, p in tuner.unet.named_parameters() if p.requires_grad}
    assert names == set(trainable_parameters(tuner.unet))
    assert names and all(".attn_temp." in n or n.endswith((".attn1.to_q.weight", ".attn2.to_q.weight")) for n in names)
    assert any(".attn1.to_q." in n for n in names) and any(".attn2.to_q." in n for n in names)
    assert any(".attn_temp.to_out." in n for n in names) and not any("norm_temp" in n for n in names)
    before = {n: p.clone() for n, p in tuner.unet.named_parameters()}
    tuner.run()
    changed = {n for n, p in tuner.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    assert not any(p.requires_grad for p in tuner.unet.parameters())


def test_an_interrupted_fine_tune_resumes_to_the_same_weights(tiny_pipe, tmp_path):
    pipe = tiny_pipe("tiny")
    straight = _tuner(pipe, TuneCache(tmp_path / "a", {"run": 1}), 4)
    straight.run()
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2  # stop before the third step

    first = _tuner(pipe, TuneCache(tmp_path / "b", {"run": 1}), 4)
    with pytest.raises(Stopped):
        first.run(stop=stop)
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "tuned.safetensors").exists()
    resumed = _tuner(pipe, TuneCache(tmp_path / "b", {"run": 1}), 4)
    resumed.run()
    assert resumed.resumed_from == 2 and (tmp_path / "b" / "tuned.safetensors").is_file()
    a, b = trainable_parameters(straight.unet), trainable_parameters(resumed.unet)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.losses == straight.losses


def test_the_shared_model_is_left_as_it_was(tiny_pipe, frames, tmp_path):
    pipe = tiny_pipe("tiny")
    unet = pipe.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    processors, flags = dict(unet.attn_processors), [p.requires_grad for p in unet.parameters()]
    edit_video(pipe, frames, "a photo of a cat", "a photo of a dog", ["dog:0,0,16,16"], cache_dir=tmp_path,
               **{**FAST, "tune_steps": 1})
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert unet.attn_processors == processors and [p.requires_grad for p in unet.parameters()] == flags
    assert not unet._forward_pre_hooks and not unet._forward_hooks and not unet.is_gradient_checkpointing


def test_clips_read_and_write_with_their_frame_rate_and_audio(tmp_path, frames):
    import imageio.v3 as iio
    import imageio_ffmpeg

    for name, kwargs in (("a.mp4", dict(fps=12, codec="libx264", macro_block_size=1)),
                         ("a.webm", dict(fps=12, codec="libvpx-vp9", macro_block_size=1)),
                         ("a.gif", dict(duration=1000 / 12, loop=0))):
        iio.imwrite(tmp_path / name, np.stack(frames), **kwargs)
        clip = read_clip(tmp_path / name)
        assert len(clip.frames) == 4 and clip.size == (32, 32) and clip.fps == pytest.approx(12, abs=0.5)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        iio.imwrite(folder / f"{i:03d}.png", frame)
    clip = read_clip(folder, max_frames=3)
    assert len(clip.frames) == 3 and np.array_equal(clip.frames[1], frames[1])
    # audio: a source with a sine track keeps it in the written clip
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    with_audio = tmp_path / "sound.mp4"
    subprocess.run([exe, "-loglevel", "error", "-y", "-i", str(tmp_path / "a.mp4"), "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:v", "copy", "-c:a", "aac", "-shortest", str(with_audio)],
                   check=True)
    assert has_audio(with_audio) and not has_audio(tmp_path / "a.mp4")
    out = write_clip(frames, tmp_path / "out.mp4", 12, audio_from=with_audio)
    assert has_audio(out) and read_clip(out).fps == pytest.approx(12, abs=0.5)
    assert len(read_clip(out).frames) == 4
