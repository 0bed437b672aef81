"""The "Personalize" tab: learn several concepts from one image, watch the attention, generate.

Named API endpoints:
- `/personalize_train` (a generator: one update per optimiser step): status line with the step
  and the loss, the attention map of each learned token (and of the class words / the
  background), AttenCraft's masks, the learned file (written at every checkpoint), and the run
  folder's name.  Pressing *Train* again with the same settings resumes the run (also after
  *Stop*).
- `/personalize_cancel(run_folder)` (the *Stop* button): stop the training run of that name after
  its current step; it saves a checkpoint there and reports "Stopped at step N".
- `/personalize_generate`: an image from a prompt with the learned tokens, using the uploaded
  learned file if given, else the run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipelines import viz
from pipelines.personalize import DEFAULT_METHOD, GENERATE_SEED, METHODS, SUPPORTED, method_named, sample_steps
from pipelines.seeds import resolve_seed
from ui.common import (
    GPU_CONCURRENCY,
    PIXEL_RESULT,
    AppContext,
    clear_error_badges,
    details,
    model_menu,
    reveal_after_success,
    seed_used_row,
    user_errors_as_gradio,
)
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
#: the steps the tab starts with for the built-in model: a couple of minutes on a CPU (as its examples)
UI_BUILTIN_STEPS = 100


@dataclass(frozen=True)
class Suggestions:
    """What the tab starts with for a model: class words, the scene of the suggested prompt
    ("a <new1> circle" + scene) and the training steps."""

    class_words: str
    scene: str
    steps: int

    def prompt(self, token: str = "<new1>", word: str | None = None) -> str:
        return f"a {token} {word or self.class_words.split(',')[0].strip()} {self.scene}"


#: the built-in model draws coloured shapes on plain, striped, checkered and gradient backgrounds (no cats)
SHAPES_WORLD = Suggestions("circle,square", "on a striped background", UI_BUILTIN_STEPS)
#: every other model: the paper's (DisenDiff: cat and dog, 250 steps)
PAPER = Suggestions("cat,dog", "on the beach", DEFAULT.default("steps"))


def suggestions(model: str | None) -> Suggestions:
    """The class words, prompt and steps that suit `model`."""
    from pipelines import models

    return SHAPES_WORLD if models.builtin_folder((model or "").strip()) else PAPER


def follow_model(model, class_words, prompt, steps):
    """The Model menu changed: the new model's suggestions as placeholders, and as the values of
    the boxes the user has not edited (empty, or still holding a model's suggestion)."""
    new, every = suggestions(model), (SHAPES_WORLD, PAPER)

    def untouched(value, known) -> bool:
        return value is None or (isinstance(value, str) and not value.strip()) or value in known

    words = (dict(value=new.class_words) if untouched(class_words, {s.class_words for s in every}) else {})
    text = dict(value=new.prompt()) if untouched(prompt, {s.prompt() for s in every}) else {}
    return (gr.update(placeholder=new.class_words, **words), gr.update(placeholder=new.prompt(), **text),
            gr.update(value=new.steps) if untouched(steps, {s.steps for s in every}) else gr.skip())


def finds_masks(method: str | None) -> bool:
    """Whether the method finds masks before training (it has its own `prepare`: AttenCraft's
    mask initialisation), so the tab shows its masks."""
    from pipelines.personalize.base import Method

    kind = METHODS.get(method or "")
    return kind is not None and kind.prepare is not Method.prepare


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def reporting(stop, progress, desc: str, total: int | None, unit: str = "steps"):
    """A `stop_between_steps` question (asked before every denoiser call) that also moves the
    progress bar: "`desc` done/total"."""
    done = 0

    def ask() -> bool:
        nonlocal done
        progress((min(done, total) if total else done, total), desc=desc, unit=unit)
        done += 1
        return stop()

    return ask


class _Preparation:
    """Names the preparation on the progress bar: "preparing 8 prior images 3/8" (one report per
    regularisation image, made or kept from an earlier run), then AttenCraft's masks.

    The trainer tells each regularisation image (`Trainer.on_prior_image`), and the stop hook,
    asked before every denoiser call, tells when the model runs for anything else than an image."""

    def __init__(self, trainer, progress, stop):
        self.progress, self.stop, self.count = progress, stop, trainer.settings.prior_images
        self.images = f"preparing {_plural(self.count, 'prior image')}"
        self.masks = f"preparing {METHODS[trainer.method].title}'s masks" if finds_masks(trainer.method) \
            else "preparing"
        self.in_image = False

        def prior_image(done, count):
            self.in_image = done < count
            self.progress((done, count), desc=self.images, unit="images")

        trainer.on_prior_image = prior_image
        if self.count:
            progress((0, self.count), desc=self.images, unit="images")

    def ask(self) -> bool:
        if not self.in_image:
            self.progress(0, desc=self.masks)
        return self.stop()


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

    from pipelines.io import atomic_path

    source = folder / "learned.safetensors"
    target = folder / f"learned-step{step}.safetensors"
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # no hard links here: a copy, written atomically
        with atomic_path(target, "the learned file's copy") as temp:
            shutil.copyfile(source, temp)
    if previous and Path(previous).name.startswith("learned-step") and Path(previous) != target:
        Path(previous).unlink(missing_ok=True)
    return str(target)


#: the training image as a run folder keeps it, so that the Results tab can reopen the run
INPUT_IMAGE = "input.png"


def new_training_folder(ctx: AppContext, request, trainer, model: str, method: str, values: dict) -> Path:
    """A run folder for a new training run, holding what resuming it needs: the image
    (`INPUT_IMAGE`, lossless, so its fingerprint matches) and the tab's inputs (the record's
    `inputs`, read back by the Results tab's "Open in Personalize")."""
    from pipelines.io import write_atomic

    inputs = {"model": model or ctx.default_model, "class_words": ",".join(trainer.words), "method": method,
              **{key: float(value) if key == "tau" else int(value) for key, value in values.items()}}
    about = f"{trainer.method} on {', '.join(trainer.words)}, {inputs['steps']} steps"
    folder = ctx.new_run_dir("personalize", request, about=about, inputs=inputs)
    source = trainer.source_image
    write_atomic(folder / INPUT_IMAGE, lambda temp: source.save(temp, format="PNG"), "the training image")
    return folder


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
        progress=gr.Progress(),
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
        progress(0, desc="loading the model")
        pipe = load_fp32(model)
        folder = ctx.outputs.run_dir_named(run_folder, "personalize")
        trainer = Trainer(pipe, image, class_words, method, folder, settings=settings)
        if folder is None or not trainer.checkpoint_matches():
            trainer.output = new_training_folder(ctx, request, trainer, model, method, values)
        name = trainer.output.name
        # this request's stop flag: set by Stop (this session, or any client naming the run);
        # the results clean-up leaves the folder alone while it trains
        with ctx.stops.job(request, "personalize") as stop, ctx.outputs.in_use(trainer.output):
            with stop_flags_lock:
                stop_flags[name] = stop
            try:
                # the run's name reaches the page (and an API client) before the preparation, so
                # Stop can name it from the start
                masks = f" and {kind.title}'s masks" if finds_masks(method) else ""
                yield (f"Preparing {_plural(settings.prior_images, 'prior image')}{masks} before the first "
                       "training step ...", gr.skip(), gr.skip(), gr.skip(), name)
                yield from _train_steps(trainer, name, stop, progress, suggestions(model))
            finally:
                with stop_flags_lock:
                    stop_flags.pop(name, None)

    def _train_steps(trainer, name, stop, progress, suggested: Suggestions):
        from pipelines.stopping import Stopped, stop_between_steps

        try:  # the regularisation images and AttenCraft's masks run the model: stoppable at a step
            with stop_between_steps(trainer.pipe, _Preparation(trainer, progress, stop.is_set).ask):
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
        progress((trainer.step, trainer.total_steps), desc="training", unit="steps")
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
                status += " · done: generate with e.g. " + f"`{suggested.prompt(trainer.tokens[0], trainer.words[0])}`"
            if info.stopped:
                status = (f"Stopped at step {info.step}/{info.total} (checkpoint saved); press Train with the "
                          "same settings to resume.")
            progress((info.step, info.total), desc="training", unit="steps")
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
        progress=gr.Progress(),
        request: gr.Request = None,
    ):
        """Generate `prompt` (with a learned token such as <new1>) from the uploaded learned file,
        or from the run folder's.  Seed -1 draws a random one; steps and guidance None or 0 are
        the learned method's.  Returns image, seed used, files."""
        from pipelines.errors import UserInputError
        from pipelines.personalize import Learned, generate
        from pipelines.stopping import stop_between_steps

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
        # the sampler calls the denoiser once per step (PNDM once more: the bar then holds at total/total);
        # steps left out are the learned method's, which --max-steps bounds too
        total = sample_steps(learned.method, steps)
        ctx.limits.check_default_steps(steps, total, "Steps", "the learned method's default")
        progress(0, desc="loading the model")
        pipe = load_fp32(model)
        with ctx.stops.job(request, "personalize") as flag, \
                stop_between_steps(pipe, reporting(flag.is_set, progress, "generating", total)):
            result = generate(pipe, learned, prompt, seed=seed, steps=steps or None,
                              guidance=None if guidance in (None, UI_METHOD_GUIDANCE) else guidance)
        out = ctx.new_run_dir("personalize", request, about=f"{prompt} (seed {result.seed})") / f"personalized_seed{result.seed}.png"
        written = result.save(out)
        return result.image, result.seed, [str(p) for p in written]

    return personalize_train, personalize_generate, personalize_cancel


