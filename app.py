"""Front door: the Gradio app (`python app.py`) and the command line (`python app.py TASK ...`).

    python app.py                      # = python app.py serve: the web app on 127.0.0.1:7860
    python app.py serve --port 7861 --model path/to/model.safetensors
    python app.py generate --prompt "a photo of a cat" --output cat.png --heatmaps cat_maps/

Tasks plug in without editing this file: `ui/<task>_cli.py` adds subcommands and
`ui/<task>_tab.py` adds a tab (see "registry" below).  Heavy imports (torch, diffusers, gradio)
happen inside the commands, so `--help` is fast and importing this module launches nothing.

A user mistake (bad argument, bad size, unknown model, missing file) prints one line
`error: <sentence>` on stderr and exits with status 2, without a traceback; so does running out of
GPU or CPU memory, saying what to lower (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from pipelines.errors import UserInputError
from ui.cli_common import DEFAULT_MODEL, Command, add_model_args

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------- argument parsing


class CliParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error: ...` line and exit status 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        fail(f"{message} (see '{self.prog} --help')")


def fail(message: str) -> None:
    message = " ".join(str(message).split())  # always one line
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _auth(value: str) -> tuple[str, str]:
    if value.count(":") != 1 or value.startswith(":") or value.endswith(":"):
        raise argparse.ArgumentTypeError("expected USER:PASSWORD with exactly one colon")
    user, password = value.split(":")
    return user, password


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 65535, not {value!r}")
    return port


def _positive_mb(value: str) -> float:
    try:
        mb = float(value)
    except ValueError:
        mb = -1
    if mb <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of megabytes, not {value!r}")
    return mb


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, not {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    import math

    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, not {value!r}")
    return number


def _motion_adapter_folder(value: str) -> str:
    """An existing folder with a config.json (the adapter itself is read when an edit uses it),
    as an absolute path."""
    folder = Path(value).expanduser()
    if not (folder / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"expected a folder of a diffusers MotionAdapter (with a config.json), "
                                         f"not {value!r}")
    return str(folder.resolve())


# --------------------------------------------------------------------------- serve

#: seconds a shutdown (SIGTERM, Ctrl-C) waits for the running tasks to stop at their next step
SHUTDOWN_WAIT_S = 60


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; "
                             "0.0.0.0 exposes the app to your network)")
    parser.add_argument("--port", default=7860, type=_port, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public *.gradio.live link (off by default)")
    parser.add_argument("--auth", type=_auth, metavar="USER:PASSWORD",
                        help="require this login in the browser")
    parser.add_argument("--max-upload-mb", default=20.0, type=_positive_mb,
                        help="largest file a user may upload, in MB (default: 20)")
    from ui.limits import DEFAULT_LIMITS

    parser.add_argument("--max-image-side", default=DEFAULT_LIMITS.max_image_side, type=_positive_int, metavar="PX",
                        help="longest side of an uploaded image or video frame, in pixels "
                             f"(default: {DEFAULT_LIMITS.max_image_side})")
    parser.add_argument("--max-steps", default=DEFAULT_LIMITS.max_steps, type=_positive_int, metavar="N",
                        help=f"denoising steps of one image (default: {DEFAULT_LIMITS.max_steps})")
    parser.add_argument("--max-train-steps", default=DEFAULT_LIMITS.max_train_steps, type=_positive_int, metavar="N",
                        help="optimiser steps of one personalization run "
                             f"(default: {DEFAULT_LIMITS.max_train_steps})")
    parser.add_argument("--allow-model", action="append", default=[], metavar="NAME",
                        help="another model users may pick in the app (repeatable); users can "
                             "pick only these, --model and the built-in models")
    parser.add_argument("--allow-motion-adapter", action="append", default=[], type=_motion_adapter_folder,
                        metavar="DIR", help="a folder of a diffusers MotionAdapter (config.json and safetensors) the "
                                            "Edit video tab may use for AnimateDiff (repeatable); users pick only "
                                            "these, by folder name")
    parser.add_argument("--models-from-hf-cache", action="store_true",
                        help="also offer every diffusers pipeline already in the local Hugging Face cache "
                             "(read only; nothing is downloaded)")
    from ui import results

    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="folder that keeps every run's results across restarts (default: "
                             f"{_home_relative(results.default_results_dir())})")
    parser.add_argument("--keep-results-days", default=results.DEFAULT_KEEP_DAYS, type=_non_negative_float,
                        metavar="DAYS", help="remove runs older than this (default: "
                                             f"{results.DEFAULT_KEEP_DAYS:g}; 0 keeps them)")
    parser.add_argument("--max-results-gb", default=results.DEFAULT_MAX_GB, type=_non_negative_float,
                        metavar="GB", help="size cap of the results folder; the oldest runs go first "
                                           f"(default: {results.DEFAULT_MAX_GB:g}; 0: no cap)")
    add_model_args(parser)


def _home_relative(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None, outputs=None,
              extra_models: tuple[str, ...] = (), limits=None, models_from_cache: tuple[str, ...] = (),
              motion_adapters: tuple[str, ...] = ()):
    """Build the Gradio Blocks app (not launched). Returns `(blocks, context)`.

    `limits`: a `ui.limits.Limits` (the defaults if None); `models_from_cache`: hub ids found in the
    local Hugging Face cache (`--models-from-hf-cache`), offered after `extra_models`;
    `motion_adapters`: the motion-adapter folders Edit video offers (`--allow-motion-adapter`)."""
    import gradio as gr

    from ui import gradio_fixes
    from ui.common import HEADER, AppContext, OutputStore, details, models_markdown
    from ui.limits import DEFAULT_LIMITS
    from ui.request_guard import GuardedBlocks

    outputs = outputs if outputs is not None else OutputStore()
    gradio_fixes.install()  # result images written atomically (ui/gradio_fixes.py)
    gradio_fixes.allow_results_from(outputs.root)
    ctx = AppContext(default_model=default_model, device=device, outputs=outputs,
                     extra_models=tuple(dict.fromkeys([*extra_models, *models_from_cache])),
                     motion_adapters=tuple(dict.fromkeys(motion_adapters)), limits=limits or DEFAULT_LIMITS)
    # GuardedBlocks: only this process's uploads and results reach a handler (ui/request_guard.py)
    with GuardedBlocks(title="Attention-layer editing", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as blocks:
        gr.Markdown(HEADER, elem_id="app-header")
        with details("About the models", elem_id="app-models"):
            gr.Markdown(models_markdown(default_model, tuple(models_from_cache)))
        tabs = {}
        with gr.Tabs():
            for module in sorted(_ui_modules("_tab"), key=lambda m: m.ORDER):
                tabs[module.__name__.removeprefix("ui.").removesuffix("_tab")] = module.build_tab(ctx)
        for module in _ui_modules("_tab"):
            if hasattr(module, "connect"):
                module.connect(ctx, tabs)
    blocks.limits = ctx.limits  # uploads over --max-image-side are refused before they are decoded
    blocks.queue(max_size=64)
    return blocks, ctx


# Small results (64 px from the built-in models) fill their box, pixels kept sharp (class
# ui.common.PIXEL_RESULT); the header stays compact so that every tab's inputs open above the fold.
APP_CSS = """
#am-image img, .pixel-result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#app-header h2 { margin: 0 0 4px 0; }
#app-header p { margin: 0; }
"""


def app_css() -> str:
    """APP_CSS and every tab module's own `CSS` (optional), in tab order."""
    tabs = sorted(_ui_modules("_tab"), key=lambda m: m.ORDER)
    return "\n".join([APP_CSS, *(getattr(module, "CSS", "") for module in tabs)])


