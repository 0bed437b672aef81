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
            shown = "" if spec.optional else f" (default: {f.default if f.default != '' else 'empty'})"
            parser.add_argument(_flag(name, spec), dest=name, type=kind, default=None, choices=spec.choices,
                                help=spec.help + shown)


def settings_from_args(args: argparse.Namespace, settings: type[Settings], skip: tuple[str, ...] = ()):
    """The settings with every flag that was given; the rest keep their defaults."""
    given = {name: getattr(args, name) for name in settings.specs()
             if name not in skip and getattr(args, name, None) is not None}
    return settings().replace(**given)
