"""The "Segment by text" tab: an image or a video + an expression -> heatmap, mask, per-token maps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.grounding_settings import OTSU, GroundingSettings
from pipelines.seeds import resolve_seed
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    denoiser_progress,
    details,
    is_shapes_model,
    model_menu,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
    zip_files,
)
from ui.settings_controls import UNSET, checkbox, follow_model_defaults, model_info, number, radio, slider, unset

ORDER = 30  # position among the tabs

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
# Offline examples: shapes-world scenes (pipelines/builtin/world.py) in the built-in model's vocabulary.
EXAMPLES = [
    [str(EXAMPLES_DIR / "scene_1090003.png"), "the blue circle"],
    [str(EXAMPLES_DIR / "scene_1090004.png"), "the purple square"],
    [str(EXAMPLES_DIR / "scene_1090005.png"), "the red triangle"],
]
NOISE_MAX = 0.95  # the noise slider's top (the settings accept sigma up to 0.99)
THRESHOLD_MAX = 0.95  # the threshold slider's top; 0 on the slider means Otsu
#: The hand-off to Remove object asks first when the mask covers more than this share of the image
LARGE_MASK = 0.5
REMOVE_LABEL, SEND_ANYWAY = "Remove this object", "Send anyway"
#: What to find, as a placeholder: words the built-in shapes world knows, or a real model's
SHAPES_PLACEHOLDER, REAL_PLACEHOLDER = "the blue circle", "the dog on the left"
#: Page style for this tab: compact example rows (small thumbnails) so that they open above the fold
CSS = """
#seg-examples td { padding: 2px 8px; }
#seg-examples td.image .container { width: 36px; height: 36px; }
#seg-examples td.image img { image-rendering: pixelated; }
"""
# The tab sets size, sigma (and from it the UNet timestep), gas, norm, magnets, threshold, refine
# and seed; the other fields keep their GroundingSettings defaults (layer choice, the sink
# criterion, SAM2 and video batching are CLI and Python settings).


def unet_timestep(sigma: float) -> int:
    """The UNet timestep of the tab's one noise slider: sigma x 1000 (the defaults agree: 0.3, 300)."""
    return int(round(float(sigma) * 1000))


def control_value(settings: GroundingSettings, name: str):
    """What the tab's control shows for a field (the threshold slider's 0 is Otsu)."""
    value = getattr(settings, name)
    return 0 if name == "threshold" and value == OTSU else value


def tab_settings(model, size=UNSET, noise=None, gas=None, norm=None, magnets=None, threshold=None, refine=None,
                 seed=None) -> GroundingSettings:
    """The validated settings of the tab's controls for `model` (size 0: the model's; threshold 0:
    Otsu; seed -1: random; None: the model's default, `GroundingSettings.for_model`)."""
    base = GroundingSettings.for_model(model)
    given = {name: value for name, value in dict(sigma=noise, gas=gas, norm=norm, magnets=magnets, refine=refine).items()
             if value is not None}
    if threshold is not None:
        given["threshold"] = threshold or OTSU
    settings = base.replace(size=unset(size), seed=resolve_seed(base.seed if seed is None else seed),
                            **given).validated()
    return settings.replace(timestep=unet_timestep(settings.sigma))


def check_video_side(ctx: AppContext, video) -> None:
    """The video's frame size within the server's --max-image-side (read from its header)."""
    from pipelines.errors import UserInputError

    try:
        import imageio.v3 as iio

        width, height = iio.immeta(video).get("size") or (0, 0)
    except Exception:  # noqa: BLE001 (unreadable: read_video says so in one sentence)
        return
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
        raise UserInputError("The video's frame size cannot be read; it may be damaged.")
    ctx.limits.check_image_side(int(width), int(height), "video's frame")


def percent(share: float) -> str:
    """A share of the image as people say it: "12 %", "0.4 %"."""
    share = 100 * float(share)
    return f"{share:.0f} %" if share >= 1 or share == 0 else f"{share:.1f} %"


def diagnostics(params: dict, magnets: list[str] | None = None, sinks: list[str] | None = None) -> str:
    """The run's details (the Details section): sinks, the prompt as the model read it and the
    words appended to it, the working size."""
    text = ""
    if sinks is not None:
        text += f"Sinks (tokens dropped as global attention sinks): {', '.join(sinks) or 'none'}. "
    text += f"Prompt read by the model: \"{params.get('prompt', '')}\""
    if magnets:
        text += f" (magnet words appended to soak up the background: {', '.join(magnets)})"
    text += "."
    size = params.get("working_size")
    if size:
        text += f" Working size {' × '.join(str(side) for side in size)} px."
    return text


