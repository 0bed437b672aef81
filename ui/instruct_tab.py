"""The "Instruction edit" tab: an image and a multi-part instruction -> the SaaS result and plain
sampling with the same seed side by side, the per-part masks and gains per step, downloads.
It edits with InstructPix2Pix models (`builtin-edit`), OmniGen (the SaaS paper's backbone,
e.g. `Shitao/OmniGen-v1-diffusers` or `tiny-omnigen` when the server offers them) and FLUX
Kontext (our extrapolation, e.g. `tiny-flux-kontext`), and draws a prompt of parts with an SD
text-to-image model.

One named API endpoint, `/instruct` (and `/instruct_stop`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines.instruct_settings import INSTRUCT, InstructSettings
from pipelines.seeds import resolve_seed
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    denoiser_progress,
    details,
    model_menu,
    reveal_after_success,
    seed_used_row,
    stop_handler,
    stoppable,
    user_errors_as_gradio,
)
from ui.settings_controls import UNSET, checkbox, number, radio, slider, unset

ORDER = 70  # position among the tabs
TASK = "instruct"

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
#: Offline examples: shapes-world edits (pipelines/builtin/world.py `make_edit`, test seeds) in the
#: built-in edit model's vocabulary; tests/test_examples.py checks each part is carried out.  They
#: are chosen among the edits builtin-edit gets entirely right at the tab's seed 0 (11 of the 28
#: edits of 2 and 3 parts from seed 1,095,000 to 1,095,039; 40 % of the benchmark's, model card):
#: other instructions fail more often than these.
EXAMPLE_EDITS = (1_095_027, 1_095_000, 1_095_020)


def examples() -> list[list[str]]:
    from pipelines.builtin import world

    return [[str(EXAMPLES_DIR / f"edit_{seed}.png"), world.make_edit(seed).instruction] for seed in EXAMPLE_EDITS]


#: results smaller than this (the built-in model's 64 px) are enlarged for the page, pixels kept
#: sharp; the downloads keep the true size
DISPLAY_SIDE = 256


def for_display(image):
    """`image` enlarged by a whole factor (nearest neighbour) until its longer side reaches
    DISPLAY_SIDE, or as it is; None stays None."""
    if image is None or max(image.size) >= DISPLAY_SIDE:
        return image
    from PIL import Image

    factor = -(-DISPLAY_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def make_handler(ctx: AppContext):
    """The event handler, also the `/instruct` API endpoint."""

    @user_errors_as_gradio
    def instruct(
        model: str,
        image,
        instruction: str,
        seed: float | None = 0,
        randomize_seed: bool = False,
        saas: bool = INSTRUCT.saas,
        steps: float | None = UNSET,
        guidance: float | None = UNSET,
        image_guidance: float | None = UNSET,
        window: float = INSTRUCT.window,
        gain: str = INSTRUCT.gain,
        max_gain: float = INSTRUCT.max_gain,
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Edit `image` by `instruction` (parts separated by commas) with SaaS and, with the same
        seed, plainly.  Steps and guidance 0 (or None) are the model's.  Seed -1 or
        randomize_seed=True draws a random seed.  Returns the edited image, the plain one (None
        with saas=False), the masks per part and step (gallery), the seed used, the files and a
        status line.  The two images are enlarged for display when small (`for_display`); the
        files keep the working size."""
        from pipelines import backbones, models
        from pipelines.errors import UserInputError
        from pipelines.instruct import T2I_SUPPORTED, edit_by_instruction, generate_by_parts, instruction_parts

        # a text-to-image model (builtin) draws a prompt of parts instead of editing an image
        drawing = models.backbone_without_loading((model or "").strip() or ctx.edit_model_choices[0]) in T2I_SUPPORTED
        if image is None and not drawing:
            raise UserInputError("Please upload an image first (or pick a text-to-image model, e.g. builtin, to "
                                 "generate a prompt of parts).")
        settings = INSTRUCT.replace(saas=bool(saas), steps=unset(steps), guidance=unset(guidance),
                                    image_guidance=unset(image_guidance), window=window, gain=gain,
                                    max_gain=max_gain).validated()  # every value checked before the model loads
        ctx.limits.check_settings(settings)
        parts = instruction_parts(instruction, split_and=drawing)
        use_seed = resolve_seed(seed, randomize_seed)
        progress(0, desc="Loading model")
        pipe = ctx.load(model, ctx.edit_model_choices)
        drawing = backbones.of(pipe) in T2I_SUPPORTED
        if drawing:
            parts = instruction_parts(instruction, split_and=True)
        # the steps the run will take on this model: left out, the model's, which --max-steps bounds too
        describe, run_steps, runs = stages(pipe, settings, parts, drawing)
        ctx.limits.check_default_steps(settings.steps, run_steps)
        with stoppable(ctx, request, TASK, pipe), denoiser_progress(pipe, progress, describe, run_steps, runs):
            if drawing:
                result = generate_by_parts(pipe, instruction, settings, seed=use_seed)
                if image is not None:
                    result.notes.insert(0, f"{models.model_name(pipe)} draws from text: the image was not used, and "
                                           "the instruction was read as a prompt of parts.")
            else:
                result = edit_by_instruction(pipe, image, instruction, settings, seed=use_seed)
        written = result.save(ctx.new_run_dir(TASK, request, about=f"{instruction} (seed {use_seed})"))
        parts = "; ".join(f"**{p}**" for p in result.parts)
        status = f"{len(result.parts)} part{'s' if len(result.parts) != 1 else ''}: {parts}."
        if result.gains:
            status += " Gains at the last rescaled step: " + ", ".join(f"{g:.2f}" for g in result.gains[-1]) + "."
        elif settings.saas and len(result.parts) > 1:
            status += " SaaS found no mask to rescale (the parts' maps were flat), so both results are alike."
        if result.notes:
            status += " " + " ".join(result.notes)
        every = max(1, len(result.masks) // 4)  # at most about 4 steps x parts in the gallery
        return (for_display(result.edited), for_display(result.plain), result.mask_gallery(every), result.seed,
                [str(p) for p in written], status)

    return instruct


def stages(pipe, settings: InstructSettings, parts: list[str], drawing: bool = False) -> tuple:
    """(describe, steps, runs) of `denoiser_progress` for one edit (or, `drawing`, one generation
    from a prompt of parts): with SaaS, plain sampling (the comparison) runs first, then SaaS;
    one run without SaaS, or when SaaS is known to change nothing (`saas_changes_nothing`)."""
    from pipelines import models
    from pipelines.instruct import edit_run, saas_changes_nothing
    from pipelines.instruct_settings import gain_rule

    if drawing:
        steps, rule = settings.steps or models.generation_defaults(pipe)["steps"], gain_rule(settings, False)
    else:
        run = edit_run(pipe, settings)  # the steps and gain rule the edit will use, on this model
        steps, rule = run["steps"], run["gain"]
    runs = 2 if settings.saas and not saas_changes_nothing(settings, len(parts), rule) else 1
    verb = "generating" if drawing else "editing"
    names = (f"plain {verb}, for comparison", f"{verb} with SaaS") if runs == 2 else (verb,)

    def describe(run: int, step: int) -> str:
        return f"{names[run]}: step {step}/{steps}"

    return describe, steps, runs


EDIT_TEXT = dict(label="Instruction (parts separated by commas)",
                 placeholder="make the circle blue, and make the background beige")
DRAW_TEXT = dict(label="Prompt of parts (separated by commas or 'and'; no image needed)",
                 placeholder="a red circle and a blue square on a striped background")


def follow_model(name: str | None):
    """The text box's label and placeholder, and the button's name, for the chosen model: an
    edit model edits the image by an instruction, a text-to-image model draws a prompt of parts."""
    from pipelines import models
    from pipelines.instruct import T2I_SUPPORTED

    drawing = models.backbone_without_loading(name or "") in T2I_SUPPORTED
    return gr.update(**(DRAW_TEXT if drawing else EDIT_TEXT)), gr.update(value="Generate" if drawing else "Edit")


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    from pipelines.instruct import SUPPORTED, T2I_SUPPORTED

    with gr.Tab("Instruction edit", id=TASK):
        gr.Markdown("Write several changes in one instruction, separated by commas, and press **Edit**: **SaaS** "
                    "(self-adaptive attention scaling) boosts the parts plain editing leaves out; both results, same "
                    "seed. With a text-to-image model (e.g. `builtin`) the instruction is a prompt of parts to draw, "
                    "no image needed.")
        with gr.Row():
            with gr.Column(scale=1):
                model = model_menu(ctx, SUPPORTED + T2I_SUPPORTED, "Instruction edit", choices=ctx.edit_model_choices,
                                   elem_id="in-model")
                image = gr.Image(label="Image to edit", type="pil", sources=["upload", "clipboard"], height=220,
                                 elem_id="in-image", elem_classes=PIXEL_RESULT)
                instruction = gr.Textbox(lines=2, elem_id="in-text", **EDIT_TEXT)
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="in-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="in-stop")
                stop_note = gr.Markdown(elem_id="in-stop-note")
                gr.Examples(examples=examples(), inputs=[image, instruction],
                            example_labels=[instruction for _, instruction in examples()],
                            label="Examples (for the built-in edit model)", elem_id="in-examples")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1 = random)", elem_id="in-seed")
                    randomize_seed = gr.Checkbox(value=False, label="Random seed", elem_id="in-randomize")
                    saas = checkbox(InstructSettings, "saas", label="SaaS", elem_id="in-saas")
                with gr.Accordion("Settings", open=False, elem_id="in-settings"):
                    with gr.Row():
                        steps = number(InstructSettings, "steps", label="Steps (0: the model's)", elem_id="in-steps")
                        guidance = number(InstructSettings, "guidance", label="Instruction guidance (0: the model's)",
                                          elem_id="in-guidance")
                        image_guidance = number(InstructSettings, "image_guidance",
                                                label="Image guidance (0: the model's)", elem_id="in-image-guidance")
                    window = slider(InstructSettings, "window", elem_id="in-window")
                    gain = radio(InstructSettings, "gain", elem_id="in-gain")
                    max_gain = slider(InstructSettings, "max_gain", elem_id="in-max-gain")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="in-status")
                with gr.Row():
                    edited = gr.Image(label="With SaaS", type="pil", format="png", interactive=False, height=360,
                                      elem_id="in-edited", elem_classes=PIXEL_RESULT)
                    plain = gr.Image(label="Plain (same seed)", type="pil", format="png", interactive=False,
                                     height=360, elem_id="in-plain", elem_classes=PIXEL_RESULT)
                seed_row, seed_used, reuse = seed_used_row("in")
                with details("Details: each part's mask and gain per step", elem_id="in-details"):
                    masks = gr.Gallery(label="Masks (red) and gains", columns=4, height="auto", object_fit="contain",
                                       elem_id="in-masks", elem_classes=PIXEL_RESULT)
                files = gr.File(label="Downloads (edited, plain, source, JSON)", file_count="multiple",
                                interactive=False, elem_id="in-files")

        handler = make_handler(ctx)
        outputs = [edited, plain, masks, seed_used, files, status]
        event = run.click(handler, [model, image, instruction, seed, randomize_seed, saas, steps, guidance,
                                    image_guidance, window, gain, max_gain], outputs, api_name=TASK, **GPU_CONCURRENCY)
        reveal_after_success(event, seed_row)
        clear_error_badges(event, outputs)
        stop.click(stop_handler(ctx, TASK, f"{TASK}_stop"), None, stop_note, api_name=f"{TASK}_stop", queue=False)
        model.change(follow_model, model, [instruction, run], queue=False, api_visibility="private",
                     show_progress="hidden")
        reuse.click(lambda used, current: (current if used is None else used, False), [seed_used, seed],
                    [seed, randomize_seed], api_visibility="private", queue=False)
    return {"image": image, "instruction": instruction, "edited": edited, "plain": plain, "seed": seed}