def private_gradio_folder() -> Path:
    """Give this process its own Gradio upload/cache folder, removed at exit.

    Gradio's default (`/tmp/gradio`) is shared by every Gradio process on the machine, outlives
    them, and all of it is served by `/gradio_api/file=`.  Set before gradio is imported: some of
    its modules read GRADIO_TEMP_DIR at import.
    """
    folder = Path(tempfile.mkdtemp(prefix="attention-app-gradio-")).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder / "examples")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (never to a stream closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _log_to_stderr() -> None:
    """The app's own log (`app`: one line per user mistake, a traceback per bug) on stderr;
    other libraries' logging is left as it is."""
    log = logging.getLogger("app")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _on_shutdown_signal(ctx):
    """SIGTERM (systemd, docker) and SIGINT (Ctrl-C): ask every running task to stop at its next
    step at once (Gradio's server waits for running requests while it closes), then end the
    server's wait loop the way Ctrl-C does, so that the clean-up runs."""

    def handler(signum, frame) -> None:
        running = ctx.stops.stop_all()
        logging.getLogger("app").info("%s: shutting down; stopping %d running task(s) at their next step",
                                      signal.Signals(signum).name, running)
        raise KeyboardInterrupt

    return handler


def shut_down(ctx, wait_s: float = SHUTDOWN_WAIT_S) -> None:
    """Stop every running task at its next step (a personalization run writes its checkpoint) and
    wait for them, so that every result is complete in the results folder and nothing writes into
    the upload folder removed at exit."""
    log = logging.getLogger("app")
    ctx.stops.stop_all()
    if not ctx.stops.wait_idle(wait_s):
        log.warning("shutting down: tasks still running after %ss; their unfinished results are lost", wait_s)


def run_serve(args: argparse.Namespace) -> int:
    from ui.limits import Limits

    _log_to_stderr()
    private_gradio_folder()
    limits = Limits(max_image_side=args.max_image_side, max_steps=args.max_steps,
                    max_train_steps=args.max_train_steps)
    from pipelines import models
    from ui.results import OutputStore, default_results_dir

    try:
        outputs = OutputStore(args.output_dir or default_results_dir(), keep_days=args.keep_results_days,
                              max_bytes=int(args.max_results_gb * 1e9))
    except (OSError, ValueError) as error:
        raise UserInputError(f"The results folder cannot be used: {error}") from error
    outputs.clean()  # runs past their age, over the cap, and what a killed process left half-written
    logging.getLogger("app").info("results are kept in %s", outputs.root)
    blocks, ctx = build_app(default_model=args.model, device=args.device, extra_models=args.allow_model,
                            limits=limits, outputs=outputs, motion_adapters=tuple(args.allow_motion_adapter),
                            models_from_cache=tuple(models.hf_cache_models()) if args.models_from_hf_cache else ())
    # SIGTERM and Ctrl-C: Gradio closes the server, `shut_down` stops the tasks (their results are
    # kept in the results folder), and the atexit handler removes this process's Gradio folder
    # (uploads and the copies of results sent to browsers; see docs/security.md)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_shutdown_signal(ctx))
    try:
        _launch(blocks, args)
    except KeyboardInterrupt:  # a signal before or after Gradio's own wait loop
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        shut_down(ctx)
        blocks.close()
    return 0


def _launch(blocks, args: argparse.Namespace) -> None:
    from ui.common import SHORTCUTS_JS

    blocks.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        max_file_size=int(args.max_upload_mb * 1024 * 1024),
        # No allowed_paths: results reach the browser as copies in the private Gradio folder
        # (named by a salted hash), so `file=` serves nothing of the output store directly.
        ssr_mode=False,
        show_error=True,
        css=app_css(),
        js=SHORTCUTS_JS,  # Ctrl+Enter runs the visible tab, Escape stops it (ui/common.py)
    )


