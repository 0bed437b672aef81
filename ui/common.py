"""Shared pieces of the Gradio app: the app context (with its results folder, ui/results.py and
who owns each run), the server's limits, per-session Stop requests, error handling, the header and
the keyboard shortcuts."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from pipelines.errors import UserInputError
from pipelines.stopping import Stopped
from ui.limits import DEFAULT_LIMITS, Limits
from ui.results import OutputStore, browser_owner

#: The app's log: one line per user mistake, a traceback per unexpected error.
logger = logging.getLogger("app")

#: Every GPU-heavy event of every tab shares this one queue slot.
GPU_CONCURRENCY = {"concurrency_id": "gpu", "concurrency_limit": 1}

REAL_MODEL_HINT = (
    "To see real attention maps, start the app with a real checkpoint: "
    "`python app.py --model stable-diffusion-v1-5/stable-diffusion-v1-5` (a hub id downloaded "
    "beforehand), `--model path/to/diffusers-folder`, or `--model path/to/model.safetensors`; "
    "add more choices for the *Model* menu with `--allow-model NAME`."
)


def zip_files(paths: list[Path], zip_path: Path) -> Path:
    """Zip `paths` flat (by file name) into `zip_path`, atomically (`pipelines.io.atomic_path`)."""
    from pipelines.io import atomic_path

    with atomic_path(zip_path, f"the archive {Path(zip_path).name}") as temp:
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in paths:
                archive.write(path, arcname=path.name)
    return zip_path


# --------------------------------------------------------------------------- stop requests


class StopRequests:
    """Stop flags of the running tasks, one per request, keyed by (browser or client session, task).

    A tab's long handler runs inside `job(request, task)`, which registers a fresh
    `threading.Event` for this one request; the tab's Stop button (and its API endpoint
    `/<task>_stop`, from the same `gradio_client.Client`) sets the events of that session's
    running `task` requests, never another visitor's.  `stop_all` (server shutdown) sets every one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str | None, str], set[threading.Event]] = {}
        self._idle = threading.Condition(self._lock)
        self._closing = False  # after stop_all (shutdown): every request starts stopped

    @staticmethod
    def session(request) -> str | None:
        return getattr(request, "session_hash", None) if request is not None else None

    @contextlib.contextmanager
    def job(self, request, task: str):
        key, flag = (self.session(request), task), threading.Event()
        with self._lock:
            self._running.setdefault(key, set()).add(flag)
            if self._closing:
                flag.set()
        try:
            yield flag
        finally:
            with self._lock:
                flags = self._running.get(key, set())
                flags.discard(flag)
                if not flags:
                    self._running.pop(key, None)
                self._idle.notify_all()

    def stop(self, request, task: str) -> int:
        """Ask this session's running `task` requests to stop; returns how many there were."""
        with self._lock:
            flags = list(self._running.get((self.session(request), task), ()))
        for flag in flags:
            flag.set()
        return len(flags)

    def stop_all(self) -> int:
        """Stop every running request, and every one that starts from now on (server shutdown)."""
        with self._lock:
            self._closing = True
            flags = [flag for flags in self._running.values() for flag in flags]
        for flag in flags:
            flag.set()
        return len(flags)

    def running(self) -> int:
        with self._lock:
            return sum(len(flags) for flags in self._running.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no task runs (True) or `timeout` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


STOPPING = "Stopping after the current step ..."
NOTHING_TO_STOP = "Nothing of yours is running in this tab."


def stop_handler(ctx: "AppContext", task: str, api_name: str):
    """The Stop button's handler (also the `/<api_name>` endpoint): stops this session's `task`."""

    def stop(request: gr.Request):
        return STOPPING if ctx.stops.stop(request, task) else NOTHING_TO_STOP

    stop.__name__ = api_name
    stop.__doc__ = (f"Stop the running {task} request of this session (this browser page or this "
                    "gradio_client.Client) before its next step; it ends with 'Stopped at step N'.")
    return stop


@dataclass
class AppContext:
    """What every tab needs to know about how the app was started.

    The browser and the API may pick only among `model_choices`: the models the server was
    started with (`--model`, `--allow-model`) and the built-in ones.  A free-text model box
    would let any visitor make the server read arbitrary paths or download from the hub.
    """

    default_model: str = "builtin"
    device: str | None = None  # None = let pipelines.models pick
    outputs: OutputStore = field(default_factory=OutputStore)
    extra_models: tuple[str, ...] = ()
    #: motion-adapter folders the server was started with (`--allow-motion-adapter`): the only ones
    #: the Edit video tab offers (by name), so no request names a path the server reads
    motion_adapters: tuple[str, ...] = ()
    limits: Limits = DEFAULT_LIMITS
    stops: StopRequests = field(default_factory=StopRequests)
    #: browser page (Gradio session) -> its owner, registered by the page's load event (ui/results_tab.py)
    _page_owners: dict = field(default_factory=dict, repr=False)

    def owner(self, request, token: str | None = None) -> str | None:
        """Who a request's runs belong to (see ui/results.py): the login with --auth, else the
        browser (its token, sent along or registered for this page), else the API client's session."""
        username = getattr(request, "username", None) if request is not None else None
        if username:
            return f"user:{username}"
        session = StopRequests.session(request)
        return browser_owner(token) or self._page_owners.get(session) or (f"session:{session}" if session else None)

    def register_page(self, request, token: str | None) -> None:
        """Remember that this browser page (Gradio session) belongs to the browser with `token`."""
        session, owner = StopRequests.session(request), browser_owner(token)
        if session and owner:
            if len(self._page_owners) >= 100_000:  # bounded: forget the oldest pages
                self._page_owners.pop(next(iter(self._page_owners)))
            self._page_owners[session] = owner

    def new_run_dir(self, task: str, request=None, about: str = "", inputs: dict | None = None) -> Path:
        """A new folder for one run of `task` in the results folder, recorded for the requester
        (listed back to them in the Results tab) with a line `about` it."""
        return self.outputs.new_run_dir(task, owner=self.owner(request), about=about, inputs=inputs)

    @property
    def model_choices(self) -> list[str]:
        """The models a text-to-image tab offers (the built-in edit models are left out)."""
        from pipelines import models

        built_in = [n for n in models.BUILTIN_NAMES if n not in models.EDIT_MODELS and self._present(n)]
        return list(dict.fromkeys([self.default_model, *self.extra_models, *built_in]))

    @property
    def edit_model_choices(self) -> list[str]:
        """The models the Instruction edit tab offers: the built-in edit model first, then the
        models the server was started with."""
        from pipelines import models

        built_in = [n for n in models.EDIT_MODELS if self._present(n)]
        return list(dict.fromkeys([*built_in, self.default_model, *self.extra_models]))

    @staticmethod
    def _present(name: str) -> bool:
        from pipelines import models

        folder = models.builtin_folder(name)
        return folder is None or (folder / "model_index.json").is_file()

    def load(self, name: str | None, choices: list[str] | None = None):
        """Load (cached by pipelines.models) the model chosen in the UI, or the default one;
        `choices`: the tab's list when it is not `model_choices`."""
        from pipelines import models

        choices = self.model_choices if choices is None else choices
        name = (name or "").strip() or choices[0]
        if name not in choices:
            raise UserInputError(
                f"This app serves only {', '.join(choices)}; start it with --model or "
                "--allow-model to offer another model."
            )
        return models.load(name, device=self.device)


def user_error(message: str, where: str = "") -> gr.Error:
    """The `gr.Error` a visitor sees for a mistake, logged as one line (no traceback)."""
    from ui.request_guard import without_server_paths

    message = " ".join(without_server_paths(str(message)).split())
    logger.info("user error%s: %s", f" in {where}" if where else "", message)
    return gr.Error(message, print_exception=False)


def stopped_error(stopped: Stopped, where: str = "") -> gr.Error:
    """What a visitor sees when a task stopped on request: a "Stopped" notice, no traceback."""
    message = f"{stopped} Nothing was saved; press the button again to start over."
    logger.info("stopped%s: %s", f" in {where}" if where else "", message)
    return gr.Error(message, title="Stopped", print_exception=False)


#: a handler's write failed for want of room, wherever it was (an atomic write says more itself)
DISK_FULL = ("The server's disk is full (or a file-size limit was reached): the result could not be saved, "
             "and earlier results are intact; try again once space is freed.")


def out_of_memory_error(message: str, where: str = "") -> gr.Error:
    """What a visitor sees when a request ran out of GPU or CPU memory: one sentence saying what to
    lower (`pipelines.errors.out_of_memory_message`), logged as one warning line without a
    traceback (a request too large for this machine, not a bug)."""
    logger.warning("out of memory%s: %s", f" in {where}" if where else "", message)
    return gr.Error(message, title="Out of memory", print_exception=False)


def _for_visitor(error: Exception, where: str) -> gr.Error | None:
    """The `gr.Error` a visitor sees for `error` raised in handler `where`, or None for a bug
    (re-raised as it is).  Called in the except block; the caller raises the answer after it,
    so that nothing refers to the failed call's frames (and the tensors they hold)."""
    from pipelines.errors import out_of_memory_message, release_memory
    from pipelines.io import out_of_room

    if isinstance(error, UserInputError):
        return user_error(error, where)
    if isinstance(error, Stopped):
        return stopped_error(error, where)
    if out_of_room(error):
        return user_error(DISK_FULL, where)
    if (message := out_of_memory_message(error)) is None:
        return None
    release_memory(error)
    return out_of_memory_error(message, where)


def user_errors_as_gradio(fn):
    """Turn `UserInputError` into `gr.Error` so the person sees the sentence, not a traceback
    (logged as one line), a task stopped on request (`Stopped`) into a "Stopped" notice,
    running out of GPU or CPU memory into one sentence saying what to lower, after freeing what
    the failed call held (so the server goes on serving), and a full disk while writing a result
    into one sentence (every earlier result is intact: files are written atomically).  Works for
    plain and generator handlers; the visitor's error is raised outside the except block."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
                return
            except Exception as error:
                if (shown := _for_visitor(error, fn.__name__)) is None:
                    raise
            raise shown

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if (shown := _for_visitor(error, fn.__name__)) is None:
                raise
        raise shown

    return wrapper


@contextlib.contextmanager
def stoppable(ctx: "AppContext", request, task: str, pipe=None, total: int | None = None):
    """Run a tab's task as a stoppable job: registers this request's stop flag (see
    `StopRequests`) and, with `pipe`, stops its denoiser before the next step once the flag is
    set (`pipelines.stopping.stop_between_steps`, which raises `Stopped`).  Yields the flag."""
    from pipelines.stopping import stop_between_steps

    with ctx.stops.job(request, task) as flag:
        if pipe is None:
            yield flag
        else:
            with stop_between_steps(pipe, flag.is_set, total):
                yield flag


# --------------------------------------------------------------------------- shared components

#: `elem_classes` of a result image or gallery: small results (64 px from the built-in models)
#: fill their box, pixels kept sharp (APP_CSS in app.py)
PIXEL_RESULT = ["pixel-result"]


def model_label(name: str, supported: tuple | None = None) -> str:
    """What the Model menu shows for `name`: the name, its family when the files tell it without
    loading, and whether this tab can run it, e.g. "builtin · SD 1.x/2.x UNet, built-in"."""
    from pipelines import models

    backbone = models.backbone_without_loading(name)
    if backbone is None:
        return name
    where = ", built-in" if models.builtin_folder(name) else ", tiny test model" if models.is_tiny(name) else ""
    unfit = "  (not for this tab)" if supported is not None and backbone not in supported else ""
    return f"{name} · {backbone.label}{where}{unfit}"


def model_note(name: str | None, supported: tuple | None, task: str) -> str:
    """One sentence under the Model menu when this tab cannot run the chosen model (or "" when
    it can, or when only loading the model would tell)."""
    from pipelines import backbones, models

    backbone = models.backbone_without_loading(name or "")
    if supported is None or backbone is None or backbone in supported:
        return ""
    return (f"⚠ {task} works with {backbones.sentence_list(supported)} models; `{name}` is "
            f"{backbone.label}: pick another model.")


def model_menu(ctx: "AppContext", supported: tuple | None, task: str, *, choices: list[str] | None = None,
               elem_id: str | None = None, **options) -> gr.Dropdown:
    """The tab's Model menu: every model the server offers (`ctx.model_choices` or `choices`) with
    its family, and below it a note that appears as soon as a model this tab cannot run is
    picked, before the user presses the button.  `supported`: the task's backbones (its
    pipeline's SUPPORTED), None for any.  Values are the plain names, as the API takes them."""
    choices = ctx.model_choices if choices is None else choices
    value = options.pop("value", choices[0])
    dropdown = gr.Dropdown(choices=[(model_label(name, supported), name) for name in choices], value=value,
                           label=options.pop("label", "Model"), elem_id=elem_id, **options)
    first = model_note(value, supported, task)
    note = gr.Markdown(first, visible=bool(first), elem_id=f"{elem_id}-note" if elem_id else None)

    def show_note(name):
        text = model_note(name, supported, task)
        return gr.update(value=text, visible=bool(text))

    dropdown.change(show_note, dropdown, note, queue=False, api_visibility="private", show_progress="hidden")
    return dropdown


def is_shapes_model(name: str | None) -> bool:
    """Whether `name` is a built-in shapes-world model (or a tiny test one): placeholders and
    defaults use the shapes world's words for it, a real checkpoint's otherwise."""
    from pipelines import models

    name = (name or "").strip()
    return models.builtin_folder(name) is not None or models.is_tiny(name)


@contextlib.contextmanager
def denoiser_progress(pipe, progress, describe, steps: int = 0, runs: int | None = None):
    """Report each denoiser call of this thread to `progress` as it starts, with a named stage
    instead of the pipeline's own step counter ("44/50 steps" says nothing of what is sampled).

    `describe(run, step)` names denoising step `step` (1..steps) of pipeline run `run` (0-based).
    `steps` 0: every call is a run of its own (one noisy pass per image or batch of frames);
    `runs` None: the total is unknown (no fraction shown).  A scheduler that calls the model
    more than once per step (PNDM's warm-up, Heun) is counted in steps: each run makes as many
    calls as its scheduler has timesteps.  Other threads' calls on the same model are ignored.
    """
    from pipelines import models

    owner, calls = threading.get_ident(), [0]

    def before_call(_module, _args):
        if threading.get_ident() != owner:
            return
        timesteps = getattr(pipe.scheduler, "timesteps", None) if steps > 0 else None
        per_run = max(len(timesteps) if timesteps is not None else 0, 1)
        run, within = divmod(calls[0], per_run)
        calls[0] += 1
        step = min(steps, 1 + within * steps // per_run) if steps > 0 else 0
        if runs:
            progress(min(1.0, (run * per_run + within) / (runs * per_run)), desc=describe(min(run, runs - 1), step))
        else:
            progress(None, desc=describe(run, step))

    handle = models.denoiser(pipe).register_forward_pre_hook(before_call)
    try:
        yield
    finally:
        handle.remove()


def seed_used_row(prefix: str) -> tuple[gr.Row, gr.Number, gr.Button]:
    """The read-only "Seed used" box and its "Reuse this seed" button, in a row that stays hidden
    until a run has used a seed (Gradio draws an empty number box as "0"); show it with
    `reveal_after_success(event, row)`.  Element ids `<prefix>-seed-used`, `<prefix>-reuse-seed`."""
    with gr.Row(visible=False, elem_id=f"{prefix}-seed-row") as row:
        seed_used = gr.Number(value=None, label="Seed used", precision=0, interactive=False,
                              elem_id=f"{prefix}-seed-used")
        reuse = gr.Button("Reuse this seed", elem_id=f"{prefix}-reuse-seed")
    return row, seed_used, reuse


def reveal_after_success(event, *components) -> None:
    """Make `components` visible once `event` has succeeded (e.g. the seed row after a run)."""
    event.success(lambda: tuple(gr.update(visible=True) for _ in components) if len(components) > 1
                  else gr.update(visible=True), None, list(components), queue=False,
                  api_visibility="private", show_progress="hidden")


def details(label: str = "Details", **options) -> gr.Accordion:
    """A closed section for diagnostics (words the method adds, token maps, crop sizes)."""
    return gr.Accordion(label, open=options.pop("open", False), **options)


def clear_error_badges(event, outputs: list) -> None:
    """After a failed run, keep the outputs as they were but drop the "Error" badge Gradio left on
    each of them (the error itself was shown once, as a notice)."""
    event.failure(lambda: tuple(gr.skip() for _ in outputs) if len(outputs) > 1 else gr.skip(), None, outputs,
                  queue=False, api_visibility="private", show_progress="hidden")


#: Keyboard shortcuts, passed to `launch(js=...)` once for the whole app (app.py), as in Stable
#: Diffusion web UIs and IOPaint: Ctrl+Enter (Cmd+Enter on a Mac) presses the visible tab's
#: primary button, Escape presses its Stop button while one of its jobs runs.  The buttons are
#: found by their variant's class (`button.primary` / `button.stop`, the app's own buttons all
#: have an elem_id), not by id, so that a new tab gets the shortcuts without editing this.
#: Gradio mounts only the selected tab, so the tooltips naming the keys are added by an observer.
SHORTCUTS_JS = r"""
() => {
  const MAC = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent);
  const RUN_KEYS = MAC ? "\u2318+Enter" : "Ctrl+Enter";
  const PRIMARY = "button.primary[id]", STOP = "button.stop[id]";
  // display:none on any ancestor (a hidden tab, row or component) leaves an element no boxes
  const shown = (el) => el.getClientRects().length > 0;
  const usable = (button) => shown(button) && !button.disabled;
  const visibleTab = () => [...document.querySelectorAll(".tabitem")].find(shown) || document.body;
  // A tab with two jobs (Personalize: Train and Generate) has two primary and two Stop buttons:
  // the one nearest to `from` (the focused field, or the button that started the run) is meant.
  const nearest = (from, buttons) => {
    for (let node = from; node; node = node.parentElement) {
      const found = buttons.find((button) => node.contains(button));
      if (found) return found;
    }
    return buttons[0];
  };
  // a job of the tab runs while one of its outputs shows Gradio's progress (an error shows
  // there too, with an "Error" badge, but nothing runs then)
  const running = (tab) => [...tab.querySelectorAll('[data-testid="status-tracker"]')]
    .some((tracker) => !tracker.classList.contains("hide") && !tracker.querySelector(".error"));
  let started = null;  // the primary button pressed last, by mouse or by the shortcut
  document.addEventListener("click", (event) => {
    const button = event.target instanceof Element && event.target.closest(PRIMARY);
    if (button) started = button;
  }, true);
  // capture phase: before a single-line textbox's own Enter handler, which would submit too
  window.addEventListener("keydown", (event) => {
    if (event.isComposing || event.repeat || event.altKey || event.shiftKey) return;
    const tab = visibleTab();
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      const buttons = [...tab.querySelectorAll(PRIMARY)].filter(usable);
      if (!buttons.length) return;
      event.preventDefault();
      event.stopPropagation();
      nearest(document.activeElement, buttons).click();
    } else if (event.key === "Escape" && !event.ctrlKey && !event.metaKey) {
      // Escape closes an open menu first; with nothing running it is left to the page
      if (document.activeElement && document.activeElement.closest('[aria-expanded="true"]')) return;
      const stops = [...tab.querySelectorAll(STOP)].filter(usable);
      if (!stops.length || !running(tab)) return;
      event.preventDefault();
      nearest(started && tab.contains(started) ? started : document.activeElement, stops).click();
    }
  }, true);
  // the keys in each button's tooltip, and for screen readers
  const label = () => {
    for (const button of document.querySelectorAll(`${PRIMARY}:not([aria-keyshortcuts])`)) {
      button.title = `${button.title ? button.title + " " : ""}(${RUN_KEYS})`;
      button.setAttribute("aria-keyshortcuts", "Control+Enter Meta+Enter");
    }
    for (const button of document.querySelectorAll(`${STOP}:not([aria-keyshortcuts])`)) {
      button.title = `${button.title ? button.title + " " : ""}(Esc while it runs)`;
      button.setAttribute("aria-keyshortcuts", "Escape");
    }
  };
  let queued = false;  // one pass per frame however many nodes Gradio adds (progress updates)
  new MutationObserver(() => {
    if (!queued) {
      queued = true;
      requestAnimationFrame(() => { queued = false; label(); });
    }
  }).observe(document.body, { childList: true, subtree: true });
  label();
}
"""


#: The app's two header lines: a title and what the tabs do
HEADER = (
    "## Attention-layer editing with diffusion models\n"
    "Work inside the attention layers of a diffusion model: see where each word looked, remove an "
    "object, segment by text, steer a concept out, personalize, edit a video or an image by instruction."
)


def models_markdown(default_model: str, models_from_cache: tuple[str, ...] = ()) -> str:
    """What the closed "About the models" section under the header says about the default model
    and how to offer others."""
    if default_model.startswith("tiny"):
        text = (f"**Note:** the default model `{default_model}` is a tiny model with *random weights*, built "
                "offline for tests: it runs in seconds on a CPU but its images, heatmaps and masks are noise. ")
    elif default_model == "builtin":
        text = ("`builtin` is our own small Stable-Diffusion-architecture model trained on a world of coloured "
                "circles, squares and triangles on plain, striped, checkered and gradient backgrounds (64 px; see "
                "`assets/builtin/README.md`); `builtin-edit` is its instruction-edit variant. They run offline on a "
                "CPU in about a second; prompts like *a red circle and a blue square on a striped background* work, "
                "photos of cats do not. ")
    else:
        text = f"The default model is `{default_model}`. "
    if models_from_cache:
        text += f"From the local Hugging Face cache: {', '.join(f'`{name}`' for name in models_from_cache)}. "
    return text + REAL_MODEL_HINT + (" `--models-from-hf-cache` offers every diffusers pipeline already in the "
                                      "local Hugging Face cache. Each Model menu shows a model's family and marks "
                                      "the ones its tab cannot run.")
