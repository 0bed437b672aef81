"""What DisenDiff and AttenCraft share: data, prior images, the training loop, checkpoints, the
learned file and generation (docs/methods/personalize.md has both methods, every default and our
deviations).

Both methods fine-tune what Custom Diffusion fine-tunes: the key and value projections of every
cross-attention layer (``*.attn2.to_k/to_v``, full rank by default, a peft LoRA on them as an
option) and the embeddings of new tokens ``<new1>``, ``<new2>`` (, ``<new3>``); everything else
is frozen.  On top of the denoising loss they add an attention loss computed from the
cross-attention maps captured by `attention_processors.personalize.PersonalizeAttention`.

`Trainer` is one loop for both: the method's settings (`disendiff.DisenDiffSettings`,
`attencraft.AttenCraftSettings`, with the paper defaults) say how much, and the method's
`Method` object (`METHODS` in `__init__.py`) adds the captions, the rows of each batch, the loss
and AttenCraft's masks.  Runs write into an output folder: ``checkpoint.pt`` (trainable tensors,
optimizer state, RNG state, masks; written every `checkpoint_every` steps to a temporary file,
then renamed) and ``learned.safetensors`` (see `Learned`); a LoRA run also writes
``pytorch_lora_weights.safetensors``, the same LoRA in the format diffusers'
``pipe.load_lora_weights(folder)`` reads (the new token rows are only in ours).  Rerunning with
the same folder resumes from the checkpoint.  `accelerate` handles the device, mixed precision
(autocast + grad scaling) and several processes (``accelerate launch app.py personalize train
...``: every process trains on its own random draws and the gradients of the few trainable
tensors are averaged before each step).

`generate` loads a learned file onto the base pipeline (refused on another base model, and for
prompts without a learned token) and samples with the method's settings.

How the new token rows, the LoRA option and the learned file work, and why, is in
docs/methods/personalize.md ("How we compute it", "Where we deviate").
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from attention_processors import ControlState, attach
from attention_processors.personalize import INSTANCE, PersonalizeAttention, unet_personalization_layers

from .. import backbones, models
from ..errors import UserInputError, out_of_memory_message
from ..io import load_image, load_tensors, save_image, save_tensors, save_torch, write_atomic
from ..seeds import resolve_seed
from ..tokenizers import check_fits
from . import DEFAULT_METHOD, METHODS, method_named, method_of, sample_steps
from .base import GENERATE_SEED, MIN_CONCEPTS, Method, PersonalizeSettings

FORMAT = "personalize-learned/1"
CHECKPOINT = "checkpoint.pt"
LEARNED = "learned.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: `pipe.load_lora_weights(folder)`
ADAPTER = "personalize"  # the peft adapter's name while it is installed
TOKEN_NAMES = ("<new1>", "<new2>", "<new3>")
SUPPORTED = (backbones.SD,)


# ----------------------------------------------------------------------------- validation


def parse_class_words(class_words) -> list[str]:
    if isinstance(class_words, str):
        class_words = class_words.split(",")
    words = [str(w).strip().lower() for w in (class_words or []) if str(w).strip()]
    return words


def _suggest(tokenizer, word: str) -> str:
    pieces = [p.replace("</w>", "") for p in tokenizer.tokenize(word) if p.endswith("</w>")]
    pieces = [p for p in pieces if p.isalpha() and len(p) > 2]
    for piece in reversed(pieces):
        if len(tokenizer(piece, add_special_tokens=False).input_ids) == 1:
            return piece
    return "toy"


def check_class_words(tokenizer, words: list[str], method: str) -> list[int]:
    """Token ids of the class words, or UserInputError (count, or a word that is not one token)."""
    limit = METHODS[method].settings.MAX_CONCEPTS
    if len(words) < MIN_CONCEPTS:
        raise UserInputError(
            f"Name at least {MIN_CONCEPTS} concepts by their class words, e.g. 'cat,dog' (got {len(words)})."
        )
    if len(words) > limit:
        raise UserInputError(f"{method} supports at most {limit} concepts from one image, not {len(words)}.")
    ids = []
    for word in words:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(word_ids) != 1:
            raise UserInputError(
                f"The class word '{word}' is {len(word_ids)} tokens for this model's tokenizer; use a "
                f"single-token word such as '{_suggest(tokenizer, word)}'."
            )
        ids.append(word_ids[0])
    return ids


# ----------------------------------------------------------------------------- text side


@contextmanager
def learned_token_embeddings(text_encoder, first_id: int, rows: torch.Tensor) -> Iterator[None]:
    """While active, token ids >= `first_id` embed as ``rows[id - first_id]``.

    Hooks on the encoder's input-embedding module: ids of new tokens are replaced by 0 before
    the lookup and their output rows by `rows` after it (gradients flow into `rows` only); every
    other position is the stock lookup, bit for bit.  The hooks are removed on exit.
    """
    embedding = text_encoder.get_input_embeddings()
    seen: dict[str, torch.Tensor] = {}

    def pre(module, args):
        ids = args[0]
        new = ids >= first_id
        seen["ids"], seen["new"] = ids, new
        return (ids.masked_fill(new, 0), *args[1:])

    def post(module, args, output):
        new = seen["new"]
        if not bool(new.any()):
            return output
        index = (seen["ids"] - first_id).clamp(0, rows.shape[0] - 1)
        return torch.where(new[..., None], rows.to(output.dtype)[index], output)

    h1 = embedding.register_forward_pre_hook(pre)
    h2 = embedding.register_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def personal_tokenizer(tokenizer, n: int):
    """A copy of the pipeline's tokenizer with `<new1>`..`<newN>` added (the shared one is untouched)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(list(TOKEN_NAMES[:n]))
    return tok


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _encode(text_encoder, ids: torch.Tensor, first_id: int, rows: torch.Tensor) -> torch.Tensor:
    with learned_token_embeddings(text_encoder, first_id, rows):
        return text_encoder(ids.to(text_encoder.device))[0]


