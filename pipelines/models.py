"""The model registry: one `load()` for every way a user can name a diffusion model.

`load(name_or_path, device, dtype)` returns a diffusers pipeline and accepts:

- the tiny built-in names (`TINY_MODELS`): seeded random weights built in code, identical on
  every call and every machine, small enough that 2 steps at 64 px take well under a second on
  a CPU.  They exist for tests, CI and trying the UI without downloads; their images are noise.
  One per backbone family the methods support: `tiny` (SD 1.x UNet), `tiny-sdxl`,
  `tiny-pixart` (PixArt-alpha DiT), `tiny-sd3` (MMDiT), `tiny-flux` (dual + single stream).
  Not listed there, for one task or case each: `tiny-sd2` (v-prediction), `tiny-omnigen` (an
  OmniGen pipeline with our own small Phi-3-style tokenizer) and `tiny-flux-kontext` (a FLUX
  Kontext pipeline from `tiny-flux`'s parts); the last two for Instruction edit only.
- `builtin`: the project's own small model trained on the shapes world (`pipelines/builtin/world.py`,
  `pipelines/builtin/train.py`), stored in `assets/builtin/` in diffusers `save_pretrained`
  layout (float16 safetensors, loaded in the dtype asked for); the app's default;
- a local folder in `save_pretrained` layout;
- a local single-file `.safetensors` checkpoint (SD 1.x/2.x, SDXL, SD3), whose base-model config
  must already be in the Hugging Face cache;
- a Hugging Face hub id (`owner/name`): the local cache first, the hub only if it answers.

Whatever a user can get wrong (unknown name, missing folder, hub unreachable, pickle checkpoint)
raises `UserInputError` with one sentence; nothing waits minutes on an unreachable network.

Loaded pipelines are cached per (resolved name, device, dtype) so switching tasks in the UI does
not reload weights; `load_as()` derives another pipeline class (inpainting, img2img, ...) from the
cached one with `from_pipe`, sharing its modules.  Everything returned is shared: a task runs the
model only inside `exclusive(pipe)` (one call at a time per cached model), and undoes whatever it
changes (processors, hooks, dtypes, FreeU, weights) before that ends; see docs/architecture.md.
Family facts are not here but in pipelines/backbones/.

The tiny models' text side: CLIP tokenizers rebuilt offline from OpenAI's BPE file (exact SD ids),
and our own small T5-style vocabulary (see pipelines/tokenizers.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines import backbones
from pipelines.errors import UserInputError, out_of_memory_message
from pipelines.model_defaults import BUILTIN_FOLDERS
from pipelines.tiny_models import (  # noqa: F401  (re-exported: models.build_tiny etc.)
    TINY_BACKBONE,
    TINY_MODELS,
    build_tiny,
    build_tiny_as,
    clip_text_config,
    is_tiny,
    save_tiny,
)

__all__ = [
    "BUILTIN_NAMES",
    "TINY_MODELS",
    "BUILTIN_DIR",
    "BUILTIN_EDIT_DIR",
    "EDIT_MODELS",
    "builtin_folder",
    "backbone",
    "build_tiny",
    "check_size",
    "clear_cache",
    "clip_text_config",
    "compile_denoiser",
    "compile_options",
    "compile_regions",
    "compile_on_load",
    "default_device",
    "default_dtype",
    "default_size",
    "denoiser",
    "exclusive",
    "holds",
    "describe",
    "family",
    "generation_defaults",
    "is_tiny",
    "load",
    "load_as",
    "model_name",
    "one_call_at_a_time",
    "quiet_view",
    "view",
    "save_tiny",
]

BUILTIN_DIR = BUILTIN_FOLDERS["builtin"]
#: the built-in instruction-edit model (InstructPix2Pix architecture, `pipelines/builtin/train_edit.py`)
BUILTIN_EDIT_DIR = BUILTIN_FOLDERS["builtin-edit"]

BUILTIN_NAMES: tuple[str, ...] = TINY_MODELS + ("builtin", "builtin-edit")
#: built-in models that edit an image by instruction (not text-to-image): only the Instruction edit task uses them
#: (`tiny-omnigen`: a random-weight OmniGen, the SaaS paper's backbone; `tiny-flux-kontext`: a random-weight
#: FLUX Kontext, SaaS our extrapolation; pipelines/tiny_models.py)
EDIT_MODELS: tuple[str, ...] = ("builtin-edit", "tiny-omnigen", "tiny-flux-kontext")


def builtin_folder(name: str) -> Path | None:
    """The folder of a trained built-in model ("builtin", "builtin-edit"), or None for other names."""
    return {"builtin": BUILTIN_DIR, "builtin-edit": BUILTIN_EDIT_DIR}.get(name)


# --------------------------------------------------------------------------------------------
# Devices and dtypes


def default_device() -> torch.device:
    """CUDA if present, else Apple MPS if present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserInputError(f"'{device}' is not a device name; use e.g. 'cpu' or 'cuda'.") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("CUDA was requested but no CUDA GPU is available here; use device 'cpu'.")
        # "cuda" and "cuda:0" must share one cache entry.
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on CUDA GPUs that support it, else float16 on GPUs; float32 on CPU."""
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if resolved.type == "mps":
        return torch.float16
    return torch.float32


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise UserInputError(f"'{dtype}' is not a dtype name; use float32, float16 or bfloat16.")
    return _DTYPE_NAMES[name]


# --------------------------------------------------------------------------------------------
# Families: the facts live in pipelines/backbones/; these answer for a pipeline or a model name


def backbone(pipe: DiffusionPipeline) -> backbones.Backbone:
    """The pipeline's backbone (`backbones.OTHER` for a family the tasks do not know)."""
    return backbones.of(pipe)


