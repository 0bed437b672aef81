"""The "Counterfactual steer" task: MedSteer cross-attention steering vectors.

The method, its defaults and our deviations are written up in docs/methods/steering.md.

1. `estimate_directions`: run the unsteered pipeline on N seeds for a positive and N seeds for
   a negative prompt, record per step and per cross-attention layer the mean output of the
   conditional rows over the image tokens (float32, streaming: a running sum), and take
   d[t, b] = normalise(mean_pos - mean_neg).  The result (`Directions`) is saved as safetensors,
   one (T, C) tensor per layer, with the metadata needed to check it against a model.
2. `counterfactual_pair`: the same prompt, seed, scheduler, steps and guidance, once plain and
   once with gated, norm-preserving removal of d on every cross-attention output (both CFG
   halves by default), plus an absolute-difference heatmap.
3. `generate_dataset`: K pairs into a folder with a JSONL manifest; resumable (finished pairs
   are skipped, every file is written atomically) and split across processes
   (`accelerate launch`: each process takes every num_processes-th seed).

Backbones: PixArt-alpha (the paper's) and SD 1.x/2.x UNets (the CASteer lineage): every
``transformer_blocks.*.attn2`` layer.  The policy is `attention_processors.medsteer.MedSteer`.

Paper defaults live in pipelines/steering_settings.py (`DirectionSettings`, `PairSettings`; MedSteer,
PixArt-alpha 512): 20 steps, CFG 4.5, the
pipeline's DPM-Solver multistep scheduler, empty negative prompt, resolution binning off,
estimation seeds base 0 + index, beta 2, all layers, all steps, both CFG halves, clamp step map.

Deviations, all deliberate:
- Seeds drive a CPU `torch.Generator` (the project's rule: the same image on any device); the
  paper seeds a generator on the model's device.
- SD UNets use guidance 7.5 by default (`SD_GUIDANCE`, our choice; CASteer's settings are not
  given), or the model folder's own default (`models.generation_defaults`, e.g. the built-in
  model's), and the model's own scheduler.
- The positive class uses seeds base+0..N-1 and the negative class base+N..2N-1 (balanced
  classes, population means as in the paper); `matched=True` gives both classes the same seeds
  (our optional matched-seed estimator).
- Estimation runs `batch_size` seeds per pipeline call (each with its own generator, so the
  noise is that of single runs) and never decodes latents.
- beta = 0 installs no processor: the steered image is the plain image.
- Pairs are computed in one batch of 4 rows [uncond base, uncond steer, cond base, cond steer]
  from identical initial latents (`batched=True`, our efficiency option); `batched=False`
  runs the two images separately.  Both start from the same noise; they agree to float
  rounding.
- Runs with fewer steps than the directions file are refused with step_map="clamp" (the
  paper's rule only defines longer runs); step_map="relative" maps any step count.
- A directions file records the model name it was estimated on; another name is refused
  unless `allow_other_model=True` (same architecture, e.g. a fine-tune).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from attention_processors import ControlState, attach, attention_layer_names
from attention_processors.medsteer import (
    NORM_EPS,
    MedSteer,
    cross_attention_layers,
    unit_directions,
)

from . import backbones, models, viz
from .errors import UserInputError
from .io import atomic_path, load_tensors, save_image, save_tensors
from .seeds import MAX_SEED, resolve_seed
from .steering_settings import (
    DIRECTIONS,
    MAX_SIDE,
    MIN_SIDE,
    PAIR,
    PAPER_GUIDANCE,
    PAPER_NEGATIVE,
    PAPER_POSITIVE,
    SD_GUIDANCE,
    STEP_MAPS,
    DirectionSettings,
    PairSettings,
)
from .tokenizers import check_fits

MAX_SEEDS = 100_000
FORMAT = "medsteer-directions/1"
SUPPORTED = (backbones.SD, backbones.PIXART)
#: the paper's backbone (MedSteer on PixArt-alpha): its guidance is the paper's
PAPER_BACKBONES = (backbones.PIXART,)


# ------------------------------------------------------------------------------ helpers


def _check_backbone(pipe) -> backbones.Backbone:
    return backbones.require(pipe, SUPPORTED, "Counterfactual steering")


model_name = models.model_name


def default_guidance(pipe) -> float:
    """The paper's guidance on its backbone; elsewhere the model's own default."""
    if models.backbone(pipe) in PAPER_BACKBONES:
        return PAPER_GUIDANCE
    # SD UNets: the model folder's own default (the built-in model's), else SD_GUIDANCE.
    return models.generation_defaults(pipe).get("guidance", SD_GUIDANCE)


def _pipe_kwargs(pipe) -> dict:
    return models.backbone(pipe).call_defaults(pipe, exact_size=True)  # the paper's: no resolution bins


def _check_prompt(prompt: str | None, what: str) -> str:
    if prompt is None or not str(prompt).strip():
        raise UserInputError(f"Please enter the {what}.")
    return str(prompt)


def validate_beta(beta: float) -> float:
    """Beta as a float, or the settings' one-sentence refusal (for callers that check it early)."""
    return PAIR.replace(beta=beta).validated().beta


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"Seeds must be between 0 and {MAX_SEED}, not {seed}.")
    return seed


