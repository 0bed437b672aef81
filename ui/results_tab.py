"""Tab "Results": every run this browser (or this login) made in any tab, kept in the results folder
across page reloads and server restarts (ui/results.py): look at it again, download its files,
reopen a personalization run to resume or use it, or delete it.

Who sees what: the page's load event gives the browser a random token kept in its local storage
(`gr.BrowserState`) and tells the app which page belongs to which browser; every tab records its
runs under that owner (`AppContext.new_run_dir`), and this tab lists only the owner's runs.
Its events are not API endpoints: an API client gets its files in each response.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ui.common import PIXEL_RESULT, AppContext
from ui.results import Run, new_browser_token

ORDER = 90  # after every task's tab

#: the tab a run's task belongs to, by the run folders' prefix
TASK_TITLES = {"attention_maps": "Attention maps", "erase": "Remove object", "segment": "Segment by text",
               "steer": "Counterfactual steer", "personalize": "Personalize", "edit_video": "Edit video",
               "instruct": "Instruction edit"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".webm"}
#: the gallery shows at most this many of a run's images (all of them stay downloadable)
GALLERY_LIMIT = 24
HEADERS = ["When", "Tab", "What", "Files"]
NOTHING_CHOSEN = "Pick a run in the list to see and download its files."
STORAGE_KEY = "attention-editing-owner"


def kept_sentence(ctx: AppContext) -> str:
    """How long the server keeps runs, in the words of its start options."""
    store = ctx.outputs
    if store.temporary:
        return "This server keeps runs only until it stops."
    parts = []
    if store.keep_days:
        parts.append(f"for {store.keep_days:g} days")
    if store.max_bytes:
        parts.append(f"up to {store.max_bytes / 1e9:g} GB for all users together (the oldest runs go first)")
    return "Runs are kept " + (", ".join(parts) if parts else "until you delete them") + "."


def rows(runs: list[Run]) -> list[list]:
    return [[run.when, TASK_TITLES.get(run.task, run.task), run.about or "-", len(run.files)] for run in runs]


def _learned_steps(folder: Path) -> int | None:
    """The training steps of a personalization run's learned file (its header only), or None."""
    from safetensors import safe_open

    path = folder / "learned.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as file:
            return int((file.metadata() or {}).get("steps", 0))
    except Exception:  # noqa: BLE001 (an unreadable file: the run shows no step count)
        return None


def resumable(run: Run | None) -> bool:
    from ui.personalize_tab import INPUT_IMAGE

    return run is not None and run.task == "personalize" and bool(run.inputs) and INPUT_IMAGE in run.files


def describe(run: Run) -> str:
    title = TASK_TITLES.get(run.task, run.task)
    text = f"**{title}**, {run.when}: {run.about or 'no description'} · {len(run.files)} file(s)"
    if run.task == "personalize" and run.inputs:
        steps = _learned_steps(run.folder)
        total = run.inputs.get("steps")
        done = f"trained {steps} of {total} steps" if steps is not None else "not trained yet"
        text += f" · {done}. **Open in Personalize** to resume it or to generate with it."
    return text


def make_handlers(ctx: AppContext):
    def register_browser(token, request: gr.Request):
        """The page's load event: give a new browser its token; remember this page's browser."""
        from ui.results import browser_owner

        if browser_owner(token) is None:
            token = new_browser_token()
        ctx.register_page(request, token)
        return token

    def list_runs(token, request: gr.Request):
        runs = ctx.outputs.runs(ctx.owner(request, token))
        note = (f"{len(runs)} run(s), newest first. " if runs else
                "No runs yet: what you make in the other tabs appears here. ") + kept_sentence(ctx)
        return rows(runs), [run.name for run in runs], note

    def show_run(names, token, evt: gr.SelectData, request: gr.Request):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        name = names[row] if isinstance(row, int) and 0 <= row < len(names or []) else None
        run = ctx.outputs.run(name, ctx.owner(request, token))
        if run is None:
            return None, "This run is no longer here; press **Refresh**.", [], None, gr.update(visible=False), \
                gr.update(visible=False), gr.update(visible=False)
        paths = [run.folder / f for f in run.files]
        images = [(str(p), p.name) for p in paths if p.suffix.lower() in IMAGE_SUFFIXES][:GALLERY_LIMIT]
        videos = [str(p) for p in paths if p.suffix.lower() in VIDEO_SUFFIXES]
        return (run.name, describe(run), images, [str(p) for p in paths] or None,
                gr.update(value=videos[0] if videos else None, visible=bool(videos)),
                gr.update(visible=resumable(run)), gr.update(visible=True))

    def delete_run(name, token, request: gr.Request):
        owner = ctx.owner(request, token)
        if not ctx.outputs.delete(name, owner):
            gr.Warning("This run could not be deleted: it is not yours, is gone, or is still training.")
        else:
            gr.Info("Run deleted.")
        table, names, note = list_runs(token, request)
        return (table, names, note, None, NOTHING_CHOSEN, [], None, gr.update(value=None, visible=False),
                gr.update(visible=False), gr.update(visible=False))

    return register_browser, list_runs, show_run, delete_run


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Results", id="results") as tab:
        note = gr.Markdown(kept_sentence(ctx), elem_id="rs-note")
        with gr.Row():
            with gr.Column(scale=5):
                table = gr.Dataframe(headers=HEADERS, datatype=["str", "str", "str", "number"], interactive=False,
                                     wrap=True, column_widths=["20%", "22%", "46%", "12%"], max_height=620,
                                     label="Your runs (click one)", elem_id="rs-table")
                refresh = gr.Button("Refresh", elem_id="rs-refresh")
            with gr.Column(scale=6):
                chosen_text = gr.Markdown(NOTHING_CHOSEN, elem_id="rs-chosen")
                gallery = gr.Gallery(label="Images", columns=4, height=300, object_fit="contain", format="png",
                                     elem_id="rs-gallery", elem_classes=PIXEL_RESULT)
                video = gr.Video(label="Video", visible=False, interactive=False, elem_id="rs-video")
                files = gr.File(label="Files (download)", file_count="multiple", interactive=False,
                                elem_id="rs-files")
                with gr.Row():
                    reopen = gr.Button("Open in Personalize", variant="primary", visible=False, elem_id="rs-reopen")
                    delete = gr.Button("Delete this run", variant="stop", visible=False, elem_id="rs-delete")
        names = gr.State([])
        chosen = gr.State(None)
    # the events need the browser's token, a component outside every tab: wired in `connect`
    return {"tab": tab, "note": note, "table": table, "refresh": refresh, "chosen_text": chosen_text,
            "gallery": gallery, "video": video, "files": files, "reopen": reopen, "delete": delete,
            "names": names, "chosen": chosen}


