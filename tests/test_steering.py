"""MedSteer counterfactual steering: the method's specification as tests (tiny models, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attention_processors import AttentionCall, ControlState, attention_layer_names
from attention_processors.medsteer import MedSteer, cross_attention_layers, remove_concept, step_index_tensor, unit_directions
from pipelines import models
from pipelines.errors import UserInputError
from pipelines.steering import (
    Directions,
    counterfactual_pair,
    estimate_directions,
    generate_dataset,
    parse_seeds,
    shard,
)

STEPS = 2


def _unit(c: int, seed: int = 0) -> torch.Tensor:
    d = torch.randn(c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    return d / d.norm()


def _tokens(n: int = 256, c: int = 16) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- the removal on tensors


@pytest.mark.parametrize("beta", [2.0, 3.0, 0.5])
def test_every_token_keeps_its_norm(beta):
    a, d = _tokens(), _unit(16)
    out = remove_concept(a, d, beta)
    torch.testing.assert_close(out.norm(dim=-1), a.norm(dim=-1), rtol=1e-6, atol=0)


def test_beta_2_reflects_the_aligned_component():
    a, d = _tokens(), _unit(16)
    aligned = a @ d > 0
    out = remove_concept(a, d, 2.0)
    torch.testing.assert_close((out @ d)[aligned], -(a @ d)[aligned], atol=1e-5, rtol=0)


def test_beta_1_removes_the_aligned_component_exactly():
    a, d = _tokens(), _unit(16)
    aligned = a @ d > 0
    out = remove_concept(a, d, 1.0)
    assert aligned.sum() > 50
    assert (out @ d)[aligned].abs().max() <= 1e-6


def test_tokens_not_aligned_with_the_direction_are_bit_identical():
    a, d = _tokens(), _unit(16)
    a[:10] -= (a[:10] @ d).unsqueeze(-1) * d  # exactly orthogonal up to rounding: a.d ~ 0
    out = remove_concept(a, d, 2.0)
    gate = a @ d <= 0
    assert gate.sum() > 50
    assert torch.equal(out[gate], a[gate])
    assert not torch.equal(out[~gate], a[~gate])


def test_beta_0_is_the_identical_tensor():
    a, d = _tokens(), _unit(16)
    assert remove_concept(a, d, 0.0) is a


def test_half_precision_tokens_are_edited_in_float32_and_cast_back():
    a, d = _tokens().to(torch.bfloat16), _unit(16)
    out = remove_concept(a, d, 2.0)
    assert out.dtype == torch.bfloat16
    reference = remove_concept(a.float(), d, 2.0).to(torch.bfloat16)
    assert torch.equal(out, reference)


def test_directions_have_unit_norm_and_zero_differences_stay_zero():
    pos = {"l": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))}
    neg = {"l": pos["l"].clone()}
    neg["l"][0] += torch.randn(8, generator=torch.Generator().manual_seed(2))
    neg["l"][2] += 1.0
    d = unit_directions(pos, neg)["l"]
    torch.testing.assert_close(d[[0, 2]].norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    assert d[1].abs().max() == 0  # identical means: no direction, steering is a no-op there
    assert torch.equal(remove_concept(_tokens(c=8), d[1], 2.0), _tokens(c=8))


def test_step_mapping_clamps_by_default_and_rescales_on_request():
    def mapped(step_map="clamp"):
        return [int(step_index_tensor(torch.tensor(t), 3, 5, step_map)) for t in range(5)]

    assert mapped() == [0, 1, 2, 2, 2]
    assert mapped("relative") == [0, 0, 1, 2, 2]


def test_the_settings_offer_exactly_the_policys_step_maps():
    """pipelines/steering_settings.py (no torch) lists the step maps again for the CLI and the tab."""
    from attention_processors.medsteer import STEP_MAPS
    from pipelines import steering_settings

    assert steering_settings.STEP_MAPS == STEP_MAPS


# ----------------------------------------------------------------------- the policy on fake calls


def _call(state: ControlState, batch: int, n: int = 6, c: int = 8, name: str = "transformer_blocks.0.attn2"):
    q = torch.zeros(batch, 1, n, c)
    k = torch.zeros(batch, 1, 3, c)
    return AttentionCall(name, "cross", q, k, k, slice(0, n), slice(0, 3), state)


def test_record_reads_only_the_conditional_rows():
    state = ControlState(row_roles=("uncond", "cond"))
    name = "transformer_blocks.0.attn2"
    controller = MedSteer([name], mode="record", state=state)
    output = torch.empty(4, 6, 8)
    output[:2] = 1000.0  # uncond rows: must never be read
    output[2] = 1.0
    output[3] = 3.0
    output[3, 0] = 9.0  # a token mean, not a row's first token
    for step in range(2):
        state.step = step
        returned = controller.post(_call(state, 4, name=name), output)
        assert returned is output
    means = controller.means()[name]
    expected = (1.0 + (3.0 * 5 + 9.0) / 6) / 2
    torch.testing.assert_close(means, torch.full((2, 8), expected))


def test_steering_only_the_conditional_half_leaves_the_unconditional_rows():
    state = ControlState(row_roles=("uncond", "cond"))
    name = "transformer_blocks.0.attn2"
    d = _unit(8)
    both = MedSteer([name], directions={name: d.expand(3, 8)}, beta=2.0, state=state)
    cond = MedSteer([name], directions={name: d.expand(3, 8)}, beta=2.0, steer_roles=("cond",), state=state)
    state.step = 1
    output = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))
    out_both = both.post(_call(state, 4, name=name), output)
    out_cond = cond.post(_call(state, 4, name=name), output)
    assert torch.equal(out_cond[:2], output[:2])
    assert torch.equal(out_cond[2:], out_both[2:])
    assert torch.equal(out_both, remove_concept(output, d, 2.0))


# ----------------------------------------------------------------------- tiny PixArt and tiny SD


@pytest.fixture(scope="module", params=["tiny-pixart", "tiny"])
def setup(request, tiny_pipe):
    pipe = tiny_pipe(request.param)
    directions = estimate_directions(pipe, "a photo of a cat", "a photo of a dog", samples=2, steps=STEPS,
                                     height=64, width=64)
    return request.param, pipe, directions


def _plain(pipe, prompt: str, seed: int, guidance: float) -> np.ndarray:
    extra = models.backbone(pipe).call_defaults(pipe, exact_size=True)
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images[0]


def test_directions_cover_every_cross_attention_layer_with_unit_vectors(setup):
    name, pipe, directions = setup
    denoiser = pipe.transformer if name == "tiny-pixart" else pipe.unet
    blocks = [n for n, m in denoiser.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert directions.layers == [f"{b}.attn2" for b in blocks]
    for layer, vectors in directions.vectors.items():
        assert vectors.shape == (STEPS, dict(denoiser.named_modules())[layer].to_out[0].out_features)
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(STEPS), atol=1e-6, rtol=0)
    assert directions.meta["samples"] == 2 and directions.meta["steps"] == STEPS


def test_beta_0_is_bit_identical_to_the_plain_pipeline(setup):
    _, pipe, directions = setup
    pair = counterfactual_pair(pipe, directions, "a photo of a cat", seed=3, beta=0)
    plain = _plain(pipe, "a photo of a cat", 3, directions.meta["guidance"])
    assert np.array_equal(pair.original_array, plain)
    assert np.array_equal(pair.steered_array, plain)
    assert pair.mean_abs_diff == 0


def test_beta_2_changes_the_image_and_the_batched_pair_equals_two_runs(setup):
    _, pipe, directions = setup
    batched = counterfactual_pair(pipe, directions, "a photo of a cat", seed=3, beta=2)
    separate = counterfactual_pair(pipe, directions, "a photo of a cat", seed=3, beta=2, batched=False)
    plain = _plain(pipe, "a photo of a cat", 3, directions.meta["guidance"])
    assert np.abs(batched.steered_array - batched.original_array).max() > 1e-3
    assert batched.mean_abs_diff > 0
    np.testing.assert_allclose(separate.original_array, plain, atol=0, rtol=0)
    np.testing.assert_allclose(batched.original_array, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched.steered_array, separate.steered_array, atol=1e-5, rtol=0)
    assert batched.heatmap.size == batched.original.size == (64, 64)


def test_steering_installs_processors_only_on_attn2_and_restores_them(setup):
    name, pipe, directions = setup
    denoiser = pipe.transformer if name == "tiny-pixart" else pipe.unet
    before = {n: m.get_processor() for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    seen = {}

    def look(module, args):
        if not seen:
            seen.update({n: m.get_processor() for n, m in module.named_modules() if hasattr(m, "set_processor")})

    handle = denoiser.register_forward_pre_hook(look)
    try:
        counterfactual_pair(pipe, directions, "a cat", seed=0, beta=2)
    finally:
        handle.remove()
    changed = sorted(n for n in before if seen[n] is not before[n])
    assert changed == sorted(cross_attention_layers(attention_layer_names(denoiser)))
    assert all(n.endswith("attn2") for n in changed)
    after = {n: m.get_processor() for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    assert all(after[n] is before[n] for n in before)


def test_longer_runs_reuse_the_last_direction_and_shorter_ones_are_refused(setup):
    _, pipe, directions = setup
    longer = counterfactual_pair(pipe, directions, "a cat", seed=0, beta=2, steps=STEPS + 2)
    assert longer.params["steps"] == STEPS + 2 and longer.mean_abs_diff > 0
    cut = Directions({k: v[:1].clone() for k, v in directions.vectors.items()}, dict(directions.meta))
    short = Directions({k: torch.cat([v, v]) for k, v in directions.vectors.items()}, dict(directions.meta))
    with pytest.raises(UserInputError, match=f"holds {2 * STEPS} steps but this run has {STEPS}"):
        counterfactual_pair(pipe, short, "a cat", seed=0, steps=STEPS)
    relative = counterfactual_pair(pipe, short, "a cat", seed=0, steps=STEPS, step_map="relative")
    assert relative.mean_abs_diff > 0
    assert counterfactual_pair(pipe, cut, "a cat", seed=0, steps=STEPS).mean_abs_diff > 0


def test_save_load_round_trip(setup, tmp_path):
    _, pipe, directions = setup
    path = directions.save(tmp_path / "d.safetensors")
    loaded = Directions.load(path)
    assert loaded.meta == directions.meta and loaded.layers == directions.layers
    for layer in directions.layers:
        assert torch.equal(loaded.vectors[layer], directions.vectors[layer])
    a = counterfactual_pair(pipe, directions, "a cat", seed=1, beta=2)
    b = counterfactual_pair(pipe, loaded, "a cat", seed=1, beta=2)
    assert np.array_equal(a.steered_array, b.steered_array)


# ----------------------------------------------------------------------- bad input


def test_directions_of_another_model_are_refused(tiny_pipe):
    sd, pixart = tiny_pipe("tiny"), tiny_pipe("tiny-pixart")
    directions = estimate_directions(pixart, "a cat", "a dog", samples=1, steps=STEPS, height=64, width=64)
    with pytest.raises(UserInputError, match=r"made for tiny-pixart with 2 cross-attention layers.*this model has"):
        counterfactual_pair(sd, directions, "a cat", seed=0)
    renamed = Directions(directions.vectors, {**directions.meta, "model": "other-pixart"})
    with pytest.raises(UserInputError, match="estimated on other-pixart, not on tiny-pixart"):
        counterfactual_pair(pixart, renamed, "a cat", seed=0)
    assert counterfactual_pair(pixart, renamed, "a cat", seed=0, allow_other_model=True).seed == 0
    layer = directions.layers[0]
    wide = Directions({**directions.vectors, layer: torch.zeros(STEPS, 7)}, directions.meta)
    with pytest.raises(UserInputError, match=f"layer {layer} is 7 wide there"):
        counterfactual_pair(pixart, wide, "a cat", seed=0)


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(UserInputError, match="junk.safetensors is not a readable directions file"):
        Directions.load(junk)
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserInputError, match="not a readable directions file"):
        Directions.load(foreign)
    with pytest.raises(UserInputError, match="no such file"):
        Directions.load(tmp_path / "missing.safetensors")
    with pytest.raises(UserInputError, match="must end in .safetensors"):
        Directions({"l": torch.zeros(1, 2)}).save(tmp_path / "d.pt")


@pytest.mark.parametrize("positive, negative", [("a cat", "a cat"), ("A  cat ", "a cat")])
def test_identical_prompts_are_refused_before_dividing_by_zero(tiny_pipe, positive, negative):
    with pytest.raises(UserInputError, match="identical, so their difference is zero"):
        estimate_directions(tiny_pipe("tiny-pixart"), positive, negative, samples=1, steps=STEPS)


def test_identical_means_are_refused_with_a_sentence(tiny_pipe, monkeypatch):
    """Two prompts that the text encoder maps to the same embedding, on matched seeds."""
    import pipelines.steering as steering

    pipe = tiny_pipe("tiny-pixart")
    real_encode = steering.encode
    monkeypatch.setattr(steering, "encode", lambda pipe, prompt, *a: real_encode(pipe, "a cat", *a))
    with pytest.raises(UserInputError, match="same cross-attention means.*no direction"):
        estimate_directions(pipe, "a cat", "a dog", samples=1, steps=STEPS, matched=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=-1), "Beta must be between 0 and 10"),
    (dict(beta=10.5), "Beta must be between 0 and 10"),
    (dict(beta="strong"), "Beta must be a number"),
    (dict(steer="uncond"), "Steer must be one of both, cond"),
    (dict(prompt="  "), "Please enter the prompt to steer"),
    (dict(seed=2**32), "seed must be at most 4294967295"),
    (dict(width=65), "Width must be a multiple of"),
    (dict(step_map="nearest"), "step map must be one of"),
])
def test_bad_pair_inputs_are_one_sentence(setup, kwargs, message):
    _, pipe, directions = setup
    call = dict(prompt="a cat", seed=0)
    call.update(kwargs)
    with pytest.raises(UserInputError, match=message):
        counterfactual_pair(pipe, directions, **call)


@pytest.mark.parametrize("kwargs, message", [
    (dict(samples=0), "Samples per prompt must be between 1"),
    (dict(steps=1), "Steps must be between 2"),
    (dict(positive=""), "Please enter the positive prompt"),
    (dict(layers="up_blocks"), "No cross-attention layer of this model matches"),
    (dict(layers="("), "not a valid regular expression"),
])
def test_bad_estimation_inputs_are_one_sentence(tiny_pipe, kwargs, message):
    call = dict(positive="a cat", negative="a dog", samples=1, steps=STEPS)
    call.update(kwargs)
    with pytest.raises(UserInputError, match=message):
        estimate_directions(tiny_pipe("tiny-pixart"), **call)


def test_unsupported_families_are_refused(tiny_pipe):
    with pytest.raises(UserInputError, match="works with SD 1.x/2.x and PixArt-alpha models"):
        estimate_directions(tiny_pipe("tiny-sd3"), "a cat", "a dog", samples=1, steps=STEPS)


# ----------------------------------------------------------------------- seeds and the dataset


def test_seed_lists():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 1-2,5") == [5, 1, 2]
    assert parse_seeds(7) == [7]
    for bad, message in (("3-1", "runs backwards"), ("a-b", "must look like"), ("0-999999", "At most")):
        with pytest.raises(UserInputError, match=message):
            parse_seeds(bad)


def test_the_split_covers_every_seed_once_and_balances_the_processes():
    seeds = list(range(10))
    parts = [shard(seeds, i, 3) for i in range(3)]
    assert sorted(s for part in parts for s in part) == seeds
    assert [len(p) for p in parts] == [4, 3, 3]
    assert shard(seeds, 0, 1) == seeds
    with pytest.raises(ValueError):
        shard(seeds, 3, 3)


def test_dataset_split_across_two_fake_processes_then_resumed(tiny_pipe, tmp_path):
    pipe = tiny_pipe("tiny-pixart")
    directions = estimate_directions(pipe, "a cat", "a dog", samples=1, steps=STEPS, height=64, width=64)
    folder = tmp_path / "pairs"
    waits = []
    second = generate_dataset(pipe, directions, "a cat", "0-4", folder, process_index=1, num_processes=2,
                              wait=lambda: waits.append(1))
    assert second.written == [1, 3] and second.manifest is None and waits == [1]
    first = generate_dataset(pipe, directions, "a cat", "0-4", folder, process_index=0, num_processes=2)
    assert first.written == [0, 2, 4]
    lines = [json.loads(line) for line in first.manifest.read_text().splitlines()]
    assert [line["seed"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[0] == {**lines[0], "prompt": "a cat", "beta": 2.0, "original": "orig_seed0.png",
                        "steered": "steered_seed0.png", "difference": "diff_seed0.png"}
    for line in lines:
        for key in ("original", "steered", "difference"):
            assert (folder / line[key]).is_file()
    # resume: a lost pair is redone, finished ones skipped; no temporary files are left
    (folder / "steered_seed2.png").unlink()
    again = generate_dataset(pipe, directions, "a cat", "0-5", folder)
    assert again.written == [2, 5] and again.skipped == [0, 1, 3, 4]
    assert len(again.manifest.read_text().splitlines()) == 6
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    with pytest.raises(UserInputError, match=r"holds pairs made with other settings \(beta\)"):
        generate_dataset(pipe, directions, "a cat", "0-5", folder, beta=1.0)