def parse_seeds(text: str | int | Iterable[int]) -> list[int]:
    """"0-99", "3,5,9", "0-9,20" or one number -> a list of distinct seeds, in order."""
    if isinstance(text, int):
        return [_check_seed(text)]
    if not isinstance(text, str):
        return list(dict.fromkeys(_check_seed(s) for s in text))
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UserInputError(f"Seeds must look like 0-99 or 1,5,7, not {text!r}.")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) else start
        if stop < start:
            raise UserInputError(f"The seed range {part} runs backwards; write it as {stop}-{start}.")
        if stop - start + len(seeds) >= MAX_SEEDS:
            raise UserInputError(f"At most {MAX_SEEDS} seeds per run, not {stop - start + 1 + len(seeds)}.")
        seeds.extend(_check_seed(s) for s in range(start, stop + 1))
    return list(dict.fromkeys(seeds))


@models.one_call_at_a_time
def encode(pipe, prompt: str, negative_prompt: str, guidance: float) -> dict:
    """Prompt embeddings as `pipe(...)` keyword arguments: encode once, reuse for every image."""
    backbone = _check_backbone(pipe)
    tokenizer, window, _ = backbone.text_layout(pipe).first()  # what encode_prompt keeps
    check_fits(tokenizer, prompt, window)
    check_fits(tokenizer, negative_prompt, window, "negative prompt")
    cfg = backbone.uses_cfg_batch(pipe, guidance)
    with torch.no_grad():
        return backbone.prompt_embeds(pipe, prompt, negative_prompt, cfg, pipe._execution_device,
                                      clean_caption=_pipe_kwargs(pipe).get("clean_caption", True))


def _call_kwargs(pipe) -> dict:
    kwargs = _pipe_kwargs(pipe)
    kwargs.pop("clean_caption", None)  # the prompt is already encoded
    return kwargs


# ------------------------------------------------------------------------------ directions


@dataclass
class Directions:
    """Unit steering directions, layer name -> float32 (T, C), with their provenance."""

    vectors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def layers(self) -> list[str]:
        return list(self.vectors)

    def save(self, path: str | Path) -> Path:
        """Write a .safetensors file (atomically), the metadata as JSON in its header."""
        metadata = {"format": FORMAT, "meta": json.dumps(self.meta), "layers": json.dumps(self.layers)}
        return save_tensors(path, self.vectors, metadata, "directions file")

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        path = Path(path)
        tensors, header = load_tensors(path, FORMAT, "directions file", "a .safetensors file written by 'steer directions'")
        try:
            layers, meta = json.loads(header["layers"]), json.loads(header["meta"])
            vectors = {name: tensors[name].float() for name in layers}
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"{path.name} is damaged: its header does not list its layers.") from error
        shapes = {v.shape[0] for v in vectors.values()}
        if not vectors or len(shapes) != 1 or any(v.ndim != 2 for v in vectors.values()):
            raise UserInputError(f"{path.name} is damaged: its directions do not all have one (steps, width) shape.")
        return cls(vectors, meta)

    def check(self, pipe, steps: int, step_map: str = "clamp", allow_other_model: bool = False) -> None:
        """Raise UserInputError with one sentence if these directions cannot steer `pipe`."""
        denoiser = models.denoiser(pipe)
        names = cross_attention_layers(attention_layer_names(denoiser))
        made_for = self.meta.get("model", "another model")
        if len(names) != len(self.vectors):
            raise UserInputError(
                f"The directions file was made for {made_for} with {len(self.vectors)} cross-attention layers, "
                f"but this model has {len(names)}; estimate directions for this model."
            )
        if set(names) != set(self.vectors):
            missing = next(n for n in names if n not in self.vectors)
            raise UserInputError(
                f"The directions file was made for {made_for}, whose layers differ from this model's (no {missing}); "
                "estimate directions for this model."
            )
        modules = dict(denoiser.named_modules())
        for name in names:
            width = modules[name].to_out[0].out_features
            stored = self.vectors[name].shape[1]
            if width != stored:
                raise UserInputError(
                    f"The directions file was made for {made_for}: layer {name} is {stored} wide there but {width} "
                    "wide in this model; estimate directions for this model."
                )
        if not allow_other_model and made_for != model_name(pipe):
            raise UserInputError(
                f"The directions file was estimated on {made_for}, not on {model_name(pipe)}; estimate directions "
                "for this model (or allow another model of the same architecture)."
            )
        if step_map not in STEP_MAPS:
            raise UserInputError(f"The step map must be one of {', '.join(STEP_MAPS)}, not {step_map!r}.")
        if step_map == "clamp" and steps < self.steps:
            raise UserInputError(
                f"The directions file holds {self.steps} steps but this run has {steps}; use at least {self.steps} "
                "steps (longer runs reuse the last step's direction) or the relative step map."
            )


