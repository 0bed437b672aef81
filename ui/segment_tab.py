"""The "Segment by text" tab: an image or a video + an expression -> heatmap, mask, per-token maps."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.grounding_settings import DEFAULTS, OTSU, GroundingSettings
from pipelines.seeds import resolve_seed
from ui.common import GPU_CONCURRENCY, AppContext, stop_handler, stoppable, user_errors_as_gradio, zip_files
from ui.settings_controls import UNSET, checkbox, number, radio, slider, unset

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
THRESHOLD_DEFAULT = 0 if DEFAULTS.threshold == OTSU else DEFAULTS.threshold
# The tab sets size, sigma (and from it the UNet timestep), gas, norm, magnets, threshold, refine
# and seed; the other fields keep their GroundingSettings defaults (layer choice, the sink
# criterion, SAM2 and video batching are CLI and Python settings).


def unet_timestep(sigma: float) -> int:
    """The UNet timestep of the tab's one noise slider: sigma x 1000 (the defaults agree: 0.3, 300)."""
    return int(round(float(sigma) * 1000))


def tab_settings(size=UNSET, noise=DEFAULTS.sigma, gas=DEFAULTS.gas, norm=DEFAULTS.norm, magnets=DEFAULTS.magnets,
                 threshold=THRESHOLD_DEFAULT, refine=DEFAULTS.refine, seed=DEFAULTS.seed) -> GroundingSettings:
    """The validated settings of the tab's controls (size 0: the model's; threshold 0: Otsu; seed -1: random)."""
    settings = DEFAULTS.replace(
        size=unset(size), sigma=noise, gas=gas, norm=norm, magnets=magnets, threshold=threshold or OTSU,
        refine=refine, seed=resolve_seed(DEFAULTS.seed if seed is None else seed),
    ).validated()
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


