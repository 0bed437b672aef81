"""The "Personalize" task: several concepts from one image with DisenDiff or AttenCraft.

Both methods, every default and where it comes from, and our deviations: docs/methods/personalize.md.

- `disendiff.py`, `attencraft.py`: one method each, in one file: its settings with the paper's
  defaults (`DisenDiffSettings`, `AttenCraftSettings`) and what it adds to training (captions,
  batches, losses; AttenCraft's masks).  `METHODS` below is the one place a method is named.
- `base.py`: the settings fields both share (`PersonalizeSettings`) and the `Method` interface.
- `common.py`: what both do: data and regularisation images, the training loop (`Trainer`,
  `train`), checkpoints, the learned file (`Learned`) and `generate`.

    from pipelines import personalize
    trainer = personalize.Trainer(pipe, photo, "cat,dog", "attencraft", "run/", steps=100)
    learned = personalize.train(pipe, photo, "cat,dog", settings=personalize.AttenCraftSettings(tau=0.05)).learned
    image = personalize.generate(pipe, learned, "a <new1> cat on the beach", seed=42).image

The names of common.py load torch and diffusers; they are imported on first use, so the command
line and the tab read the settings (this module, base.py and the method modules) without them.
"""

from __future__ import annotations

from types import MappingProxyType

from ..errors import UserInputError
from .attencraft import AttenCraft, AttenCraftSettings, concept_spans, uniform_subset_sampler
from .base import (
    GENERATE_SEED,
    MAX_STEPS,
    MIN_CONCEPTS,
    PRIOR_GUIDANCE,
    PRIOR_STEPS,
    SAMPLING,
    Method,
    PersonalizeSettings,
)
from .disendiff import DisenDiff, DisenDiffSettings

#: every method, by the name the CLI, the tab and the learned files use
METHODS: dict[str, type[Method]] = {"disendiff": DisenDiff, "attencraft": AttenCraft}
DEFAULT_METHOD = "disendiff"

#: every paper default per method, read-only (the settings classes are where they live)
PAPER_DEFAULTS = MappingProxyType({name: MappingProxyType(kind.settings.paper_defaults())
                                   for name, kind in METHODS.items()})


def sample_steps(method: str, steps: int | None = None) -> int:
    """The denoising steps `generate` takes with a file learned by `method`: `steps`, else (None
    or 0) the method's `sample_steps` (an unknown method's: the default method's).  The tab checks
    them against the server's --max-steps."""
    kind = METHODS.get(method, METHODS[DEFAULT_METHOD])
    return int(steps or kind.settings.default("sample_steps"))


def method_named(name) -> tuple[str, type[Method]]:
    """(name, method class) of a method's name, any case; one sentence for an unknown one."""
    key = str(name or "").strip().lower()
    if key not in METHODS:
        raise UserInputError(f"The method must be one of {', '.join(METHODS)}, not '{key}'.")
    return key, METHODS[key]


def method_of(settings: PersonalizeSettings) -> tuple[str, type[Method]]:
    """(name, method class) whose settings `settings` are."""
    for name, kind in METHODS.items():
        if isinstance(settings, kind.settings):
            return name, kind
    raise TypeError(f"{type(settings).__name__} are not the settings of a personalization method")


# common.py's public names, loaded on first use
_COMMON = (
    "ADAPTER", "CHECKPOINT", "FORMAT", "LEARNED", "LORA_FILE", "SUPPORTED", "TOKEN_NAMES",
    "Forward", "Generated", "Learned", "StepInfo", "TrainResult", "Trainer", "augment", "check_class_words",
    "checkpoint_fingerprint", "diffusers_lora_path", "generate", "learned_token_embeddings", "lora_adapter",
    "lora_config", "masked_mse", "model_name", "parse_class_words", "personal_tokenizer", "refuse_peft_adapters",
    "square_image", "swapped_weights", "train", "use_learned",
)

__all__ = [
    "AttenCraft", "AttenCraftSettings", "DEFAULT_METHOD", "DisenDiff", "DisenDiffSettings", "GENERATE_SEED", "MAX_STEPS", "METHODS",
    "MIN_CONCEPTS", "Method", "PAPER_DEFAULTS", "PRIOR_GUIDANCE", "PRIOR_STEPS", "PersonalizeSettings", "SAMPLING",
    "concept_spans", "method_named", "method_of", "sample_steps", "uniform_subset_sampler", *_COMMON,
]


def __getattr__(name: str):
    if name in _COMMON:
        from . import common

        value = getattr(common, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_COMMON})