def family(pipe: DiffusionPipeline) -> str:
    """The backbone's name ("sd", "sdxl", "pixart", "sd3", "flux" or "other"), as results record it."""
    return backbones.of(pipe).name


def describe(name_or_pipe: str | DiffusionPipeline) -> str:
    """One line for the UI, e.g. "SD 1.x/2.x UNet" or "FLUX MMDiT (tiny, random weights)".

    Tiny names and local diffusers folders are described without loading anything; any other
    name is loaded (and cached) first, because only its components tell the family.
    """
    if isinstance(name_or_pipe, DiffusionPipeline):
        return backbones.of(name_or_pipe).label
    name = str(name_or_pipe)
    if is_tiny(name):
        return f"{TINY_BACKBONE[name].label} (tiny, random weights)"
    folder = builtin_folder(name) or Path(name).expanduser()
    index_file = folder / "model_index.json"
    if index_file.is_file():
        class_name = json.loads(index_file.read_text()).get("_class_name", "")
        label = backbones.by_pipeline_class(class_name).label
        return f"{label} (built-in, trained on the shapes world)" if builtin_folder(name) else label
    return backbones.of(load(name)).label


def backbone_without_loading(name: str) -> backbones.Backbone | None:
    """The family of a model name read from its files alone (tiny names, built-in and local
    diffusers folders, hub ids already in the local Hugging Face cache), or None when only
    loading it would tell (a single checkpoint file, a hub id not downloaded yet)."""
    name = str(name or "").strip()
    if is_tiny(name):
        return TINY_BACKBONE[name]
    index_file: Path | None = None
    folder = builtin_folder(name) or Path(name).expanduser()
    if folder.is_dir():
        index_file = folder / "model_index.json"
    elif is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model_index.json")
        index_file = Path(cached) if isinstance(cached, str) else None
    try:
        class_name = json.loads(index_file.read_text()).get("_class_name", "") if index_file else ""
    except (OSError, ValueError, AttributeError):
        return None
    return backbones.by_pipeline_class(class_name) if class_name else None


