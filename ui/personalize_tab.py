"""The "Personalize" tab: learn several concepts from one image, watch the attention, generate.

Named API endpoints:
- `/personalize_train` (a generator: one update per optimiser step): status line with the step
  and the loss, the attention map of each learned token (and of the class words / the
  background), AttenCraft's masks, the learned file (written at every checkpoint), and the run
  folder's name.  Pressing *Train* again with the same settings resumes the run (also after
  *Cancel*).
- `/personalize_cancel(run_folder)`: stop the training run of that name after its current step;
  it saves a checkpoint there and reports "Stopped at step N".
- `/personalize_generate`: an image from a prompt with the learned tokens, using the uploaded
  learned file if given, else the run's.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines import viz
from pipelines.personalize import DEFAULT_METHOD, GENERATE_SEED, METHODS, method_named
from pipelines.seeds import resolve_seed
from ui.common import GPU_CONCURRENCY, AppContext, stoppable, user_errors_as_gradio
from ui.settings_controls import number

ORDER = 50  # position among the tabs
MAP_SIDE = 128  # pixels of one attention-map thumbnail
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

# The controls' ranges and defaults come from the methods' settings (pipelines/personalize/):
# the default method's, and for a field of one method only (AttenCraft's tau), that method's.
# The tab's own choices, deliberately unlike the settings:
UI_DEFAULT_PRIOR = 8  # ours: a quick start in the UI (the papers use 200; raise it for real runs)
UI_METHOD_GUIDANCE = 0  # the guidance box's 0 stands for the learned method's own (6 / 7.5)
# the training seed follows the seed rule of every tab (pipelines/seeds.py: -1 draws one), not the field's range

DEFAULT = METHODS[DEFAULT_METHOD].settings


def _owner(name: str):
    """The method (class) whose settings hold the field `name`: the default method's if it has it."""
    kinds = [METHODS[DEFAULT_METHOD], *METHODS.values()]
    return next(kind for kind in kinds if name in kind.settings.specs())


def _per_method(name: str) -> str:
    """Each method's default of a field, "250 / 500"."""
    return " / ".join(f"{kind.settings.default(name):g}" for kind in METHODS.values())



def _gallery(maps, labels) -> list:
    if maps is None:
        return []
    return [(viz.thumbnail(m.numpy(), MAP_SIDE), label) for m, label in zip(maps, labels)]


def _snapshot_learned(folder: Path, step: int, previous: str | None) -> str:
    """A name for this checkpoint's learned file that nothing rewrites (a hard link, else a copy):
    learned.safetensors is replaced at every checkpoint while the browser may still download it."""
    import os
    import shutil

    source = folder / "learned.safetensors"
    target = folder / f"learned-step{step}.safetensors"
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    if previous and Path(previous).name.startswith("learned-step") and Path(previous) != target:
        Path(previous).unlink(missing_ok=True)
    return str(target)


