"""The "Attention maps" tab: generate an image and one cross-attention heatmap per prompt word."""

from __future__ import annotations

import gradio as gr

from pipelines.attention_maps_settings import DEFAULTS, AttentionMapSettings
from pipelines.seeds import resolve_seed
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    model_menu,
    reveal_after_success,
    seed_used_row,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
    zip_files,
)
from ui.settings_controls import UNSET, dropdown, number, slider, textbox, unset

# Prompts in the built-in model's vocabulary (pipelines/builtin/world.py) and their seeds: they run
# offline in about a second on a CPU.
EXAMPLES = [
    ["a red circle and a blue square on a striped background", 0],
    ["a picture of a yellow triangle, a green circle and a purple square", 1],
    ["an orange square on a white background", 2],
]


def make_handler(ctx: AppContext):
    """The event handler, also exposed as the `/attention_maps` API endpoint."""

    @user_errors_as_gradio
    def attention_maps(
        model: str,
        prompt: str,
        negative_prompt: str = DEFAULTS.negative_prompt,
        seed: float | None = 0,
        randomize_seed: bool = False,
        steps: float | None = UNSET,
        guidance: float | None = UNSET,
        width: float | None = UNSET,
        height: float | None = UNSET,
        layers: str = DEFAULTS.layers,
        overlay_alpha: float = DEFAULTS.overlay_alpha,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Generate an image and a heatmap per prompt word.

        Steps, guidance, width and height 0 (or empty) are the model's defaults;
        seed -1 or randomize_seed=True draws a random seed.  Returns the image, the heatmap
        overlays, the seed used and the files (PNG with parameters, JSON sidecar, heatmaps zip).
        """
        from pipelines.attention_maps import generate_with_attention_maps, run_steps

        settings = DEFAULTS.replace(
            negative_prompt=negative_prompt or "", steps=unset(steps), guidance=unset(guidance),
            height=unset(height), width=unset(width), layers=layers, overlay_alpha=overlay_alpha,
        ).validated()  # before loading the model
        ctx.limits.check_settings(settings)
        progress(0, desc="Loading model")
        pipe = ctx.load(model)
        steps = run_steps(pipe, settings)  # left out: the model's, bounded by --max-steps too
        ctx.limits.check_default_steps(settings.steps, steps)
        use_seed = resolve_seed(seed, randomize_seed)
        with stoppable(ctx, request, "attention_maps", pipe, steps):
            result = generate_with_attention_maps(pipe, prompt, settings, seed=use_seed)
        run_dir = ctx.new_run_dir("attention_maps", request, about=f"{prompt} (seed {result.seed})")
        heatmap_dir = run_dir / "heatmaps"
        written = result.save(run_dir / "image.png", heatmap_dir=heatmap_dir)
        heatmaps = [p for p in written if p.parent == heatmap_dir]
        others = [p for p in written if p.parent != heatmap_dir]
        files = [str(p) for p in others]
        if heatmaps:
            files.append(str(zip_files(heatmaps, run_dir / "heatmaps.zip")))
        return result.image, result.overlays(), result.seed, files

    return attention_maps


ORDER = 10  # position among the tabs


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    from pipelines.backbones import TEXT_TO_IMAGE

    with gr.Tab("Attention maps", id="attention_maps"):
        gr.Markdown("Type a prompt and press **Generate**: next to the image, one heatmap per word shows where "
                    "the model's cross-attention looked while drawing it.")
        with gr.Row():
            with gr.Column(scale=1):
                model = model_menu(ctx, TEXT_TO_IMAGE, "Attention maps", elem_id="am-model",
                                   info="the models this app was started with and the built-in ones")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle and a blue square on a striped background",
                                    elem_id="am-prompt")
                negative_prompt = textbox(AttentionMapSettings, "negative_prompt", label="Negative prompt",
                                          placeholder="what the image should not show (optional)",
                                          elem_id="am-negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="am-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="am-randomize")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="am-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="am-stop")
                stop_note = gr.Markdown(elem_id="am-stop-note")
                # the examples go here, under the buttons (filled below, once `steps` exists)
                examples_slot = gr.Column()
                # ranges and steps come from AttentionMapSettings; 0 (UNSET) is the model's own
                with gr.Accordion("Settings", open=False, elem_id="am-settings"):
                    with gr.Row():
                        steps = number(AttentionMapSettings, "steps", label="Steps (0: the model's)", elem_id="am-steps")
                        guidance = number(AttentionMapSettings, "guidance", label="Guidance (0: the model's)",
                                          elem_id="am-guidance")
                    with gr.Row():
                        width = number(AttentionMapSettings, "width", label="Width (0: the model's)", elem_id="am-width")
                        height = number(AttentionMapSettings, "height", label="Height (0: the model's)",
                                        elem_id="am-height")
                    layers = dropdown(AttentionMapSettings, "layers", label="Layers averaged", elem_id="am-layers")
                    overlay_alpha = slider(AttentionMapSettings, "overlay_alpha", label="Heatmap opacity",
                                           elem_id="am-overlay-alpha")
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=360,
                                 elem_id="am-image", elem_classes=PIXEL_RESULT)
                # height="auto": every word's heatmap shows at once, no box scrolling on its own
                gallery = gr.Gallery(label="Heatmap per word", columns=6, height="auto", format="png",
                                     object_fit="contain", elem_id="am-heatmaps", elem_classes=PIXEL_RESULT)
                seed_row, seed_used, reuse = seed_used_row("am")
                files = gr.File(label="Downloads (PNG with parameters, JSON, heatmaps zip)",
                                file_count="multiple", interactive=False, elem_id="am-files")
        with examples_slot:
            gr.Examples(
                examples=EXAMPLES,
                inputs=[prompt, seed],
                example_labels=[prompt for prompt, _ in EXAMPLES],
                label="Examples (the built-in model's vocabulary; about a second each on a CPU)",
                elem_id="am-examples",
            )

        inputs = [model, prompt, negative_prompt, seed, randomize_seed, steps, guidance,
                  width, height, layers, overlay_alpha]
        outputs = [image, gallery, seed_used, files]
        handler = make_handler(ctx)
        for event in (generate.click(handler, inputs, outputs, api_name="attention_maps", **GPU_CONCURRENCY),
                      prompt.submit(handler, inputs, outputs, api_visibility="private", **GPU_CONCURRENCY)):
            reveal_after_success(event, seed_row)
            clear_error_badges(event, outputs)
        # outside the queue, so that it runs while the generation holds the GPU slot
        stop.click(stop_handler(ctx, "attention_maps", "attention_maps_stop"), None, stop_note,
                   api_name="attention_maps_stop", queue=False)
        reuse.click(
            lambda used, current: (current if used is None else used, False),
            [seed_used, seed],
            [seed, randomize_seed],
            api_visibility="private",
            queue=False,
        )
    return {"prompt": prompt, "image": image, "seed": seed}