def hf_cache_models() -> list[str]:
    """Hub ids of the diffusers pipelines in the local Hugging Face cache (a snapshot with a
    `model_index.json`), for `python app.py --models-from-hf-cache`; reads only the cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except (CacheNotFound, OSError):
        return []
    return sorted(repo.repo_id for repo in cache.repos if repo.repo_type == "model"
                  and any((revision.snapshot_path / "model_index.json").is_file() for revision in repo.revisions))


#: Steps and guidance for text-to-image when a model folder does not say otherwise (SD's).
GENERATION_DEFAULTS = {"steps": 25, "guidance": 7.5}


def generation_defaults(pipe_or_name: DiffusionPipeline | str) -> dict:
    """{"steps", "guidance"} to generate with this model by default (and "image_guidance" for an
    instruction-edit model whose folder names one).

    A model folder may name its own in `training.json` ("inference_defaults", written by our
    training script, e.g. the built-in model's); others get SD's.  Takes a pipeline or a model
    name (read without loading anything, for the UI's initial values).
    """
    name = pipe_or_name if isinstance(pipe_or_name, str) else str(getattr(pipe_or_name, "name_or_path", "") or "")
    folder = builtin_folder(name) or Path(name).expanduser()
    return dict(_folder_generation_defaults(str(folder)) if folder.is_dir() else GENERATION_DEFAULTS)


@functools.lru_cache(maxsize=32)
def _folder_generation_defaults(folder: str) -> dict:
    path = Path(folder) / "training.json"
    try:
        saved = json.loads(path.read_text()).get("inference_defaults", {})
    except (OSError, ValueError, AttributeError):
        return GENERATION_DEFAULTS
    defaults = {"steps": int(saved.get("num_inference_steps", GENERATION_DEFAULTS["steps"])),
                "guidance": float(saved.get("guidance_scale", GENERATION_DEFAULTS["guidance"]))}
    if "image_guidance_scale" in saved:  # an instruction-edit model (builtin-edit)
        defaults["image_guidance"] = float(saved["image_guidance_scale"])
    return defaults


def view(pipe: DiffusionPipeline, *, quiet: bool = False, scheduler=None) -> DiffusionPipeline:
    """The same pipeline for one task's calls, with its own progress setting or scheduler.

    A shallow copy: every other component (and so the per-model lock of `exclusive`) is shared,
    while what the view sets (the progress bar with `quiet`, the `scheduler` with its config
    entry) and the attributes a pipeline call sets on itself (`_guidance_scale`,
    `_num_timesteps`, ...) are the copy's own, so the cached pipeline is never changed.
    """
    copied = copy.copy(pipe)
    if quiet:
        copied._progress_bar_config = {**getattr(pipe, "_progress_bar_config", {}), "disable": True}
    if scheduler is not None:
        copied.scheduler = scheduler  # DiffusionPipeline.__setattr__ updates the copy's own config
    return copied


def quiet_view(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`view(pipe, quiet=True)`: no per-call progress bar, for a task that shows its own."""
    return view(pipe, quiet=True)


def model_name(pipe: DiffusionPipeline) -> str:
    """The model's name as the user gave it ("builtin", a hub id, a path as typed): what results record."""
    return str(pipe.name_or_path or type(pipe).__name__)


def denoiser(pipe: DiffusionPipeline):
    """The pipeline's UNet or transformer: where attention processors are attached."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet



# --------------------------------------------------------------------------------------------
# One call at a time per model
#
# A cached pipeline is shared by every tab, thread and Python caller, and a task cannot run it
# without changing it for the duration of the call: every pipeline call sets the scheduler's
# timesteps, tasks install attention processors and forward hooks, Remove object runs a float16
# VAE in float32 and switches FreeU on, Personalize swaps attention weights, freezes parameters
# and changes the scheduler.  Each of those is undone when the call ends; the lock makes sure no
# other call sees the model in between.  It is keyed on the denoiser, which every `from_pipe`
# variant shares, and re-entrant, so a task may call another locked function inside its own call.
#
# "Runs the model" includes its tokenizers: a fast (Rust) tokenizer sets its padding and
# truncation on the shared object at every call, so a prompt check in one thread can make
# another thread's pipeline encode its prompt unpadded (then longer or shorter than its negative
# prompt: the call fails) or its own check see a padded 77-token encoding.  Validation that
# tokenizes therefore runs under the lock too; it waits at most for one task call (Personalize:
# one training step).
# `holds(pipe)` lets tests check that every use of a shared component happens under it.

_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()  # per thread: id(denoiser) -> how many nested `exclusive` blocks hold it


@contextmanager
def exclusive(pipe: DiffusionPipeline) -> Iterator[None]:
    """Hold this model's lock: no other locked call on the same model runs meanwhile."""
    module = denoiser(pipe)
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(module)
        if lock is None:
            lock = _MODEL_LOCKS[module] = threading.RLock()
    with lock:
        held = _held()
        held[id(module)] = held.get(id(module), 0) + 1
        try:
            yield
        finally:
            held[id(module)] -= 1
            if not held[id(module)]:
                del held[id(module)]


def _held() -> dict[int, int]:
    if not hasattr(_HELD, "models"):
        _HELD.models = {}
    return _HELD.models


def holds(pipe: DiffusionPipeline) -> bool:
    """Whether the calling thread is inside `exclusive(pipe)` (or a view's or variant's of the same model)."""
    return id(denoiser(pipe)) in _held()


def one_call_at_a_time(function: Callable) -> Callable:
    """Decorate a task function whose first argument is the pipeline: it runs under `exclusive`."""

    @functools.wraps(function)
    def locked(pipe, *args, **kwargs):
        with exclusive(pipe):
            return function(pipe, *args, **kwargs)

    return locked


def default_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    """(height, width) in pixels the model was trained at."""
    sample = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    if isinstance(sample, (list, tuple)):
        return int(sample[0]) * pipe.vae_scale_factor, int(sample[1]) * pipe.vae_scale_factor
    side = int(sample) * pipe.vae_scale_factor
    return side, side


def check_size(pipe: DiffusionPipeline, height: int, width: int, min_side: int = 64, max_side: int = 2048) -> None:
    """Raise UserInputError unless both sides are multiples the model accepts, within bounds."""
    multiple = backbones.of(pipe).size_multiple(pipe)
    for side_name, side in (("Height", height), ("Width", width)):
        if side % multiple or not min_side <= side <= max_side:
            raise UserInputError(
                f"{side_name} must be a multiple of {multiple} between {min_side} and {max_side} "
                f"for this model, not {side}."
            )


# --------------------------------------------------------------------------------------------
# Loading from disk and from the hub

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face hub id ("owner/name"), not a path."""
    return bool(_HUB_ID.match(name))  # its first character is a letter or digit: never ".", "/" or "~"
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# How long to wait for the hub to answer before calling it unreachable.
_HUB_PROBE_TIMEOUT_S = 5.0


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers renamed `torch_dtype` to `dtype` (the old name warns); older releases within
    # our supported range only know `torch_dtype`.
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _load_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not (folder / "model_index.json").is_file():
        raise UserInputError(
            f"The folder '{folder}' is not a diffusers model folder (it has no model_index.json)."
        )
    try:
        return DiffusionPipeline.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, **_dtype_kwarg(dtype)
        )
    except OSError as error:
        # Missing or unreadable weight files; the most common cause is a folder saved with
        # pickled .bin weights, which we do not load.
        raise UserInputError(
            f"Could not load the diffusers folder '{folder}' (weights must be .safetensors): "
            f"{_first_line(error)}"
        ) from error


class _LazyCheckpoint(Mapping):
    """A .safetensors file's tensors by name, each read from disk only when asked for.

    diffusers' architecture detection looks at key names and a few tensor shapes; this lets it
    run without reading gigabytes twice (from_single_file reads the whole file afterwards).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="pt")
        self._keys = list(self._handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_checkpoint(path: Path) -> _LazyCheckpoint:
    try:
        return _LazyCheckpoint(path)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        if out_of_memory_message(error) is not None:
            raise  # not a bad file: the request's handler says what to lower (pipelines.errors)
        raise UserInputError(f"'{path}' is not a readable .safetensors file: {_first_line(error)}") from error


def _single_file_pipeline_class(checkpoint: Mapping, path: Path) -> type[DiffusionPipeline]:
    """Guess the pipeline from the checkpoint's tensor names."""
    keys = list(checkpoint.keys())
    if any(key.startswith("conditioner.embedders.1") for key in keys):
        return StableDiffusionXLPipeline
    if any(key.startswith("model.diffusion_model.joint_blocks.") for key in keys):
        return StableDiffusion3Pipeline
    if any(key.startswith("model.diffusion_model.input_blocks.") for key in keys):
        return StableDiffusionPipeline
    if any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in keys):
        raise UserInputError(
            f"'{path.name}' holds only a FLUX transformer; pass a complete diffusers FLUX folder instead."
        )
    raise UserInputError(
        f"'{path.name}' is not a recognised SD 1.x/2.x, SDXL or SD3 single-file checkpoint."
    )


def _single_file_config_folder(checkpoint: Mapping, path: Path, pipeline_class: type) -> str:
    """The cached diffusers config folder of the checkpoint's base model, without the network.

    from_single_file would silently go online when this config is not cached, even with
    local_files_only=True, so look it up here and hand the folder over explicitly.
    """
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    config_repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return snapshot_download(
            config_repo,
            local_files_only=True,
            allow_patterns=["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"],
        )
    except Exception as error:  # LocalEntryNotFoundError and friends: not in the cache
        raise UserInputError(
            f"Loading '{path.name}' needs the config of '{config_repo}', which is not in the local "
            "Hugging Face cache: on a machine with internet run "
            f"`{pipeline_class.__name__}.from_single_file('{path.name}').save_pretrained('FOLDER')` "
            "and pass that folder instead."
        ) from error


def _load_single_file(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise UserInputError(
            f"'{path.name}' is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors (or a diffusers folder) and pass that instead."
        )
    if suffix != ".safetensors":
        raise UserInputError(f"'{path.name}' is neither a diffusers folder nor a .safetensors checkpoint.")
    checkpoint = _open_checkpoint(path)
    pipeline_class = _single_file_pipeline_class(checkpoint, path)
    config_folder = _single_file_config_folder(checkpoint, path, pipeline_class)
    return pipeline_class.from_single_file(
        str(path), config=config_folder, local_files_only=True, **_dtype_kwarg(dtype)
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_hub(repo_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached_index = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached_index, str):
        return DiffusionPipeline.from_pretrained(
            repo_id, local_files_only=True, use_safetensors=True, **_dtype_kwarg(dtype)
        )

    unreachable = (
        f"The model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be "
        f"reached: run `huggingface-cli download {repo_id}` on a machine with internet, or pass a "
        "local diffusers folder."
    )
    if _hub_offline():
        raise UserInputError(unreachable)
    # One quick metadata request decides whether downloading can work at all; without it a
    # missing network surfaces only after the hub client's retries and long timeouts.
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=_HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as error:
        raise UserInputError(
            f"The model '{repo_id}' is gated: accept its licence on huggingface.co and log in with "
            "`huggingface-cli login`, or pass a local diffusers folder."
        ) from error
    except RepositoryNotFoundError as error:
        raise UserInputError(f"There is no model '{repo_id}' on the Hugging Face hub.") from error
    except Exception as error:  # connection, DNS, TLS and timeout errors of the HTTP client
        raise UserInputError(unreachable) from error
    # safetensors only: pickled .bin weights can run code when loaded
    return DiffusionPipeline.from_pretrained(repo_id, use_safetensors=True, **_dtype_kwarg(dtype))


def _resolve(name_or_path: str) -> tuple[str, Callable[[torch.dtype], DiffusionPipeline]]:
    """The cache key for a user-given name, and how to build the pipeline if it is not cached."""
    name = str(name_or_path).strip()
    if not name:
        raise UserInputError("No model was given; use 'tiny', a local folder or a hub id.")
    if is_tiny(name):
        return name, lambda dtype: build_tiny_as(name, dtype)
    folder = builtin_folder(name)
    if folder is not None:
        if not (folder / "model_index.json").is_file():
            raise UserInputError(
                f"The built-in model '{name}' is missing from {folder} (it ships with the repository; restore "
                "that folder with git, or use 'tiny' or a local checkpoint)."
            )
        return f"{name}:{folder}", lambda dtype: _load_folder(folder, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path.resolve()
        return str(folder), lambda dtype: _load_folder(folder, dtype)
    if path.is_file():
        file = path.resolve()
        return str(file), lambda dtype: _load_single_file(file, dtype)
    if is_hub_id(name):
        return f"hub:{name}", lambda dtype: _load_hub(name, dtype)
    if name.startswith((".", "/", "~")) or os.sep in name or path.suffix:
        raise UserInputError(f"There is no file or folder at '{name}'.")
    raise UserInputError(
        f"'{name}' is not a built-in model ({', '.join(BUILTIN_NAMES)}), an existing local path or a "
        "hub id of the form owner/name."
    )


# --------------------------------------------------------------------------------------------
# The cache

_cache: dict[tuple, DiffusionPipeline] = {}
# Gradio serves tabs from several threads: one lock keeps two tabs from loading the same model
# twice.  Re-entrant because load_as() calls load().
_cache_lock = threading.RLock()


def load(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """The pipeline for a built-in name, local folder, `.safetensors` file or hub id (cached).

    `device` defaults to CUDA, then MPS, then CPU; `dtype` to bfloat16 (float16 on GPUs without
    bf16) on GPUs and float32 on CPU.  Strings like "cuda" or "float16" are accepted.  The same
    arguments return the same object; treat it as shared.
    """
    resolved_device = _resolve_device(device)
    resolved_dtype = _resolve_dtype(dtype, resolved_device)
    key, build = _resolve(name_or_path)
    cache_key = (key, str(resolved_device), resolved_dtype)
    with _cache_lock:
        pipe = _cache.get(cache_key)
        if pipe is None:
            # Loaders get the dtype up front (from_pretrained keeps the modules a model marks
            # as float32-only in float32); only the device move is left.
            pipe = build(resolved_dtype).to(resolved_device)
            # Results record the model by the name the user gave ("builtin", a hub id, the path
            # as typed), never by the folder it was read from (a server path a visitor must not
            # see, and one that differs between checkouts).
            pipe.register_to_config(_name_or_path=str(name_or_path).strip())
            if _compile_options is not None:  # --compile: once, as the model enters the cache
                compile_denoiser(pipe, **_compile_options)
            _cache[cache_key] = pipe
        return pipe


def load_as(
    name_or_path: str,
    pipeline_class: type[DiffusionPipeline],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """`pipeline_class.from_pipe(load(...))`, cached: another task's pipeline on the same weights.

    The derived pipeline shares every module with the base one (no copy, no reload).
    """
    base = load(name_or_path, device, dtype)
    resolved_device = _resolve_device(device)
    key, _ = _resolve(name_or_path)
    cache_key = (key, str(resolved_device), _resolve_dtype(dtype, resolved_device), pipeline_class)
    with _cache_lock:
        pipe = _cache.get(cache_key)
        if pipe is None:
            if type(base) is pipeline_class:
                pipe = base
            else:
                pipe = pipeline_class.from_pipe(base)
            _cache[cache_key] = pipe
        return pipe


def clear_cache() -> None:
    """Forget every cached pipeline (and free GPU memory they alone held)."""
    with _cache_lock:
        _cache.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: torch.compile options for every pipeline `load` builds from now on (None: no compilation).
_compile_options: dict | None = None


def compile_on_load(**options) -> None:
    """Compile the denoiser of every pipeline `load` builds from now on (`compile_denoiser`, with
    these `torch.compile` options): what the app's `--compile` turns on for the process."""
    global _compile_options
    _compile_options = dict(options)


def compile_denoiser(pipe: DiffusionPipeline, **options) -> DiffusionPipeline:
    """Compile `pipe`'s denoiser in place, once: its repeated blocks (diffusers'
    `compile_repeated_blocks`, regional compilation) where the model class names them in
    `_repeated_blocks` (UNets, FLUX), else the whole denoiser (`nn.Module.compile`).  `options` go
    to `torch.compile` and are kept on the denoiser (`compile_options`): a task that builds its
    own copy of it (Edit video) compiles the copy with them.  Attention control keeps working:
    processors and the step state are compile-stable (see attention_processors/core.py).

    Regional compilation shares one code object among the blocks, and Dynamo compiles it once
    per distinct block: a different token count or width, and every block holding a controlled
    layer (a method's per-layer decisions are constants of its graph), once per method that ran
    on it.  Dynamo allows 8 graphs per code object, past which it runs the rest eagerly (or
    fails, with ``fullgraph=True``); a UNet's shared block code stands for every block, so the
    limit becomes 8 per block (process-wide; never lowered; `compile_regions`).  Graphs are per
    block and method, never per step."""
    den = denoiser(pipe)
    if getattr(den, "_project_compiled", False):
        return pipe
    if getattr(den, "_repeated_blocks", None) and hasattr(den, "compile_repeated_blocks"):
        compile_regions(den, **options)
    else:
        den.compile(**options)
    den._project_compiled = True
    den._project_compile_options = dict(options)
    return pipe


def compile_options(module: torch.nn.Module) -> dict | None:
    """The `torch.compile` options `compile_denoiser` compiled `module` with; None if it did not."""
    return dict(getattr(module, "_project_compile_options", {})) if getattr(module, "_project_compiled", False) else None


def compile_regions(module: torch.nn.Module, graphs_per_block: int = 8, **options) -> None:
    """diffusers' regional compilation (`compile_repeated_blocks(**options)`: every submodule whose
    class is in `module._repeated_blocks`), with Dynamo's recompile limit raised to
    `graphs_per_block` per block (see `compile_denoiser`)."""
    import torch._dynamo

    blocks = sum(type(m).__name__ in module._repeated_blocks for m in module.modules())
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs_per_block * blocks)
    module.compile_repeated_blocks(**options)
