"""RefAM referring segmentation, specified (shared/methods/grounding.md section 7).

Policy (attention_processors/refam.py) on tiny FLUX (dual + single stream), SD3 and SD UNet:
the capture leaves the model output unchanged, its slice equals a float64 reference, text order
conventions hold, magnet/stop/padding columns never reach the heatmap, sinks are detected and
suppressed, and the early exit changes nothing.  Pipeline (pipelines/grounding.py): token roles,
grids for non-square images, Otsu equal to OpenCV's, binary image-sized masks, one mask per video
frame, SAM2 point prompts and selection, and one sentence for every bad input.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from attention_processors import ControlState, attach, attention_layer_names
from attention_processors.core import AttentionCall
from attention_processors.processors import ControlledFluxAttnProcessor
from attention_processors.refam import RefAMCapture, StopForward, choose_layers, detect_sinks, layer_heat
from pipelines import grounding, models
from pipelines.errors import UserInputError
from pipelines.grounding import (
    GroundingSettings,
    build_prompt,
    heat_to_mask,
    heatmap_points,
    load_stopwords,
    otsu_threshold,
    segment_image,
    segment_video,
    select_mask,
    token_roles,
)
from pipelines.tokenizers import clip_tokenizer, t5_tokenizer

FAMILIES = ["tiny", "tiny-sd3", "tiny-flux"]
EXPRESSION = "the red circle on the left"
FAST = dict(size=64)


def denoiser_of(pipe):
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def image(width=96, height=64, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), np.uint8))


def text_length(pipe) -> tuple[int, slice | None]:
    """Text columns the capture sees in a stock pipeline call, and the part to read."""
    fam = grounding.models.family(pipe)
    if fam == "flux":
        return 512, None
    if fam == "sd3":
        return 256, slice(77, 333)
    return 77, None


def all_layers(pipe) -> dict[str, float]:
    denoiser = denoiser_of(pipe)
    depth = len(denoiser.down_blocks) if hasattr(denoiser, "down_blocks") else None
    return choose_layers(attention_layer_names(denoiser), "all", unet_levels=(0, 1, 2), unet_depth=depth)


def capture_for(pipe, **kwargs) -> RefAMCapture:
    n, part = text_length(pipe)
    target = torch.zeros(n, dtype=torch.bool)
    target[1:4] = True
    kwargs.setdefault("early_exit", False)
    return RefAMCapture(all_layers(pipe), target=target, text_part=part, state=ControlState(("cond",)), **kwargs)


def run_pipe(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(EXPRESSION, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                generator=generator, output_type="latent").images


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request, tiny_pipe):
    return tiny_pipe(request.param)


# ------------------------------------------------------------------------ 1, 2: observe, fidelity


def test_capture_leaves_model_output_unchanged(pipe):
    stock = run_pipe(pipe)
    controller = capture_for(pipe)
    with attach(denoiser_of(pipe), controller):
        observed = run_pipe(pipe)
    assert controller.layer_count == len(all_layers(pipe))
    assert torch.equal(stock, observed)


class Checking(RefAMCapture):
    """Compares every captured map with a float64 softmax of the full logits."""

    checked: list

    def _maps(self, call: AttentionCall):
        maps = super()._maps(call)
        rows = call.rows(self.role)
        q = call.query[rows].double()[:, :, call.image_queries]
        k = call.key[rows].double()
        logits = q @ k.transpose(-1, -2) * call.query.shape[-1] ** -0.5
        text = slice(call.text_keys.start, call.text_keys.stop)
        if self.text_part is not None:
            text = slice(text.start + self.text_part.start, text.start + self.text_part.stop)
        if self.norm == "full_row":
            reference = logits.softmax(-1)[..., text]
        else:
            reference = logits[..., text].softmax(-1)
        torch.testing.assert_close(maps.double(), reference.mean(1), atol=1e-5, rtol=0)
        self.checked.append((call.name, call.kind))
        return maps


@pytest.mark.parametrize("norm", ["text_softmax", "full_row"])
def test_captured_slice_matches_float64_reference(pipe, norm, monkeypatch):
    """Both normalisations (on UNets, whose keys are all text, they coincide) at several chunk sizes."""
    n, part = text_length(pipe)
    target = torch.zeros(n, dtype=torch.bool)
    target[1] = True
    for chunk in (1, 7, 4096):
        controller = Checking(all_layers(pipe), target=target, text_part=part, norm=norm, early_exit=False,
                              state=ControlState(("cond",)))
        controller.checked = []
        # full_row's chunked normaliser, at several chunk sizes
        original = AttentionCall.text_probs
        monkeypatch.setattr(AttentionCall, "text_probs",
                            lambda self, *a, _original=original, _chunk=chunk, **k: _original(self, *a, **{**k, "chunk": _chunk}))
        with attach(denoiser_of(pipe), controller):
            run_pipe(pipe)
        monkeypatch.setattr(AttentionCall, "text_probs", original)
        kinds = {kind for _, kind in controller.checked}
        expected = {"sd": {"cross"}, "sd3": {"joint"}, "flux": {"joint", "single"}}
        assert kinds == expected[grounding.models.family(pipe)]


# ------------------------------------------------------------------------ 3, 4: order and split


def planted_call(kind: str, n_txt=5, grid=(4, 6), column=2, spot=(1, 4), heads=2, dim=8):
    """An attention call whose text key `column` equals the query of one image token at `spot`."""
    torch.manual_seed(0)
    n_img = grid[0] * grid[1]
    q = torch.randn(1, heads, n_txt + n_img, dim) * 0.1
    k = torch.randn(1, heads, n_txt + n_img, dim) * 0.1
    image_first = kind == "joint-image-first"
    img = slice(0, n_img) if image_first else slice(n_txt, n_txt + n_img)
    txt = slice(n_img, n_img + n_txt) if image_first else slice(0, n_txt)
    direction = torch.ones(dim) * 3.0
    k[:, :, txt.start + column] = direction
    q[:, :, img.start + spot[0] * grid[1] + spot[1]] = direction
    state = ControlState(("cond",), latent_hw=grid)
    return AttentionCall("layer", "single" if kind == "single" else "joint", q, k, k.clone(), img, txt, state)


@pytest.mark.parametrize("kind", ["joint-text-first", "joint-image-first", "single"])
def test_planted_alignment_is_recovered_at_its_place(kind):
    call = planted_call(kind)
    target = torch.zeros(5, dtype=torch.bool)
    target[2] = True
    controller = RefAMCapture({"layer": 0.0}, target=target, among=torch.ones(5, dtype=torch.bool),
                              gas_mode="none", early_exit=False, state=call.state)
    controller.capture(call)
    heat = controller.heat()[0]
    assert heat.shape == (4, 6)
    assert divmod(int(heat.argmax()), 6) == (1, 4)


def test_single_stream_with_wrong_text_length_raises(tiny_pipe):
    pipe = tiny_pipe("tiny-flux")
    attn = pipe.transformer.single_transformer_blocks[0].attn
    controller = RefAMCapture({"single_transformer_blocks.0.attn": 0.5}, target=torch.ones(3, dtype=torch.bool),
                              state=ControlState(("cond",), latent_hw=(4, 4), n_txt=7))
    processor = ControlledFluxAttnProcessor("single_transformer_blocks.0.attn", controller)
    hidden = torch.randn(1, 5 + 16, attn.query_dim)
    with pytest.raises(ValueError, match="do not split"):
        processor(attn, hidden)


# ------------------------------------------------------------------------ 5: token roles


@pytest.mark.parametrize("make", [clip_tokenizer, t5_tokenizer], ids=["clip", "t5"])
def test_token_roles_of_expression_magnets_colour_and_padding(make):
    tokenizer = make()
    expression = "the man in red on the left"
    prompt, spans = build_prompt(expression, magnets=4, colour=True)
    assert prompt == "the man in red on the left and of the a green"  # "red" is taken: green
    roles, texts, n_real = token_roles(tokenizer, prompt, len(expression), spans, load_stopwords(), 24)
    words = [(t, r) for t, r in zip(texts, roles) if r not in ("special", "padding")]
    assert words == [("the", "stop"), ("man", "content"), ("in", "stop"), ("red", "content"), ("on", "stop"),
                     ("the", "stop"), ("left", "content"), ("and", "magnet"), ("of", "magnet"),
                     ("the", "magnet"), ("a", "magnet"), ("green", "magnet")]
    eos = texts.index(tokenizer.eos_token)
    assert roles[eos] == "special" and roles[eos + 1:] == ["padding"] * (24 - eos - 1)
    assert n_real == eos + 1
    if make is clip_tokenizer:
        assert roles[0] == "special"  # start of text


def test_word_split_into_pieces_keeps_its_role_and_head_target():
    tokenizer = t5_tokenizer()  # "zebra" is not in the tiny vocabulary: it splits into pieces
    expression = "the zebra in red"
    prompt, spans = build_prompt(expression, magnets=0, colour=False)
    roles, texts, _ = token_roles(tokenizer, prompt, len(expression), spans, load_stopwords(), 16, target="head")
    pieces = [t for t, r in zip(texts, roles) if r == "content"]
    assert "".join(pieces) == "zebra" and len(pieces) > 1
    assert roles[texts.index("red")] == "context"


def test_stop_words_come_from_a_config_file(tmp_path):
    path = tmp_path / "stop_fr.txt"
    path.write_text("# French\nle\nla\nde\n")
    assert load_stopwords(path) == frozenset({"le", "la", "de"})


# ------------------------------------------------------------------------ 6, 7, 8: columns and sinks


def test_magnet_and_padding_columns_never_reach_the_heatmap():
    torch.manual_seed(0)
    maps = torch.rand(2, 12, 6).softmax(-1)
    target = torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)  # content
    among = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)  # stop + content + magnet
    changed = maps.clone()
    changed[..., 4:] = torch.rand(2, 12, 2) * 100  # padding / special columns: any mass
    for renorm in (True, False):
        torch.testing.assert_close(layer_heat(maps, target, among, renorm), layer_heat(changed, target, among, renorm))
    magnets = maps.clone()
    magnets[..., 3] = torch.rand(2, 12) * 100  # magnet column: never averaged in
    torch.testing.assert_close(layer_heat(maps, target, among, False), layer_heat(magnets, target, among, False))
    # renormalised over `among`: only the target columns' share of the word mass counts
    expected = (maps[..., 1:3] / maps[..., :4].sum(-1, keepdim=True)).mean(-1)
    torch.testing.assert_close(layer_heat(maps, target, among, True), expected)


def test_planted_sink_is_detected_and_peaked_column_of_equal_mass_is_not():
    torch.manual_seed(0)
    n = 64
    maps = torch.full((n, 6), 0.02) + torch.rand(n, 6) * 0.01
    maps[:, 1] = 0.5  # uniform, high mass: a sink
    maps[:, 3] = 0.0
    maps[:8, 3] = 0.5 * n / 8  # the same mass, on 8 pixels only
    flags = detect_sinks(maps, tau_mass=4.0, tau_cv=0.5)
    assert flags.tolist() == [False, True, False, False, False, False]
    # excluded from the layer's aggregation in the default mode
    controller = RefAMCapture({"l": 0.9}, target=torch.ones(6, dtype=torch.bool), early_exit=False, state=ControlState(("cond",), latent_hw=(8, 8)))
    call = AttentionCall("l", "cross", torch.zeros(1, 1, n, 4), torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4),
                         slice(0, n), slice(0, 6), controller.state)
    controller._maps = lambda call: maps[None]
    controller.capture(call)
    assert controller.sink_columns().tolist() == flags.tolist()


def test_suppressed_keys_get_no_attention_in_deep_layers_only(tiny_pipe):
    pipe = tiny_pipe("tiny-flux")
    layers = all_layers(pipe)  # dual block at depth 0, single block at depth 0.5
    suppressed = torch.zeros(512, dtype=torch.bool)
    suppressed[[1, 3]] = True
    seen = {}

    class Probe(RefAMCapture):
        def _capture_text(self, call):
            probs = call.text_probs(call.rows("cond"), norm="full_row")
            seen[call.name] = (probs[..., suppressed].max().item(),
                               call.text_probs(call.rows("cond")).sum(-1))
            super()._capture_text(call)

    outputs = {}

    def record(tag):
        handles = []
        for name, module in denoiser_of(pipe).named_modules():
            if name in layers:
                handles.append(module.register_forward_hook(
                    lambda m, a, out, name=name: outputs.setdefault(tag, {}).__setitem__(name, out)))
        return handles

    handles = record("stock")
    run_pipe(pipe)
    for h in handles:
        h.remove()
    controller = Probe(layers, target=torch.ones(512, dtype=torch.bool), gas_mode="suppress", suppress_keys=suppressed,
                       l_gas=0.5, early_exit=False, state=ControlState(("cond",)))
    handles = record("suppress")
    with attach(denoiser_of(pipe), controller):
        run_pipe(pipe)
    for h in handles:
        h.remove()
    deep, shallow = "single_transformer_blocks.0.attn", "transformer_blocks.0.attn"
    assert seen[deep][0] < 1e-6
    torch.testing.assert_close(seen[deep][1], torch.ones_like(seen[deep][1]))  # rows renormalise
    assert seen[shallow][0] > 1e-6
    for a, b in zip(outputs["stock"][shallow], outputs["suppress"][shallow]):
        assert torch.equal(a, b)  # the layer below l_gas is bit-identical to stock


# ------------------------------------------------------------------------ 9: grids, masks, Otsu


def test_non_square_input_gives_dit_grid_and_image_sized_binary_mask(tiny_pipe):
    pipe = tiny_pipe("tiny-flux")
    photo = image(1024, 768)
    heat, _, info = grounding._heatmaps(pipe, [photo], EXPRESSION, GroundingSettings(size=1024), load_stopwords())
    assert tuple(heat.shape[-2:]) == (48, 64)
    result = segment_image(pipe, image(96, 64), EXPRESSION, **FAST)
    assert result.mask.shape == (64, 96) and result.mask.dtype == bool
    assert result.heatmap.shape == (64, 96) and 0 <= result.heatmap.min() and result.heatmap.max() <= 1


def test_unet_layers_resize_to_the_finest_captured_grid(tiny_pipe):
    pipe = tiny_pipe("tiny")
    heat, tokens, info = grounding._heatmaps(pipe, [image(96, 64)], EXPRESSION,
                                             GroundingSettings(size=96, unet_levels=(0, 1, 2)), load_stopwords())
    assert tuple(heat.shape[-2:]) == (8, 12)  # the 8x12 latent: level 0
    assert tuple(tokens.shape[-2:]) == (8, 12)


def test_otsu_matches_opencv():
    rng = np.random.RandomState(0)
    cases = [rng.randint(0, 256, (40, 50)), np.concatenate([rng.normal(60, 10, 500), rng.normal(180, 20, 700)]),
             rng.beta(0.5, 2.0, (30, 30)) * 255]
    for values in cases:
        values = np.uint8(np.clip(values, 0, 255)).reshape(-1, 1)
        level, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert otsu_threshold(values) == int(level)


def test_mask_keeps_the_component_of_the_peak():
    heat = np.zeros((20, 30), np.float32)
    heat[2:6, 2:6] = 1.0
    heat[12:18, 20:28] = 0.8
    mask, level = heat_to_mask(heat, "otsu", component=True)
    assert mask[3, 3] and not mask[15, 25] and 0 <= level < 0.8
    both, _ = heat_to_mask(heat, 0.5, component=False)
    assert both[3, 3] and both[15, 25]


# ------------------------------------------------------------------------ 10, 11: SAM2 prompts


def test_points_argmax_nms_and_negatives():
    heat = np.zeros((100, 100), np.float32)
    heat[10, 20] = 1.0
    heat[11, 21] = 0.95  # too close to the first peak: suppressed
    heat[70, 80] = 0.9
    heat += np.linspace(0, 0.1, 100)[None, :]  # lowest heat on the left column
    points, labels = heatmap_points(heat, k=2, negatives=1)
    assert points[:2].tolist() == [[20, 10], [80, 70]]
    assert labels.tolist() == [1, 1, 0] and points[2][0] == 0


def test_mask_selection_rules_pick_the_expected_mask():
    heat = np.zeros((10, 10), np.float32)
    heat[:5] = 1.0
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5] = True  # equals the hot half
    masks[1, :] = True  # everything
    masks[2, :2] = True  # too small
    scores = np.array([0.5, 0.9, 0.6])
    assert select_mask(masks, scores, heat, "sam_score") == 1
    assert select_mask(masks, scores, heat, "heatmap_iou") == 0
    assert select_mask(masks, np.array([0.5, 0.9, 0.95]), heat, "product") == 0


def tiny_sam2():
    from transformers import Sam2Config, Sam2Model

    vision = dict(
        backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, image_size=[256, 256],
                             blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                             num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
                             global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2]),
        backbone_channel_list=[128, 64, 32, 16], backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        fpn_hidden_size=32,
    )
    config = Sam2Config(vision_config=vision, prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
                        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    torch.manual_seed(0)
    return Sam2Model(config).eval()


def test_sam2_path_on_a_tiny_random_sam2_saved_locally(tiny_pipe, tmp_path):
    folder = tmp_path / "sam2"
    tiny_sam2().save_pretrained(folder)
    result = segment_image(tiny_pipe("tiny-flux"), image(96, 64), EXPRESSION, sam2=str(folder), **FAST)
    assert result.mask.shape == (64, 96) and result.mask.dtype == bool
    assert len(result.params["sam2_scores"]) == 3 and result.params["sam2_labels"] == [1]
    with pytest.raises(UserInputError, match="SAM2"):
        segment_image(tiny_pipe("tiny-flux"), image(), EXPRESSION, sam2=str(tmp_path / "missing"), **FAST)


# ------------------------------------------------------------------------ 12: early exit


def test_early_exit_gives_identical_heatmaps(pipe):
    ran = []

    def after(module, args, output):
        ran.append(1)

    # a hook on the last module of the denoiser: it must not run when the forward stops early
    denoiser = denoiser_of(pipe)
    last = denoiser.proj_out if hasattr(denoiser, "proj_out") else denoiser.conv_out
    handle = last.register_forward_hook(after)
    try:
        early = segment_image(pipe, image(), EXPRESSION, early_exit=True, **FAST)
        assert not ran
        full = segment_image(pipe, image(), EXPRESSION, early_exit=False, **FAST)
        assert ran
    finally:
        handle.remove()
    assert np.array_equal(early.heatmap, full.heatmap)
    assert np.array_equal(early.token_maps, full.token_maps)


def test_stop_forward_is_raised_after_the_last_selected_layer():
    controller = RefAMCapture({"a": 0.0, "b": 0.5}, target=torch.ones(2, dtype=torch.bool), gas_mode="none",
                              state=ControlState(("cond",), latent_hw=(2, 2)))
    call = lambda name: AttentionCall(name, "cross", torch.randn(1, 1, 4, 4), torch.randn(1, 1, 2, 4),
                                      torch.randn(1, 1, 2, 4), slice(0, 4), slice(0, 2), controller.state)
    controller.capture(call("a"))
    with pytest.raises(StopForward):
        controller.capture(call("b"))


# ------------------------------------------------------------------------ pipeline features


def test_every_family_and_ablation_runs(pipe):
    fam = grounding.models.family(pipe)
    for overrides in (dict(gas="none"), dict(gas="suppress", depth="all", l_gas=0.0), dict(gas="redirect"),
                      dict(norm="full_row", target="head"), dict(norm="raw"), dict(magnets=0, colour=False),
                      dict(filter_magnets=False, n_noise=2, threshold=0.5)):
        result = segment_image(pipe, image(), EXPRESSION, **FAST, **overrides)
        assert result.mask.shape == (64, 96)
        assert np.isfinite(result.heatmap).all()
    if fam == "sd":
        refined = segment_image(pipe, image(), EXPRESSION, refine=True, **FAST)
        assert refined.mask.shape == (64, 96)
    else:
        with pytest.raises(UserInputError, match="UNet"):
            segment_image(pipe, image(), EXPRESSION, refine=True, **FAST)
    tokens = dict(segment_image(pipe, image(), EXPRESSION, gas="redirect", **FAST).tokens)
    assert "." in tokens and tokens["."] == "aux"


def test_video_gives_one_mask_per_frame(tiny_pipe, tmp_path):
    pipe = tiny_pipe("tiny-flux")
    frames = [image(96, 64, seed) for seed in range(5)]
    result = segment_video(pipe, frames, EXPRESSION, batch_frames=2, **FAST)
    assert result.masks.shape == (5, 64, 96) and result.masks.dtype == bool
    written = result.save(tmp_path / "mask.mp4")
    back, _ = grounding.read_video(written[0])
    assert len(back) == 5 and len(grounding.read_video(written[1])[0]) == 5


@pytest.mark.parametrize("expression, message", [
    ("", "enter an expression"), ("   ", "enter an expression"), ("the of a", "only stop words"),
    ("?!", "no words"), ("red " * 600, "too long"),
])
def test_bad_expressions_get_one_sentence(tiny_pipe, expression, message):
    with pytest.raises(UserInputError, match=message):
        segment_image(tiny_pipe("tiny-flux"), image(), expression, **FAST)


def test_bad_videos_and_models_get_one_sentence(tiny_pipe, tmp_path):
    pipe = tiny_pipe("tiny-flux")
    with pytest.raises(UserInputError, match="no frames"):
        segment_video(pipe, [], EXPRESSION, **FAST)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(UserInputError, match="not a readable video"):
        segment_video(pipe, broken, EXPRESSION, **FAST)
    with pytest.raises(UserInputError, match="FLUX, SD3 and SD"):
        segment_image(tiny_pipe("tiny-pixart"), image(), EXPRESSION, **FAST)
    with pytest.raises(UserInputError, match="threshold"):
        segment_image(pipe, image(), EXPRESSION, threshold=1.5, **FAST)


# ------------------------------------------------------------------------ 13: metrics, evaluator


def test_miou_and_oiou_differ_on_objects_of_different_sizes():
    from benchmarks.refseg import iou_terms, miou_oiou

    big_gt = np.zeros((10, 10), bool)
    big_gt[:, :8] = True  # 80 pixels, predicted exactly
    small_gt = np.zeros((10, 10), bool)
    small_gt[0, 0] = True  # 1 pixel, missed
    small_pred = np.zeros((10, 10), bool)
    small_pred[9, 9] = True
    terms = [iou_terms(big_gt, big_gt), iou_terms(small_pred, small_gt)]
    miou, oiou = miou_oiou(terms)
    assert miou == pytest.approx(0.5)
    assert oiou == pytest.approx(80 / 82)


def test_j_and_f_on_a_sequence_with_a_known_boundary_offset():
    from benchmarks.refseg import j_and_f

    gt = np.zeros((3, 100, 100), bool)
    gt[:, 20:60, 20:60] = True
    near = np.roll(gt, 1, axis=2)  # 1 px offset: within the tolerance (0.008 x 141 px = 1.13 px)
    j, f, jf = j_and_f(near, gt)
    assert j == pytest.approx(40 * 39 / (40 * 41)) and f == pytest.approx(1.0)
    far = np.roll(gt, 5, axis=2)  # 5 px: only the horizontal edges' overlap remains
    _, f_far, _ = j_and_f(far, gt)
    assert 0.3 < f_far < 0.8
    assert j_and_f(gt, gt) == (1.0, 1.0, 1.0)


def test_evaluator_runs_on_the_shipped_sample_with_ablations(capsys):
    from benchmarks import refseg

    assert refseg.main(["--folder", str(refseg.ROOT / "assets" / "refseg_sample"), "--model", "tiny",
                        "--size", "64", "--limit", "2", "--ablate", "--refine"]) == 0
    lines = [__import__("json").loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["variant"] for line in lines] == ["default", "no_magnets", "gas_none", "gas_suppress",
                                                    "gas_redirect", "no_redistribution", "refine"]
    for line in lines:
        assert line["expressions"] == 2 and 0 <= line["mIoU"] <= 1 and 0 <= line["oIoU"] <= 1


def test_sample_generator_writes_the_documented_layout(tmp_path):
    from benchmarks.refseg import make_sample

    folder = make_sample(tmp_path / "sample", n=2)
    samples = grounding.read_refseg_folder(folder)
    assert len(samples) == 4 and all(s.image.is_file() and s.mask.is_file() for s in samples)
    mask = np.asarray(Image.open(samples[0].mask))
    assert set(np.unique(mask)) == {0, 255}


def test_unet_levels_default_to_the_16_to_48_cell_grids():
    """SD 1.5 at 512 px (64x64 latent) and SD 2.1 at 768 px get the paper's levels 1 and 2; a
    model whose grids are all smaller falls back to its finest cross-attention level."""
    from diffusers import UNet2DConditionModel

    from attention_processors.refam import auto_unet_levels

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280))
    names = attention_layer_names(sd15)
    assert auto_unet_levels(names, 64, 4) == (1, 2)
    assert auto_unet_levels(names, 96, 4) == (1, 2)
    assert auto_unet_levels(names, 32, 4) == (0, 1)  # SD 1.5 at 256 px: its 32 and 16 grids
    tiny = models.build_tiny("tiny").unet
    assert auto_unet_levels(attention_layer_names(tiny), 8, len(tiny.down_blocks)) == (0,)


def test_text_encodings_are_cached_per_model_without_keeping_the_model_alive(monkeypatch):
    """A repeated expression is encoded once per model; dropping the model frees its cache."""
    import gc
    import weakref

    calls = []
    encode = grounding._encode
    monkeypatch.setattr(grounding, "_encode", lambda *args: calls.append(args[2]) or encode(*args))
    pipe = models.build_tiny("tiny-flux")
    first = segment_image(pipe, image(64, 64), EXPRESSION, **FAST)
    again = segment_image(pipe, image(64, 64), EXPRESSION, **FAST)
    assert len(calls) == 1 and np.array_equal(first.mask, again.mask)
    segment_image(pipe, image(64, 64), "the blue square", **FAST)
    assert len(calls) == 2
    assert pipe in grounding._TEXT_CACHES
    alive = weakref.ref(pipe)
    del pipe, first, again
    gc.collect()
    assert alive() is None
