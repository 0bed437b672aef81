"""The "Attention maps" tab: generate an image and one cross-attention heatmap per prompt word."""

from __future__ import annotations

import gradio as gr

from pipelines.seeds import resolve_seed
from ui.common import GPU_CONCURRENCY, AppContext, user_errors_as_gradio, zip_files

# Prompts in the built-in model's vocabulary (pipelines/builtin/world.py): they run offline in about a
# second on a CPU.  The last column is the steps (0 = the model's default).
EXAMPLES = [
    ["a red circle and a blue square on a striped background", "", 0, 0],
    ["a picture of a yellow triangle, a green circle and a purple square", "", 1, 0],
    ["an orange square on a white background", "", 2, 0],
]


def _layer_choices() -> tuple[str, ...]:
    from pipelines.attention_maps import LAYER_CHOICES

    return tuple(LAYER_CHOICES)


def make_handler(ctx: AppContext):
    """The event handler, also exposed as the `/attention_maps` API endpoint."""

    @user_errors_as_gradio
    def attention_maps(
        model: str,
        prompt: str,
        negative_prompt: str = "",
        seed: float | None = 0,
        randomize_seed: bool = False,
        steps: float | None = 0,
        guidance: float | None = None,
        width: float | None = 0,
        height: float | None = 0,
        layers: str = "all",
        progress=gr.Progress(track_tqdm=True),
    ):
        """Generate an image and a heatmap per prompt word.

        Width/height 0 (or empty) use the model's default size, steps 0 and guidance empty the
        model's defaults; seed -1 or randomize_seed=True draws a random seed. Returns the image, the heatmap overlays, the seed used and the
        files (PNG with parameters, JSON sidecar, heatmaps zip).
        """
        from pipelines.attention_maps import generate_with_attention_maps

        progress(0, desc="Loading model")
        pipe = ctx.load(model)
        use_seed = resolve_seed(seed, randomize_seed)
        result = generate_with_attention_maps(
            pipe,
            prompt,
            negative_prompt=negative_prompt or "",
            seed=use_seed,
            steps=int(steps) if steps else None,
            guidance=None if guidance is None else float(guidance),
            height=int(height) if height else None,
            width=int(width) if width else None,
            layers=layers,
        )
        run_dir = ctx.outputs.new_run_dir("attention_maps")
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
    from pipelines import models

    with gr.Tab("Attention maps", id="attention_maps"):
        gr.Markdown(
            "Type a prompt and press **Generate**: next to the image you get one heatmap per "
            "word showing where the model's cross-attention looked while drawing it."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(
                    choices=ctx.model_choices,
                    value=ctx.default_model,
                    label="Model",
                    info="the models this app was started with (--model, --allow-model) and the built-in ones",
                    elem_id="am-model",
                )
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle and a blue square on a striped background",
                                    elem_id="am-prompt")
                negative_prompt = gr.Textbox(value="", label="Negative prompt", elem_id="am-negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)",
                                     elem_id="am-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed",
                                                 elem_id="am-randomize")
                defaults = models.generation_defaults(ctx.default_model)
                with gr.Row():
                    steps = gr.Number(value=defaults["steps"], precision=0, minimum=0, maximum=200,
                                      label="Steps (0 = model default)", elem_id="am-steps")
                    guidance = gr.Number(value=defaults["guidance"], minimum=0, maximum=30, step=0.5,
                                         label="Guidance", elem_id="am-guidance")
                with gr.Row():
                    width = gr.Number(value=0, precision=0, step=8, minimum=0,
                                      label="Width (0 = model default)", elem_id="am-width")
                    height = gr.Number(value=0, precision=0, step=8, minimum=0,
                                       label="Height (0 = model default)", elem_id="am-height")
                layers = gr.Dropdown(choices=list(_layer_choices()), value="all",
                                     label="Layers averaged", elem_id="am-layers")
                generate = gr.Button("Generate", variant="primary", elem_id="am-generate")
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=320,
                                 elem_id="am-image")
                gallery = gr.Gallery(label="Heatmap per word", columns=4, format="png",
                                     elem_id="am-heatmaps")
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", precision=0, interactive=False,
                                          elem_id="am-seed-used")
                    reuse = gr.Button("Reuse this seed", elem_id="am-reuse-seed")
                files = gr.File(label="Downloads (PNG with parameters, JSON, heatmaps zip)",
                                file_count="multiple", interactive=False, elem_id="am-files")

        gr.Examples(
            examples=EXAMPLES,
            inputs=[prompt, negative_prompt, seed, steps],
            label="Examples (the built-in model's vocabulary; about a second each on a CPU)",
        )

        inputs = [model, prompt, negative_prompt, seed, randomize_seed, steps, guidance,
                  width, height, layers]
        outputs = [image, gallery, seed_used, files]
        handler = make_handler(ctx)
        generate.click(handler, inputs, outputs, api_name="attention_maps", **GPU_CONCURRENCY)
        prompt.submit(handler, inputs, outputs, api_visibility="private", **GPU_CONCURRENCY)
        reuse.click(
            lambda used, current: (current if used is None else used, False),
            [seed_used, seed],
            [seed, randomize_seed],
            api_visibility="private",
            queue=False,
        )
    return {"prompt": prompt, "image": image, "seed": seed}
