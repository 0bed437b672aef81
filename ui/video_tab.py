"""The "Edit video" tab (ReAtCo): a clip, a source and an edited prompt, one box per object bound
to a word of the edited prompt -> the edited clip, a side-by-side with the source, and one
attention heatmap video per bound word.

The task is `pipelines.video.edit_video`; this module only turns the controls into its inputs,
runs it as a stoppable job and writes its result into a run folder.  Boxes are drawn by clicking
two opposite corners on a frame of the clip (the frame slider picks the frame, so a word may get
boxes on several keyframes, interpolated in between); every click adds a row to an editable
table `word, x1, y1, x2, y2, frame` in pixels of the source frames, which is what the task
receives.  The fine-tune and the inversion are cached in this process's temporary folder (see
`cache_dir`), so a second edit of the same clip (other boxes, another prompt) and a run after a
Stop skip what was done.

The example clip `assets/examples/clip_1090021.mp4` is shapes-world clip 1090021 (8 frames,
64 px, one red circle moving up), written with
`world.make_clip(1090021, 8, num_objects=1)` and `pipelines.io.write_video(frames, path, 8)`;
its boxes are the circle's start and end positions, so the keyframe interpolation follows it.

The backbone (Advanced, *Motion adapter*): the Tune-A-Video inflation (the paper's) or AnimateDiff
with one of the motion adapters the server was started with (`app.py serve
--allow-motion-adapter DIR`, listed by folder name; `adapter_choices`).  A request names a choice
of that list, never a path: anything else is refused in one sentence.  The fine-tune steps box
starts empty, which is `VideoSettings.fine_tune_steps`'s default: the paper's 200 on the
inflated UNet, 0 with an adapter (AnimateDiff needs no per-video fine-tune); its 0 is no
fine-tune.  Empty is also the API's default, so an API client that picks an adapter and leaves
the steps out gets no fine-tune, as in the browser.

While the edit samples, *Preview (while editing)* shows the model's current estimate of the edited
clip (its first, middle and last frames, `pipelines.video.edit.preview_frames`) after a few of the
steps (at most `pipelines.video.reatco.PREVIEWS`): the box appears with the first preview of a
run, stays after a Stop (how far the edit got) and is hidden again when the result is shown
(the handler's last output clears it, so that an API client gets None, and the event's success
hides it).
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from pipelines.errors import UserInputError
from pipelines.seeds import resolve_seed
from pipelines.stopping import Stopped
from pipelines.video_settings import VideoSettings
from ui.common import (
    GPU_CONCURRENCY,
    AppContext,
    clear_error_badges,
    model_menu,
    reveal_after_success,
    seed_used_row,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
)
from ui.settings_controls import UNSET, checkbox, dropdown, number, slider, unset

ORDER = 60  # position among the tabs
TASK = "edit_video"  # the run folders' prefix and the stop requests' key
DEFAULTS = VideoSettings()
logger = logging.getLogger("app")

#: the box table's columns (pixels of the source frames; frame counted from 0 among the edited frames)
BOX_HEADERS = ["word", "x1", "y1", "x2", "y2", "frame"]
#: what the upload takes (the formats `pipelines.video.clip.read_clip` reads)
CLIP_TYPES = [".mp4", ".webm", ".gif", ".mov", ".avi", ".mkv"]
#: the frame viewer enlarges small frames to about this many pixels on their longer side
VIEWER_SIDE = 384
#: the preview strip is enlarged to about this width (the result column's) when its frames are small
PREVIEW_WIDTH = 400
#: box outline colours, one per bound word (cycled)
BOX_COLOURS = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (120, 255, 120), (255, 120, 255), (255, 160, 40)]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_CLIP = EXAMPLES_DIR / "clip_1090021.mp4"
#: the example's settings: the paper's 200 fine-tune steps and 50 DDIM steps take minutes on a
#: CPU even at 64 px, so the example asks for fewer (every other setting stays the paper's)
EXAMPLE_TUNE_STEPS = 20
EXAMPLE_STEPS = 10
EXAMPLES = [
    [str(EXAMPLE_CLIP), "a red circle on a striped background", "a blue square on a striped background",
     [["square", 20, 29, 47, 56, 0], ["square", 19, 5, 46, 32, 7]], True, EXAMPLE_TUNE_STEPS, EXAMPLE_STEPS],
    [str(EXAMPLE_CLIP), "a red circle on a striped background", "a red circle on a checkered background",
     [], False, EXAMPLE_TUNE_STEPS, EXAMPLE_STEPS],
]
#: what each example's button says (the button fills in the clip, both prompts, the boxes, IRJS and the steps)
EXAMPLE_LABELS = ["red circle → blue square", "stripes → checkers"]

#: the settings under Advanced, in the dataclass's order (IRJS has its own checkbox above them)
ADVANCED = tuple(name for name in VideoSettings.specs() if name != "preserve_background")
#: the motion-adapter menu's first choice: no adapter, the paper's backbone
NO_ADAPTER = "none: Tune-A-Video inflation"
#: fields whose default None is not UNSET's 0: tune_steps' 0 means "no fine-tune" (its None, the
#: empty box it starts as, is the backbone's default), motion_adapter is a menu
_NOT_UNSET = ("tune_steps", "motion_adapter")
#: the fields whose default None ("the source's", "the whole clip") is 0 in a number box
UNSET_FIELDS = tuple(name for name, (f, _, _) in VideoSettings.specs().items()
                     if f.default is None and name not in _NOT_UNSET)
#: the settings that count optimiser steps (--max-train-steps); `steps` counts denoising steps
TRAINING_FIELDS = ("tune_steps",)
#: what the progress bar says during each stage the task reports (`progress(stage, done, total, loss)`)
STAGE_PROGRESS = {"fine-tune": "fine-tuning", "inversion": "inverting the clip", "edit": "editing"}
#: marks a preview among the edit's events (the others are `progress`'s (stage, done, total, loss))
PREVIEW = object()

#: rules for this tab's elements (app.py adds them to the page): the 64 px clips of the built-in
#: model fill their box with sharp pixels, and the downloads box is small while empty
CSS = """
#ev-edited video, #ev-side video { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#ev-frame img, #ev-preview img { image-rendering: pixelated; }
#ev-files .empty { min-height: 0; height: 88px; }
"""


def cache_dir(ctx: AppContext) -> Path:
    """Where the app keeps fine-tunes and inversions: in the results folder, kept across restarts
    (editing the same clip again skips them) and cleaned up with the runs by the server's
    --keep-results-days and --max-results-gb (ui/results.py); never named by a request."""
    return ctx.outputs.cache_dir("video-cache")


# ----------------------------------------------------------------------------- settings and boxes


def adapter_choices(ctx: AppContext) -> dict[str, str | None]:
    """The motion-adapter menu: `NO_ADAPTER`, then each `--allow-motion-adapter` folder by its name
    (a repeated name gets " (2)", " (3)", ...), each mapped to its folder (None: no adapter)."""
    choices: dict[str, str | None] = {NO_ADAPTER: None}
    for folder in ctx.motion_adapters:
        name = Path(folder).name or str(folder)
        label, n = name, 2
        while label in choices:
            label, n = f"{name} ({n})", n + 1
        choices[label] = str(folder)
    return choices


def chosen_adapter(ctx: AppContext, choice) -> str | None:
    """The folder of the menu's `choice` (None for no adapter, or a left-out parameter); a
    choice outside the server's list is one sentence: a request never names a path."""
    choices = adapter_choices(ctx)
    if choice is None or choice == "":
        return None
    if not isinstance(choice, str) or choice not in choices:
        raise UserInputError(f"{str(choice)[:80]!r} is not a motion adapter this app offers; choose one of: "
                             f"{', '.join(choices)}.")
    return choices[choice]


