"""The "Remove object" tab: paint over an object, press Remove (Attentive Eraser).

Components other tabs may set (returned by `build_tab`, e.g. the Segment tab sends its result):

- ``tabs["eraser"]["image"]``: the `gr.ImageEditor`.  Set it to an image (PIL, numpy uint8,
  or a file path) to replace the picture, or to an editor value
  ``{"background": image, "layers": [RGBA stroke layers], "composite": image}``.
- ``tabs["eraser"]["mask"]``: a `gr.Image` (``type="pil"``, mode "L") holding an object mask
  (white or any non-zero value = remove; any size, resized to the image).  It is combined with the
  brush strokes (union).

The tab's id is "eraser" (for ``gr.Tabs(selected=...)``).  The event is also the API endpoint
``/erase`` (see `make_handler`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.eraser import SUPPORTED, describe_work, grow_mask
from pipelines.eraser_settings import MAX_GROW, EraserSettings
from pipelines.errors import UserInputError
from pipelines.seeds import resolve_seed
from pipelines.viz import overlay_mask
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    details,
    model_menu,
    reveal_after_success,
    seed_used_row,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
)
from ui.settings_controls import follow_model_defaults, model_info, radio, slider, textbox

ORDER = 20  # position among the tabs
HISTORY_LIMIT = 20

MODE_CHOICES = [("SIP: re-paste the noised background (default)", "sip"), ("DIP: DDIM inversion", "dip")]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
# Offline examples: (world seed, object index) of shapes-world scenes shipped with their masks.
EXAMPLES = [(1090003, 0), (1090004, 1), (1090007, 1)]

#: The brush's default size (Gradio's brush radius) as a fraction of the image's smaller side.
BRUSH_FRACTION = 1 / 12
#: The brush size before any image is loaded (right for the 128 px examples).
DEFAULT_BRUSH = 11
#: The before/after handle opens this fraction of the image's width left of the edited region,
#: so that the whole edit shows "after".
COMPARE_MARGIN = 0.03

#: The tab's own CSS (app.py adds it to the page): the editor, result and examples fit above the
#: fold at 1400x900; example thumbnails small.
CSS = """
#er-examples thead { display: none; }
#er-examples td { padding: 2px 8px; }
#er-examples td .container { width: 60px; height: 60px; }
#er-examples td img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


def editor_image_and_mask(editor, mask) -> tuple[Image.Image | None, np.ndarray | None]:
    """The picture and the object mask (bool, or None if nothing was painted or sent).

    editor: the ImageEditor value (dict with background, layers, composite) or a plain image;
    mask: an optional mask image.  The mask is every painted pixel of every layer, plus the
    non-zero pixels of `mask` (resized to the picture).
    """
    from pipelines.io import load_mask

    layers = []
    if isinstance(editor, dict):
        image = editor.get("background")
        if image is None:
            image = editor.get("composite")
        layers = [layer for layer in editor.get("layers") or [] if layer is not None]
    else:
        image = editor
    if isinstance(image, str):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image is None:
        return None, None
    union = None
    for layer in layers:
        if isinstance(layer, str):
            layer = Image.open(layer)
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        if layer.mode != "RGBA":
            layer = layer.convert("RGBA")
        painted, _ = load_mask(layer.getchannel("A"), size=image.size, threshold=0)
        union = painted if union is None else union | painted
    if mask is not None:
        sent, _ = load_mask(mask, size=image.size)
        union = sent if union is None else union | sent
    return image, union


def _notify(notes: list[str]) -> None:
    """Warn about what the user can act on (empty or resized mask, ...); the processed region is
    told under "Details" (`pipelines.eraser.describe_work`)."""
    for note in notes:
        gr.Warning(note)


def brush_size(image_size: tuple[int, int]) -> int:
    """The default brush size (Gradio's brush radius, image pixels) for an image of this size."""
    return max(2, round(min(image_size) * BRUSH_FRACTION))


def _brush(size: int = DEFAULT_BRUSH) -> gr.Brush:
    return gr.Brush(colors=[("#ff3030", 0.7)], color_mode="fixed", default_size=size)