def make_handlers(ctx: AppContext):
    """(personalize_train, personalize_generate, personalize_cancel): the event handlers, also
    the API endpoints."""
    import threading

    # run name -> its stop flag, for the runs training now (any session may stop a run it can
    # name: the browser that started it, or an API client that got the name from the stream)
    stop_flags: dict[str, threading.Event] = {}
    stop_flags_lock = threading.Lock()

    def load_fp32(model):
        import torch

        from pipelines import models

        ctx.load(model)  # validates the name against the server's models
        return models.load((model or "").strip() or ctx.default_model, device=ctx.device, dtype=torch.float32)

    @user_errors_as_gradio
    def personalize_train(
        model: str,
        image,
        class_words: str,
        method: str = DEFAULT_METHOD,
        steps: float = DEFAULT.default("steps"),
        prior_images: float = UI_DEFAULT_PRIOR,
        tau: float = _owner("tau").settings.default("tau"),
        seed: float = DEFAULT.default("seed"),
        run_folder: str | None = None,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Train (or resume) DisenDiff / AttenCraft on one image; yields one update per step.

        Yields (status, attention maps gallery, masks gallery, learned file, run folder).
        `run_folder`: the name (not a path) of an earlier run's folder, as this function returned
        it; it is resumed when its settings match, otherwise a new folder is made.
        """
        from pipelines.errors import UserInputError
        from pipelines.personalize import Trainer

        if image is None:
            raise UserInputError("Please upload an image holding the concepts.")
        method, kind = method_named(method)
        values = {"steps": steps, "prior_images": prior_images, "tau": tau,
                  "seed": resolve_seed(0 if seed is None else seed)}
        # the method's settings take the controls it has (tau is AttenCraft's); checked before the model loads
        settings = kind.settings().replace(**{k: v for k, v in values.items() if k in kind.settings.specs()})
        settings = settings.validated()
        ctx.limits.check_settings(settings, training=("steps",))
        pipe = load_fp32(model)
        folder = ctx.outputs.run_dir_named(run_folder, "personalize")
        trainer = Trainer(pipe, image, class_words, method, folder, settings=settings)
        if folder is None or not trainer.checkpoint_matches():
            trainer.output = ctx.outputs.new_run_dir("personalize")
        name = trainer.output.name
        # this request's stop flag: set by Cancel (this session, or any client naming the run)
        with ctx.stops.job(request, "personalize") as stop:
            with stop_flags_lock:
                stop_flags[name] = stop
            try:
                # the run's name reaches the page (and an API client) before the preparation, so
                # Cancel can name it from the start
                yield "Preparing (regularisation images, masks) ...", gr.skip(), gr.skip(), gr.skip(), name
                progress(0, desc="Preparing (regularisation images, masks)")
                yield from _train_steps(trainer, name, stop, progress)
            finally:
                with stop_flags_lock:
                    stop_flags.pop(name, None)

    def _train_steps(trainer, name, stop, progress):
        from pipelines.stopping import Stopped, stop_between_steps

        try:  # the regularisation images and AttenCraft's masks run the model: stoppable at a step
            with stop_between_steps(trainer.pipe, stop.is_set):
                trainer.start()
        except Stopped as stopped:
            yield (f"Stopped while preparing (at denoising step {stopped.step} of the regularisation images), "
                   "before the first training step; press Train to start again."), [], [], None, name
            return
        resumed = f" (resumed from step {trainer.resumed_from})" if trainer.resumed_from else ""
        maps, masks = [], []
        learned = str(trainer.output / "learned.safetensors") if (trainer.output / "learned.safetensors").is_file() else None
        if trainer.step >= trainer.total_steps:
            yield f"Already trained {trainer.step} steps{resumed}.", maps, masks, learned, name
            return
        for info in trainer.run(stop=stop.is_set):
            if info.maps is not None:
                maps = _gallery(info.maps, info.map_labels)
            if info.masks is not None:
                masks = _gallery(info.masks, info.mask_labels)
            if info.note:  # a checkpoint was written: offer a frozen copy of this step's file
                learned = _snapshot_learned(trainer.output, info.step, learned)
                file_update = learned
            else:
                file_update = gr.skip()  # the file being served is never rewritten under it
            parts = ", ".join(f"{k} {v:.4f}" for k, v in info.parts.items())
            status = (f"Step {info.step}/{info.total}{resumed} · loss {info.loss:.4f} ({parts}) · "
                      f"{trainer.method}, tokens " + ", ".join(f"`{t}` {w}" for t, w in zip(trainer.tokens, trainer.words)))
            if info.step == info.total:
                status += " · done: generate below with e.g. " + f"`a {trainer.tokens[0]} {trainer.words[0]} on the beach`"
            if info.stopped:
                status = (f"Stopped at step {info.step}/{info.total} (checkpoint saved); press Train with the "
                          "same settings to resume.")
            progress((info.step, info.total), desc=f"loss {info.loss:.4f}")
            yield status, maps, masks, file_update, name

    def personalize_cancel(run_folder: str | None = None, request: gr.Request = None) -> str:
        """Stop the training run named `run_folder` (as personalize_train streams it) after its
        current step; it saves a checkpoint there, so the same settings resume from that step.
        Without a name: stop this session's (this page's, this gradio_client.Client's) training
        and generation in this tab."""
        name = run_folder.strip() if isinstance(run_folder, str) else ""
        with stop_flags_lock:
            stop = stop_flags.get(name) if name else None
        if stop is not None:
            stop.set()
            return "Stopping after the current step ..."
        if ctx.stops.stop(request, "personalize"):
            return "Stopping after the current step ..."
        return "No training with this run name is running." if name else "Nothing of yours is running in this tab."

    @user_errors_as_gradio
    def personalize_generate(
        model: str,
        learned_file: str | None = None,
        run_folder: str | None = None,
        prompt: str = "",
        seed: float | None = GENERATE_SEED,
        steps: float = DEFAULT.default("sample_steps"),
        guidance: float | None = None,
        progress=gr.Progress(track_tqdm=True),
        request: gr.Request = None,
    ):
        """Generate `prompt` (with a learned token such as <new1>) from the uploaded learned file,
        or from the run folder's.  Seed -1 draws a random one; steps and guidance None or 0 are
        the learned method's.  Returns image, seed used, files."""
        from pipelines.errors import UserInputError
        from pipelines.personalize import Learned, generate

        seed = resolve_seed(seed)  # cheap checks first: no file is read for a bad seed
        if learned_file:
            path = Path(learned_file)
        elif (folder := ctx.outputs.run_dir_named(run_folder, "personalize")) and (folder / "learned.safetensors").is_file():
            path = folder / "learned.safetensors"
        else:
            raise UserInputError("Train first, or upload a learned file (.safetensors).")
        if steps:
            ctx.limits.check_steps(steps, "Steps")
        learned = Learned.load(path)
        pipe = load_fp32(model)
        with stoppable(ctx, request, "personalize", pipe):
            result = generate(pipe, learned, prompt, seed=seed, steps=steps or None,
                              guidance=None if guidance in (None, UI_METHOD_GUIDANCE) else guidance)
        out = ctx.outputs.new_run_dir("personalize") / f"personalized_seed{result.seed}.png"
        written = result.save(out)
        return result.image, result.seed, [str(p) for p in written]

    return personalize_train, personalize_generate, personalize_cancel


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    with gr.Tab("Personalize", id="personalize"):
        gr.Markdown(
            "**DisenDiff / AttenCraft**: learn each object of one photo as a new word (`<new1>`, `<new2>`) "
            "by fine-tuning the cross-attention keys/values and the new token embeddings, with attention "
            "losses that keep the concepts apart. Watch each token's attention map as it trains, then "
            "generate e.g. *a &lt;new1&gt; cat on the beach*. Pressing Train again resumes a cancelled run."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=ctx.model_choices, value=ctx.default_model, label="Model",
                                    elem_id="pz-model")
                image = gr.Image(label="Image with the concepts", type="pil", elem_id="pz-image")
                class_words = gr.Textbox(label="Class word of each concept (comma-separated, one token each)",
                                         value="cat,dog", elem_id="pz-classes")
                method = gr.Radio([(kind.title, name) for name, kind in METHODS.items()], value=DEFAULT_METHOD,
                                  label="Method", elem_id="pz-method")
                with gr.Row():
                    steps = number(DEFAULT, "steps", label=f"Steps (paper: {_per_method('steps')})",
                                   elem_id="pz-steps")
                    prior = number(DEFAULT, "prior_images", value=UI_DEFAULT_PRIOR,
                                   label=f"Prior images (paper: {DEFAULT.default('prior_images')})", elem_id="pz-prior")
                with gr.Row():
                    tau = number(_owner("tau").settings, "tau", label=f"{_owner('tau').title} margin τ",
                                 elem_id="pz-tau")
                    train_seed = gr.Number(value=DEFAULT.default("seed"), precision=0, label="Training seed",
                                           elem_id="pz-train-seed")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="pz-train")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="pz-cancel")
                run_folder = gr.Textbox(visible=False, elem_id="pz-run")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="pz-status")
                maps = gr.Gallery(label="Attention map per token", columns=6, format="png", height=200,
                                  elem_id="pz-maps")
                masks = gr.Gallery(label="AttenCraft masks (token assigned)", columns=6, format="png", height=200,
                                   elem_id="pz-masks")
                learned_out = gr.File(label="Learned file (download)", interactive=False, elem_id="pz-learned-out")
                learned_in = gr.File(label="Or upload a learned file (.safetensors)", file_types=[".safetensors"],
                                     type="filepath", elem_id="pz-learned-in")
                prompt = gr.Textbox(label="Prompt with a learned token", value="a <new1> cat on the beach",
                                    elem_id="pz-prompt")
                with gr.Row():
                    seed = gr.Number(value=GENERATE_SEED, precision=0, label="Seed (-1 = random)", elem_id="pz-seed")
                    gen_steps = number(DEFAULT, "sample_steps", elem_id="pz-gen-steps")
                    guidance = number(DEFAULT, "sample_guidance", value=UI_METHOD_GUIDANCE,
                                      label=f"Guidance (0 = the method's: {_per_method('sample_guidance')})",
                                      elem_id="pz-guidance")
                generate = gr.Button("Generate", elem_id="pz-generate")
                with gr.Row():
                    result = gr.Image(label="Generated", type="pil", format="png", interactive=False,
                                      elem_id="pz-result")
                    with gr.Column():
                        seed_used = gr.Number(label="Seed used", precision=0, interactive=False,
                                              elem_id="pz-seed-used")
                        files = gr.File(label="Downloads (image, JSON)", file_count="multiple", interactive=False,
                                        elem_id="pz-files")

        gr.Examples(
            examples=[[str(EXAMPLES_DIR / "scene_1090003.png"), "circle,square", "disendiff", 100,
                       "a <new1> circle on a striped background"],
                      [str(EXAMPLES_DIR / "scene_1090004.png"), "triangle,square", "attencraft", 100,
                       "a <new2> square on a white background"]],
            inputs=[image, class_words, method, steps, prompt],
            label="Examples (shapes-world scenes for the built-in model; 100 steps train in one to two minutes on a CPU)",
        )

        personalize_train, personalize_generate, personalize_cancel = make_handlers(ctx)
        train.click(
            personalize_train, [model, image, class_words, method, steps, prior, tau, train_seed, run_folder],
            [status, maps, masks, learned_out, run_folder], api_name="personalize_train", **GPU_CONCURRENCY)
        # not Gradio's `cancels=`: that kills the job mid-step (losing the steps since the last
        # checkpoint) and works only for the page that started it, never for an API client
        cancel.click(personalize_cancel, [run_folder], [status], api_name="personalize_cancel", queue=False)
        generate.click(personalize_generate, [model, learned_in, run_folder, prompt, seed, gen_steps, guidance],
                       [result, seed_used, files], api_name="personalize_generate", **GPU_CONCURRENCY)
    return {"image": image, "class_words": class_words, "prompt": prompt, "result": result, "status": status}
