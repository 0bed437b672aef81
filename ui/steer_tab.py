"""The "Counterfactual steer" tab: MedSteer steering directions and counterfactual pairs.

Two named API endpoints: `/steer_directions` (estimate, or fetch from the in-memory cache, the
directions of a positive/negative prompt pair; returns a status line and the .safetensors file)
and `/steer_pair` (the plain and the steered image of a prompt with one seed, and their
difference heatmap; uses an uploaded directions file if given, otherwise the cached or freshly
estimated directions of the prompt pair).
"""

from __future__ import annotations

import functools
import threading

import gradio as gr

from pipelines.seeds import resolve_seed
from pipelines.steering_settings import (
    DIRECTIONS,
    PAIR,
    PAPER_NEGATIVE,
    PAPER_POSITIVE,
    DirectionSettings,
    PairSettings,
)
from ui.common import GPU_CONCURRENCY, AppContext, stop_handler, stoppable, user_errors_as_gradio
from ui.settings_controls import UNSET, number, radio, slider, unset

ORDER = 40  # position among the tabs
CACHE_SIZE = 8  # directions kept in memory, most recently used last
TAB_SAMPLES = 8  # the tab's starting value: a quick first estimate (the Python API's default is 100)

# Offline examples in the built-in model's vocabulary (pipelines/builtin/world.py); the last one is the
# paper's medical prompt pair, for a model trained on Kvasir.
EXAMPLES = [
    ["a red circle", "a blue circle", "a red circle on a striped background"],
    ["a green square", "a yellow square", "a picture of a green square and a purple triangle"],
    ["An endoscopic image of dyed lifted polyps", "An endoscopic image of normal cecum",
     "An endoscopic image of dyed lifted polyps"],
]