# ----------------------------------------------------------------------------- weights


@contextmanager
def swapped_weights(unet, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Use `weights` (module name -> weight) for those Linear modules; restore the originals."""
    modules = dict(unet.named_modules())
    originals = []
    try:
        for name, weight in weights.items():
            module = modules[name]
            originals.append((module, module.weight))
            module.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
        yield
    finally:
        for module, weight in originals:
            module.weight = weight


def _kv_names(attn2_layers: list[str]) -> list[str]:
    return [f"{layer}.{proj}" for layer in attn2_layers for proj in ("to_k", "to_v")]


def lora_config(names, rank: int, alpha: float | None = None):
    """The peft config of our LoRA: rank `rank` on exactly the modules `names`, scale alpha / r."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(rank if alpha is None else alpha), target_modules=sorted(names),
                      init_lora_weights=True)


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False)


def refuse_peft_adapters(unet) -> None:
    """One sentence when `unet` already carries peft adapters (ours would be unloaded with them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(unet, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        raise UserInputError("The model has peft/LoRA adapters loaded; unload them (pipe.unload_lora_weights()) "
                             "before personalizing it.")


@contextmanager
def lora_adapter(unet, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> Iterator[dict]:
    """Install `factors` (module name -> (A, B)) on `unet` as a peft LoRA adapter; remove it on exit.

    peft wraps each named Linear in its LoRA layer (output W x + alpha / r * B A x); the layer's
    lora_A / lora_B weights *are* the given tensors (a trainer's parameters stay its own, and
    gradients reach them).  The adapter is created on the meta device, so installing it allocates
    nothing and draws no random number.  On exit peft's `unload()` puts the original Linear
    modules back (the same objects: diffusers' `delete_adapters` would leave the wrappers in the
    tree) and deletes the `peft_config` it set on the UNet, and the gradient flags peft changed
    are restored.  Yields the LoRA layers by module name.  Hold `models.exclusive` around it.
    """
    from peft.tuners.lora import LoraLayer, LoraModel

    refuse_peft_adapters(unet)
    rank = int(next(iter(factors.values()))[0].shape[0])
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    tuner = LoraModel(unet, lora_config(factors, rank, alpha), ADAPTER, low_cpu_mem_usage=True)
    try:
        layers = {}
        for name, (a, b) in factors.items():
            layer = unet.get_submodule(name)
            if not isinstance(layer, LoraLayer):
                raise RuntimeError(f"peft did not wrap {name}")
            layer.lora_A[ADAPTER].weight = _parameter(a)
            layer.lora_B[ADAPTER].weight = _parameter(b)
            layers[name] = layer
        yield layers
    finally:
        tuner.unload()
        for p, flag in flags:
            p.requires_grad_(flag)


def diffusers_lora_path(learned_path: str | Path) -> Path:
    """Where `Learned.save(learned_path)` writes the diffusers-format LoRA of a LoRA run."""
    path = Path(learned_path)
    return path.with_name(LORA_FILE if path.name == LEARNED else f"{path.stem}_{LORA_FILE}")


@dataclass
class Learned:
    """What training produced: new token rows and the K/V weights (or LoRA factors), plus metadata."""

    method: str
    base_model: str
    tokens: list[str]
    class_words: list[str]
    steps: int
    token_rows: torch.Tensor  # (n, d) float32
    kv: dict[str, torch.Tensor] = field(default_factory=dict)  # "...attn2.to_k" -> full weight
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    lora_rank: int = 0
    lora_alpha: float = 0.0
    masks: torch.Tensor | None = None  # AttenCraft's final masks (concepts..., background)
    assignment: list[int] | None = None

    @property
    def alpha(self) -> float:
        """The LoRA's alpha (scale alpha / rank); files without one used alpha = rank."""
        return float(self.lora_alpha or self.lora_rank)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA under peft's names (``<module>.lora_A.weight``), as `get_peft_model_state_dict` gives them."""
        out = {}
        for name, (a, b) in self.lora.items():
            out[f"{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        return out

    def save_diffusers_lora(self, path: str | Path) -> Path:
        """Write the UNet LoRA in the format `pipe.load_lora_weights` reads (the token rows stay in ours)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        path = Path(path)
        metadata = lora_config(self.lora, self.lora_rank, self.alpha).to_dict()

        def write(temp: Path) -> None:
            StableDiffusionLoraLoaderMixin.save_lora_weights(
                temp.parent, unet_lora_layers=self.peft_state_dict(), weight_name=temp.name,
                unet_lora_adapter_metadata=metadata)

        write_atomic(path, write, "the diffusers LoRA file")
        return path

    def save(self, path: str | Path) -> Path:
        """Write our learned file at `path`; a LoRA also goes to `diffusers_lora_path(path)` for diffusers."""
        path = Path(path)
        tensors = {"token_rows": self.token_rows}
        tensors |= {f"kv/{name}": w for name, w in self.kv.items()}
        for name, (a, b) in self.lora.items():
            tensors[f"lora_A/{name}"], tensors[f"lora_B/{name}"] = a, b
        if self.masks is not None:
            tensors["masks"] = self.masks
        meta = {"format": FORMAT, "method": self.method, "base_model": self.base_model,
                "tokens": json.dumps(self.tokens), "class_words": json.dumps(self.class_words),
                "steps": str(self.steps), "lora_rank": str(self.lora_rank), "lora_alpha": str(self.lora_alpha),
                "assignment": json.dumps(self.assignment)}
        save_tensors(path, tensors, meta, "learned file")
        if self.lora:
            self.save_diffusers_lora(diffusers_lora_path(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Learned":
        path = Path(path)
        tensors, meta = load_tensors(path, FORMAT, "learned file", "a learned.safetensors written by 'personalize train'")
        try:
            lora = {}
            for k in tensors:
                if k.startswith("lora_A/"):
                    name = k[len("lora_A/"):]
                    lora[name] = (tensors[k], tensors[f"lora_B/{name}"])
            return cls(
                method=meta["method"], base_model=meta["base_model"], tokens=json.loads(meta["tokens"]),
                class_words=json.loads(meta["class_words"]), steps=int(meta["steps"]),
                token_rows=tensors["token_rows"],
                kv={k[len("kv/"):]: v for k, v in tensors.items() if k.startswith("kv/")}, lora=lora,
                lora_rank=int(meta.get("lora_rank", 0)), lora_alpha=float(meta.get("lora_alpha", 0)),
                masks=tensors.get("masks"), assignment=json.loads(meta.get("assignment", "null")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"{path.name} is damaged: its header or tensors are incomplete.") from error

    def check_fits(self, unet, text_encoder) -> None:
        """One sentence unless every K/V weight or LoRA factor and the token rows fit these modules."""
        modules = dict(unet.named_modules())
        fits = bool(self.kv or self.lora)
        for name, w in self.kv.items():
            fits = fits and name in modules and tuple(modules[name].weight.shape) == tuple(w.shape)
        for name, (a, b) in self.lora.items():
            shape = tuple(modules[name].weight.shape) if name in modules else None
            fits = fits and shape is not None and a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1] > 0 \
                and (b.shape[0], a.shape[1]) == shape
        if not fits:
            raise UserInputError("The learned file does not fit this model's attention layers.")
        if self.token_rows.shape[1] != text_encoder.get_input_embeddings().weight.shape[1]:
            raise UserInputError("The learned file does not fit this model's text encoder.")

    def check_base(self, pipe) -> None:
        name = model_name(pipe)
        if name != self.base_model:
            raise UserInputError(
                f"This learned file was trained on the model '{self.base_model}', not on '{name}'; "
                f"load it onto '{self.base_model}'."
            )


def checkpoint_fingerprint(folder: str | Path | None) -> dict | None:
    """The settings recorded in `folder`'s checkpoint, or None when there is none (or unreadable)."""
    if folder is None or not (Path(folder) / CHECKPOINT).is_file():
        return None
    try:
        return torch.load(Path(folder) / CHECKPOINT, map_location="cpu", weights_only=True).get("fingerprint")
    except Exception:
        return None


model_name = models.model_name


# ----------------------------------------------------------------------------- losses


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm: str = "paper") -> torch.Tensor:
    """Per-row masked MSE, mean over rows; mask is (B, 1, h, w).

    "paper": sum_{c,h,w} (pred - target)^2 m / sum_{h,w} m (both released codes; about C x the
    per-element mean); "mean": the per-element mean over the masked region.
    """
    if norm not in ("paper", "mean"):
        raise ValueError(f"unknown loss_norm {norm!r}: use 'paper' or 'mean'")
    err = (pred.float() - target.float()) ** 2 * mask
    denom = mask.sum((1, 2, 3)).clamp_min(1e-8)
    if norm == "mean":
        denom = denom * pred.shape[1]
    return (err.sum((1, 2, 3)) / denom).mean()