def make_handler(ctx: AppContext):
    """The event handler, also exposed as the `/segment` API endpoint."""

    @user_errors_as_gradio
    def segment(
        model: str,
        image,
        video,
        expression: str,
        size: float | None = UNSET,
        noise: float = DEFAULTS.sigma,
        gas: str = DEFAULTS.gas,
        norm: str = DEFAULTS.norm,
        magnets: float = DEFAULTS.magnets,
        threshold: float = THRESHOLD_DEFAULT,
        refine: bool = DEFAULTS.refine,
        seed: float = DEFAULTS.seed,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Segment the object the expression names in the image (or in every video frame).

        size 0 uses the model's working size; noise is sigma for FLUX/SD3 (0-1) and is mapped to
        timestep noise*1000 on SD UNets; threshold 0 means Otsu; seed -1 draws a random one.
        Returns the heatmap overlay, the mask, the per-token maps, the overlay video (video
        input), the files and a summary.
        """
        from pipelines.errors import UserInputError
        from pipelines.grounding import segment_image, segment_video

        if image is None and not video:
            raise UserInputError("Please upload an image or a video.")
        settings = tab_settings(size, noise, gas, norm, magnets, threshold, refine, seed)  # before loading
        if video:
            check_video_side(ctx, video)
        progress(0, desc="Loading model")
        pipe = ctx.load(model)
        if video:
            with stoppable(ctx, request, "segment", pipe):
                result = segment_video(pipe, video, expression, settings)
            run_dir = ctx.outputs.new_run_dir("segment")
            written = result.save(run_dir / "mask.mp4")
            first = result.overlays()[0]
            mask = Image.fromarray(np.uint8(result.masks[0]) * 255)
            summary = f"{len(result.masks)} frames; mask video and overlay video in the downloads."
            if "stopped_at_frame" in result.params:
                summary = (f"Stopped at step {result.params['stopped_at_frame']} of {result.params['frames_read']} "
                           f"(frames): the masks of the first {len(result.masks)} frames are in the downloads.")
            return first, mask, [], str(written[1]), [str(p) for p in written], summary
        with stoppable(ctx, request, "segment", pipe):
            result = segment_image(pipe, image, expression, settings)
        run_dir = ctx.outputs.new_run_dir("segment")
        written = result.save(run_dir / "mask.png", heatmap=run_dir / "heatmap.png")
        token_dir = run_dir / "tokens"
        token_files = []
        for i, (picture, _) in enumerate(result.gallery()):
            path = token_dir / f"{i:02d}.png"
            token_dir.mkdir(exist_ok=True)
            picture.save(path)
            token_files.append(path)
        files = [str(p) for p in written]
        if token_files:
            files.append(str(zip_files(token_files, run_dir / "token_maps.zip")))
        summary = (f"Mask: {result.mask.mean():.1%} of the image (threshold {result.threshold:.2f}). "
                   f"Sinks: {', '.join(result.sinks) or 'none'}. Prompt read by the model: "
                   f"\"{result.params['prompt']}\".")
        mask = Image.fromarray(np.uint8(result.mask) * 255)
        return result.overlay(), mask, result.gallery(), None, files, summary

    return segment


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Segment by text", id="segment") as tab:
        gr.Markdown(
            "Upload an image (or a video), type what to find, e.g. *the dog on the left*, and press "
            "**Segment**: one noisy pass of the diffusion model shows where its attention puts each "
            "word (RefAM). Stop words and the appended *magnet* words soak up the background; their "
            "maps are in the gallery."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=ctx.model_choices, value=ctx.default_model, label="Model",
                                    info="FLUX, SD3 or SD 1.x/2.x models", elem_id="seg-model")
                image = gr.Image(label="Image", type="pil", format="png", elem_id="seg-image")
                video = gr.Video(label="or a video (one mask per frame)", elem_id="seg-video")
                expression = gr.Textbox(label="Expression", placeholder="the dog on the left", elem_id="seg-text")
                with gr.Accordion("Settings", open=False):
                    # ranges, steps, choices and defaults come from GroundingSettings
                    size = number(GroundingSettings, "size", label="Working size, long side (0: the model's)",
                                  elem_id="seg-size")
                    noise = slider(GroundingSettings, "sigma", maximum=NOISE_MAX, info=None,
                                   label="Noise level (sigma; UNet: x1000 = timestep)", elem_id="seg-noise")
                    gas = radio(GroundingSettings, "gas", label="Attention sinks", elem_id="seg-gas")
                    norm = radio(GroundingSettings, "norm", elem_id="seg-norm")
                    magnets = slider(GroundingSettings, "magnets", info=None, label="Magnet words appended",
                                     elem_id="seg-magnets")
                    threshold = gr.Slider(0, THRESHOLD_MAX, value=THRESHOLD_DEFAULT, step=0.05, label="Threshold (0 = Otsu)",
                                          elem_id="seg-threshold")
                    refine = checkbox(GroundingSettings, "refine", info=None, label="Refine by self-attention (SD UNets)",
                                      elem_id="seg-refine")
                    # no range on the control: Gradio's own range message would replace our one
                    # sentence, and resolve_seed checks the value (-1 = random)
                    seed = number(GroundingSettings, "seed", minimum=None, maximum=None, label="Noise seed (-1 = random)",
                                  elem_id="seg-seed")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="seg-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="seg-stop")
                stop_note = gr.Markdown(elem_id="seg-stop-note")
            with gr.Column(scale=2):
                with gr.Row():
                    heat = gr.Image(label="Heatmap", type="pil", format="png", interactive=False, elem_id="seg-heatmap")
                    mask = gr.Image(label="Mask", type="pil", format="png", interactive=False, elem_id="seg-mask")
                summary = gr.Markdown(elem_id="seg-summary")
                remove = gr.Button("Remove this object", elem_id="seg-remove")
                gallery = gr.Gallery(label="Per-token maps (role; sinks marked)", columns=6, format="png",
                                     elem_id="seg-tokens")
                overlay_video = gr.Video(label="Overlay video", interactive=False, elem_id="seg-overlay-video")
                files = gr.File(label="Downloads (mask PNG + JSON, heatmap, token maps zip / videos)",
                                file_count="multiple", interactive=False, elem_id="seg-files")
        gr.Examples(examples=[e for e in EXAMPLES if Path(e[0]).is_file()], inputs=[image, expression],
                    label="Examples (shapes-world scenes, fast with the built-in model)", elem_id="seg-examples")

        inputs = [model, image, video, expression, size, noise, gas, norm, magnets, threshold, refine, seed]
        outputs = [heat, mask, gallery, overlay_video, files, summary]
        handler = make_handler(ctx)
        run.click(handler, inputs, outputs, api_name="segment", **GPU_CONCURRENCY)
        expression.submit(handler, inputs, outputs, api_visibility="private", **GPU_CONCURRENCY)
        stop.click(stop_handler(ctx, "segment", "segment_stop"), None, stop_note, api_name="segment_stop", queue=False)
    return {"tab": tab, "image": image, "expression": expression, "mask": mask, "remove": remove}


def connect(ctx: AppContext, tabs: dict) -> None:
    """"Remove this object": send the image and the mask to the Remove object tab, if it exists."""
    ours = tabs["segment"]
    eraser = tabs.get("eraser")
    if not eraser or "image" not in eraser or "mask" not in eraser:
        ours["remove"].click(lambda: gr.Info("This app has no Remove object tab."), None, None,
                             api_visibility="private", queue=False)
        return
    targets = [eraser["image"], eraser["mask"]]
    parent = getattr(ours["tab"], "parent", None)
    switch = isinstance(parent, gr.Tabs)
    if switch:
        targets.append(parent)

    def send(image, mask):
        if image is None or mask is None:
            raise gr.Error("Segment an image first; then its mask can be sent to Remove object.")
        bw = Image.fromarray(np.uint8(np.asarray(mask.convert("L")) > 127) * 255)
        values = [_value_for(eraser["image"], image), _value_for(eraser["mask"], bw)]
        if switch:
            values.append(gr.Tabs(selected=eraser.get("tab_id", "eraser")))
        else:
            gr.Info("Image and mask sent: open the Remove object tab.")
        return values

    ours["remove"].click(send, [ours["image"], ours["mask"]], targets, api_visibility="private", queue=False)


def _value_for(component, picture: Image.Image):
    """`picture` in the form `component` takes (an ImageEditor wants background + layers)."""
    if isinstance(component, gr.ImageEditor):
        return {"background": picture, "layers": [], "composite": picture}
    return picture