def tab_settings(**values) -> VideoSettings:
    """The validated settings of the tab's controls; keys are VideoSettings fields (0 in a box
    whose default is None means None, except tune_steps, whose 0 is no fine-tune; seed -1 draws a
    random one; motion_adapter is a folder, see `chosen_adapter`)."""
    unknown = set(values) - set(VideoSettings.specs())
    if unknown:
        raise TypeError(f"not a VideoSettings field: {sorted(unknown)}")
    changes = {name: (unset(value) if name in UNSET_FIELDS else value) for name, value in values.items()}
    if "seed" in changes:
        changes["seed"] = resolve_seed(DEFAULTS.seed if changes["seed"] is None else changes["seed"])
    return DEFAULTS.replace(**changes).validated()


def _blank(cell) -> bool:
    """An empty table cell: None, blank text, or the NaN a number column holds when left empty."""
    return cell is None or (isinstance(cell, str) and not cell.strip()) or (isinstance(cell, float) and cell != cell)


def _cell_is(cell, number: int) -> bool:
    """Whether a table cell holds `number` (False for blank or non-numeric cells)."""
    try:
        return not _blank(cell) and float(cell) == number
    except (TypeError, ValueError):
        return False


def boxes_from_table(rows) -> list:
    """The table's rows as `pipelines.video.Box`es (rows left empty are skipped).

    Only the table's own shape is checked here (a word, four numbers, a whole frame); the task
    checks everything that needs the clip or the prompt (zero area, outside the frame, a word
    not in the prompt, more words than the prompt has), each in one sentence."""
    from pipelines.video.boxes import as_box

    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame (Python callers)
        rows = rows.values.tolist()
    if not isinstance(rows, (list, tuple)):
        raise UserInputError("The boxes must be a table of rows word, x1, y1, x2, y2, frame.")
    boxes = []
    for number_, row in enumerate(rows, start=1):
        row = list(row) if isinstance(row, (list, tuple)) else [row]
        if all(_blank(cell) for cell in row):
            continue
        if len(row) not in (5, 6):
            raise UserInputError(f"Box row {number_} has {len(row)} cells; give word, x1, y1, x2, y2 and frame.")
        word, *coords = row[:5]
        frame = row[5] if len(row) == 6 and not _blank(row[5]) else 0
        if _blank(word) or not isinstance(word, str):
            raise UserInputError(f"Box row {number_} has no word; write the word of the edited prompt it binds to.")
        for name, cell in zip(BOX_HEADERS[1:5], coords):
            if _blank(cell):
                raise UserInputError(f"Box row {number_} has no {name}; give x1, y1, x2, y2 in pixels of the frame.")
        # the task's own parser gives the sentences for non-numbers, NaN and a bad frame
        boxes.append(as_box((word.strip(), tuple(coords), frame)))
    return boxes


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """The SD CLIP tokenizer (every model this task runs on uses it): binds the drawn boxes'
    words for the frame preview without loading a model."""
    from pipelines.tokenizers import clip_tokenizer

    return clip_tokenizer()


