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

from pipelines.eraser_settings import PAPER, EraserSettings
from pipelines.errors import UserInputError
from pipelines.seeds import resolve_seed
from ui.common import GPU_CONCURRENCY, AppContext, stop_handler, stoppable, user_errors_as_gradio
from ui.settings_controls import radio, slider

ORDER = 20  # position among the tabs
HISTORY_LIMIT = 20

MODE_CHOICES = [("SIP: re-paste the noised background (default)", "sip"), ("DIP: DDIM inversion", "dip")]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
# Offline examples: (world seed, object index) of shapes-world scenes shipped with their masks.
EXAMPLES = [(1090003, 0), (1090004, 1), (1090005, 0)]


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
    for note in notes:
        gr.Warning(note)


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
        steps: float = PAPER.steps,
        strength: float = EraserSettings.SIP_STRENGTH,
        guidance: float = PAPER.guidance,
        ss_steps: float = PAPER.ss_steps,
        ss_scale: float = PAPER.ss_scale,
        mode: str = PAPER.mode,
        num_images: float = PAPER.num_images,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Remove the painted (or sent) object.

        image: the editor value {"background": image, "layers": [stroke layers], "composite": ...};
        mask: optional mask image (white = remove), combined with the strokes.  seed -1 or
        randomize_seed=True draws a random seed; image i of num_images uses seed + i.  strength
        applies to SIP (DIP always starts from full noise).  Returns the (input, result) pair,
        every result, the dilated mask over the input, the seed used and the files (PNG with the
        parameters and a JSON sidecar per result).
        """
        from pipelines.eraser import erase as run_erase

        picture, painted = editor_image_and_mask(image, mask)
        if picture is None:
            raise UserInputError("Please upload an image first.")
        if painted is None:
            painted = np.zeros((picture.height, picture.width), bool)
        use_seed = resolve_seed(seed, randomize_seed)
        mode = (mode or PAPER.mode).lower() if isinstance(mode, str) else mode
        settings = PAPER.replace(
            steps=steps, strength=strength if mode == "sip" else None, guidance=guidance, ss_steps=ss_steps,
            ss_scale=ss_scale, mode=mode, num_images=num_images, grow=grow or 0,
        ).validated()  # every value checked before the model loads
        ctx.limits.check_settings(settings)
        progress(0, desc="Loading model")
        pipe = ctx.load(model)
        with stoppable(ctx, request, "erase", pipe):
            result = run_erase(pipe, picture, painted, settings, seed=use_seed)
        _notify(result.notes)
        run_dir = ctx.outputs.new_run_dir("erase")
        written = result.save(run_dir / "result.png")
        return (
            (result.input, result.image),
            [(image, f"seed {s}") for image, s in zip(result.images, result.seeds)],
            result.mask_overlay(),
            result.seed,
            [str(p) for p in written],
            result.images,
        )

    return erase


def make_preview(ctx: AppContext):
    """The dilated mask over the picture, updated while painting (no diffusion)."""

    def preview(model, image, mask, grow):
        from pipelines.eraser import preview as run_preview

        try:
            picture, painted = editor_image_and_mask(image, mask)
            if picture is None or painted is None or not painted.any():
                return None
            overlay, _ = run_preview(ctx.load(model), picture, painted, grow=int(grow or 0))
            return overlay
        except UserInputError:
            return None

    return preview


def _as_editor(image) -> dict:
    return {"background": image, "layers": [], "composite": image}


def _history_text(history: list) -> str:
    return f"History: {len(history)} earlier input(s)." if history else "History: empty."


def use_result(results, selected, image, history):
    """Make the chosen result the new input, remembering the current one."""
    if not results:
        raise gr.Error("There is no result yet; press Remove first.")
    chosen = results[min(int(selected or 0), len(results) - 1)]
    current, _ = editor_image_and_mask(image, None)
    history = list(history or [])
    if current is not None:
        history = (history + [current])[-HISTORY_LIMIT:]
    return _as_editor(chosen), None, history, _history_text(history)


def step_back(history):
    """Return to the input before the last "use result as new input"."""
    history = list(history or [])
    if not history:
        raise gr.Error("There is no earlier input to go back to.")
    previous = history.pop()
    return _as_editor(previous), None, history, _history_text(history)


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Remove object", id="eraser"):
        gr.Markdown(
            "Upload a photo, **paint over the object** with the brush and press **Remove**: the "
            "hole is rebuilt from the background (Attentive Eraser: the attention of the masked "
            "region is redirected to the background; no prompt needed). Pixels away from the "
            "mask stay exactly as they were."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=ctx.model_choices, value=ctx.default_model, label="Model",
                                    info="SD 1.x/2.x or SDXL models (paper: SDXL base 1.0, SD 2.1 base)",
                                    elem_id="er-model")
                editor = gr.ImageEditor(
                    label="Image: paint over the object to remove",
                    type="pil",
                    image_mode="RGBA",  # the stroke layers keep their alpha (= the mask)
                    sources=("upload", "clipboard"),
                    brush=gr.Brush(colors=[("#ff3030", 0.7)], color_mode="fixed", default_size=24),
                    eraser=gr.Eraser(default_size=24),
                    layers=False,
                    transforms=(),
                    format="png",
                    height=420,
                    elem_id="er-editor",
                )
                mask = gr.Image(label="Mask (optional; white = remove; other tabs can send one)",
                                type="pil", image_mode="L", sources=("upload", "clipboard"),
                                format="png", height=160, elem_id="er-mask")
                grow = slider(EraserSettings, "grow", minimum=-64, maximum=64, info=None,
                              label="Grow (+) or shrink (-) the mask, pixels", elem_id="er-grow")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="er-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="er-randomize")
                with gr.Accordion("Advanced", open=False, elem_id="er-advanced"):
                    # ranges, steps and defaults come from EraserSettings (the paper's)
                    steps = slider(EraserSettings, "steps", elem_id="er-steps")
                    strength = slider(EraserSettings, "strength", value=EraserSettings.SIP_STRENGTH,
                                      label="Strength (SIP)", elem_id="er-strength")
                    guidance = slider(EraserSettings, "guidance", label="Removal guidance (SARG) scale",
                                      elem_id="er-guidance")
                    ss_steps = slider(EraserSettings, "ss_steps", maximum=50,
                                      label="Similarity suppression steps (0..N; -1 = off)", elem_id="er-ss-steps")
                    ss_scale = slider(EraserSettings, "ss_scale", label="Similarity suppression scale",
                                      elem_id="er-ss-scale")
                    mode = radio(EraserSettings, "mode", MODE_CHOICES, label="Latent process", elem_id="er-mode")
                    num_images = slider(EraserSettings, "num_images", maximum=4,
                                        label="Results (seeds seed, seed+1, ...)", info=None, elem_id="er-num-images")
                with gr.Row():
                    run = gr.Button("Remove", variant="primary", elem_id="er-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="er-stop")
                stop_note = gr.Markdown(elem_id="er-stop-note")
            with gr.Column(scale=1):
                compare = gr.ImageSlider(label="Before / after", type="pil", format="png", interactive=False,
                                         elem_id="er-compare")
                gallery = gr.Gallery(label="Results (click one to choose it)", columns=4, format="png",
                                     height=160, elem_id="er-results")
                mask_preview = gr.Image(label="Mask used (dilated), over the image", type="pil", format="png",
                                        interactive=False, height=200, elem_id="er-mask-preview")
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="er-seed-used")
                    reuse = gr.Button("Reuse this seed", elem_id="er-reuse-seed")
                files = gr.File(label="Downloads (PNG with parameters, JSON)", file_count="multiple",
                                interactive=False, elem_id="er-files")
                with gr.Row():
                    use = gr.Button("Use result as new input", elem_id="er-use-result")
                    back = gr.Button("Step back", elem_id="er-step-back")
                history_text = gr.Markdown(_history_text([]), elem_id="er-history")

        gr.Examples(
            examples=[[str(EXAMPLES_DIR / f"scene_{seed}.png"), str(EXAMPLES_DIR / f"scene_{seed}_mask{index}.png")]
                      for seed, index in EXAMPLES],
            inputs=[editor, mask],
            label="Examples (shapes-world scenes with the object's mask; fast with the built-in model)",
            elem_id="er-examples",
        )

        results = gr.State([])
        selected = gr.State(0)
        history = gr.State([])

        inputs = [model, editor, mask, grow, seed, randomize_seed, steps, strength, guidance,
                  ss_steps, ss_scale, mode, num_images]
        outputs = [compare, gallery, mask_preview, seed_used, files, results]
        run.click(make_handler(ctx), inputs, outputs, api_name="erase", **GPU_CONCURRENCY).then(
            lambda: 0, None, selected, api_visibility="private", queue=False)

        stop.click(stop_handler(ctx, "erase", "erase_stop"), None, stop_note, api_name="erase_stop", queue=False)

        preview = make_preview(ctx)
        preview_inputs = [model, editor, mask, grow]
        for trigger in (editor.change, mask.change, grow.release):
            trigger(preview, preview_inputs, mask_preview, api_visibility="private",
                    trigger_mode="always_last", show_progress="hidden")

        def choose(event: gr.SelectData):
            return event.index

        gallery.select(choose, None, selected, api_visibility="private", queue=False)
        use.click(use_result, [results, selected, editor, history], [editor, mask, history, history_text],
                  api_visibility="private", queue=False)
        back.click(step_back, [history], [editor, mask, history, history_text],
                   api_visibility="private", queue=False)
        reuse.click(lambda used, current: (current if used is None else used, False),
                    [seed_used, seed], [seed, randomize_seed], api_visibility="private", queue=False)
    return {"image": editor, "mask": mask, "model": model, "seed": seed, "result": compare}
