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


# ------------------------------------------------------------------ defaults a model folder changes


def model_info(settings: type[Settings], name: str, model) -> str:
    """The control's info line: the field's help, and the model's own default when its folder
    sets one (`Settings.for_model`), so the user sees why the value is not the paper's."""
    from pipelines.model_defaults import task_defaults

    help_text = settings.specs()[name][1].help
    measured = task_defaults(model, settings.TASK) if settings.TASK else {}
    if name not in measured:
        return help_text
    paper, value = settings.default(name), measured[name]
    shown = f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    return f"{help_text} ({model}: {shown} as measured on it; the paper's: {_shown(paper)})"


def _shown(value) -> str:
    if value is None:
        return "auto"
    if value == "":
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def followed_fields(settings: type[Settings], choices: list[str]) -> list[str]:
    """The fields whose default some model of the menu changes (its folder's measured defaults)."""
    from pipelines.model_defaults import task_defaults

    if settings.TASK is None:
        return []
    changed = set().union(*(task_defaults(name, settings.TASK) for name in choices))
    return [name for name in settings.specs() if name in changed]


def model_default_updates(settings: type[Settings], names: list[str], new_model, values: list, choices: list[str],
                          value_of=getattr) -> list[dict]:
    """The controls' updates when the Model menu changes to `new_model`: a control still at a
    default (the paper's or any menu model's) takes the new model's value; a value the user set
    stays; every one gets the info line of `model_info`."""
    new = settings.for_model(new_model)
    candidates = [settings(), *(settings.for_model(name) for name in choices)]
    updates = []
    for name, value in zip(names, values):
        at_a_default = value in {value_of(known, name) for known in candidates}
        info = model_info(settings, name, new_model)
        updates.append(gr.update(value=value_of(new, name), info=info) if at_a_default else gr.update(info=info))
    return updates


def follow_model_defaults(model: gr.Dropdown, settings: type[Settings], controls: dict[str, gr.components.Component],
                          choices: list[str], value_of=getattr) -> None:
    """The controls whose default some model of the menu changes (`followed_fields`) follow the
    Model menu (`model_default_updates`).  `value_of(settings, name)` is what the control shows
    for a field (e.g. a resolved value where the field's default is None)."""
    names = [name for name in followed_fields(settings, choices) if name in controls]
    if not names:
        return

    def follow(new_model, *values):
        return model_default_updates(settings, names, new_model, list(values), choices, value_of)

    model.change(follow, [model, *(controls[name] for name in names)], [controls[name] for name in names],
                 queue=False, api_visibility="private", show_progress="hidden")