def prompt_choices(prompt: str | None) -> list[str]:
    """The distinct words of the edited prompt, in order (what a box may bind to)."""
    from pipelines.attention_maps import prompt_words

    return list(dict.fromkeys(w for w, _, _ in prompt_words(prompt or "")))


# ----------------------------------------------------------------------------- the frame viewer


def _check_clip_side(ctx: AppContext, path) -> None:
    """The clip's frame size within --max-image-side, read from its header before decoding."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if capture.isOpened():
            width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width and height:
                ctx.limits.check_image_side(width, height, "video's frame")
    finally:
        capture.release()


def read_frames(ctx: AppContext, video, frames=DEFAULTS.frames, frame_stride=DEFAULTS.frame_stride):
    """The frames the edit will use (the task's own reader, with the frames and stride settings)."""
    if not video:
        raise UserInputError("Please upload a clip (mp4, webm, gif, ...).")
    settings = tab_settings(frames=frames, frame_stride=frame_stride)
    _check_clip_side(ctx, video)
    path = Path(video)
    return _decoded(str(path), path.stat().st_mtime_ns, settings.frames or None, settings.frame_stride)


@functools.lru_cache(maxsize=2)
def _decoded(path: str, mtime_ns: int, max_frames: int | None, stride: int) -> tuple[np.ndarray, ...]:
    """The clip's frames, decoded once per (file, version, frames, stride): every slider move and
    click of the frame viewer reads them again.  Two clips at most (two visitors taking turns):
    a long, large clip is big in memory."""
    from pipelines.video import read_clip

    return tuple(read_clip(path, max_frames=max_frames, stride=stride).frames)


def display_scale(frame_shape) -> int:
    """The whole-number factor the frame viewer enlarges a frame by (nearest neighbour), so that a
    small clip (the built-in model's 64 px) can be clicked on precisely; clicks are divided by it."""
    return max(1, VIEWER_SIDE // max(frame_shape[:2]))


def frame_with_boxes(frame: np.ndarray, index: int, count: int, boxes, prompt: str) -> tuple[Image.Image, str]:
    """Frame `index`, enlarged by `display_scale`, with every box it has (keyframes interpolated, as
    the task will), and a line naming each word's colour, or the sentence saying what is wrong."""
    from pipelines.video import boxes as box_tools

    scale = display_scale(frame.shape)
    picture = Image.fromarray(frame)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    try:
        parsed = boxes_from_table(boxes)
        if not parsed:
            return picture, "Click two opposite corners of a box on the frame to add it for the chosen word."
        h, w = frame.shape[:2]
        tokenizer = _tokenizer()
        targets = box_tools.resolve(parsed, prompt, tokenizer, tokenizer.model_max_length, count, (w, h))
    except UserInputError as error:
        return picture, f"**Boxes:** {error}"
    draw = ImageDraw.Draw(picture)
    legend = []
    for k, target in enumerate(targets):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in target.boxes[min(index, len(target.boxes) - 1)])
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=max(1, scale // 2))
        keyed = "keyframe" if index in target.keyframes else "interpolated"
        legend.append(f"*{target.word}* ({'#%02x%02x%02x' % colour}, {keyed})")
    return picture, f"Frame {index}: " + ", ".join(legend)


def make_viewer_handlers(ctx: AppContext):
    """The frame viewer's events (private endpoints): show a frame with its boxes, and add a box
    from two clicks."""

    @user_errors_as_gradio
    def show_frame(video, index, boxes, prompt, frames=DEFAULTS.frames, frame_stride=DEFAULTS.frame_stride):
        if not video:
            return None, gr.update(maximum=1, value=0), "Upload a clip to draw boxes on its frames."
        clip = read_frames(ctx, video, frames, frame_stride)
        index = int(min(max(index or 0, 0), len(clip) - 1))
        picture, note = frame_with_boxes(clip[index], index, len(clip), boxes, prompt or "")
        return picture, gr.update(maximum=max(len(clip) - 1, 1), value=index), note

    @user_errors_as_gradio
    def click_corner(video, index, boxes, prompt, word, corner, frames=DEFAULTS.frames,
                     frame_stride=DEFAULTS.frame_stride, event: gr.SelectData = None):
        x, y = (event.index if event is not None else (None, None))
        rows, picture, note, new_corner = add_corner(ctx, video, index, boxes, prompt, word, corner, x, y, frames,
                                                     frame_stride)
        added = corner is not None and new_corner is None
        # the table changes only when a box was added (its change event redraws the frame)
        return (rows if added else gr.skip()), picture, note, new_corner

    return show_frame, click_corner


def add_corner(ctx: AppContext, video, index, boxes, prompt, word, corner, x, y, frames=DEFAULTS.frames,
               frame_stride=DEFAULTS.frame_stride):
    """One click on the frame viewer at its pixel (x, y): the first corner is remembered, the second adds the
    row `word, x1, y1, x2, y2, frame` (sorted corners; the clicked pixels included), replacing the
    word's box on this frame if it had one."""
    rows = [list(r) for r in (boxes or []) if not all(_blank(c) for c in r)]
    clip = read_frames(ctx, video, frames, frame_stride)
    index = int(min(max(index or 0, 0), len(clip) - 1))
    if x is None or y is None:
        picture, note = frame_with_boxes(clip[index], index, len(clip), rows, prompt or "")
        return rows, picture, note, corner
    if not word or word not in prompt_choices(prompt):
        raise UserInputError("Choose the word of the edited prompt the box binds to, then click its corners.")
    scale = display_scale(clip[index].shape)
    h, w = clip[index].shape[:2]  # viewer pixels -> pixels of the source frame (a click on the edge stays in it)
    x, y = min(max(int(x) // scale, 0), w - 1), min(max(int(y) // scale, 0), h - 1)
    if corner is None:
        picture, note = frame_with_boxes(clip[index], index, len(clip), rows, prompt or "")
        return rows, picture, f"Corner ({x}, {y}) set: now click the opposite corner. " + note, [x, y]
    (ax, ay), (bx, by) = corner, (x, y)
    # one box per word and keyframe: a box drawn again on the same frame replaces the word's old one
    rows = [r for r in rows if not (len(r) == 6 and r[0] == word and _cell_is(r[5], index))]
    rows.append([word, min(ax, bx), min(ay, by), max(ax, bx) + 1, max(ay, by) + 1, index])
    picture, note = frame_with_boxes(clip[index], index, len(clip), rows, prompt or "")
    return rows, picture, note, None


# ----------------------------------------------------------------------------- the edit


def _status(seen: dict, settings: VideoSettings, done: bool = False) -> str:
    """One line per stage: where the fine-tune, the inversion and the editing stand."""
    later = {"fine-tune": ("inversion", "edit"), "inversion": ("edit",), "edit": ()}
    lines = []
    for stage, label in (("fine-tune", "Fine-tune"), ("inversion", "Inversion"), ("edit", "Editing")):
        if stage == "fine-tune" and not settings.fine_tune_steps():
            lines.append(f"- {label}: off (0 steps)")
        elif stage in seen:
            step, total, loss = seen[stage]
            tail = "" if loss is None else f", loss {loss:.4f}"
            lines.append(f"- {label}: step {step} of {total}{tail}")
        elif done or any(s in seen for s in later[stage]):
            lines.append(f"- {label}: from the cache")
        else:
            lines.append(f"- {label}: waiting")
    return "\n".join(lines)


def _stopped_message(stopped: Stopped) -> str:
    """What a stop keeps, by the stage it reached (the task caches each stage as it ends)."""
    kept = {
        "fine-tune step": "the fine-tune's checkpoint at this step is kept, so the next Edit with the same clip, "
                          "source prompt and settings resumes there",
        "inversion step": "the finished fine-tune is kept (the inversion starts over)",
        "editing step": "the fine-tune and the inversion are kept, so the next Edit starts with the editing",
    }.get(stopped.what, "the finished stages are kept")
    return f"{stopped} Nothing of this edit was saved; {kept}."


def preview_strip(frames: dict) -> Image.Image:
    """A preview's frames (frame index -> RGB array) side by side, in order, with a thin dark gap
    between them: one picture the width of the result column shows them all.  A narrow strip (the
    built-in model's 64 px frames) is enlarged by a whole factor (nearest neighbour) towards
    `PREVIEW_WIDTH`: the browser shrinks a picture to its box but does not enlarge it."""
    pictures = [frames[k] for k in sorted(frames)]
    h, w = pictures[0].shape[:2]
    gap = max(2, w // 32)
    strip = np.full((h, len(pictures) * w + (len(pictures) - 1) * gap, 3), 32, np.uint8)
    for k, picture in enumerate(pictures):
        strip[:, k * (w + gap):k * (w + gap) + w] = picture
    picture = Image.fromarray(strip)
    scale = max(1, PREVIEW_WIDTH // picture.width)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def _preview_label(step: int, total: int, frames: dict) -> str:
    names = ", ".join(str(k) for k in sorted(frames))
    return f"Preview (while editing): step {step} of {total}, frames {names}"


def make_handler(ctx: AppContext, cache: str | Path | None = None):
    """The event handler, also the `/edit_video` API endpoint; `cache`: the fine-tune and inversion
    cache (default `cache_dir(ctx)`)."""

    @user_errors_as_gradio
    def edit_video(
        model: str,
        video,
        source_prompt: str,
        prompt: str,
        boxes=None,
        preserve_background: bool = DEFAULTS.preserve_background,
        frames: float = DEFAULTS.frames,
        frame_stride: float = DEFAULTS.frame_stride,
        height: float | None = UNSET,
        width: float | None = UNSET,
        window: float = DEFAULTS.window,
        window_stride: float = DEFAULTS.window_stride,
        steps: float = DEFAULTS.steps,
        guidance: float = DEFAULTS.guidance,
        seed: float = DEFAULTS.seed,
        motion_adapter: str = NO_ADAPTER,
        tune_steps: float | None = DEFAULTS.tune_steps,
        tune_lr: float = DEFAULTS.tune_lr,
        tune_frames: float | None = UNSET,
        mixed_precision: str = DEFAULTS.mixed_precision,
        gradient_checkpointing: bool = DEFAULTS.gradient_checkpointing,
        checkpoint_every: float = DEFAULTS.checkpoint_every,
        per_frame_groupnorm: bool = DEFAULTS.per_frame_groupnorm,
        rad: bool = DEFAULTS.rad,
        rad_scale: float = DEFAULTS.rad_scale,
        rad_until: float = DEFAULTS.rad_until,
        refine_iterations: float = DEFAULTS.refine_iterations,
        topk: float = DEFAULTS.topk,
        temperature: float = DEFAULTS.temperature,
        smoothing: float = DEFAULTS.smoothing,
        heatmaps: bool = DEFAULTS.heatmaps,
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Edit the clip from the source prompt to the prompt (ReAtCo), each box holding its word.

        boxes: rows word, x1, y1, x2, y2, frame in pixels of the source frames (several frames of
        one word are keyframes, interpolated); preserve_background is IRJS; motion_adapter is a
        choice of the server's motion-adapter menu (AnimateDiff; NO_ADAPTER: the Tune-A-Video
        inflation); the other parameters are VideoSettings fields (height, width, tune_frames 0: the
        source's / the whole clip; tune_steps left out: 200 without an adapter, 0 with one; seed -1:
        random).  Yields the progress of every stage and a preview of the edit while it samples;
        returns the status, the edited clip, the side-by-side, the heatmap videos, the files, the
        seed used (the one drawn for -1) and the preview (None once the edit is done).
        """
        from pipelines.video import edit_video as run_edit

        values = dict(locals())
        values["motion_adapter"] = chosen_adapter(ctx, motion_adapter)  # a server-side folder, never the request's
        settings = tab_settings(**{name: values[name] for name in VideoSettings.specs()})  # before loading
        # the fine-tune steps as they will run: an empty box is the backbone's default (200 on the
        # inflated UNet), which --max-train-steps must bound as much as a typed number
        ctx.limits.check_settings(settings.replace(tune_steps=settings.fine_tune_steps()), training=TRAINING_FIELDS)
        if not video:
            raise UserInputError("Please upload a clip (mp4, webm, gif, ...).")
        parsed = boxes_from_table(boxes)
        _check_clip_side(ctx, video)
        progress(0, desc="loading the model")
        pipe = ctx.load(model)
        events: queue.Queue = queue.Queue()
        outcome: dict = {}
        seen: dict = {}
        skip = (gr.skip(),) * 5  # every output but the status and the preview, until the edit is done

        def preview(step, total, frames):  # in the edit's thread: the picture is made there
            events.put((PREVIEW, gr.update(value=preview_strip(frames), label=_preview_label(step, total, frames),
                                           visible=True)))

        with stoppable(ctx, request, TASK) as flag:
            def work():
                try:
                    outcome["result"] = run_edit(pipe, video, source_prompt, prompt, parsed, settings,
                                                 cache_dir=cache if cache is not None else cache_dir(ctx),
                                                 progress=lambda *event: events.put(event), stop=flag.is_set,
                                                 preview=preview)
                except BaseException as error:  # noqa: BLE001 (re-raised in the request's thread below)
                    outcome["error"] = error
                finally:
                    events.put(None)

            # the edit runs in its own thread so that this generator can show every step as it ends
            worker = threading.Thread(target=work, name="edit-video", daemon=True)
            worker.start()
            try:
                # the last run's preview goes (a new one appears with this run's first)
                yield (_status(seen, settings), *skip, gr.update(value=None, visible=False))
                while (event := events.get()) is not None:
                    if event[0] is PREVIEW:
                        yield (gr.skip(), *skip, event[1])
                        continue
                    stage, step, total, loss = event
                    seen[stage] = (step, total, loss)
                    progress((step, total), desc=STAGE_PROGRESS.get(stage, stage), unit="steps")
                    yield (_status(seen, settings), *skip, gr.skip())
            finally:
                flag.set()  # the page went away (the generator closed): stop the edit at its next step
                worker.join()
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, Stopped):
                message = _stopped_message(error)
                logger.info("stopped in edit_video: %s", message)
                raise gr.Error(message, title="Stopped", print_exception=False)
            raise error
        result = outcome["result"]
        progress(0, desc="writing the clips")
        run_dir = ctx.new_run_dir(TASK, request, about=prompt)
        written = result.save(run_dir / "edited.mp4")
        edited, side = written[0], written[1]
        heat = [(str(path), word) for path, word in zip(written[2:-1], result.heatmaps)]
        timings = result.params["timings"]
        summary = [_status(seen, settings, done=True),
                   f"\n{len(result.frames)} frames at {result.params['size'][0]}x{result.params['size'][1]}, "
                   + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
                   + f". Seed {settings.seed} (*Reuse this seed* puts it in Advanced to repeat this edit)."]
        summary += [f"\n*{note}*" for note in result.notes]
        # the result takes the preview's place (None for API clients; the page hides the box on success)
        yield "\n".join(summary), str(edited), str(side), heat, [str(p) for p in written], settings.seed, None

    return edit_video


# ----------------------------------------------------------------------------- the tab


def setting_parameters(handler) -> list[str]:
    """The handler's VideoSettings parameters in its signature's order: the order of the event's
    inputs (Gradio passes them by position), so no control can land in another setting."""
    names = [name for name in inspect.signature(handler).parameters if name in VideoSettings.specs()]
    assert sorted(names) == sorted(VideoSettings.specs()), "the handler must take every VideoSettings field"
    return names


def elem_id(name: str) -> str:
    """A setting's control's HTML id: ev-<field name with dashes>."""
    return "ev-" + name.replace("_", "-")


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    from pipelines.video import SUPPORTED

    with gr.Tab("Edit video", id="edit_video") as tab:
        gr.Markdown(
            "**ReAtCo**: say what the clip shows and what it should show, and box each object on a frame for a word "
            "of the edited prompt; **Edit** fine-tunes, inverts and edits the clip with each word held in its box.",
            elem_id="ev-intro")
        with gr.Row():
            with gr.Column(scale=1):
                model = model_menu(ctx, SUPPORTED, "Edit video", elem_id="ev-model")
                video = gr.File(label="Clip (mp4, webm, gif, mov, avi, mkv)", file_types=CLIP_TYPES, type="filepath",
                                height=140, elem_id="ev-video")
                source_prompt = gr.Textbox(label="Source prompt", placeholder="a red circle on a striped background",
                                           elem_id="ev-source-prompt")
                prompt = gr.Textbox(label="Edited prompt", placeholder="a blue square on a striped background",
                                    elem_id="ev-prompt")
                preserve_background = checkbox(VideoSettings, "preserve_background",
                                               label="Keep the rest unchanged (IRJS)", elem_id="ev-preserve-background")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="ev-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="ev-stop")
                stop_note = gr.Markdown(visible=False, elem_id="ev-stop-note")  # shown once Stop is pressed
                # the examples go here, under the buttons (filled below, once the settings exist)
                examples_slot = gr.Column()
                with gr.Accordion("Advanced (the paper's settings)", open=False, elem_id="ev-advanced") as advanced:
                    controls = _advanced_controls(list(adapter_choices(ctx)))
            with gr.Column(scale=1):
                frame = gr.Image(label="Frame (click two opposite corners to add a box)", type="pil", format="png",
                                 interactive=False, height=320, elem_id="ev-frame")
                with gr.Row():
                    frame_index = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="ev-frame-index")
                    word = gr.Dropdown(choices=[], value=None, label="Box for the word", allow_custom_value=False,
                                       elem_id="ev-word")
                box_note = gr.Markdown(elem_id="ev-box-note")
                boxes = gr.Dataframe(headers=BOX_HEADERS, datatype=["str"] + ["number"] * 5, type="array",
                                     row_count=1, column_count=len(BOX_HEADERS), interactive=True,
                                     label="Boxes (source-frame pixels; a word's boxes on several frames are "
                                           "keyframes, interpolated between; edit or delete rows freely)",
                                     elem_id="ev-boxes")
                clear = gr.Button("Clear the boxes", elem_id="ev-clear")
                corner = gr.State(None)
            with gr.Column(scale=1):
                # hidden except while an edit samples (and after a Stop), above where the result will appear
                preview = gr.Image(label="Preview (while editing)", type="pil", format="png", interactive=False,
                                   visible=False, height=180, elem_id="ev-preview")
                edited = gr.Video(label="Edited clip", interactive=False, height=320, elem_id="ev-edited")
                seed_row, seed_used, reuse = seed_used_row("ev")
                status = gr.Markdown(elem_id="ev-status")
                side = gr.Video(label="Source | edit", interactive=False, elem_id="ev-side")
                heat = gr.Gallery(label="Attention of each bound word", columns=2, elem_id="ev-attention")
                files = gr.File(label="Downloads (edited MP4, side-by-side MP4, heatmap MP4s, JSON)",
                                file_count="multiple", interactive=False, height=120, elem_id="ev-files")
        if EXAMPLE_CLIP.is_file():
            with examples_slot:
                gr.Examples(examples=EXAMPLES,
                            inputs=[video, source_prompt, prompt, boxes, preserve_background, controls["tune_steps"],
                                    controls["steps"]],
                            example_labels=EXAMPLE_LABELS,
                            label=f"Examples (built-in model; {EXAMPLE_TUNE_STEPS} fine-tune + {EXAMPLE_STEPS} steps, for a CPU)",
                            elem_id="ev-examples")

        handler = make_handler(ctx)
        controls["preserve_background"] = preserve_background
        inputs = [model, video, source_prompt, prompt, boxes, *(controls[name] for name in setting_parameters(handler))]
        # the preview last: the API's earlier outputs keep their places
        outputs = [status, edited, side, heat, files, seed_used, preview]
        edit = run.click(handler, inputs, outputs, api_name=TASK, **GPU_CONCURRENCY)
        clear_error_badges(edit, outputs)
        reveal_after_success(edit, seed_row)
        edit.success(lambda: gr.update(visible=False), None, preview, queue=False, api_visibility="private",
                     show_progress="hidden")
        # the seed box is in the closed Advanced section: open it, so that the change is seen
        reuse.click(lambda used, current: (current if used is None else used, gr.Accordion(open=True)),
                    [seed_used, controls["seed"]], [controls["seed"], advanced], api_visibility="private",
                    queue=False)
        stop.click(stop_handler(ctx, TASK, f"{TASK}_stop"), None, stop_note, api_name=f"{TASK}_stop", queue=False) \
            .then(lambda: gr.update(visible=True), None, stop_note, queue=False, api_visibility="private",
                  show_progress="hidden")

        show_frame, click_corner = make_viewer_handlers(ctx)
        clip_settings = [controls["frames"], controls["frame_stride"]]
        view_inputs = [video, frame_index, boxes, prompt, *clip_settings]
        view_outputs = [frame, frame_index, box_note]
        for trigger in (video.change, frame_index.release, boxes.change, controls["frames"].change,
                        controls["frame_stride"].change):
            trigger(show_frame, view_inputs, view_outputs, api_visibility="private", queue=False)
        video.change(lambda: None, None, corner, api_visibility="private", queue=False)  # a new clip: no pending corner
        frame.select(click_corner, [video, frame_index, boxes, prompt, word, corner, *clip_settings],
                     [boxes, frame, box_note, corner], api_visibility="private", queue=False)

        def words(text, current):
            choices = prompt_choices(text)
            return gr.update(choices=choices, value=current if current in choices else None)

        prompt.change(words, [prompt, word], word, api_visibility="private", queue=False)
        clear.click(lambda: ([], None), None, [boxes, corner], api_visibility="private", queue=False)
    return {"tab": tab, "video": video, "prompt": prompt, "boxes": boxes, "run": run}


def _advanced_controls(adapters: list[str]) -> dict:
    """One control per VideoSettings field but IRJS, made from the field (range, default, help);
    `adapters`: the motion-adapter menu's choices (`adapter_choices`)."""
    c = {}
    with gr.Row():
        c["frames"] = number(VideoSettings, "frames", label="Frames (0: every frame)", elem_id="ev-frames")
        c["frame_stride"] = number(VideoSettings, "frame_stride", label="Frame stride", elem_id="ev-frame-stride")
    with gr.Row():
        c["width"] = number(VideoSettings, "width", label="Width (0: the source's)", elem_id="ev-width")
        c["height"] = number(VideoSettings, "height", label="Height (0: the source's)", elem_id="ev-height")
    with gr.Row():
        c["window"] = number(VideoSettings, "window", label="Window (frames)", elem_id="ev-window")
        c["window_stride"] = number(VideoSettings, "window_stride", label="Window stride", elem_id="ev-window-stride")
    with gr.Row():
        c["steps"] = number(VideoSettings, "steps", elem_id="ev-steps")
        c["guidance"] = number(VideoSettings, "guidance", elem_id="ev-guidance")
        # no range on the control: resolve_seed says what is wrong in one sentence (-1 = random)
        c["seed"] = number(VideoSettings, "seed", minimum=None, maximum=None, label="Seed (-1 = random)",
                           elem_id="ev-seed")
    c["motion_adapter"] = gr.Dropdown(choices=adapters, value=NO_ADAPTER, label="Motion adapter (AnimateDiff, beyond "
                                      "the paper)", info="the server's motion adapters (--allow-motion-adapter); "
                                      "none: the paper's Tune-A-Video inflation", allow_custom_value=False,
                                      elem_id="ev-motion-adapter")
    with gr.Row():
        # its 0 is "no fine-tune", so its default (None) is an empty box, not UNSET's 0
        c["tune_steps"] = number(VideoSettings, "tune_steps", value=None, minimum=0,
                                 label=f"Fine-tune steps (empty: {VideoSettings.PAPER_TUNE_STEPS}, 0 with a motion "
                                       "adapter)", elem_id="ev-tune-steps")
        c["tune_lr"] = number(VideoSettings, "tune_lr", step=1e-6, label="Fine-tune learning rate",
                              elem_id="ev-tune-lr")
        c["tune_frames"] = number(VideoSettings, "tune_frames", label="Fine-tune frames (0: the clip, at most 16)",
                                  elem_id="ev-tune-frames")
    with gr.Row():
        c["mixed_precision"] = dropdown(VideoSettings, "mixed_precision", elem_id="ev-mixed-precision")
        c["checkpoint_every"] = number(VideoSettings, "checkpoint_every", label="Checkpoint every (steps)",
                                       elem_id="ev-checkpoint-every")
    with gr.Row():
        c["gradient_checkpointing"] = checkbox(VideoSettings, "gradient_checkpointing", elem_id="ev-gradient-checkpointing")
        c["per_frame_groupnorm"] = checkbox(VideoSettings, "per_frame_groupnorm", elem_id="ev-per-frame-groupnorm")
    with gr.Row():
        c["rad"] = checkbox(VideoSettings, "rad", elem_id="ev-rad")
        c["heatmaps"] = checkbox(VideoSettings, "heatmaps", elem_id="ev-heatmaps")
    c["rad_scale"] = number(VideoSettings, "rad_scale", label="RAD scale", elem_id="ev-rad-scale")
    c["rad_until"] = slider(VideoSettings, "rad_until", label="RAD fraction of the steps", elem_id="ev-rad-until")
    c["refine_iterations"] = slider(VideoSettings, "refine_iterations", label="Refinement iterations",
                                    elem_id="ev-refine-iterations")
    c["topk"] = slider(VideoSettings, "topk", label="Top-k", elem_id="ev-topk")
    c["temperature"] = number(VideoSettings, "temperature", label="Temperature", elem_id="ev-temperature")
    c["smoothing"] = number(VideoSettings, "smoothing", label="Smoothing (sigma)", elem_id="ev-smoothing")
    missing = set(ADVANCED) - set(c)
    assert not missing, missing  # a new VideoSettings field needs its control here
    return c