# ----------------------------------------------------------------------------- data


def square_image(image, size: int, crop: str = "center") -> Image.Image:
    """Centre square crop (or squash) to size x size."""
    if crop == "squash":
        return image.resize((size, size), Image.BICUBIC)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def augment(image: Image.Image, size: int, factor: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Custom Diffusion's augmentation: (pixels (3, S, S), valid mask (1, S/f, S/f), prompt prefix)."""
    def randint(lo, hi):  # [lo, hi)
        return int(torch.randint(lo, hi, (1,), generator=generator))

    if float(torch.rand((), generator=generator)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if float(torch.rand((), generator=generator)) < 0.66:
        scale = randint(size // 3, size + 1)
    else:
        scale = randint(int(1.2 * size), int(1.4 * size))
    prefix = ""
    if scale < 0.6 * size:
        prefix = ["a far away ", "very small "][randint(0, 2)]
    elif scale > size:
        prefix = ["zoomed in ", "close up "][randint(0, 2)]
    outer, inner = (scale, size) if scale > size else (size, scale)
    top, left = randint(0, outer - inner + 1), randint(0, outer - inner + 1)
    pixels = _to_tensor(image.resize((scale, scale), Image.BICUBIC))
    m = size // factor
    mask = torch.zeros(1, m, m)
    if scale > size:
        pixels = pixels[:, top:top + size, left:left + size]
        mask[:] = 1
    else:
        canvas = torch.zeros(3, size, size)
        canvas[:, top:top + scale, left:left + scale] = pixels
        pixels = canvas
        mask[:, top // factor + 1:(top + scale) // factor - 1, left // factor + 1:(left + scale) // factor - 1] = 1
        if mask.sum() == 0:  # tiny latents: keep the pasted region unshrunk
            mask[:, top // factor:max(math.ceil((top + scale) / factor), top // factor + 1),
                 left // factor:max(math.ceil((left + scale) / factor), left // factor + 1)] = 1
    return pixels, mask, prefix


def _border_mask(m: int) -> torch.Tensor:
    mask = torch.zeros(1, m, m)
    mask[:, 1:-1, 1:-1] = 1
    return mask


# ----------------------------------------------------------------------------- the trainer


@dataclass
class StepInfo:
    """What one optimiser step reports (for progress bars and the UI)."""

    step: int  # steps done
    total: int
    loss: float
    parts: dict
    maps: torch.Tensor | None = None  # (n_maps, h, w) float, detached: per-token attention
    map_labels: list[str] = field(default_factory=list)
    masks: torch.Tensor | None = None  # AttenCraft: (K, h, w) binary
    mask_labels: list[str] = field(default_factory=list)
    note: str = ""
    stopped: bool = False  # the run stopped here on request (`Trainer.run(stop=...)`)


@dataclass
class TrainResult:
    learned: Learned
    folder: Path
    path: Path
    steps: int
    resumed_from: int
    losses: list[float]


@dataclass
class Forward:
    """One forward of a batch, as a method's `loss` gets it."""

    pred: torch.Tensor  # the noise (or v) prediction, (B, C, h, w)
    target: torch.Tensor
    controller: PersonalizeAttention  # holds the captured maps of the instance rows
    ids: torch.Tensor  # the captions' token ids, (B, 77)
    masks: torch.Tensor  # valid masks (B, 1, h, w) on the device
    instance: list[int]  # rows of the photo
    prior: list[int]  # rows of regularisation images


def _method(method: str | None, settings: PersonalizeSettings | None) -> tuple[str, type[Method]]:
    """The method's name and class from its name, its settings or both (they must agree)."""
    if settings is None:
        name = DEFAULT_METHOD if method is None else method
        return method_named(name)
    name, kind = method_of(settings)
    if method is not None and method_named(method)[0] != name:
        raise TypeError(f"{type(settings).__name__} are the settings of {name}, not of {method}")
    return name, kind


class Trainer:
    """One training run of DisenDiff or AttenCraft on `pipe` (see the module docstring).

    `settings`: the method's settings (`DisenDiffSettings`, `AttenCraftSettings`; the paper's by
    default); `overrides` replace its fields by name (e.g. ``steps=3, prior_images=2``), and an
    unknown name is a TypeError.  `method` may be left out when `settings` are given.
    `subset_sampler` (AttenCraft): ``f(step, {"losses": [...]}) -> concept indices`` instead of
    the uniform draw.  `on_prior_image(done, count)`, when set, is told before each
    regularisation image is made or reused (done = images ready so far) and once all `count`
    are ready: the only progress there is before the first training step.
    """

    on_prior_image: Callable[[int, int], None] | None = None

    def __init__(self, pipe, image, class_words, method: str | None = None, output: str | Path | None = None, *,
                 settings: PersonalizeSettings | None = None, subset_sampler: Callable | None = None, **overrides):
        # under the model's lock: the checks tokenize with the shared tokenizer, and the trainable
        # copies are read from weights another trainer swaps while it runs a step
        with models.exclusive(pipe):
            self._build(pipe, image, class_words, method, output, settings, subset_sampler, overrides)

    def _build(self, pipe, image, class_words, method, output, settings, subset_sampler, overrides) -> None:
        from accelerate import Accelerator

        self.method, kind = _method(method, settings)
        backbones.require(pipe, SUPPORTED, "Personalization")
        unknown = set(overrides) - set(kind.settings.specs())
        if unknown:
            raise TypeError(f"unknown option(s) for {self.method}: {', '.join(sorted(unknown))}")
        self.settings = s = (settings or kind.settings()).replace(**overrides).validated()
        self.strategy: Method = kind(self)
        self.pipe = pipe
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        if self.unet.dtype != torch.float32:
            raise UserInputError("Training needs the model in float32 (load it with dtype float32; "
                                 "mixed precision is the mixed_precision option).")
        self.words = parse_class_words(class_words)
        self.class_ids = check_class_words(pipe.tokenizer, self.words, self.method)
        self.n = len(self.words)
        self.tokens = list(TOKEN_NAMES[: self.n])
        self.size = int(s.size or models.default_size(pipe)[0])
        self.factor = int(pipe.vae_scale_factor)
        models.check_size(pipe, self.size, self.size)
        min_side = max(64, self.size // 2)
        self.source_image = load_image(image, min_side=min_side)  # as given (kept by the app to resume)
        self.image = square_image(self.source_image, self.size, s.crop)
        self.image_hash = hashlib.sha256(self.image.tobytes()).hexdigest()[:16]
        self.output = Path(output) if output is not None else None
        self.seed, self.lora_rank, self.attention_losses = s.seed, s.lora_rank, s.attention_losses
        self.prior_steps = s.prior_steps
        self.subset_sampler = subset_sampler
        self.accelerator = Accelerator(mixed_precision=s.mixed_precision, cpu=pipe.device.type == "cpu")
        self.device = pipe.device

        # tokenizer copy with the new tokens; their rows live in one separate parameter
        self.tokenizer = personal_tokenizer(pipe.tokenizer, self.n)
        self.first_id = self.tokenizer.convert_tokens_to_ids(self.tokens[0])
        embedding = self.text_encoder.get_input_embeddings().weight
        init = list(s.INIT_IDS)[: self.n]
        self.token_rows = torch.nn.Parameter(embedding.detach()[init].clone().float())

        layers = unet_personalization_layers(self.unet)
        self.attn2, self.capture_layers, self.self_layers = layers["attn2"], layers["capture"], layers["self"]
        modules = dict(self.unet.named_modules())
        self.kv_names = _kv_names(self.attn2)
        if self.lora_rank:  # the peft adapter's factors, kept here and installed per locked section
            refuse_peft_adapters(self.unet)
            g = torch.Generator().manual_seed(self.seed)
            self.lora = {}
            for name in self.kv_names:
                a = torch.empty(self.lora_rank, modules[name].in_features)
                # peft's init_lora_weights=True (kaiming-uniform A, zero B), from our seeded generator
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                self.lora[name] = (torch.nn.Parameter(a),
                                   torch.nn.Parameter(torch.zeros(modules[name].out_features, self.lora_rank)))
            self.kv = {}
            trainable = [p for pair in self.lora.values() for p in pair]
        else:
            self.kv = {name: torch.nn.Parameter(modules[name].weight.detach().clone().float()) for name in self.kv_names}
            self.lora = {}
            trainable = list(self.kv.values())
        for p in trainable:
            p.data = p.data.to(self.device)
        self.token_rows.data = self.token_rows.data.to(self.device)
        self.trainable = trainable + [self.token_rows]
        optimizer = torch.optim.AdamW(self.trainable, lr=s.lr, betas=tuple(s.ADAM_BETAS), weight_decay=s.weight_decay,
                                      eps=s.adam_eps)
        self.optimizer = self.accelerator.prepare(optimizer)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.generator = torch.Generator().manual_seed(self.seed + self.accelerator.process_index)
        self.step = 0
        self.resumed_from = 0
        self.losses: list[float] = []
        # AttenCraft's masks (concepts..., background) and the token of each; None for DisenDiff
        self.masks: torch.Tensor | None = None
        self.assignment: list[int] | None = None
        self.prior_latents: torch.Tensor | None = None
        self._instance_latent_dist = None
        self.state = ControlState(row_roles=(INSTANCE,))
        self._ready = False
        self._started = False
        self._weights_active = False
        self.last_controller: PersonalizeAttention | None = None

    # ------------------------------------------------------------------ bookkeeping

    @property
    def total_steps(self) -> int:
        return self.settings.steps

    def fingerprint(self) -> dict:
        return {"method": self.method, "class_words": self.words, "image": self.image_hash,
                "base_model": model_name(self.pipe), "lora_rank": self.lora_rank, "size": self.size,
                "attention_losses": self.attention_losses, "seed": self.seed}

    def learned(self) -> Learned:
        return Learned(
            method=self.method, base_model=model_name(self.pipe), tokens=self.tokens, class_words=self.words,
            steps=self.step, token_rows=self.token_rows.detach().float().cpu().clone(),
            kv={k: v.detach().float().cpu().clone() for k, v in self.kv.items()},
            lora={k: (a.detach().cpu().clone(), b.detach().cpu().clone()) for k, (a, b) in self.lora.items()},
            lora_rank=self.lora_rank, lora_alpha=float(self.lora_rank),
            masks=None if self.masks is None else self.masks.cpu().clone(), assignment=self.assignment,
        )

    def save_checkpoint(self) -> None:
        if self.output is None or not self.accelerator.is_main_process:
            return
        state = {
            "format": FORMAT, "fingerprint": self.fingerprint(), "step": self.step,
            "kv": {k: v.detach().cpu() for k, v in self.kv.items()},
            "lora": {k: [a.detach().cpu(), b.detach().cpu()] for k, (a, b) in self.lora.items()},
            "token_rows": self.token_rows.detach().cpu(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "masks": None if self.masks is None else self.masks.cpu(), "assignment": self.assignment,
            "losses": list(self.losses),
        }
        save_torch(state, self.output / CHECKPOINT, f"the checkpoint of step {self.step}")
        self.learned().save(self.output / LEARNED)

    def try_resume(self) -> bool:
        """Load `output/checkpoint.pt` if there is one (same settings required)."""
        if self.output is None or not (self.output / CHECKPOINT).is_file():
            return False
        try:
            state = torch.load(self.output / CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception as error:
            if out_of_memory_message(error):  # a full memory is not a damaged checkpoint: keep it
                raise
            raise UserInputError(f"The checkpoint in '{self.output}' is not readable; use another output folder.") from error
        if state.get("fingerprint") != self.fingerprint():
            raise UserInputError(
                f"The output folder '{self.output}' holds a run with other settings (image, concepts, method, "
                "model or seed); choose a new output folder to start another run."
            )
        with torch.no_grad():
            for k, v in state["kv"].items():
                self.kv[k].copy_(v)
            for k, (a, b) in state["lora"].items():
                self.lora[k][0].copy_(a)
                self.lora[k][1].copy_(b)
            self.token_rows.copy_(state["token_rows"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.masks = state["masks"]
        self.assignment = state["assignment"]
        self.losses = list(state["losses"])
        self.step = self.resumed_from = int(state["step"])
        return True

    # ------------------------------------------------------------------ data

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist

    def _latents(self, dist_mean: torch.Tensor, dist_std: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(dist_mean.shape, generator=self.generator).to(self.device)
        z = dist_mean + dist_std * noise
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def _prior_prompt(self) -> str:
        return self.strategy.prior_prompt()

    def prepare_data(self) -> None:
        """Generate (or reuse from output/prior/) the regularisation images and encode them."""
        if self._ready:
            return
        count = self.settings.prior_images
        if count:
            images = []
            folder = self.output / "prior" if self.output is not None else None
            prompt = self._prior_prompt()
            for i in range(count):
                if self.on_prior_image is not None:
                    self.on_prior_image(i, count)
                path = folder / f"{i:04d}.png" if folder is not None else None
                if path is not None and path.is_file():
                    with Image.open(path) as opened:
                        images.append(opened.convert("RGB"))
                    continue
                image = self._generate_prior(prompt, i)
                if path is not None and self.accelerator.is_main_process:
                    write_atomic(path, lambda temp, im=image: im.save(temp, format="PNG"), "a regularisation image")
                images.append(image)
            if self.on_prior_image is not None:
                self.on_prior_image(count, count)
            pixels = torch.stack([_to_tensor(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC))
                                  for im in images])
            dists = [self._encode_pixels(pixels[i:i + 8]) for i in range(0, len(pixels), 8)]
            self.prior_mean = torch.cat([d.mean for d in dists])
            self.prior_std = torch.cat([d.std for d in dists])
        if not self.settings.augment:
            d = self._encode_pixels(_to_tensor(self.image)[None])
            self.instance_mean, self.instance_std = d.mean, d.std
        self._ready = True

    def _generate_prior(self, prompt: str, index: int) -> Image.Image:
        with torch.no_grad():  # our bar counts the images; the pipeline's own is hidden on a view
            out = models.quiet_view(self.pipe)(prompt, num_inference_steps=self.prior_steps, guidance_scale=self.settings.prior_guidance,
                            height=self.size, width=self.size,
                            generator=torch.Generator().manual_seed(self.seed * 100_003 + index))
        return out.images[0]

    def instance_caption(self, prefix: str = "") -> str:
        return self.strategy.instance_caption(prefix)

    def _instance_row(self):
        lat = self.size // self.factor
        if self.settings.augment:
            pixels, mask, prefix = augment(self.image, self.size, self.factor, self.generator)
            d = self._encode_pixels(pixels[None])
            return self._latents(d.mean, d.std), mask, self.instance_caption(prefix)
        return self._latents(self.instance_mean, self.instance_std), _border_mask(lat), self.instance_caption()

    def _prior_row(self):
        i = int(torch.randint(len(self.prior_mean), (1,), generator=self.generator))
        lat = self.size // self.factor
        return (self._latents(self.prior_mean[i:i + 1], self.prior_std[i:i + 1]), torch.ones(1, lat, lat),
                self._prior_prompt())

    def make_batch(self, step: int) -> dict:
        """One forward's rows: latents, valid masks, captions, roles, timesteps and noise."""
        rows, subset = self.strategy.batch_rows(step)
        latents = torch.cat([r[0] for r in rows])
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(rows),), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        return {"latents": latents, "masks": torch.stack([r[1] for r in rows]), "captions": [r[2] for r in rows],
                "roles": tuple(r[3] for r in rows), "timesteps": t, "noise": noise, "subset": subset}

    # ------------------------------------------------------------------ forward and losses

    def _controller(self, capture_self: bool) -> PersonalizeAttention:
        return PersonalizeAttention(self.attn2, self.capture_layers, self.self_layers,
                                    capture_cross=self.attention_losses or capture_self, capture_self=capture_self,
                                    state=self.state)

    def forward(self, batch: dict, capture_self: bool = False):
        """Noise prediction, target and the controller holding the captured maps."""
        device = self.device
        ids = _ids(self.tokenizer, batch["captions"])
        noise = batch["noise"].to(device)
        t = batch["timesteps"].to(device)
        latents = batch["latents"].to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        self.state.row_roles = batch["roles"]
        controller = self.last_controller = self._controller(capture_self)
        with self.accelerator.autocast(), self._active_weights():
            text = _encode(self.text_encoder, ids, self.first_id, self.token_rows)
            with attach(self.unet, controller, track_steps=False):
                pred = self.unet(noisy, t, text).sample
        return pred, target, controller, ids

    @contextmanager
    def _active_weights(self):
        """Our K/V weights swapped in, or our LoRA installed as a peft adapter; undone on exit.

        Re-entrant: `optimizer_step` installs them once for its locked section, so its forwards
        reuse them; a forward outside one (AttenCraft's mask initialisation) installs them itself.
        """
        if self._weights_active:
            yield
            return
        self._weights_active = True
        try:
            if self.lora:
                with lora_adapter(self.unet, self.lora, float(self.lora_rank)):
                    yield
            else:
                with swapped_weights(self.unet, self.kv):
                    yield
        finally:
            self._weights_active = False

    def _row_tokens(self, ids_row: list[int]) -> tuple[list[int], list[int]]:
        new_ids = [self.first_id + i for i in range(self.n)]
        modifier = [ids_row.index(t) for t in new_ids if t in ids_row]
        return modifier, [m + 1 for m in modifier]

    def compute_loss(self, batch: dict, refresh: bool = False) -> tuple[torch.Tensor, dict, StepInfo]:
        """The method's loss on one batch (`refresh`: AttenCraft also refreshes its masks)."""
        pred, target, controller, ids = self.forward(batch, capture_self=refresh)
        roles = batch["roles"]
        out = Forward(pred, target, controller, ids, batch["masks"].to(self.device),
                      instance=[i for i, r in enumerate(roles) if r == INSTANCE],
                      prior=[i for i, r in enumerate(roles) if r != INSTANCE])
        info = StepInfo(step=self.step, total=self.total_steps, loss=0.0, parts={})
        loss, parts = self.strategy.loss(batch, out, refresh, info)
        info.parts = parts
        return loss, parts, info

    # ------------------------------------------------------------------ the loop

    @contextmanager
    def _frozen(self):
        """Freeze the shared modules for the run (gradients reach only our parameters); restore flags."""
        flags = [(p, p.requires_grad) for m in (self.unet, self.text_encoder, self.vae) for p in m.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def optimizer_step(self, batches: list[dict], refresh: bool = False) -> StepInfo:
        """One optimiser step over `batches` (gradient accumulation); returns its report."""
        self.optimizer.zero_grad(set_to_none=True)
        total, info = 0.0, None
        with models.exclusive(self.pipe), self._frozen(), self._active_weights():
            for i, batch in enumerate(batches):
                loss, parts, step_info = self.compute_loss(batch, refresh=refresh and i == 0)
                self.accelerator.backward(loss / len(batches))
                total += float(loss.detach()) / len(batches)
                info = info or step_info
            if self.accelerator.num_processes > 1:
                for p in self.trainable:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            if self.settings.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total)
        info.step, info.loss = self.step, total
        return info

    def start(self) -> None:
        """Create the folder, resume from its checkpoint, prepare the data and AttenCraft's masks (once)."""
        if self._started:
            return
        if self.output is not None:
            if self.output.exists() and not self.output.is_dir():
                raise UserInputError(f"The output must be a folder, not the file '{self.output}'.")
            self.output.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        with models.exclusive(self.pipe):  # the regularisation images and AttenCraft's masks run the model
            self.prepare_data()
            with self._frozen():
                self.strategy.prepare()
        self._started = True

    def checkpoint_matches(self) -> bool:
        """Whether the output folder holds a checkpoint of this very run (same settings)."""
        return checkpoint_fingerprint(self.output) == self.fingerprint()

    def run(self, stop: Callable[[], bool] | None = None) -> Iterator[StepInfo]:
        """Train from the current (or resumed) step to `steps`, yielding one report per step.

        `stop` is asked after every step; when it answers True the run saves a checkpoint (so
        no step is lost and the same settings resume from here), reports `stopped=True` and ends.
        Checkpoints are also written every `checkpoint_every` steps, once `checkpoint_seconds`
        have passed since the last one (a killed run loses at most about that much training,
        however slow a step is), and at the end.
        """
        self.start()
        every, seconds = self.settings.checkpoint_every, self.settings.checkpoint_seconds
        saved_at = time.monotonic()
        while self.step < self.total_steps:
            step = self.step
            refresh = self.strategy.refresh_due(step)
            with models.exclusive(self.pipe):  # the batch encodes images with the shared VAE
                batches = [self.make_batch(step) for _ in range(self.settings.grad_accum)]
            info = self.optimizer_step(batches, refresh=refresh)
            info.stopped = self.step < self.total_steps and stop is not None and bool(stop())
            overdue = bool(seconds) and time.monotonic() - saved_at >= seconds
            if seconds and self.accelerator.num_processes > 1:  # every process saves together, or none
                flag = torch.tensor([float(overdue)], device=self.accelerator.device)
                overdue = bool(self.accelerator.reduce(flag, "max").item())
            if info.stopped or overdue or self.step % every == 0 or self.step == self.total_steps:
                self.accelerator.wait_for_everyone()
                self.save_checkpoint()
                saved_at = time.monotonic()
                info.note = f"checkpoint saved at step {self.step}"
            yield info
            if info.stopped:
                return


def train(pipe, image, class_words, method: str | None = None, output: str | Path | None = None,
          on_step: Callable[[StepInfo], None] | None = None, **options) -> TrainResult:
    """Run (or resume) a whole training; `options` as `Trainer` (``settings=`` and overrides of
    its fields).  Returns the learned file."""
    from tqdm.auto import tqdm

    trainer = Trainer(pipe, image, class_words, method, output, **options)
    trainer.start()
    bar = tqdm(total=trainer.total_steps, desc=f"{trainer.method} training", disable=not trainer.accelerator.is_main_process)
    first = True
    try:
        for info in trainer.run():
            if first:
                bar.update(trainer.resumed_from)
                first = False
            bar.update(1)
            bar.set_postfix(loss=f"{info.loss:.4f}")
            if on_step is not None:
                on_step(info)
    finally:
        bar.close()  # also on an error: its message starts a line of its own
    learned = trainer.learned()
    path = trainer.output / LEARNED if trainer.output is not None else None
    if path is not None and trainer.accelerator.is_main_process:
        learned.save(path)
    return TrainResult(learned, trainer.output, path, trainer.step, trainer.resumed_from, list(trainer.losses))


# ----------------------------------------------------------------------------- generation


@dataclass
class Generated:
    image: Image.Image
    seed: int
    params: dict

    def save(self, path: str | Path) -> list[Path]:
        return save_image(self.image, path, self.params)


@contextmanager
def use_learned(pipe, learned: Learned) -> Iterator:
    """Install `learned` on the base pipeline for one call; yields the tokenizer with the new tokens.
    Holds `models.exclusive(pipe)` meanwhile: no other call sees the learned weights."""
    with models.exclusive(pipe):
        learned.check_base(pipe)
        unet, te = pipe.unet, pipe.text_encoder
        learned.check_fits(unet, te)
        base = unet.get_submodule(next(iter(learned.lora or learned.kv))).weight
        if learned.lora:  # float32 factors, as diffusers' load_lora_weights keeps them
            factors = {k: (a.to(base.device, torch.float32), b.to(base.device, torch.float32))
                       for k, (a, b) in learned.lora.items()}
            weights = lora_adapter(unet, factors, learned.alpha)
        else:
            weights = swapped_weights(unet, {k: v.to(base.device, base.dtype) for k, v in learned.kv.items()})
        tokenizer = personal_tokenizer(pipe.tokenizer, len(learned.tokens))
        first_id = tokenizer.convert_tokens_to_ids(learned.tokens[0])
        with weights, learned_token_embeddings(te, first_id, learned.token_rows.to(te.device)):
            yield tokenizer


def _check_prompt(prompt: str, learned: Learned) -> str:
    if prompt is None or not str(prompt).strip():
        raise UserInputError("Please enter a prompt, e.g. 'a <new1> cat on the beach'.")
    if not any(t in prompt for t in learned.tokens):
        example = f"a {learned.tokens[0]} {learned.class_words[0]} on the beach"
        raise UserInputError(
            f"The prompt uses none of the learned tokens {', '.join(learned.tokens)}; write e.g. '{example}'."
        )
    return str(prompt)


@models.one_call_at_a_time
def generate(pipe, learned: Learned, prompt: str, seed: int | None = GENERATE_SEED, steps: int | None = None,
             guidance: float | None = None, negative_prompt: str = "") -> Generated:
    """Sample `prompt` with the learned tokens and K/V on the base pipeline.

    `steps` and `guidance` override the learned method's `sample_steps` and `sample_guidance`
    (None or 0 steps: the method's); eta and the scheduler are the method's.
    """
    prompt = _check_prompt(prompt, learned)
    kind = METHODS.get(learned.method, METHODS[DEFAULT_METHOD])
    defaults = kind.settings()
    settings = defaults.replace(sample_steps=sample_steps(learned.method, steps),
                                sample_guidance=defaults.sample_guidance if guidance is None else guidance).validated()
    steps, guidance, eta = settings.sample_steps, float(settings.sample_guidance), kind.settings.SAMPLE_ETA
    seed = resolve_seed(seed)
    scheduler = kind.sample_scheduler(pipe)
    height, width = models.default_size(pipe)
    call = models.view(pipe, scheduler=scheduler)  # the method's sampler, never set on the shared pipeline
    with use_learned(pipe, learned) as tokenizer, torch.no_grad():
        check_fits(tokenizer, prompt, tokenizer.model_max_length)  # refused, never cut silently
        check_fits(tokenizer, negative_prompt, tokenizer.model_max_length, "negative prompt")
        te = pipe.text_encoder
        pe = te(_ids(tokenizer, [prompt]).to(te.device))[0]
        ne = te(_ids(tokenizer, [negative_prompt or ""]).to(te.device))[0]
        out = call(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=guidance,
                   eta=float(eta), height=height, width=width, generator=torch.Generator().manual_seed(seed))
    params = {"task": "personalize", "method": learned.method, "model": learned.base_model, "prompt": prompt,
              "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "guidance": guidance,
              "eta": eta, "tokens": learned.tokens, "class_words": learned.class_words,
              "trained_steps": learned.steps}
    return Generated(out.images[0], seed, params)
