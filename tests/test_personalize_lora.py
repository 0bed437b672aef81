"""Personalize's LoRA option (`lora_rank > 0`) on the tiny model: a peft LoRA adapter on exactly
the cross-attention K/V projections, installed on the shared UNet only for a locked section and
removed without a trace, written for diffusers' `load_lora_weights` too, and still reading the
learned files written before."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from test_shared_model import snapshot

from pipelines import models
from pipelines.personalize import (
    ADAPTER,
    FORMAT,
    LEARNED,
    LORA_FILE,
    Learned,
    Trainer,
    diffusers_lora_path,
    generate,
    train,
    use_learned,
)

FAST = dict(steps=2, prior_images=1, batch_size=1, grad_accum=1, prior_steps=2)
RANK = 2


@pytest.fixture(scope="module")
def pipe():
    return models.load("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def run(pipe, photo, tmp_path_factory):
    """A 2-step LoRA run written to a folder (learned file + diffusers file)."""
    return train(pipe, photo, "cat,dog", "disendiff", tmp_path_factory.mktemp("lora") / "run", lora_rank=RANK,
                 lr=1e-2, **FAST)


def module_tree(module) -> list:
    return [(name, type(m), id(m)) for name, m in module.named_modules()]


def test_the_adapter_is_peft_lora_on_exactly_the_attn2_kv_layers_with_scale_one(pipe, photo):
    trainer = Trainer(pipe, photo, "cat,dog", "disendiff", None, lora_rank=RANK, **FAST)
    assert sorted(trainer.lora) == sorted(f"{layer}.{proj}" for layer in trainer.attn2 for proj in ("to_k", "to_v"))
    modules = dict(pipe.unet.named_modules())
    for name, (a, b) in trainer.lora.items():  # peft's init_lora_weights=True: kaiming-uniform A, zero B
        fan_in = modules[name].in_features
        assert a.shape == (RANK, fan_in) and b.shape == (modules[name].out_features, RANK)
        assert not b.any() and a.abs().max() <= 1 / math.sqrt(fan_in) and a.std() > 0
    tree = module_tree(pipe.unet)
    with models.exclusive(pipe), trainer._active_weights():
        config = pipe.unet.peft_config[ADAPTER]
        assert (config.r, config.lora_alpha, config.init_lora_weights) == (RANK, RANK, True)
        assert set(config.target_modules) == set(trainer.lora)
        wrapped = {name for name, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
        assert wrapped == set(trainer.lora)
        for name, (a, b) in trainer.lora.items():
            layer = pipe.unet.get_submodule(name)
            assert layer.scaling[ADAPTER] == 1.0 and layer.r[ADAPTER] == RANK
            assert layer.get_base_layer() is modules[name]  # the shared module, wrapped, not copied
            # the adapter's weights are the trainer's parameters (what the optimiser steps)
            assert layer.lora_A[ADAPTER].weight is a and layer.lora_B[ADAPTER].weight is b
    assert module_tree(pipe.unet) == tree and not hasattr(pipe.unet, "peft_config")


def test_training_and_generate_leave_the_shared_unet_as_they_found_it(pipe, photo):
    before, tree = snapshot(pipe), module_tree(pipe.unet)
    flags = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    trainer = Trainer(pipe, photo, "cat,dog", "disendiff", None, lora_rank=RANK, lr=1e-2, **FAST)
    b0 = {name: b.detach().clone() for name, (_, b) in trainer.lora.items()}
    list(trainer.run())
    assert module_tree(pipe.unet) == tree and snapshot(pipe) == before
    # only the factors (and the token rows) trained: every B moved away from zero
    assert all(not torch.equal(trainer.lora[name][1], b0[name]) for name in b0)
    generate(pipe, trainer.learned(), "a <new1> cat", seed=1, steps=2)
    assert module_tree(pipe.unet) == tree and snapshot(pipe) == before
    assert {name: p.requires_grad for name, p in pipe.unet.named_parameters()} == flags
    assert not hasattr(pipe.unet, "peft_config") and not pipe.unet._hf_peft_config_loaded


def test_a_unet_that_already_has_peft_adapters_is_refused(photo):
    from peft import LoraConfig

    from pipelines.errors import UserInputError

    fresh = models.build_tiny("tiny")
    trainer = Trainer(fresh, photo, "cat,dog", "disendiff", None, lora_rank=RANK, **FAST)
    fresh.unet.add_adapter(LoraConfig(r=1, target_modules=["to_q"]), adapter_name="theirs")
    with pytest.raises(UserInputError, match="adapters loaded"):  # loaded between steps
        list(trainer.run())
    with pytest.raises(UserInputError, match="adapters loaded"):  # loaded before
        Trainer(fresh, photo, "cat,dog", "disendiff", None, lora_rank=RANK, **FAST)
    assert set(fresh.unet.peft_config) == {"theirs"}


def test_the_diffusers_file_is_peft_state_dict_and_lives_next_to_the_learned_file(pipe, run):
    learned = Learned.load(run.path)
    assert diffusers_lora_path(run.path) == run.folder / LORA_FILE and (run.folder / LORA_FILE).is_file()
    assert diffusers_lora_path(run.folder / "other.safetensors") == run.folder / f"other_{LORA_FILE}"
    with models.exclusive(pipe), use_learned(pipe, learned):
        theirs = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER)
    ours = learned.peft_state_dict()
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k].float(), ours[k]) for k in ours)


@pytest.mark.parametrize("where", ["folder", "file"])
def test_load_lora_weights_gives_the_same_kv_outputs_as_use_learned(pipe, run, where):
    learned = Learned.load(run.path)
    fresh = models.build_tiny("tiny")
    fresh.load_lora_weights(str(run.folder if where == "folder" else run.folder / LORA_FILE))
    x = torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = {name: pipe.unet.get_submodule(name)(x) for name in learned.lora}
        with models.exclusive(pipe), use_learned(pipe, learned):
            ours = {name: pipe.unet.get_submodule(name)(x) for name in learned.lora}
        theirs = {name: fresh.unet.get_submodule(name)(x) for name in learned.lora}
    for name in learned.lora:
        assert torch.equal(ours[name], theirs[name]), name
    assert any(not torch.equal(ours[name], plain[name]) for name in learned.lora)  # the LoRA is really there


def test_a_learned_file_in_the_earlier_lora_layout_still_loads(pipe, tmp_path):
    """Files written before the peft adapter: ``lora_A/<name>`` (r, in), ``lora_B/<name>`` (out, r)
    float32 tensors, metadata lora_rank / lora_alpha; they act as W x + alpha / r * B A x."""
    from safetensors.torch import save_file

    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    g = torch.Generator().manual_seed(3)
    modules = dict(pipe.unet.named_modules())
    tensors = {"token_rows": torch.randn(2, pipe.text_encoder.get_input_embeddings().weight.shape[1], generator=g)}
    for name in names:
        tensors[f"lora_A/{name}"] = torch.randn(4, modules[name].in_features, generator=g)
        tensors[f"lora_B/{name}"] = torch.randn(modules[name].out_features, 4, generator=g)
    meta = {"format": FORMAT, "method": "disendiff", "base_model": "tiny", "tokens": '["<new1>", "<new2>"]',
            "class_words": '["cat", "dog"]', "steps": "7", "lora_rank": "4", "lora_alpha": "2.0",
            "assignment": "null"}
    save_file(tensors, str(tmp_path / LEARNED), metadata=meta)
    learned = Learned.load(tmp_path / LEARNED)
    assert learned.lora_rank == 4 and learned.alpha == 2.0 and sorted(learned.lora) == sorted(names)
    x = torch.randn(3, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), models.exclusive(pipe), use_learned(pipe, learned):
        for name in names:
            a, b = tensors[f"lora_A/{name}"], tensors[f"lora_B/{name}"]
            expected = modules[name](x) + 0.5 * (x @ a.T) @ b.T
            torch.testing.assert_close(pipe.unet.get_submodule(name)(x), expected)
    assert generate(pipe, learned, "a <new1> cat", seed=1, steps=2).image.size == models.default_size(pipe)[::-1]
