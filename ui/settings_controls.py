"""Gradio controls made from a task's settings dataclass (pipelines/settings.py).

The control's range, step, default value and info line come from the field, so a tab never
re-types a default; a tab may narrow the range or pick its own label (keyword overrides).
"""

from __future__ import annotations

import gradio as gr

from pipelines.settings import Settings


def slider(settings: type[Settings], name: str, **overrides) -> gr.Slider:
    """A slider over the field's range; an exclusive lower bound starts one step above it."""
    f, spec, kind = settings.specs()[name]
    step = spec.step or (1 if kind is int else 0.01)
    minimum = spec.minimum if spec.minimum is not None else spec.above + step
    options = dict(minimum=minimum, maximum=spec.maximum, value=f.default, step=step,
                   label=settings.label(name), info=spec.help)
    options.update(overrides)
    return gr.Slider(**options)


#: What a number box holds for a field whose default is None ("the model's own", "decided from
#: the other settings"): a browser shows an empty number box as 0 and sends 0, so such a box
#: starts at 0 and its 0 means None (`unset`).  (For guidance this gives up 0 = no CFG in the
#: tabs; 1 gives that.)
UNSET = 0


def unset(value):
    """A number box's value as the setting: None for UNSET (or an empty box)."""
    return None if value is None or value == UNSET else value


def number(settings: type[Settings], name: str, **overrides) -> gr.Number:
    """A number box with the field's limits; one whose default is None starts at UNSET (read it
    with `unset`), and its lower limit admits UNSET."""
    f, spec, kind = settings.specs()[name]
    minimum = spec.minimum
    if f.default is None and minimum is not None and minimum > UNSET:
        minimum = UNSET
    options = dict(value=UNSET if f.default is None else f.default, minimum=minimum, maximum=spec.maximum,
                   step=spec.step or 1, precision=0 if kind is int else None, label=settings.label(name))
    options.update(overrides)
    return gr.Number(**options)


def radio(settings: type[Settings], name: str, choices=None, **overrides) -> gr.Radio:
    """A radio over the field's choices (or (label, value) pairs naming them)."""
    f, spec, _ = settings.specs()[name]
    options = dict(choices=choices or list(spec.choices), value=f.default, label=settings.label(name))
    options.update(overrides)
    return gr.Radio(**options)


def checkbox(settings: type[Settings], name: str, **overrides) -> gr.Checkbox:
    f, spec, _ = settings.specs()[name]
    options = dict(value=bool(f.default), label=settings.label(name), info=spec.help)
    options.update(overrides)
    return gr.Checkbox(**options)


def dropdown(settings: type[Settings], name: str, choices=None, **overrides) -> gr.Dropdown:
    """A dropdown over the field's choices (or (label, value) pairs naming them)."""
    f, spec, _ = settings.specs()[name]
    options = dict(choices=choices or list(spec.choices), value=f.default, label=settings.label(name))
    options.update(overrides)
    return gr.Dropdown(**options)


def textbox(settings: type[Settings], name: str, **overrides) -> gr.Textbox:
    """A text box holding the field's default (empty where it is None)."""
    f, _, _ = settings.specs()[name]
    options = dict(value=f.default or "", label=settings.label(name))
    options.update(overrides)
    return gr.Textbox(**options)
