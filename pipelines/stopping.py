"""Stopping a running task at a step boundary, asked from another thread (the app's Stop button).

One mechanism for every task and model family: `stop_between_steps(pipe, stop)` puts a forward
pre-hook on the pipeline's denoiser (UNet or transformer) for the duration of a block.  Before
each denoiser call it asks `stop()`; once that answers True it raises `Stopped`, so the step in
progress finishes and the next one never starts.  It works the same way for diffusers' own
sampling loops (SD, SDXL, SD3, FLUX, and PixArt, whose pipeline has no `callback_on_step_end`
in diffusers 0.42) and for this project's loops (Attentive Eraser, RefAM, MedSteer's direction
estimate), without a change to any of them: with `stop()` answering False the hook changes
nothing, so results are bit-identical.

The hook answers only in the thread that installed it: a shared cached model (pipelines.models)
called from another thread, for another user, is never stopped by this user's flag.

Training does not use the hook (a stop inside an optimiser step would lose the step): the
personalization trainer asks its own `stop` after every step and writes a checkpoint there
(`Trainer.run(stop=...)`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["Stopped", "StepCount", "stop_between_steps"]


class Stopped(Exception):
    """The user asked the task to stop; `step` denoiser steps had finished (of `total`, if known)."""

    def __init__(self, step: int, total: int | None = None, what: str = "step"):
        self.step, self.total, self.what = step, total, what
        of = f" of {total}" if total else ""
        super().__init__(f"Stopped at {what} {step}{of}.")


class StepCount:
    """How many denoiser calls the block has run so far (`done`), readable while it runs."""

    def __init__(self) -> None:
        self.done = 0


@contextmanager
def stop_between_steps(pipe_or_module, stop: Callable[[], bool] | None,
                       total: int | None = None) -> Iterator[StepCount]:
    """Within the block, raise `Stopped` before the denoiser's next call once `stop()` is True.

    `pipe_or_module`: a diffusers pipeline (its denoiser is hooked) or a torch module.  `stop`
    None: nothing is installed.  `total`: the number of denoiser calls the block will make, if
    known, for the message ("Stopped at step 3 of 25.").  Yields a `StepCount`.
    """
    count = StepCount()
    if stop is None:
        yield count
        return
    module = pipe_or_module
    if not hasattr(module, "register_forward_pre_hook"):
        from . import models

        module = models.denoiser(pipe_or_module)
    owner = threading.get_ident()

    def before_call(_module, _args):
        if threading.get_ident() != owner:
            return None
        if stop():
            raise Stopped(count.done, total)
        count.done += 1
        return None

    handle = module.register_forward_pre_hook(before_call)
    try:
        yield count
    finally:
        handle.remove()