def headline(summary: str | None) -> str:
    """What the tab shows in plain view of a run's summary: its first paragraph."""
    return (summary or "").split("\n\n", 1)[0]


def placeholder(model: str | None) -> str:
    """The expression box's placeholder for `model`."""
    return SHAPES_PLACEHOLDER if is_shapes_model(model) else REAL_PLACEHOLDER


def fingerprint(image) -> str | None:
    """A short digest of an image's pixels and size (None for no image)."""
    if image is None:
        return None
    picture = image.convert("RGB")
    digest = hashlib.sha1(np.asarray(picture).tobytes())
    digest.update(repr(picture.size).encode())
    return digest.hexdigest()


def hand_off_check(image, mask, source: str | None, confirmed: bool) -> tuple[str, str, float]:
    """Whether "Remove this object" may send `mask` with `image`: ("send" | "ask" | "refuse",
    the sentence to show, the mask's share of the image).  `source`: the fingerprint of the image
    the mask was made from (None: a video's first frame or nothing yet); `confirmed`: the person
    already pressed once for this mask (a mask over LARGE_MASK of the image asks first)."""
    if image is None or mask is None:
        return "refuse", "Segment an image first; then its mask can be sent to Remove object.", 0.0
    if source is None or source != fingerprint(image):
        return ("refuse", "This mask was not made from the image shown (the image changed, or the mask is a "
                "video's first frame): press Segment, then send it.", 0.0)
    binary = np.asarray(mask.convert("L")) > 127
    share = float(binary.mean())
    if not binary.any():
        return ("refuse", "The mask is empty, so there is nothing to remove: try another expression or a lower "
                "threshold (Settings).", share)
    if share > LARGE_MASK and not confirmed:
        return ("ask", f"This mask covers {percent(share)} of the image: Remove object would repaint most of the "
                "picture, background included. Check the mask; press Send anyway to send it anyway.", share)
    return ("send", f"Image and mask ({percent(share)} of the image) sent to Remove object: the mask is in its "
            "Mask box (white = removed); check it and press Remove there.", share)