def wire(ctx: AppContext, ours: dict) -> gr.BrowserState:
    """The browser's token and the tab's events.  The token's component is made here, outside
    every tab: Gradio mounts a tab's components only once the tab is opened, and an unmounted
    BrowserState neither reads nor writes the browser's storage.  Returns it."""
    from gradio.context import Context

    root = Context.root_block
    if root is None or Context.block is not root:
        raise RuntimeError("the Results tab's events are wired in the app's gr.Blocks, outside its tabs")
    browser = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=ctx.outputs.browser_secret())
    register_browser, list_runs, show_run, delete_run = make_handlers(ctx)
    listing = [ours["table"], ours["names"], ours["note"]]
    private = dict(api_visibility="private", show_progress="hidden")
    root.load(register_browser, browser, browser, queue=False, **private).then(list_runs, browser, listing, **private)
    ours["tab"].select(list_runs, browser, listing, **private)
    ours["refresh"].click(list_runs, browser, listing, **private)
    details = [ours[key] for key in ("chosen", "chosen_text", "gallery", "files", "video", "reopen", "delete")]
    ours["table"].select(show_run, [ours["names"], browser], details, **private)
    ours["delete"].click(delete_run, [ours["chosen"], browser], [*listing, *details], **private)
    return browser


#: the Personalize tab's components that "Open in Personalize" fills, in the handler's order
PERSONALIZE_FIELDS = ["model", "image", "class_words", "method", "steps", "prior", "tau", "train_seed", "run_folder",
                      "status"]


def make_reopen(ctx: AppContext, switch: bool):
    """The "Open in Personalize" handler: the run's model, image, settings, name and a status line
    (PERSONALIZE_FIELDS), then the selected tab when `switch`."""

    def reopen(name, token, request: gr.Request):
        from PIL import Image

        from ui.personalize_tab import INPUT_IMAGE

        run = ctx.outputs.run(name, ctx.owner(request, token))
        if not resumable(run):
            raise gr.Error("This run cannot be reopened: it is gone or is not a personalization run.",
                           print_exception=False)
        inputs = run.inputs
        model = inputs.get("model")
        if model not in ctx.model_choices:
            raise gr.Error(f"This run used the model '{model}', which this server does not offer now.",
                           print_exception=False)
        with Image.open(run.folder / INPUT_IMAGE) as image:
            picture = image.convert("RGB")
        steps = _learned_steps(run.folder)
        status = (f"Reopened the run of {run.when} ({run.about}). "
                  + (f"It has trained {steps} of {inputs.get('steps')} steps: press **Train** to resume it, or "
                     "**Generate** with what it learned." if steps else "Press **Train** to start it."))
        values = [model, picture, inputs.get("class_words"), inputs.get("method"), inputs.get("steps"),
                  inputs.get("prior_images"), inputs.get("tau"), inputs.get("seed"), run.name, status]
        if switch:
            values.append(gr.Tabs(selected="personalize"))
        return values

    return reopen


def connect(ctx: AppContext, tabs: dict) -> None:
    """The tab's events (`wire`), and "Open in Personalize": fill the Personalize tab with the run's image and settings and
    its run name, and switch to it; Train then resumes the run, Generate uses what it learned."""
    ours, personalize = tabs["results"], tabs.get("personalize")
    browser = wire(ctx, ours)
    if not personalize or any(key not in personalize for key in PERSONALIZE_FIELDS):
        return
    targets = [personalize[key] for key in PERSONALIZE_FIELDS]
    parent = getattr(personalize.get("tab"), "parent", None)
    switch = isinstance(parent, gr.Tabs)
    if switch:
        targets.append(parent)
    ours["reopen"].click(make_reopen(ctx, switch), [ours["chosen"], browser], targets,
                         api_visibility="private", show_progress="hidden")
