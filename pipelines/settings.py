"""Task settings: one frozen dataclass per task holds every setting's default, limits and help.

That dataclass is the one place a default lives.  The task function takes it (and keyword
overrides of its fields), `validated()` checks it with one sentence per problem, and the CLI
flags (`ui/cli_settings.py`) and the tab's controls (`ui/settings_controls.py`) are derived
from its fields: names, defaults, ranges, choices and help.  Adding a setting is one field.

    @dataclass(frozen=True)
    class MySettings(Settings):
        steps: int = setting(50, "denoising steps", minimum=1, maximum=200)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import UserInputError


@dataclass(frozen=True)
class Spec:
    """What the UI and the validation know about one setting."""

    help: str  # a short phrase: CLI help, the control's info line
    label: str | None = None  # the control's label and the subject of error sentences
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive lower bound ("above 0")
    choices: tuple | None = None
    step: float | None = None  # slider step
    optional: bool = False  # None is a value (it means "decided from other settings or the model")
    flag: str | None = None  # the CLI flag when it is not --<field-name>


def setting(default: Any, help: str, *, label: str | None = None, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, choices: tuple | None = None,
            step: float | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its `Spec`; a None default makes None an allowed value."""
    spec = Spec(help, label, minimum, maximum, above, tuple(choices) if choices else None, step, default is None,
                flag)
    return field(default=default, metadata={"spec": spec})


def _kind(annotation) -> type:
    """int, float, bool or str from an annotation such as `float | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Settings:
    """Base class of the task settings; subclasses add fields made by `setting()`."""

    #: this task's key in a model folder's `task_defaults.json` (`pipelines/model_defaults.py`);
    #: None: the task has no per-model defaults
    TASK: ClassVar[str | None] = None

    @classmethod
    def for_model(cls, model, **given):
        """The settings for `model` (a name, folder or pipeline): the `given` values, then the
        model folder's own measured defaults for this task, then the paper's.  Names the model
        folder sets that are not settings of this task are ignored."""
        from .model_defaults import task_defaults

        known = cls.specs()
        measured = {name: value for name, value in task_defaults(model, cls.TASK).items() if name in known} \
            if cls.TASK else {}
        return cls(**{**measured, **given})

    @classmethod
    def model_default(cls, model, name: str):
        """One setting's default for `model` (its folder's measured value, else the paper's)."""
        return getattr(cls.for_model(model), name)

    @classmethod
    def specs(cls) -> dict[str, tuple[dataclasses.Field, Spec, type]]:
        """{field name: (field, spec, value type)} in declaration order."""
        hints = typing.get_type_hints(cls)
        return {f.name: (f, f.metadata["spec"], _kind(hints[f.name])) for f in dataclasses.fields(cls)
                if "spec" in f.metadata}

    @classmethod
    def default(cls, name: str):
        return cls.specs()[name][0].default

    @classmethod
    def label(cls, name: str) -> str:
        spec = cls.specs()[name][1]
        return spec.label or name.replace("_", " ").capitalize()

    def replace(self, **changes):
        """A copy with some fields changed; an unknown name is a TypeError (no silent typos)."""
        return dataclasses.replace(self, **changes)

    def validated(self):
        """A copy with every value converted to its field's type; UserInputError for the first bad one."""
        values = {}
        for name, (_, spec, kind) in self.specs().items():
            values[name] = self._checked(name, getattr(self, name), spec, kind)
        checked = dataclasses.replace(self, **values)
        checked.check()
        return checked

    def check(self) -> None:
        """Rules across fields; subclasses raise UserInputError."""

    def _checked(self, name: str, value, spec: Spec, kind: type):
        label = self.label(name)
        if value is None:
            if spec.optional:
                return None
            raise UserInputError(f"{label} needs a value.")
        if kind is bool:
            if not isinstance(value, (bool, int)) or isinstance(value, float):
                raise UserInputError(f"{label} must be on or off, not {value!r}.")
            return bool(value)
        if kind in (int, float):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise UserInputError(f"{label} must be a number, not {value!r}.") from None
            if not math.isfinite(number):
                raise UserInputError(f"{label} must be a finite number, not {value!r}.")
            if kind is int:
                if number != int(number):
                    raise UserInputError(f"{label} must be a whole number, not {_format(number)}.")
                number = int(number)
            low_ok = spec.minimum is None or number >= spec.minimum
            above_ok = spec.above is None or number > spec.above
            high_ok = spec.maximum is None or number <= spec.maximum
            if not (low_ok and above_ok and high_ok):
                raise UserInputError(f"{label} must be {self._range(spec)}, not {_format(number)}.")
            return number
        value = str(value)
        if spec.choices is not None and value not in spec.choices:
            raise UserInputError(f"{label} must be one of {', '.join(map(str, spec.choices))}, not {value!r}.")
        return value

    @staticmethod
    def _range(spec: Spec) -> str:
        if spec.above is not None and spec.maximum is not None:
            return f"above {_format(spec.above)} and at most {_format(spec.maximum)}"
        if spec.minimum is not None and spec.maximum is not None:
            return f"between {_format(spec.minimum)} and {_format(spec.maximum)}"
        if spec.above is not None:
            return f"above {_format(spec.above)}"
        if spec.minimum is not None:
            return f"at least {_format(spec.minimum)}"
        return f"at most {_format(spec.maximum)}"
