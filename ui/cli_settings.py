"""Command-line flags made from a task's settings dataclass (pipelines/settings.py).

Every field becomes one flag: `--ss-steps` for `ss_steps`, with the field's type, choices and
help, and "(default: ...)" from the field's default, so a default is never typed twice.  A flag
left out means "the settings' default": parsed values are None until given.  Booleans: a field
that defaults to True gets `--no-<name>` (help: "on by default; this flag turns it off"), one that defaults to False gets `--<name>`, and one
whose default is None (decided from the model) takes auto|on|off.
"""

from __future__ import annotations

import argparse

from pipelines.settings import Settings

_AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def _auto_on_off(value: str) -> bool | None:
    if value not in _AUTO_ON_OFF:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, not {value!r}")
    return _AUTO_ON_OFF[value]


def _flag(name: str, spec) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, settings: type[Settings], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `settings` (not those in `skip`)."""
    for name, (f, spec, kind) in settings.specs().items():
        if name in skip:
            continue
        if kind is bool and spec.optional:
            parser.add_argument(_flag(name, spec), dest=name, type=_auto_on_off, default=None, metavar="auto|on|off",
                                help=spec.help)
        elif kind is bool and f.default:
            parser.add_argument(spec.flag or "--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                                default=None, help=f"{spec.help} (on by default; this flag turns it off)")
        elif kind is bool:
            parser.add_argument(_flag(name, spec), dest=name, action="store_const", const=True, default=None,
                                help=spec.help)
        else:
            notes = _model_notes(settings, name)
            if spec.optional:
                shown = f" ({notes[2:]})" if notes else ""
            else:
                shown = f" (default: {f.default if f.default != '' else 'empty'}{notes})"
            parser.add_argument(_flag(name, spec), dest=name, type=kind, default=None, choices=spec.choices,
                                help=spec.help + shown)


def _model_notes(settings: type[Settings], name: str) -> str:
    """"; builtin: 1" for each built-in model whose folder sets its own default for this field
    (`pipelines/model_defaults.py`), so `--help` never shows a default the model does not use."""
    from pipelines.model_defaults import BUILTIN_FOLDERS, task_defaults

    if settings.TASK is None:
        return ""
    notes = []
    for model in BUILTIN_FOLDERS:
        value = task_defaults(model, settings.TASK).get(name)
        if value is not None:
            notes.append(f"{model}: {_shown_default(value)}")
    return "".join(f"; {note}" for note in notes)


def settings_from_args(args: argparse.Namespace, settings: type[Settings], skip: tuple[str, ...] = (),
                       model=None):
    """The settings with every flag that was given; the rest keep their defaults: the model's
    (`Settings.for_model`, its folder's measured ones) when `model` is given, else the paper's."""
    given = {name: getattr(args, name) for name in settings.specs()
             if name not in skip and getattr(args, name, None) is not None}
    return settings.for_model(model, **given) if model is not None else settings().replace(**given)



# ------------------------------------------------------------------ settings classes of which a flag picks one


def _shown_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else ("empty" if value == "" else str(value))


def _variant_fields(variants: dict[str, type[Settings]], skip=(), only=None) -> dict[str, dict]:
    """{field name: {variant: (field, spec, kind)}} over every variant, in declaration order."""
    fields: dict[str, dict] = {}
    for variant, settings in variants.items():
        for name, entry in settings.specs().items():
            if name not in skip and (only is None or name in only):
                fields.setdefault(name, {})[variant] = entry
    return fields


def _variant_flag(name: str, owners: dict) -> str:
    """The field's flag; --no-<name> for a boolean that is on by default wherever it exists."""
    f, spec, kind = next(iter(owners.values()))
    if kind is bool and {entry[0].default for entry in owners.values()} == {True}:
        return spec.flag or "--no-" + name.replace("_", "-")
    return _flag(name, spec)


def add_variant_arguments(parser: argparse.ArgumentParser, variants: dict[str, type[Settings]],
                          skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """One flag per field of any of `variants`: settings classes of which another flag picks one
    (such as one per method; `variant_settings_from_args` reads them).  A field they share is one
    flag whose help shows each variant's default where they differ ("default: 250 for a, 500 for
    b"); a field of some variants only says so ("b only").  A boolean whose default differs
    between variants (or is None) takes on|off.  `only` keeps just those fields."""
    for name, owners in _variant_fields(variants, skip, only).items():
        f, spec, kind = next(iter(owners.values()))
        defaults = {variant: entry[0].default for variant, entry in owners.items()}
        same = len({repr(d) for d in defaults.values()}) == 1
        notes = [] if len(owners) == len(variants) else [f"{' and '.join(owners)} only"]
        if same and kind is bool and f.default is not None:
            if f.default:
                notes.insert(0, "on by default; this flag turns it off")
            parser.add_argument(_variant_flag(name, owners), dest=name, action="store_const", const=not f.default,
                                default=None, help=spec.help + (f" ({'; '.join(notes)})" if notes else ""))
            continue
        if not same:
            notes.append("default: " + ", ".join(f"{_shown_default(d)} for {v}" for v, d in defaults.items()))
        elif f.default is not None:
            notes.append(f"default: {_shown_default(f.default)}")
        text = spec.help + (f" ({'; '.join(notes)})" if notes else "")
        flag = _flag(name, spec)
        metavar = flag.lstrip("-").replace("-", "_").upper()  # the flag's name, not the field's
        if kind is bool:
            parser.add_argument(flag, dest=name, type=_auto_on_off, default=None, help=text,
                                metavar="auto|on|off" if None in defaults.values() else "on|off")
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, choices=spec.choices, help=text,
                                metavar=None if spec.choices else metavar)


def variant_settings_from_args(args: argparse.Namespace, variants: dict[str, type[Settings]], chosen: str,
                               selector: str, skip: tuple[str, ...] = ()):
    """The settings of variant `chosen` with every flag that was given; a flag of other variants
    only is one sentence naming the `selector` flag that takes it."""
    from pipelines.errors import UserInputError

    for name, owners in _variant_fields(variants, skip).items():
        if chosen not in owners and getattr(args, name, None) is not None:
            raise UserInputError(f"{_variant_flag(name, owners)} is a setting of {' and '.join(owners)} only; "
                                 f"drop it or use {selector} {next(iter(owners))}.")
    return settings_from_args(args, variants[chosen], skip)