INTRO = ("**DisenDiff / AttenCraft**: learn each object of one image as a new word (`<new1>`, `<new2>`), watch "
         "its attention map as it trains, then generate with it. Train again resumes a stopped run.")
#: before the first run, the status line says what to do
START = "Upload an image (or pick an example), name each object's class, and press **Train**."
#: rules for this tab's elements (app.py adds them to the page): the examples' table fits its
#: column, and the file boxes are small while they are empty
CSS = """
#pz-examples table { table-layout: fixed; width: 100%; }
#pz-examples th { white-space: normal; }
#pz-examples td.image .container { width: 56px; height: 56px; }
#pz-learned-out .empty, #pz-files .empty { min-height: 0; height: 88px; }
"""


def build_tab(ctx: AppContext) -> dict:
    """Add the tab's components and events to the enclosing `gr.Blocks`; return the components."""
    start = suggestions(ctx.model_choices[0])  # the Model menu's first choice
    with gr.Tab("Personalize", id="personalize") as tab:
        gr.Markdown(INTRO, elem_id="pz-intro")
        with gr.Row():
            with gr.Column(scale=1, min_width=380):
                model = model_menu(ctx, SUPPORTED, "Personalization", elem_id="pz-model")
                with gr.Row():
                    image = gr.Image(label="Image with the concepts", type="pil", height=260, scale=1, min_width=170,
                                     elem_id="pz-image")
                    with gr.Column(scale=1, min_width=170):
                        class_words = gr.Textbox(label="Class words", value=start.class_words,
                                                 placeholder=start.class_words, elem_id="pz-classes")
                        steps = number(DEFAULT, "steps", value=start.steps,
                                       label=f"Steps (paper: {_per_method('steps')})", elem_id="pz-steps")
                        method = gr.Radio([(kind.title, name) for name, kind in METHODS.items()],
                                          value=DEFAULT_METHOD, label="Method", elem_id="pz-method")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="pz-train")
                    # elem_id and endpoint keep their first name (cancel); the button reads Stop, as on every tab
                    cancel = gr.Button("Stop", variant="stop", elem_id="pz-cancel")
                # the examples go here, under the buttons (filled below, once the prompt exists)
                examples_slot = gr.Column()
                with details("Training settings", elem_id="pz-settings"):
                    with gr.Row():
                        prior = number(DEFAULT, "prior_images", value=UI_DEFAULT_PRIOR,
                                       label=f"Prior images (paper: {DEFAULT.default('prior_images')})",
                                       elem_id="pz-prior")
                        tau = number(_owner("tau").settings, "tau", label=f"{_owner('tau').title} margin τ",
                                     elem_id="pz-tau")
                        train_seed = gr.Number(value=DEFAULT.default("seed"), precision=0, label="Training seed",
                                               elem_id="pz-train-seed")
                run_folder = gr.Textbox(visible=False, elem_id="pz-run")
            with gr.Column(scale=2):
                status = gr.Markdown(START, elem_id="pz-status")
                with gr.Row():
                    with gr.Column(scale=1):
                        result = gr.Image(label="Generated", type="pil", format="png", interactive=False, height=340,
                                          elem_id="pz-result", elem_classes=PIXEL_RESULT)
                        seed_row, seed_used, reuse = seed_used_row("pz")
                    with gr.Column(scale=1):
                        # a map per learned token and per class word (or the background): 2 x 2 for two concepts
                        maps = gr.Gallery(label="Attention map per token", columns=2, format="png", height=340,
                                          object_fit="contain", elem_id="pz-maps", elem_classes=PIXEL_RESULT)
                        masks = gr.Gallery(label="AttenCraft masks (token assigned)", columns=3, format="png",
                                           height=170, object_fit="contain", visible=finds_masks(DEFAULT_METHOD),
                                           elem_id="pz-masks", elem_classes=PIXEL_RESULT)
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt with a learned token", value=start.prompt(),
                                        placeholder=start.prompt(), scale=2, elem_id="pz-prompt")
                    seed = gr.Number(value=GENERATE_SEED, precision=0, label="Seed (-1 = random)", scale=1,
                                     min_width=120, elem_id="pz-seed")
                    gen_steps = number(DEFAULT, "sample_steps", scale=1, min_width=120, elem_id="pz-gen-steps")
                    guidance = number(DEFAULT, "sample_guidance", value=UI_METHOD_GUIDANCE, scale=1, min_width=120,
                                      label=f"Guidance (0: the method's, {_per_method('sample_guidance')})",
                                      elem_id="pz-guidance")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="pz-generate")
                    generate_stop = gr.Button("Stop", variant="stop", elem_id="pz-generate-stop")
                with gr.Row():
                    learned_out = gr.File(label="Learned file (download)", interactive=False, height=110,
                                          elem_id="pz-learned-out")
                    files = gr.File(label="Downloads (image, JSON)", file_count="multiple", interactive=False,
                                    height=110, elem_id="pz-files")
                with details("Generate from a learned file", elem_id="pz-learned"):
                    learned_in = gr.File(label="Learned file (.safetensors) to generate with, instead of the run's",
                                         file_types=[".safetensors"], type="filepath", height=110,
                                         elem_id="pz-learned-in")

        with examples_slot:
            gr.Examples(
                examples=[[str(EXAMPLES_DIR / "scene_1090003.png"), "circle,square", "disendiff", UI_BUILTIN_STEPS,
                           "a <new1> circle on a striped background"],
                          [str(EXAMPLES_DIR / "scene_1090004.png"), "triangle,square", "attencraft", UI_BUILTIN_STEPS,
                           "a <new2> square on a white background"]],
                inputs=[image, class_words, method, steps, prompt],
                visible_columns=[0, 1, 2],  # the steps and the prompt are set too, not shown
                label=f"Examples (built-in model, {UI_BUILTIN_STEPS} steps: minutes on a CPU)",
                elem_id="pz-examples",
            )

        # the masks are AttenCraft's: shown while a method that finds masks is chosen
        method.change(lambda name: gr.update(visible=finds_masks(name)), method, masks, queue=False,
                      api_visibility="private", show_progress="hidden")
        model.change(follow_model, [model, class_words, prompt, steps], [class_words, prompt, steps], queue=False,
                     api_visibility="private", show_progress="hidden")
        personalize_train, personalize_generate, personalize_cancel = make_handlers(ctx)
        train_outputs = [status, maps, masks, learned_out, run_folder]
        training = train.click(
            personalize_train, [model, image, class_words, method, steps, prior, tau, train_seed, run_folder],
            train_outputs, api_name="personalize_train", **GPU_CONCURRENCY)
        clear_error_badges(training, train_outputs)
        # not Gradio's `cancels=`: that kills the job mid-step (losing the steps since the last
        # checkpoint) and works only for the page that started it, never for an API client
        cancel.click(personalize_cancel, [run_folder], [status], api_name="personalize_cancel", queue=False)
        # the same request without a run name: stops this page's generation (or training)
        generate_stop.click(personalize_cancel, None, [status], api_visibility="private", queue=False)
        generate_outputs = [result, seed_used, files]
        generation = generate.click(personalize_generate,
                                    [model, learned_in, run_folder, prompt, seed, gen_steps, guidance],
                                    generate_outputs, api_name="personalize_generate", **GPU_CONCURRENCY)
        reveal_after_success(generation, seed_row)
        clear_error_badges(generation, generate_outputs)
        reuse.click(lambda used, current: current if used is None else used, [seed_used, seed], seed, queue=False,
                    api_visibility="private", show_progress="hidden")
    return {"tab": tab, "model": model, "image": image, "class_words": class_words, "method": method, "steps": steps,
            "prior": prior, "tau": tau, "train_seed": train_seed, "run_folder": run_folder, "prompt": prompt,
            "result": result, "status": status}