def make_handlers(ctx: AppContext):
    """(steer_directions, steer_pair): the event handlers, also the API endpoints."""
    estimated_here = threading.local()  # whether this thread's last lookup computed the directions

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def cached_directions(model: str, positive: str, negative: str, settings: DirectionSettings):
        from pipelines.steering import estimate_directions

        estimated_here.value = True
        return estimate_directions(ctx.load(model), positive, negative, settings)

    def directions_for(model, positive, negative, samples, steps, guidance, width, height, progress, request=None):
        settings = DIRECTIONS.replace(samples=samples, steps=steps, guidance=unset(guidance), height=unset(height),
                                      width=unset(width)).validated()
        ctx.limits.check_settings(settings)
        pipe = ctx.load(model)  # a bad model name is one sentence before anything is estimated
        estimated_here.value = False
        progress(0, desc="Estimating directions")
        with stoppable(ctx, request, "steer", pipe, 2 * -(-settings.samples // settings.batch_size) * settings.steps):
            directions = cached_directions(model or ctx.default_model, positive, negative, settings)
        return pipe, directions, not estimated_here.value

    def describe(directions, cached: bool, source: str = "") -> str:
        m = directions.meta
        origin = source or ("from the cache" if cached else "estimated now")
        return (f"Directions {origin}: **{m.get('positive')}** → **{m.get('negative')}**, "
                f"{m.get('samples')} images per prompt, {directions.steps} steps × {len(directions.layers)} "
                f"layers, model `{m.get('model')}`.")

    @user_errors_as_gradio
    def steer_directions(
        model: str,
        positive: str,
        negative: str,
        samples: float = TAB_SAMPLES,
        steps: float = DIRECTIONS.steps,
        guidance: float | None = UNSET,
        width: float | None = UNSET,
        height: float | None = UNSET,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Estimate (or reuse) the steering directions of a prompt pair.

        Returns a status line and the directions as a .safetensors file to download.
        Width, height and guidance 0 (or None) are the model's (guidance: PixArt the paper's 4.5).
        """
        pipe, directions, cached = directions_for(model, positive, negative, samples, steps, guidance,
                                                  width, height, progress, request)
        path = directions.save(ctx.outputs.new_run_dir("steer") / "directions.safetensors")
        return describe(directions, cached), str(path)

    @user_errors_as_gradio
    def steer_pair(
        model: str,
        positive: str,
        negative: str,
        samples: float = TAB_SAMPLES,
        steps: float = DIRECTIONS.steps,
        guidance: float | None = UNSET,
        width: float | None = UNSET,
        height: float | None = UNSET,
        directions_file: str | None = None,
        prompt: str = "",
        seed: float | None = 0,
        randomize_seed: bool = False,
        beta: float = PAIR.beta,
        steer: str = PAIR.steer,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Generate the plain and the steered image of `prompt` with one seed, and their difference.

        With `directions_file` (a .safetensors from /steer_directions or the CLI) that file is
        used and the prompt pair is ignored; otherwise the pair's directions are taken from the
        cache or estimated first.  Seed -1 or randomize_seed=True draws a random seed.  Returns
        original, steered, difference heatmap, the seed used, the files and a status line.
        """
        from pipelines.steering import Directions, counterfactual_pair

        pair_settings = PAIR.replace(beta=beta, steer=steer).validated()
        ctx.limits.check_settings(pair_settings)
        if directions_file:
            pipe = ctx.load(model)
            directions = Directions.load(directions_file)
            status = describe(directions, False, "from the uploaded file")
        else:
            pipe, directions, cached = directions_for(model, positive, negative, samples, steps, guidance,
                                                      width, height, progress, request)
            status = describe(directions, cached)
        use_seed = resolve_seed(seed, randomize_seed)
        progress(0, desc="Generating the pair")
        with stoppable(ctx, request, "steer", pipe):
            result = counterfactual_pair(pipe, directions, prompt, seed=use_seed, settings=pair_settings)
        written = result.save(ctx.outputs.new_run_dir("steer"))
        status += f" Mean absolute difference: {result.mean_abs_diff:.4f}."
        return result.original, result.steered, result.heatmap, result.seed, [str(p) for p in written], status

    return steer_directions, steer_pair


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Counterfactual steer", id="steer"):
        gr.Markdown(
            "**MedSteer**: estimate a steering direction from a *positive* concept (to remove) and a "
            "*negative* concept (to steer towards), then generate a prompt twice with the same seed, "
            "plainly and with the concept steered out of every cross-attention layer. Beta 1 removes "
            "the concept's component, 2 (the paper's) reflects it."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=ctx.model_choices, value=ctx.default_model, label="Model",
                                    elem_id="st-model")
                positive = gr.Textbox(label="Positive prompt (concept to remove)", elem_id="st-positive",
                                      placeholder=PAPER_POSITIVE)
                negative = gr.Textbox(label="Negative prompt (concept to steer towards)", elem_id="st-negative",
                                      placeholder=PAPER_NEGATIVE)
                with gr.Row():
                    # ranges and defaults from DirectionSettings; samples start small for a quick try
                    samples = number(DirectionSettings, "samples", value=TAB_SAMPLES, elem_id="st-samples")
                    steps = number(DirectionSettings, "steps", elem_id="st-steps")
                    guidance = number(DirectionSettings, "guidance",
                                      label="Guidance (0: the model's)", elem_id="st-guidance")
                with gr.Row():
                    width = number(DirectionSettings, "width", step=8, label="Width (0: the model's)",
                                   elem_id="st-width")
                    height = number(DirectionSettings, "height", step=8, label="Height (0: the model's)",
                                    elem_id="st-height")
                with gr.Row():
                    estimate = gr.Button("Estimate directions", elem_id="st-estimate")
                    stop = gr.Button("Stop", variant="stop", elem_id="st-stop")
                stop_note = gr.Markdown(elem_id="st-stop-note")
                directions_out = gr.File(label="Directions (download)", interactive=False,
                                         elem_id="st-directions-out")
                directions_in = gr.File(label="Or upload a directions file (.safetensors)", file_types=[".safetensors"],
                                        type="filepath", elem_id="st-directions-in")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt to steer", lines=2, elem_id="st-prompt")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="st-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="st-randomize")
                    beta = slider(PairSettings, "beta", info=None, elem_id="st-beta")
                    steer = radio(PairSettings, "steer", label="CFG halves steered", elem_id="st-steer")
                generate = gr.Button("Generate pair", variant="primary", elem_id="st-generate")
                status = gr.Markdown(elem_id="st-status")
                with gr.Row():
                    original = gr.Image(label="Original", type="pil", format="png", interactive=False,
                                        elem_id="st-original")
                    steered = gr.Image(label="Steered", type="pil", format="png", interactive=False,
                                       elem_id="st-steered")
                    heatmap = gr.Image(label="|difference|", type="pil", format="png", interactive=False,
                                       elem_id="st-heatmap")
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="st-seed-used")
                    reuse = gr.Button("Reuse this seed", elem_id="st-reuse-seed")
                files = gr.File(label="Downloads (original, steered, difference, JSON)", file_count="multiple",
                                interactive=False, elem_id="st-files")

        gr.Examples(examples=EXAMPLES, inputs=[positive, negative, prompt],
                    label="Examples (the first two suit the built-in model)")

        steer_directions, steer_pair = make_handlers(ctx)
        pair_inputs = [model, positive, negative, samples, steps, guidance, width, height]
        estimate.click(steer_directions, pair_inputs, [status, directions_out], api_name="steer_directions",
                       **GPU_CONCURRENCY)
        generate.click(steer_pair, pair_inputs + [directions_in, prompt, seed, randomize_seed, beta, steer],
                       [original, steered, heatmap, seed_used, files, status], api_name="steer_pair",
                       **GPU_CONCURRENCY)
        # stops the directions estimate and the pair of this session, before their next step
        stop.click(stop_handler(ctx, "steer", "steer_stop"), None, stop_note, api_name="steer_stop", queue=False)
        reuse.click(lambda used, current: (current if used is None else used, False), [seed_used, seed],
                    [seed, randomize_seed], api_visibility="private", queue=False)
    return {"prompt": prompt, "positive": positive, "negative": negative, "original": original,
            "steered": steered, "seed": seed}