# --------------------------------------------------------------------------- registry

# Every task plugs in through two optional modules in ui/, found here without editing this file:
#   ui/<task>_cli.py  defines COMMANDS: dict[str, Command]      (subcommands of `python app.py`)
#   ui/<task>_tab.py  defines ORDER: int and build_tab(ctx) -> dict of named components, and
#                     optionally connect(ctx, tabs) to wire events across tabs once all exist
#                     and CSS: str, rules for its own elements (added to the page's style sheet)
#                     (`tabs` maps each tab module's short name, e.g. "eraser", to its components).


def _ui_modules(suffix: str) -> list:
    import importlib
    import pkgutil

    import ui

    names = sorted(m.name for m in pkgutil.iter_modules(ui.__path__) if m.name.endswith(suffix))
    return [importlib.import_module(f"ui.{name}") for name in names]


def _commands() -> dict[str, Command]:
    commands = {"serve": Command("launch the web app (the default when no command is given)",
                                 add_serve_args, run_serve)}
    for module in _ui_modules("_cli"):
        commands.update(module.COMMANDS)
    return commands


COMMANDS: dict[str, Command] = _commands()
DEFAULT_COMMAND = "serve"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only` set, of that command alone (the others are
    listed without their arguments: adding some imports torch, which `--help` need not wait for)."""
    parser = CliParser(
        prog="app.py",
        description="Attention-layer editing of images and video with diffusion models. "
                    f"Without a command, runs '{DEFAULT_COMMAND}'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        if only is None or only == name:
            command.add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)  # `python app.py --port 7861` means `serve --port 7861`
    args = build_parser(only=argv[0] if argv[0] in COMMANDS else "").parse_args(argv)
    if getattr(args, "compile", False):  # --compile (ui/cli_common.add_model_args)
        from pipelines import models

        models.compile_on_load()
    try:
        return COMMANDS[args.command].run(args)
    except UserInputError as error:
        fail(str(error))
    except Exception as error:
        # out of GPU or CPU memory: one sentence saying what to lower (pipelines/errors.py); a bug
        # keeps its traceback
        from pipelines.errors import out_of_memory_message

        if (message := out_of_memory_message(error)) is None:
            raise
        fail(message)
    except KeyboardInterrupt:
        # Ctrl-C: every result is written atomically, so nothing half-written is left behind;
        # folder commands (erase, segment --folder, steer pairs, personalize train) resume
        print("stopped (Ctrl-C); files written so far are complete, and rerunning the same "
              "command resumes where a folder command stopped", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