def compare_position(changed: np.ndarray) -> float:
    """Where the before/after handle opens (percent of the width): just left of the region the
    edit may have changed, so the whole edit shows the result (50 when nothing changed)."""
    columns = np.flatnonzero(np.asarray(changed).any(axis=0))
    if columns.size == 0:
        return 50.0
    width = changed.shape[1]
    left = columns[0] - max(1.0, COMPARE_MARGIN * width)
    return round(max(0.0, 100.0 * left / width), 1)




def _control_value(settings: EraserSettings, name: str):
    """What the tab's control shows for a field: the strength slider is SIP's, so an unset
    strength shows SIP's default."""
    if name == "strength" and settings.strength is None:
        return EraserSettings.SIP_STRENGTH
    return getattr(settings, name)


def make_handler(ctx: AppContext):
    """The Remove event, also the `/erase` API endpoint."""

    @user_errors_as_gradio
    def erase(
        model: str,
        image,
        mask=None,
        grow: float = 0,
        seed: float | None = 0,
        randomize_seed: bool = False,
        steps: float | None = None,
        strength: float | None = None,
        guidance: float | None = None,
        ss_steps: float | None = None,
        ss_scale: float | None = None,
        mode: str | None = None,
        num_images: float | None = None,
        fill_prompt: str | None = None,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Remove the painted (or sent) object.

        image: the editor value {"background": image, "layers": [stroke layers], "composite": ...};
        mask: optional mask image (white = remove), combined with the strokes.  seed -1 or
        randomize_seed=True draws a random seed; image i of num_images uses seed + i.  strength
        applies to SIP (DIP always starts from full noise).  fill_prompt: what should fill the hole
        (ours; empty: the paper's method, which uses no prompt).  A setting left out (None) is the
        model's default (`EraserSettings.for_model`: the paper's, or the values measured for the
        built-in model).  Returns the (input, result) pair,
        every result, the dilated mask over the input, the seed used and the files (PNG with the
        parameters and a JSON sidecar per result); for the page (states, not in the API): the
        results, the Details text and where the before/after handle opens (`compare_position`).
        """
        from pipelines.eraser import erase as run_erase

        picture, painted = editor_image_and_mask(image, mask)
        if picture is None:
            raise UserInputError("Please upload an image first.")
        if painted is None:
            painted = np.zeros((picture.height, picture.width), bool)
        use_seed = resolve_seed(seed, randomize_seed)
        base = EraserSettings.for_model(model)
        mode = base.mode if mode is None else (mode.lower() if isinstance(mode, str) else mode)
        given = dict(steps=steps, strength=strength if mode == "sip" else None, guidance=guidance, ss_steps=ss_steps,
                     ss_scale=ss_scale, num_images=num_images, fill_prompt=fill_prompt)
        settings = base.replace(mode=mode, grow=grow or 0, **{k: v for k, v in given.items() if v is not None})
        if mode != "sip":
            settings = settings.replace(strength=None)  # DIP starts from full noise
        settings = settings.validated()  # every value checked before the model loads
        ctx.limits.check_settings(settings)
        progress(0, desc="Loading model")
        pipe = ctx.load(model)
        with stoppable(ctx, request, "erase", pipe):
            result = run_erase(pipe, picture, painted, settings, seed=use_seed)
        _notify(result.notes)
        run_dir = ctx.new_run_dir("erase", request, about=f"{settings.mode.upper()}, {settings.steps} steps, seed {use_seed}")
        written = result.save(run_dir / "result.png")
        return (
            (result.input, result.image),
            [(image, f"seed {s}") for image, s in zip(result.images, result.seeds)],
            result.mask_overlay(),
            result.seed,
            [str(p) for p in written],
            result.images,
            describe_work(result.params, result.input.size),
            compare_position(result.changed),
        )

    return erase


def grown_mask_overlay(image, mask, grow):
    """The painted (or sent) mask, grown or shrunk as the pipeline will (`grow_mask`), over the
    picture: cheap, no model (the mask the model used, slightly softened, replaces it after a run)."""
    try:
        picture, painted = editor_image_and_mask(image, mask)
    except UserInputError:
        return None
    if picture is None or painted is None or not painted.any():
        return None
    pixels = int(min(max(float(grow or 0), -MAX_GROW), MAX_GROW))
    return overlay_mask(picture, grow_mask(painted, pixels))


def _sized_brush(picture: Image.Image):
    """An editor update whose brush and eraser fit `picture` (`brush_size`)."""
    radius = brush_size(picture.size)
    return gr.ImageEditor(brush=_brush(radius), eraser=gr.Eraser(default_size=radius))


def editor_changed(image, mask, grow, brush_for):
    """After a stroke or a new picture: the mask preview, and for a picture of another size than
    the brush was sized for, a brush (and eraser) sized to it; the size the brush is now for."""
    picture, _ = editor_image_and_mask(image, None) if image is not None else (None, None)
    size = list(picture.size) if picture is not None else None
    if size is None or size == brush_for:
        return grown_mask_overlay(image, mask, grow), gr.skip(), brush_for
    return grown_mask_overlay(image, mask, grow), _sized_brush(picture), size


def example_files(index: int) -> tuple[Path, Path]:
    """The picture and the mask of example `index` (of `EXAMPLES`)."""
    seed, obj = EXAMPLES[index]
    return EXAMPLES_DIR / f"scene_{seed}.png", EXAMPLES_DIR / f"scene_{seed}_mask{obj}.png"


def _example_picture(mask) -> Image.Image | None:
    """The example picture that `mask` is the mask of, or None."""
    if not isinstance(mask, Image.Image):
        return None
    array = np.asarray(mask.convert("L"))
    for index in range(len(EXAMPLES)):
        image_path, mask_path = example_files(index)
        if np.array_equal(array, np.asarray(Image.open(mask_path).convert("L"))):
            return Image.open(image_path)
    return None


def mask_or_grow_changed(image, mask, grow):
    """A new mask or growth: the preview.  While the editor has no picture yet (an example or the
    Segment tab fills the mask first; the editor loads its picture a moment later, without a
    change event), an example's mask is shown over its picture and any other preview is cleared."""
    picture, _ = editor_image_and_mask(image, None) if image is not None else (None, None)
    if picture is None:
        picture = _example_picture(mask)
        return None if picture is None else grown_mask_overlay(picture, mask, grow)
    return grown_mask_overlay(image, mask, grow)


def example_loaded(sample):
    """After an example's values were set (which gives the editor its first brush again): a brush
    sized to the example's picture, and that size."""
    index = sample[0] if isinstance(sample, (tuple, list)) else sample
    if not isinstance(index, int) or not 0 <= index < len(EXAMPLES):
        return gr.skip(), gr.skip()
    picture = Image.open(example_files(index)[0])
    return _sized_brush(picture), list(picture.size)


def _as_editor(image) -> dict:
    return {"background": image, "layers": [], "composite": image}


def _history_text(history: list) -> str:
    return f"History: {len(history)} earlier input(s)." if history else "History: empty."


def use_result(results, selected, image, history):
    """Make the chosen result the new input, remembering the current one; no mask, so no preview
    (the editor sends no change event for a picture set this way)."""
    if not results:
        raise gr.Error("There is no result yet; press Remove first.")
    chosen = results[min(int(selected or 0), len(results) - 1)]
    current, _ = editor_image_and_mask(image, None)
    history = list(history or [])
    if current is not None:
        history = (history + [current])[-HISTORY_LIMIT:]
    return _as_editor(chosen), None, history, _history_text(history), None


def step_back(history):
    """Return to the input before the last "use result as new input"."""
    history = list(history or [])
    if not history:
        raise gr.Error("There is no earlier input to go back to.")
    previous = history.pop()
    return _as_editor(previous), None, history, _history_text(history), None


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Remove object", id="eraser"):
        gr.Markdown("**Paint over an object** and press **Remove**: it is filled in from the background "
                    "(Attentive Eraser, no prompt needed); the rest of the image stays as it was.")
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    label="Image: paint over the object to remove",
                    type="pil",
                    image_mode="RGBA",  # the stroke layers keep their alpha (= the mask)
                    sources=("upload", "clipboard"),
                    # sized to each new picture (about 1/12 of its smaller side, `editor_changed`)
                    brush=_brush(DEFAULT_BRUSH),
                    eraser=gr.Eraser(default_size=DEFAULT_BRUSH),
                    layers=False,
                    transforms=(),
                    format="png",
                    height=380,
                    elem_id="er-editor",
                )
                with gr.Row():
                    run = gr.Button("Remove", variant="primary", elem_id="er-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="er-stop")
                stop_note = gr.Markdown(elem_id="er-stop-note")
                examples_slot = gr.Column()  # gr.Examples goes here once the mask input exists
                grow = slider(EraserSettings, "grow", minimum=-64, maximum=64, info=None,
                              label="Grow (+) or shrink (-) the mask, pixels", elem_id="er-grow")
                mask = gr.Image(label="Mask (optional; white = remove; other tabs can send one)",
                                type="pil", image_mode="L", sources=("upload", "clipboard"),
                                format="png", height=160, elem_id="er-mask")
                model = model_menu(ctx, SUPPORTED, "Remove object", elem_id="er-model",
                                   info="SD 1.x/2.x or SDXL models (paper: SDXL base 1.0, SD 2.1 base)")
                fill_prompt = textbox(EraserSettings, "fill_prompt", value=EraserSettings.for_model(model.value).fill_prompt,
                                      label="Fill the hole with (optional prompt)",
                                      placeholder="empty: the paper's method (no prompt)",
                                      info=model_info(EraserSettings, "fill_prompt", model.value), elem_id="er-fill")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="er-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="er-randomize")
                with gr.Accordion("Advanced", open=False, elem_id="er-advanced"):
                    # ranges, steps and defaults come from EraserSettings: the paper's, or the
                    # menu model's measured ones (`follow_model_defaults` below)
                    shown = EraserSettings.for_model(model.value)
                    steps = slider(EraserSettings, "steps", value=shown.steps, elem_id="er-steps")
                    strength = slider(EraserSettings, "strength", value=_control_value(shown, "strength"),
                                      info=model_info(EraserSettings, "strength", model.value),
                                      label="Strength (SIP)", elem_id="er-strength")
                    guidance = slider(EraserSettings, "guidance", label="Removal guidance (SARG) scale",
                                      value=shown.guidance, info=model_info(EraserSettings, "guidance", model.value),
                                      elem_id="er-guidance")
                    ss_steps = slider(EraserSettings, "ss_steps", maximum=50, value=shown.ss_steps,
                                      label="Similarity suppression steps (0..N; -1 = off)", elem_id="er-ss-steps")
                    ss_scale = slider(EraserSettings, "ss_scale", value=shown.ss_scale, label="Similarity suppression scale",
                                      elem_id="er-ss-scale")
                    mode = radio(EraserSettings, "mode", MODE_CHOICES, label="Latent process", elem_id="er-mode")
                    num_images = slider(EraserSettings, "num_images", maximum=4, value=shown.num_images,
                                        label="Results (seeds seed, seed+1, ...)", info=None, elem_id="er-num-images")
            with gr.Column(scale=1):
                with gr.Column(elem_id="er-result"):  # the result, as the app-wide browser checks find it
                    compare = gr.ImageSlider(label="Result (drag the handle to compare with the original)",
                                             type="pil", format="png", interactive=False, height=380, max_height=380,
                                             elem_classes=PIXEL_RESULT, elem_id="er-compare")
                gallery = gr.Gallery(label="Results (click one to choose it)", columns=4, fit_columns=False,
                                     format="png", height=170, object_fit="contain", elem_classes=PIXEL_RESULT,
                                     elem_id="er-results")
                mask_preview = gr.Image(label="Mask over the image (grown or shrunk; after Remove: the mask used)",
                                        type="pil", format="png", interactive=False, height=200,
                                        elem_classes=PIXEL_RESULT, elem_id="er-mask-preview")
                seed_row, seed_used, reuse = seed_used_row("er")
                files = gr.File(label="Downloads (PNG with parameters, JSON)", file_count="multiple",
                                interactive=False, elem_id="er-files")
                with gr.Row():
                    use = gr.Button("Use result as new input", elem_id="er-use-result")
                    back = gr.Button("Step back", elem_id="er-step-back")
                history_text = gr.Markdown(_history_text([]), elem_id="er-history")
                with details(elem_id="er-details"):
                    run_details = gr.Markdown("Press Remove to see what was processed.", elem_id="er-details-text")

        with examples_slot:
            examples = gr.Examples(
                examples=[[str(path) for path in example_files(i)] for i in range(len(EXAMPLES))],
                inputs=[editor, mask],
                label="Examples (shapes-world scenes with the object's mask)",
                elem_id="er-examples",
            )

        results = gr.State([])
        selected = gr.State(0)
        history = gr.State([])
        details_state = gr.State("")
        handle_at = gr.State(50.0)  # where the before/after handle opens after a run
        brush_for = gr.State(None)  # the picture size the brush was sized for

        follow_model_defaults(model, EraserSettings, {"steps": steps, "strength": strength, "guidance": guidance,
                                                      "ss_steps": ss_steps, "ss_scale": ss_scale,
                                                      "num_images": num_images, "fill_prompt": fill_prompt},
                              ctx.model_choices, value_of=_control_value)
        inputs = [model, editor, mask, grow, seed, randomize_seed, steps, strength, guidance,
                  ss_steps, ss_scale, mode, num_images, fill_prompt]
        outputs = [compare, gallery, mask_preview, seed_used, files, results, details_state, handle_at]
        removal = run.click(make_handler(ctx), inputs, outputs, api_name="erase", **GPU_CONCURRENCY)
        removal.then(lambda: 0, None, selected, api_visibility="private", queue=False)
        # the handle opens just left of the edit, so that the whole edited region shows "after"
        removal.success(lambda text, position: (text, gr.ImageSlider(slider_position=position)),
                        [details_state, handle_at], [run_details, compare], api_visibility="private", queue=False,
                        show_progress="hidden")
        reveal_after_success(removal, seed_row)
        clear_error_badges(removal, [compare, gallery, mask_preview, seed_used, files])

        stop.click(stop_handler(ctx, "erase", "erase_stop"), None, stop_note, api_name="erase_stop", queue=False)

        # the grown mask over the picture at once, no model (queue=False); a new picture also
        # resizes the brush
        editor.change(editor_changed, [editor, mask, grow, brush_for], [mask_preview, editor, brush_for],
                      api_visibility="private", queue=False, trigger_mode="always_last", show_progress="hidden")
        editor.upload(editor_changed, [editor, mask, grow, brush_for], [mask_preview, editor, brush_for],
                      api_visibility="private", queue=False, show_progress="hidden")
        for trigger in (mask.change, grow.change):
            trigger(mask_or_grow_changed, [editor, mask, grow], mask_preview, api_visibility="private", queue=False,
                    trigger_mode="always_last", show_progress="hidden")
        # after the example's values (which reset the editor's brush to its first size)
        examples.load_input_event.then(example_loaded, examples.dataset, [editor, brush_for],
                                       api_visibility="private", queue=False, show_progress="hidden")

        def choose(event: gr.SelectData):
            return event.index

        gallery.select(choose, None, selected, api_visibility="private", queue=False)
        for button, handler, handler_inputs in ((use, use_result, [results, selected, editor, history]),
                                                (back, step_back, [history])):
            event = button.click(handler, handler_inputs, [editor, mask, history, history_text, mask_preview],
                                 api_visibility="private", queue=False)
            clear_error_badges(event, [editor, mask, history_text, mask_preview])
        reuse.click(lambda used, current: (current if used is None else used, False),
                    [seed_used, seed], [seed, randomize_seed], api_visibility="private", queue=False)
    return {"image": editor, "mask": mask, "model": model, "seed": seed, "result": compare}
