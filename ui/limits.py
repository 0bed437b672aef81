"""The server's request limits (`python app.py serve --max-image-side/--max-steps/--max-train-steps`).

No Gradio here: app.py reads the defaults for `--help` without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UserInputError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server, set at launch (`python app.py serve --max-...`).

    They keep one visitor from holding the one GPU queue slot for hours: the longest side of an
    uploaded image or video frame, the denoising steps of one image, and the optimiser steps of
    one personalization run.  Each task's own settings have wider ranges (the CLI and Python use
    those); a request over a limit gets one sentence naming the flag.
    """

    max_image_side: int = 4096
    max_steps: int = 100
    max_train_steps: int = 2000

    #: settings fields that count denoising steps of one image
    DENOISING_FIELDS = ("steps", "sample_steps", "prior_steps")

    def check_image_side(self, width: int, height: int, what: str = "image") -> None:
        if max(width, height) > self.max_image_side:
            raise UserInputError(
                f"The {what} is {width}x{height} pixels; this server takes at most {self.max_image_side} pixels "
                f"on the longest side (--max-image-side); scale it down first.")

    def check_steps(self, steps, label: str = "Steps", training: bool = False) -> None:
        if steps is None:
            return
        limit, flag = (self.max_train_steps, "--max-train-steps") if training else (self.max_steps, "--max-steps")
        if steps > limit:
            raise UserInputError(f"{label} must be at most {limit} on this server ({flag}), not {steps:g}.")

    def check_default_steps(self, given, steps, label: str = "Steps", source: str = "the model's default",
                            fix: str | None = None) -> None:
        """The denoising steps a request left to a default, within --max-steps like typed ones.

        `check_settings` sees only the counts a request gives; one it leaves out (`given` None or
        0) is the model's (or a file's, or a method's) default, known once that is loaded.  Call
        this then, before the first denoising step, with `steps`, the count the run will use (by
        the pipeline's own rule); `source` names where it comes from, `fix` replaces the advice.
        A `given` count is checked as `check_steps` does.
        """
        if given:
            self.check_steps(given, label)
            return
        try:
            count = float(steps)
        except (TypeError, ValueError):
            return  # not a count (a damaged file's): the pipeline refuses it in its own words
        if count > self.max_steps:
            raise UserInputError(
                f"{label} were left to {source}, {count:g}, "
                f"but this server takes at most {self.max_steps} (--max-steps); "
                f"{fix or f'set {label} to {self.max_steps} or fewer'}.")

    def check_settings(self, settings, training: tuple[str, ...] = ()) -> None:
        """Every step count of validated `settings` within the limits; the fields in `training`
        count optimiser steps, the others denoising steps."""
        specs = type(settings).specs()
        for name in specs:
            if name in training or name in self.DENOISING_FIELDS:
                self.check_steps(getattr(settings, name), type(settings).label(name), training=name in training)


DEFAULT_LIMITS = Limits()