def make_handler(ctx: AppContext):
    """The event handler, also exposed as the `/segment` API endpoint."""

    @user_errors_as_gradio
    def segment(
        model: str,
        image,
        video,
        expression: str,
        size: float | None = UNSET,
        noise: float | None = None,
        gas: str | None = None,
        norm: str | None = None,
        magnets: float | None = None,
        threshold: float | None = None,
        refine: bool | None = None,
        seed: float | None = None,
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Segment the object the expression names in the image (or in every video frame).

        size 0 uses the model's working size; noise is sigma for FLUX/SD3 (0-1) and is mapped to
        timestep noise*1000 on SD UNets; threshold 0 means Otsu; seed -1 draws a random one; a
        setting left out (None) is the model's default (the paper's, or the values measured for
        the built-in model: `GroundingSettings.for_model`).
        Returns the heatmap overlay, the mask, the per-token maps, the overlay video (video
        input), the files and a summary: its first paragraph says what was found (the mask's
        share of the image), the next one the diagnostics (threshold, attention sinks, the
        prompt as the model read it with its appended magnet words, the working size).
        """
        from pipelines.errors import UserInputError
        from pipelines.grounding import segment_image, segment_video
        from pipelines.io import save_image

        if image is None and not video:
            raise UserInputError("Please upload an image or a video.")
        settings = tab_settings(model, size, noise, gas, norm, magnets, threshold, refine, seed)  # before loading
        if video:
            check_video_side(ctx, video)
        progress(0, desc="Loading the model")
        pipe = ctx.load(model)
        if video:
            def frames(run, _step):
                return f"Segmenting the video: {(run + 1) * settings.batch_frames} frames read"

            with stoppable(ctx, request, "segment", pipe), denoiser_progress(pipe, progress, frames):
                result = segment_video(pipe, video, expression, settings)
            run_dir = ctx.new_run_dir("segment", request, about=f"{expression} (video)")
            written = result.save(run_dir / "mask.mp4")
            first = result.overlays()[0]
            mask = Image.fromarray(np.uint8(result.masks[0]) * 255)
            summary = f"{len(result.masks)} frames; mask video and overlay video in the downloads."
            summary += "\n\n" + diagnostics(result.params)
            if "stopped_at_frame" in result.params:
                summary = (f"Stopped at step {result.params['stopped_at_frame']} of {result.params['frames_read']} "
                           f"(frames): the masks of the first {len(result.masks)} frames are in the downloads.")
                summary += "\n\n" + diagnostics(result.params)
            return first, mask, [], str(written[1]), [str(p) for p in written], summary
        with (stoppable(ctx, request, "segment", pipe),
              denoiser_progress(pipe, progress, lambda *_: "Reading the attention: one noisy pass", runs=1)):
            result = segment_image(pipe, image, expression, settings)
        run_dir = ctx.new_run_dir("segment", request, about=expression)
        written = result.save(run_dir / "mask.png", heatmap=run_dir / "heatmap.png")
        token_files = [save_image(picture, run_dir / "tokens" / f"{i:02d}.png", None)[0]  # atomic, no sidecar
                       for i, (picture, _) in enumerate(result.gallery())]
        files = [str(p) for p in written]
        if token_files:
            files.append(str(zip_files(token_files, run_dir / "token_maps.zip")))
        magnets = [text for text, role in result.tokens if role == "magnet"]
        summary = (f"Mask: {percent(result.mask.mean())} of the image.\n\n"
                   f"Threshold {result.threshold:.2f}{' (Otsu)' if settings.threshold == OTSU else ''}. "
                   + diagnostics(result.params, magnets, result.sinks))
        mask = Image.fromarray(np.uint8(result.mask) * 255)
        return result.overlay(), mask, result.gallery(), None, files, summary

    return segment


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    from pipelines.grounding import SUPPORTED

    with gr.Tab("Segment by text", id="segment") as tab:
        gr.Markdown("Upload an image, type what to find and press **Segment**: the mask is where the diffusion "
                    "model's attention puts those words (RefAM, one noisy pass).", elem_id="seg-intro")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = model_menu(ctx, SUPPORTED, "Segment by text", elem_id="seg-model")
                image = gr.Image(label="Image", type="pil", format="png", height=160, elem_id="seg-image")
                expression = gr.Textbox(label="What to find", placeholder=placeholder(ctx.model_choices[0]),
                                        elem_id="seg-text")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="seg-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="seg-stop")
                gr.Examples(examples=[e for e in EXAMPLES if Path(e[0]).is_file()], inputs=[image, expression],
                            label="Examples (shapes-world scenes, fast with the built-in model)",
                            elem_id="seg-examples")
                with gr.Accordion("A video instead of an image", open=False, elem_id="seg-video-section"):
                    video = gr.Video(label="Video (one mask per frame)", elem_id="seg-video")
                with gr.Accordion("Settings", open=False, elem_id="seg-settings"):
                    # ranges, steps, choices and defaults come from GroundingSettings: the paper's,
                    # or the menu model's measured ones (`follow_model_defaults` below)
                    shown = GroundingSettings.for_model(model.value)
                    size = number(GroundingSettings, "size", label="Working size, long side (0: the model's)",
                                  elem_id="seg-size")
                    noise = slider(GroundingSettings, "sigma", maximum=NOISE_MAX, value=shown.sigma,
                                   info=model_info(GroundingSettings, "sigma", model.value),
                                   label="Noise level (sigma; UNet: x1000 = timestep)", elem_id="seg-noise")
                    gas = radio(GroundingSettings, "gas", value=shown.gas, label="Attention sinks", elem_id="seg-gas")
                    norm = radio(GroundingSettings, "norm", value=shown.norm, elem_id="seg-norm")
                    magnets = slider(GroundingSettings, "magnets", value=shown.magnets, info=None,
                                     label="Magnet words appended", elem_id="seg-magnets")
                    threshold = gr.Slider(0, THRESHOLD_MAX, value=control_value(shown, "threshold"), step=0.05,
                                          label="Threshold (0 = Otsu)",
                                          info=model_info(GroundingSettings, "threshold", model.value),
                                          elem_id="seg-threshold")
                    refine = checkbox(GroundingSettings, "refine", value=shown.refine, info=None,
                                      label="Refine by self-attention (SD UNets)", elem_id="seg-refine")
                    # no range on the control: Gradio's own range message would replace our one
                    # sentence, and resolve_seed checks the value (-1 = random)
                    seed = number(GroundingSettings, "seed", minimum=None, maximum=None, label="Noise seed (-1 = random)",
                                  elem_id="seg-seed")
            with gr.Column(scale=3):
                with gr.Row():
                    heat = gr.Image(label="Heatmap (where the words look)", type="pil", format="png", interactive=False,
                                    height=340, elem_id="seg-heatmap", elem_classes=PIXEL_RESULT)
                    mask = gr.Image(label="Mask", type="pil", format="png", interactive=False, height=340,
                                    elem_id="seg-mask", elem_classes=PIXEL_RESULT)
                found = gr.Markdown(elem_id="seg-summary")
                stop_note = gr.Markdown(elem_id="seg-stop-note")
                remove = gr.Button(REMOVE_LABEL, elem_id="seg-remove")
                overlay_video = gr.Video(label="Overlay video", interactive=False, visible=False,
                                         elem_id="seg-overlay-video")
                files = gr.File(label="Downloads (mask PNG + JSON, heatmap, token maps zip / videos)",
                                file_count="multiple", interactive=False, elem_id="seg-files")
                with details(elem_id="seg-details"):
                    summary = gr.Markdown(elem_id="seg-details-text")
                    gallery = gr.Gallery(label="Per-token maps (role; sinks marked)", columns=6, height="auto",
                                         format="png", object_fit="contain", elem_id="seg-tokens",
                                         elem_classes=PIXEL_RESULT)
        # the fingerprint of the image the mask was made from, and whether "Send anyway" is armed
        source, confirmed = gr.State(None), gr.State(False)

        inputs = [model, image, video, expression, size, noise, gas, norm, magnets, threshold, refine, seed]
        outputs = [heat, mask, gallery, overlay_video, files, summary]
        handler = make_handler(ctx)
        private = dict(queue=False, api_visibility="private", show_progress="hidden")
        for event in (run.click(handler, inputs, outputs, api_name="segment", **GPU_CONCURRENCY),
                      expression.submit(handler, inputs, outputs, api_visibility="private", **GPU_CONCURRENCY)):
            clear_error_badges(event, outputs)
            event.success(lambda summary, image, video: (headline(summary), gr.Video(visible=bool(video)),
                                                         None if video else fingerprint(image), False,
                                                         gr.Button(value=REMOVE_LABEL)),
                          [summary, image, video], [found, overlay_video, source, confirmed, remove], **private)
        image.change(lambda: (False, gr.Button(value=REMOVE_LABEL)), None, [confirmed, remove], **private)
        model.change(lambda name: gr.Textbox(placeholder=placeholder(name)), model, expression, **private)
        follow_model_defaults(model, GroundingSettings, {"sigma": noise, "gas": gas, "norm": norm, "magnets": magnets,
                                                         "threshold": threshold, "refine": refine},
                              ctx.model_choices, value_of=control_value)
        stop.click(stop_handler(ctx, "segment", "segment_stop"), None, stop_note, api_name="segment_stop", queue=False)
    return {"tab": tab, "image": image, "expression": expression, "mask": mask, "remove": remove,
            "source": source, "confirmed": confirmed}


def connect(ctx: AppContext, tabs: dict) -> None:
    """"Remove this object": send the image and the mask to the Remove object tab, if it exists,
    after checking them (`hand_off_check`: the mask belongs to the image shown, is not empty,
    and one over half the image is sent only on a second press, "Send anyway")."""
    ours = tabs["segment"]
    eraser = tabs.get("eraser")
    if not eraser or "image" not in eraser or "mask" not in eraser:
        ours["remove"].click(lambda: gr.Info("This app has no Remove object tab."), None, None,
                             api_visibility="private", concurrency_limit=None, show_progress="hidden")
        return
    targets = [eraser["image"], eraser["mask"]]
    parent = getattr(ours["tab"], "parent", None)
    switch = isinstance(parent, gr.Tabs)
    if switch:
        targets.append(parent)
    unchanged = [gr.skip() for _ in targets]

    def send(image, mask, source, confirmed):
        verdict, message, _ = hand_off_check(image, mask, source, bool(confirmed))
        if verdict == "refuse":
            gr.Warning(message)
            return [*unchanged, False, gr.Button(value=REMOVE_LABEL)]
        if verdict == "ask":
            gr.Warning(message, duration=10)
            return [*unchanged, True, gr.Button(value=SEND_ANYWAY)]
        bw = Image.fromarray(np.uint8(np.asarray(mask.convert("L")) > 127) * 255)
        values = [_value_for(eraser["image"], image), _value_for(eraser["mask"], bw)]
        if switch:
            values.append(gr.Tabs(selected=eraser.get("tab_id", "eraser")))
        gr.Info(message if switch else message + " Open the Remove object tab.")
        return [*values, False, gr.Button(value=REMOVE_LABEL)]

    # queued (notices show only for queued events), outside the GPU slot: it only checks and copies
    ours["remove"].click(send, [ours["image"], ours["mask"], ours["source"], ours["confirmed"]],
                         [*targets, ours["confirmed"], ours["remove"]], api_visibility="private",
                         concurrency_limit=None, show_progress="hidden")


def _value_for(component, picture: Image.Image):
    """`picture` in the form `component` takes (an ImageEditor wants background + layers)."""
    if isinstance(component, gr.ImageEditor):
        return {"background": picture, "layers": [], "composite": picture}
    return picture
