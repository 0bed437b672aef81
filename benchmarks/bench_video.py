"""benchmarks/run.py video: ReAtCo's editing loop (RAD + IRJS over windows) vs the reference
code's loop, on the same clip, fine-tune and inversion.

Both arms run `pipelines.video.edit_video` on a random clip (8 frames at `--size`, one 8-frame
window: the saving per window does not depend on the window) with a warm cache, so the fine-tune and the inversion are loaded, not redone: what is timed is
the edit itself (encoding, sampling, decoding).  The baseline swaps the sampler for
`ReferenceSampler`, which does what the authors' loop does and ours skips (docs/methods/video.md,
"Our deviations"):

- a conditional gradient pass at every step, also after the RAD updates end (i >= 25 of 50),
  where the gradient is computed and thrown away;
- the whole UNet in every gradient pass (ours stops after the block of the last capture layer);
- an unconditional and a conditional no-grad forward after every refinement iteration, whose
  results are discarded.

So the arms do not make the same model calls (``equal_calls`` is false, by design): the ratio is
the saving.  Goal (issue #14): ratio <= 1 / 1.3, i.e. our edit at least 1.3x faster.

Memory with the clip's length (goal: a 48-frame clip at most 1.1x the peak of a 16-frame one):

    python benchmarks/bench_video.py memory [--model tiny] [--size 64] [--frames 16 48] [--device cuda]

runs one whole edit (fine-tune, inversion, sampling, decoding; the paper's 4-frame windows) per
clip length, each in a fresh process, and prints one JSON line with each peak (CUDA allocator
peak on a GPU; process RSS on a CPU, where the weights and the Python runtime are part of it) and
the ratios to the first.
`--model sd15-random` is the SD 1.5 architecture with random weights (bench_generate.py).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script (memory)

from benchmarks.bench_generate import sd15_random  # noqa: E402
from benchmarks.common import load_model  # noqa: E402
from pipelines.video import edit as edit_module  # noqa: E402
from pipelines.video.reatco import Sampler  # noqa: E402

TASK = "video"
BREAKDOWN = False
BREAKDOWN_WHY = ("the edit runs an inflated copy of the UNet, not the loaded one; its layers' costs are the "
                 "capture of attention_processors/video.py")
#: --compile: the edit runs its own copy of the UNet, which it compiles only when the loaded denoiser
#: was compiled the app's way (pipelines/video/edit.py `_compile_like_shared`)
COMPILE = "app"
FULL_SIZE = {"sd15-random": sd15_random}
SOURCE, PROMPT, WORD = "a red circle on a striped background", "a blue square on a striped background", "square"
#: frames of the benchmark clip, and the fine-tune steps done once before timing
FRAMES = 8
TUNE_STEPS = 2


class ReferenceSampler(Sampler):
    """The reference loop's work on top of ours: a gradient pass every step, no early exit, and
    the discarded guidance forwards of the refinement loop."""

    def __post_init__(self):
        super().__post_init__()
        self._exit_block = torch.nn.Identity()  # never called: every gradient pass runs the whole UNet
        self._step = -1

    def rad_due(self, i: int) -> bool:
        return bool(self.settings.rad and self.tokens)

    def loss_at(self, z, t, a, b):
        out = super().loss_at(z, t, a, b)
        if self._step in self.refine:  # the reference's refinement iteration also predicts noise, unused
            self.controller.capturing = False
            self.controller.state.row_roles = ("uncond", "cond")
            with torch.no_grad():
                self.unet(torch.cat([z, z]).detach(), t, encoder_hidden_states=torch.cat([self.uncond, self.cond]))
            self.controller.capturing = True
        return out

    def rad_update(self, z, i, t, a, b):
        self._step = i
        if i < self.rad_last or i in self.refine:
            return super().rad_update(z, i, t, a, b)
        self.controller.capturing = True
        try:
            with torch.enable_grad():
                z_grad = z.detach().requires_grad_(True)
                loss, _, _ = self.loss_at(z_grad, t, a, b)
                torch.autograd.grad(loss, z_grad)  # computed and thrown away, as the reference does
        finally:
            self.controller.capturing = False
        return z


def random_clip(size: int, frames: int) -> tuple[list[np.ndarray], list[str]]:
    """A seeded random clip of `frames` frames of `size` px, and a box for WORD in its middle."""
    rng = np.random.RandomState(0)
    clip = [(rng.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(frames)]
    return clip, [f"{WORD}:{size // 4},{size // 4},{size // 2},{size // 2}"]


@contextmanager
def reference_loop():
    with mock.patch.object(edit_module, "Sampler", ReferenceSampler):
        yield


def prepare(args):
    """Method: `edit_video` as shipped.  Baseline: the same call with the reference loop."""
    from pipelines.video import edit_video

    pipe = load_model(args)
    pipe.set_progress_bar_config(disable=True)
    size = args.size = args.size or (512 if args.model in FULL_SIZE else 64)
    clip, box = random_clip(size, FRAMES)
    cache = tempfile.mkdtemp(prefix="bench-video-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)  # full-size fine-tunes are large
    settings = dict(steps=args.steps, tune_steps=TUNE_STEPS, frames=FRAMES, window=FRAMES, heatmaps=False)
    edit_video(pipe, clip, SOURCE, PROMPT, box, cache_dir=cache, fps=8, **settings)  # fine-tune and invert once

    def method():
        edit_video(pipe, clip, SOURCE, PROMPT, box, cache_dir=cache, fps=8, **settings)

    def baseline():
        with reference_loop():
            edit_video(pipe, clip, SOURCE, PROMPT, box, cache_dir=cache, fps=8, **settings)

    def no_rad():
        edit_video(pipe, clip, SOURCE, PROMPT, box, cache_dir=cache, fps=8, rad=False, **settings)

    return method, baseline, {"no_rad": no_rad}


# ------------------------------------------------------------------------------ memory by clip length


def _one_edit_peak(model: str, size: int, frames: int, device: str | None) -> int:
    """Peak memory of one whole edit of a random `frames`-frame clip (this process, fresh)."""
    from benchmarks.run import PeakMemory
    from pipelines import models
    from pipelines.video import edit_video

    pipe = models.load(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    clip, box = random_clip(size, frames)
    with tempfile.TemporaryDirectory(prefix="bench-video-memory-") as cache, PeakMemory(pipe.device) as memory:
        edit_video(pipe, clip, SOURCE, PROMPT, box, cache_dir=cache, fps=8, frames=0, steps=4, tune_steps=2,
                   refine_iterations=1, heatmaps=False)
    return int(memory.peak)


def memory_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_video.py memory")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    peaks = {}
    for frames in args.frames:
        command = [sys.executable, __file__, "_peak", args.model, str(args.size), str(frames), args.device or ""]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[frames] = int(done.stdout.strip().splitlines()[-1])
    first = peaks[args.frames[0]]
    print(json.dumps({"kind": "memory", "task": TASK, "model": args.model, "size": args.size,
                      "peak_bytes": peaks, "ratio_to_first": {f: round(p / first, 3) for f, p in peaks.items()}}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_peak"]:
        model, size, frames, device = sys.argv[2:6]
        print(_one_edit_peak(model, int(size), int(frames), device or None))
    elif sys.argv[1:2] == ["memory"]:
        sys.exit(memory_main(sys.argv[2:]))
    else:
        sys.exit("usage: python benchmarks/bench_video.py memory [--model M] [--size PX] [--frames N ...]")
