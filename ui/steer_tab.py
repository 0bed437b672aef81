"""The "Counterfactual steer" tab: MedSteer steering directions and counterfactual pairs.

Two named API endpoints: `/steer_directions` (estimate, or fetch from the in-memory cache, the
directions of a prompt pair; returns a status line and the .safetensors file) and `/steer_pair`
(the plain and the steered image of a prompt with one seed, and their difference heatmap; uses
an uploaded directions file if given, otherwise the cached or freshly estimated directions of
the prompt pair).

The pair is MedSteer's "positive" prompt (`positive`: it shows the concept to remove) and its
"negative" prompt (`negative`: it shows what replaces it); the tab calls them *Concept to remove*
and *Replace with*, so that "negative prompt" keeps its usual meaning (the CFG negative prompt,
which this tab leaves empty, as the paper does).
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
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    denoiser_progress,
    is_shapes_model,
    model_menu,
    reveal_after_success,
    seed_used_row,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
)
from ui.settings_controls import UNSET, number, radio, slider, unset

ORDER = 40  # position among the tabs
CACHE_SIZE = 8  # directions kept in memory, most recently used last
TAB_SAMPLES = 8  # the tab's starting value: a quick first estimate (the Python API's default is 100)

# Offline examples in the built-in model's vocabulary (pipelines/builtin/world.py); the last one is the
# paper's medical prompt pair, for a model trained on Kvasir.
EXAMPLES = [
    ["a red circle", "a blue circle", "a red circle on a striped background"],
    ["a green square", "a yellow square", "a picture of a green square and a purple triangle"],
    [PAPER_POSITIVE, PAPER_NEGATIVE, PAPER_POSITIVE],
]
#: what the examples' buttons say (the three prompts do not fit a narrow column as a table)
EXAMPLE_LABELS = ["red circle → blue circle", "green square → yellow square",
                  "the paper's: polyps → normal cecum (endoscopy)"]

REMOVE_LABEL = "Concept to remove (a prompt showing it)"
REPLACE_LABEL = "Replace with (a prompt showing the replacement)"
#: (concept to remove, replace with, prompt to steer) as placeholders: words the built-in shapes
#: world knows, or the paper's prompts for the other models
SHAPES_PLACEHOLDERS = ("a red circle on a striped background", "a blue circle on a striped background",
                       "a red circle and a green square on a striped background")
PAPER_PLACEHOLDERS = (PAPER_POSITIVE, PAPER_NEGATIVE, PAPER_POSITIVE)


def placeholders(model: str | None) -> tuple[str, str, str]:
    """(concept to remove, replace with, prompt to steer) placeholders that suit `model`."""
    return SHAPES_PLACEHOLDERS if is_shapes_model(model) else PAPER_PLACEHOLDERS


def check_concepts(positive, negative) -> None:
    """The prompt pair in the tab's words (the pipeline's sentences say positive and negative)."""
    from pipelines.errors import UserInputError

    for value, what in ((positive, "the concept to remove (a prompt showing it)"),
                        (negative, "what replaces it (a prompt showing the replacement)")):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserInputError(f"Please enter {what}.")
    if isinstance(positive, str) and isinstance(negative, str) and \
            " ".join(positive.split()).casefold() == " ".join(negative.split()).casefold():
        raise UserInputError("The concept to remove and its replacement are identical, so there is no direction "
                             "to steer along; give two different concepts.")


def sampling(settings: DirectionSettings):
    """`describe` for the direction estimate: which of the 2 x samples images are being drawn
    (runs: the batches of the first prompt, then those of the second)."""
    batches = -(-settings.samples // settings.batch_size)

    def describe(run: int, step: int) -> str:
        prompt, batch = divmod(run, batches)
        drawn = prompt * settings.samples + min(settings.samples, (batch + 1) * settings.batch_size)
        return f"Estimating the direction: sampling {drawn}/{2 * settings.samples} (step {step}/{settings.steps})"

    return describe, 2 * batches


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
        check_concepts(positive, negative)
        progress(0, desc="Loading the model")
        pipe = ctx.load(model)  # a bad model name is one sentence before anything is estimated
        estimated_here.value = False
        describe, runs = sampling(settings)
        with (stoppable(ctx, request, "steer", pipe, runs * settings.steps),
              denoiser_progress(pipe, progress, describe, settings.steps, runs)):
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
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Estimate (or reuse) the steering directions of a prompt pair.

        positive: a prompt showing the concept to remove; negative: a prompt showing what
        replaces it (MedSteer's names; not a CFG negative prompt).  Returns a status line and the
        directions as a .safetensors file to download.  Width, height and guidance 0 (or None)
        are the model's (guidance: PixArt the paper's 4.5).
        """
        pipe, directions, cached = directions_for(model, positive, negative, samples, steps, guidance,
                                                  width, height, progress, request)
        run_dir = ctx.new_run_dir("steer", request, about=f"directions: {positive} → {negative}")
        path = directions.save(run_dir / "directions.safetensors")
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
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Generate the plain and the steered image of `prompt` with one seed, and their difference.

        positive: a prompt showing the concept to remove; negative: a prompt showing what
        replaces it (MedSteer's names; not a CFG negative prompt).  With `directions_file` (a
        .safetensors from /steer_directions or the CLI) that file is used and the prompt pair is
        ignored; otherwise the pair's directions are taken from the cache or estimated first.
        Seed -1 or randomize_seed=True draws a random seed.  Returns original, steered,
        difference heatmap, the seed used, the files and a status line.
        """
        from pipelines.steering import Directions, counterfactual_pair, pair_steps

        pair_settings = PAIR.replace(beta=beta, steer=steer).validated()
        ctx.limits.check_settings(pair_settings)
        if directions_file:
            progress(0, desc="Loading the model")
            pipe = ctx.load(model)
            directions = Directions.load(directions_file)
            status = describe(directions, False, "from the uploaded file")
        else:
            pipe, directions, cached = directions_for(model, positive, negative, samples, steps, guidance,
                                                      width, height, progress, request)
            status = describe(directions, cached)
        # steps left out are the directions' (an uploaded file's too), which --max-steps bounds
        steps = pair_steps(directions, pair_settings.steps)
        ctx.limits.check_default_steps(
            pair_settings.steps, steps,
            "The pair's steps", "the directions file's step count" if directions_file else "the directions' step count",
            f"use directions estimated with {ctx.limits.max_steps} steps or fewer")
        use_seed = resolve_seed(seed, randomize_seed)
        # beta 0 or an unbatched pair renders twice; the batched pair (the default) once
        runs = 1 if pair_settings.batched or pair_settings.beta == 0 else 2
        progress(0, desc="Generating the pair")
        with (stoppable(ctx, request, "steer", pipe),
              denoiser_progress(pipe, progress, lambda run, step: f"Generating the pair: step {step}/{steps}",
                                steps, runs)):
            result = counterfactual_pair(pipe, directions, prompt, seed=use_seed, settings=pair_settings)
        written = result.save(ctx.new_run_dir("steer", request, about=f"{prompt} (seed {result.seed}, beta {pair_settings.beta})"))
        status += f" Mean absolute difference: {result.mean_abs_diff:.4f}."
        return result.original, result.steered, result.heatmap, result.seed, [str(p) for p in written], status

    return steer_directions, steer_pair


def placeholder_updates(model: str | None):
    """The three text boxes' placeholders for `model` (on a change of the Model menu)."""
    return tuple(gr.Textbox(placeholder=text) for text in placeholders(model))


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    from pipelines.steering import SUPPORTED

    first = placeholders(ctx.model_choices[0])
    with gr.Tab("Counterfactual steer", id="steer"):
        gr.Markdown("Name a concept to remove and what replaces it, then **Generate pair**: the prompt drawn twice "
                    "with one seed, plainly and with the concept steered out of the cross-attention (MedSteer).",
                    elem_id="st-intro")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = model_menu(ctx, SUPPORTED, "Counterfactual steer", elem_id="st-model")
                positive = gr.Textbox(label=REMOVE_LABEL, placeholder=first[0], elem_id="st-positive")
                negative = gr.Textbox(label=REPLACE_LABEL, placeholder=first[1], elem_id="st-negative")
                prompt = gr.Textbox(label="Prompt to steer", placeholder=first[2], elem_id="st-prompt")
                with gr.Row():
                    generate = gr.Button("Generate pair", variant="primary", elem_id="st-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="st-stop")
                stop_note = gr.Markdown(elem_id="st-stop-note")
                gr.Examples(examples=EXAMPLES, inputs=[positive, negative, prompt], example_labels=EXAMPLE_LABELS,
                            elem_id="st-examples", label="Examples (the first two suit the built-in model)")
                with gr.Accordion("Settings", open=False, elem_id="st-settings"):
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="st-seed")
                        randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="st-randomize")
                    beta = slider(PairSettings, "beta", info="1 removes the concept, 2 (the paper's) reflects it "
                                                             "towards the replacement", elem_id="st-beta")
                    steer = radio(PairSettings, "steer", label="CFG halves steered", elem_id="st-steer")
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
                with gr.Accordion("Directions file", open=False, elem_id="st-directions"):
                    estimate = gr.Button("Estimate directions only", elem_id="st-estimate")
                    directions_out = gr.File(label="Directions (download)", interactive=False,
                                             elem_id="st-directions-out")
                    directions_in = gr.File(label="Or upload a directions file (.safetensors; replaces the two "
                                                  "concepts)", file_types=[".safetensors"], type="filepath",
                                            elem_id="st-directions-in")
            with gr.Column(scale=5):
                with gr.Row(equal_height=True):
                    original = gr.Image(label="Original", type="pil", format="png", interactive=False, height=300,
                                        min_width=256, elem_id="st-original", elem_classes=PIXEL_RESULT)
                    steered = gr.Image(label="Steered", type="pil", format="png", interactive=False, height=300,
                                       min_width=256, elem_id="st-steered", elem_classes=PIXEL_RESULT)
                    heatmap = gr.Image(label="|difference|", type="pil", format="png", interactive=False,
                                       height=300, min_width=256, elem_id="st-heatmap", elem_classes=PIXEL_RESULT)
                status = gr.Markdown(elem_id="st-status")
                seed_row, seed_used, reuse = seed_used_row("st")
                files = gr.File(label="Downloads (original, steered, difference, JSON)", file_count="multiple",
                                interactive=False, elem_id="st-files")

        steer_directions, steer_pair = make_handlers(ctx)
        pair_inputs = [model, positive, negative, samples, steps, guidance, width, height]
        estimated = estimate.click(steer_directions, pair_inputs, [status, directions_out],
                                   api_name="steer_directions", **GPU_CONCURRENCY)
        clear_error_badges(estimated, [status, directions_out])
        pair_outputs = [original, steered, heatmap, seed_used, files, status]
        generated = generate.click(steer_pair, pair_inputs + [directions_in, prompt, seed, randomize_seed, beta, steer],
                                   pair_outputs, api_name="steer_pair", **GPU_CONCURRENCY)
        clear_error_badges(generated, pair_outputs)
        reveal_after_success(generated, seed_row)
        # stops the directions estimate and the pair of this session, before their next step
        stop.click(stop_handler(ctx, "steer", "steer_stop"), None, stop_note, api_name="steer_stop", queue=False)
        reuse.click(lambda used, current: (current if used is None else used, False), [seed_used, seed],
                    [seed, randomize_seed], api_visibility="private", queue=False)
        model.change(placeholder_updates, model, [positive, negative, prompt], api_visibility="private",
                     queue=False, show_progress="hidden")
    return {"prompt": prompt, "positive": positive, "negative": negative, "original": original,
            "steered": steered, "seed": seed}