def _seeds_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@models.one_call_at_a_time
def estimate_directions(
    pipe,
    positive: str = PAPER_POSITIVE,
    negative: str = PAPER_NEGATIVE,
    settings: DirectionSettings | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> Directions:
    """Directions d[t, b] = normalise(mean_pos - mean_neg) over `samples` images per prompt.

    settings: `DirectionSettings` (MedSteer's by default); `options` override its fields by name,
    e.g. `samples=8, steps=20` (`layers`: a regular expression narrowing the cross-attention
    layers).  `progress` (optional) is called with (images done, images total) after every
    batch; a tqdm bar is shown as well.
    """
    from tqdm.auto import tqdm

    _check_backbone(pipe)
    positive = _check_prompt(positive, "positive prompt (the concept to remove)")
    negative = _check_prompt(negative, "negative prompt (the concept to steer towards)")
    if " ".join(positive.split()).casefold() == " ".join(negative.split()).casefold():
        raise UserInputError(
            "The positive and negative prompts are identical, so their difference is zero and there is no "
            "direction to steer along; give two different concepts."
        )
    settings = (settings or DIRECTIONS).replace(**options).validated()
    samples, steps, layers, matched = settings.samples, settings.steps, settings.layers, settings.matched
    guidance = default_guidance(pipe) if settings.guidance is None else settings.guidance
    default_h, default_w = models.default_size(pipe)
    height, width = settings.height or default_h, settings.width or default_w
    models.check_size(pipe, height, width, MIN_SIDE, MAX_SIDE)
    base_seed = settings.base_seed
    negative_prompt = settings.negative_prompt
    denoiser = models.denoiser(pipe)
    try:
        selected = cross_attention_layers(attention_layer_names(denoiser), layers)
    except re.error as error:
        raise UserInputError(f"The layer pattern {layers!r} is not a valid regular expression ({error}).") from None
    if not selected:
        raise UserInputError(f"No cross-attention layer of this model matches {layers!r}.")
    batch_size = settings.batch_size
    roles = models.backbone(pipe).row_roles(pipe, guidance)

    means = {}
    bar = tqdm(total=2 * samples, desc="Estimating directions", unit="image")
    done = 0
    try:
        for label, prompt, offset in (("positive", positive, 0), ("negative", negative, 0 if matched else samples)):
            embeds = encode(pipe, prompt, negative_prompt, guidance)
            controller = MedSteer(selected, mode="record", state=ControlState(row_roles=roles))
            seeds = [base_seed + offset + n for n in range(samples)]
            quiet = models.quiet_view(pipe)  # our bar counts images; the pipeline's would count steps
            for start in range(0, samples, batch_size):
                chunk = seeds[start:start + batch_size]
                # a fresh state per call: the step index restarts at 0; the sums carry on
                controller.state = ControlState(row_roles=roles)
                with attach(denoiser, controller):
                    quiet(
                        **embeds, num_inference_steps=steps, guidance_scale=guidance, height=height,
                        width=width, num_images_per_prompt=len(chunk),
                        generator=_seeds_generators(chunk), output_type="latent", **_call_kwargs(pipe),
                    )
                bar.update(len(chunk))
                done += len(chunk)
                if progress is not None:
                    progress(done, 2 * samples)
            means[label] = controller.means()
    finally:
        bar.close()

    vectors = unit_directions(means["positive"], means["negative"])
    norms = torch.stack([(means["positive"][n] - means["negative"][n]).norm(dim=-1) for n in selected])
    if not bool((norms > NORM_EPS).any()):
        raise UserInputError(
            "The two prompts give the same cross-attention means, so their difference is zero and there is no "
            "direction to steer along; give two different concepts."
        )
    meta = {
        "model": model_name(pipe),
        "family": models.backbone(pipe).name,
        "positive": positive,
        "negative": negative,
        "negative_prompt": negative_prompt,
        "samples": samples,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "base_seed": base_seed,
        "matched": bool(matched),
        "scheduler": type(pipe.scheduler).__name__,
        "layers": len(selected),
        "layer_pattern": layers,
        "zero_entries": int((norms <= NORM_EPS).sum()),
    }
    return Directions(vectors, meta)


# ------------------------------------------------------------------------------ pairs


def difference_heatmap(original: np.ndarray, steered: np.ndarray) -> tuple[Image.Image, float, float]:
    """JET heatmap of |original - steered| (mean over RGB, scaled to its maximum), mean and max."""
    diff = np.abs(original.astype(np.float32) - steered.astype(np.float32)).mean(-1)
    peak = float(diff.max())
    scaled = diff / peak if peak > 0 else diff
    return Image.fromarray(viz.jet(scaled)), float(diff.mean()), peak


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.uint8(np.clip(array * 255, 0, 255).round()))


@dataclass
class PairResult:
    original: Image.Image
    steered: Image.Image
    heatmap: Image.Image
    mean_abs_diff: float  # in [0, 1] image units
    seed: int
    params: dict = field(default_factory=dict)
    original_array: np.ndarray | None = field(default=None, repr=False)  # float (H, W, 3) in [0, 1]
    steered_array: np.ndarray | None = field(default=None, repr=False)

    def file_names(self) -> dict[str, str]:
        s = self.seed
        return {"original": f"orig_seed{s}.png", "steered": f"steered_seed{s}.png", "difference": f"diff_seed{s}.png"}

    def save(self, folder: str | Path) -> list[Path]:
        """Write orig_seed{s}.png, steered_seed{s}.png, diff_seed{s}.png, then pair_seed{s}.json."""
        folder = Path(folder)
        names = self.file_names()
        written = []
        for key, image in (("original", self.original), ("steered", self.steered), ("difference", self.heatmap)):
            written += save_image(image, folder / names[key], None)
        record = {**self.params, **names, "seed": self.seed, "mean_abs_diff": self.mean_abs_diff}
        sidecar = folder / f"pair_seed{self.seed}.json"
        with atomic_path(sidecar) as temp:
            temp.write_text(json.dumps(record, indent=2, default=str))
        return written + [sidecar]


def _steer_roles(halves: tuple[str, ...], steer: str, batched: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(row roles of the batch, roles to steer), from the backbone's roles of one image's rows."""
    wanted = halves if steer == "both" else ("cond",)
    if not batched:
        return halves, wanted
    roles = tuple(f"{h}_{kind}" for h in halves for kind in ("base", "steer"))
    return roles, tuple(f"{h}_steer" for h in wanted)


@models.one_call_at_a_time
def _render(pipe, embeds, seed, steps, guidance, height, width, controller=None, images=1, latents=None) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(embeds, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                  generator=generator, output_type="np", num_images_per_prompt=images, **_call_kwargs(pipe))
    if latents is not None:
        kwargs["latents"] = latents
    if controller is None:
        return pipe(**kwargs).images
    with attach(models.denoiser(pipe), controller):
        return pipe(**kwargs).images


def _initial_latents(pipe, seed, height, width, dtype) -> torch.Tensor:
    """The noise the pipeline draws itself for one image with this seed (CPU generator)."""
    from diffusers.utils.torch_utils import randn_tensor

    channels = models.denoiser(pipe).config.in_channels
    shape = (1, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), device=pipe._execution_device, dtype=dtype)


@dataclass
class _Settings:
    steps: int
    guidance: float
    height: int
    width: int
    negative_prompt: str
    beta: float
    steer: str
    step_map: str
    batched: bool


def pair_steps(directions: Directions, steps: int | None = None) -> int:
    """The denoising steps a pair takes with `directions`: `steps`, else (None or 0) the file's
    record of its estimation's steps, else its vectors' count.  The tab checks them against the
    server's --max-steps."""
    return int(steps or directions.meta.get("steps") or directions.steps)


def _settings(pipe, directions: Directions, settings: PairSettings) -> _Settings:
    """The pair's settings with every None taken from the directions (or the model), checked."""
    _check_backbone(pipe)
    meta = directions.meta
    settings = settings.validated()
    resolved = settings.replace(
        steps=pair_steps(directions, settings.steps),
        guidance=meta.get("guidance", default_guidance(pipe)) if settings.guidance is None else settings.guidance,
        height=settings.height or meta.get("height") or models.default_size(pipe)[0],
        width=settings.width or meta.get("width") or models.default_size(pipe)[1],
        negative_prompt=meta.get("negative_prompt", "") if settings.negative_prompt is None else settings.negative_prompt,
    ).validated()  # the file's values obey the same limits
    models.check_size(pipe, resolved.height, resolved.width, MIN_SIDE, MAX_SIDE)
    directions.check(pipe, resolved.steps, resolved.step_map, resolved.allow_other_model)
    return _Settings(resolved.steps, resolved.guidance, resolved.height, resolved.width, resolved.negative_prompt,
                     resolved.beta, resolved.steer, resolved.step_map, resolved.batched)


@models.one_call_at_a_time
def _pair(pipe, directions: Directions, embeds: dict, prompt: str, seed: int, s: _Settings) -> PairResult:
    halves = models.backbone(pipe).row_roles(pipe, s.guidance)
    args = (s.steps, s.guidance, s.height, s.width)
    if s.beta == 0:  # exact no-op: no processor installed at all
        original = _render(pipe, embeds, seed, *args)[0]
        steered = original.copy()
    else:
        roles, steer_roles = _steer_roles(halves, s.steer, s.batched)
        controller = MedSteer(
            directions.layers, mode="steer", directions=directions.vectors, beta=s.beta,
            steer_roles=steer_roles, step_map=s.step_map, run_steps=s.steps, state=ControlState(row_roles=roles),
        )
        if s.batched:
            latents = _initial_latents(pipe, seed, s.height, s.width, embeds["prompt_embeds"].dtype)
            both = _render(pipe, embeds, seed, *args, controller=controller, images=2, latents=latents.repeat(2, 1, 1, 1))
            original, steered = both[0], both[1]
        else:
            original = _render(pipe, embeds, seed, *args)[0]
            steered = _render(pipe, embeds, seed, *args, controller=controller)[0]
    original_image, steered_image = _to_pil(original), _to_pil(steered)
    heatmap, mean_diff, _ = difference_heatmap(np.asarray(original_image), np.asarray(steered_image))
    params = {
        "task": "steering",
        "model": model_name(pipe),
        "prompt": prompt,
        "seed": seed,
        "beta": s.beta,
        "steps": s.steps,
        "guidance": s.guidance,
        "height": s.height,
        "width": s.width,
        "negative_prompt": s.negative_prompt,
        "steer": s.steer,
        "step_map": s.step_map,
        "scheduler": type(pipe.scheduler).__name__,
        "directions": {k: directions.meta.get(k) for k in ("positive", "negative", "samples", "steps", "model")},
    }
    return PairResult(original_image, steered_image, heatmap, mean_diff / 255.0, seed, params,
                      original_array=original, steered_array=steered)


def counterfactual_pair(
    pipe,
    directions: Directions,
    prompt: str,
    seed: int | None = None,
    settings: PairSettings | None = None,
    **options,
) -> PairResult:
    """The plain and the steered image of `prompt` with the same seed, and their difference.

    settings: `PairSettings` (MedSteer's by default); `options` override its fields by name
    (`beta=1`).  Steps, guidance, size and the CFG negative prompt left as None are those the
    directions were estimated with.  seed None (or negative) draws a random seed, reported in
    the result.
    """
    prompt = _check_prompt(prompt, "prompt to steer")
    s = _settings(pipe, directions, (settings or PAIR).replace(**options))
    seed = resolve_seed(seed)
    embeds = encode(pipe, prompt, s.negative_prompt, s.guidance)
    return _pair(pipe, directions, embeds, prompt, seed, s)


# ------------------------------------------------------------------------------ dataset


def shard(items: list, index: int, count: int) -> list:
    """The part of `items` process `index` of `count` handles: every count-th item."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} is not in 0..{count - 1}")
    return list(items[index::count])


@dataclass
class DatasetSummary:
    folder: Path
    written: list[int]  # seeds generated by this process
    skipped: list[int]  # seeds of this process already finished
    manifest: Path | None  # written by process 0 once every process is done


def _pair_done(folder: Path, seed: int) -> bool:
    sidecar = folder / f"pair_seed{seed}.json"
    if not sidecar.is_file():
        return False
    try:
        record = json.loads(sidecar.read_text())
        return all((folder / record[k]).is_file() for k in ("original", "steered", "difference"))
    except (OSError, ValueError, KeyError):
        return False


def _run_config(pipe, directions: Directions, prompt: str, s: _Settings) -> dict:
    return {
        "model": model_name(pipe), "prompt": prompt, "beta": s.beta, "steps": s.steps, "guidance": s.guidance,
        "height": s.height, "width": s.width, "negative_prompt": s.negative_prompt, "steer": s.steer,
        "step_map": s.step_map,
        "directions": {k: directions.meta.get(k) for k in ("model", "positive", "negative", "samples", "steps")},
    }


def write_manifest(folder: str | Path, seeds: list[int]) -> Path:
    """manifest.jsonl: one line per finished pair of `seeds` (seed order), written atomically."""
    folder = Path(folder)
    lines = []
    for seed in seeds:
        if _pair_done(folder, seed):
            record = json.loads((folder / f"pair_seed{seed}.json").read_text())
            lines.append(json.dumps({k: record.get(k) for k in
                                     ("seed", "prompt", "beta", "original", "steered", "difference", "mean_abs_diff")}))
    manifest = folder / "manifest.jsonl"
    with atomic_path(manifest) as temp:
        temp.write_text("".join(line + "\n" for line in lines))
    return manifest


def generate_dataset(
    pipe,
    directions: Directions,
    prompt: str,
    seeds: str | Iterable[int],
    output_dir: str | Path,
    settings: PairSettings | None = None,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    wait: Callable[[], None] | None = None,
    **options,
) -> DatasetSummary:
    """Counterfactual pairs for every seed into `output_dir`, with manifest.jsonl.

    Resumable: pairs whose files and pair_seed{s}.json exist are skipped (every file is written
    atomically, the JSON last).  A folder made with other settings is refused.  Under
    `accelerate launch` pass the process index and count and `wait` (wait_for_everyone):
    process i takes seeds i, i+count, ...; process 0 writes the manifest once all are done.
    """
    from tqdm.auto import tqdm

    prompt = _check_prompt(prompt, "prompt to steer")
    seed_list = parse_seeds(seeds)
    if not seed_list:
        raise UserInputError("Please give at least one seed.")
    s = _settings(pipe, directions, (settings or PAIR).replace(**options))
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"The output {folder} is a file; give a folder.")
    embeds = encode(pipe, prompt, s.negative_prompt, s.guidance)  # a prompt too long is refused before any file
    config = _run_config(pipe, directions, prompt, s)
    config_path = folder / "run.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if config_path.is_file():
            previous = json.loads(config_path.read_text())
            if previous != json.loads(json.dumps(config)):
                changed = sorted(k for k in set(config) | set(previous) if previous.get(k) != config.get(k))
                raise UserInputError(
                    f"{folder} holds pairs made with other settings ({', '.join(changed)}); use a new folder to "
                    "change them, or the same settings to resume."
                )
        else:
            with atomic_path(config_path) as temp:
                temp.write_text(json.dumps(config, indent=2))
    except OSError as error:
        raise UserInputError(f"Cannot write to {folder}: {error.strerror or error}.") from error
    except ValueError as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(f"{config_path} is damaged; use a new folder.") from error

    mine = shard(seed_list, process_index, num_processes)
    done = {seed for seed in mine if _pair_done(folder, seed)}
    skipped = [seed for seed in mine if seed in done]
    todo = [seed for seed in mine if seed not in done]
    written = []
    if todo:
        quiet = models.quiet_view(pipe)  # one bar over the pairs, not one per image
        for seed in tqdm(todo, desc=f"Pairs (process {process_index})" if num_processes > 1 else "Pairs"):
            result = _pair(quiet, directions, embeds, prompt, seed, s)
            try:
                result.save(folder)
            except OSError as error:
                raise UserInputError(f"Cannot write to {folder}: {error.strerror or error}.") from error
            written.append(seed)
    if wait is not None:
        wait()
    manifest = write_manifest(folder, seed_list) if process_index == 0 else None
    return DatasetSummary(folder, written, skipped, manifest)
