"""Pre-train the built-in model's text encoder on the shapes world, before the UNet (stage 0).

    python -m pipelines.builtin.text_tower --work runs/builtin --steps 1500

Why a separate stage.  Built-in model v1 trained its `CLIPTextModel` from scratch jointly with
the UNet, and the UNet's loss never asked the text states to differ per word: the states of a
caption's content words collapsed onto one direction (mean pairwise cosine 0.91), so every
word's cross-attention map was the same blob and no method that reads attention per word could
work.  Stable Diffusion instead conditions on a *frozen* CLIP text tower trained contrastively
on image-caption pairs.  This stage does the same at the world's scale:

- **Model**: a `transformers.CLIPModel` whose text tower is exactly the built-in model's text
  encoder (`train.build_text_encoder`: the real CLIP tokenizer and vocabulary, 77 positions, 4
  layers of width 64), and a small vision tower (a ViT of 3 layers of width 64 on 8 px patches of
  the 64 px scene).  Only the text tower ships; the vision tower exists to train it.
- **Contrastive loss with hard negatives**: CLIP's symmetric InfoNCE over the batch (the model's
  own `return_loss=True`), plus, for every image, a hard negative caption of a *different* scene
  that differs by one fact: two objects' colours swapped (binding), one colour or one shape
  changed, the background changed, or an object added to / taken from an empty scene.  The
  image-to-text softmax runs over the batch's true captions and all hard negatives.
- **Per-token heads**: the pooled (end-of-text) state is all the contrastive loss reads, but the
  UNet reads *every* token state.  So three linear heads read each world-word token's final
  state and must name (a) the word itself, (b) the colour and (c) the shape of the object the
  word belongs to ("circle" in "a red circle" must say red; "red" must say circle).  (a) keeps a
  word's identity in its own state, (b) and (c) bind attributes to objects, which is what
  "the red shape" needs when the cross-attention of "shape" is read.
- **Decorrelation** (weight `--decorrelate`, 0 = off): the mean squared cosine between the final
  states of different world words of a caption.  Measured without and with it (see the model
  card); the option stays so the comparison can be rerun.

After this stage the text encoder is frozen for the UNet's training (`train.py --text-encoder`).
The run is seeded and resumable like `train.py`: data of step k depends only on (seed, k), the
full state is checkpointed atomically every `--checkpoint-every` steps into `--work`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.builtin import world
from pipelines.builtin.train import IMAGE_SIZE, TEXT_WIDTH, build_text_encoder, load_checkpoint, log, save_atomic

VISION = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, num_hidden_layers=3,
              num_attention_heads=4, intermediate_size=256, hidden_act="quick_gelu")
EMPTY_SCENE_RATE = 0.1  # share of empty (background-only) scenes in a batch, as in train.py

# The world's words a token head must name.  Multi-token words ("light grey") are not labelled.
WORDS: tuple[str, ...] = (*world.SHAPES, *world.COLOURS, *world.SIZES, *world.BACKGROUNDS,
                          *world.BACKGROUND_TONES, "empty", "nothing")
IGNORE = -100


def build_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    text = build_text_encoder().config
    config = CLIPConfig(text_config=text.to_dict(), vision_config=VISION, projection_dim=TEXT_WIDTH)
    torch.manual_seed(seed)
    return CLIPModel(config)


class TokenHeads(torch.nn.Module):
    def __init__(self, width: int = TEXT_WIDTH):
        super().__init__()
        self.word = torch.nn.Linear(width, len(WORDS))
        self.colour = torch.nn.Linear(width, len(world.COLOURS))
        self.shape = torch.nn.Linear(width, len(world.SHAPES))


# ------------------------------------------------------------------------------------ data


def _changed(scene: world.Scene, rng: random.Random) -> tuple:
    """(background, objects) of `scene` with exactly one fact changed: a hard negative."""
    objects, background = list(scene.objects), scene.background
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    if not objects:
        if rng.random() < 0.5:
            donor = world.make_scene(rng.randrange(world.TEST_SEED_START), num_objects=1).objects[0]
            return background, [donor]
        return world.make_scene(rng.randrange(world.TEST_SEED_START), 0).background, objects
    pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))
             if objects[i].colour != objects[j].colour]
    kind = rng.choice(["swap", "colour", "shape", "background", "remove"] if pairs else
                      ["colour", "shape", "background", "remove"])
    if kind == "swap":
        i, j = rng.choice(pairs)
        a, b = objects[i], objects[j]
        objects[i], objects[j] = (world.WorldObject(a.shape, b.colour, a.size, a.x, a.y),
                                  world.WorldObject(b.shape, a.colour, b.size, b.x, b.y))
    elif kind in ("colour", "shape"):
        i = rng.randrange(len(objects))
        obj = objects[i]
        if kind == "colour":
            new = rng.choice([c for c in colours if c != obj.colour])
            objects[i] = world.WorldObject(obj.shape, new, obj.size, obj.x, obj.y)
        else:
            new = rng.choice([s for s in shapes if s != obj.shape])
            objects[i] = world.WorldObject(new, obj.colour, obj.size, obj.x, obj.y)
    elif kind == "background":
        while True:
            other = world.make_scene(rng.randrange(world.TEST_SEED_START), 0).background
            if other.phrase != background.phrase:
                background = other
                break
    else:  # one object fewer (an empty scene when it was the only one)
        objects.pop(rng.randrange(len(objects)))
    return background, objects


def batch(step: int, size: int, seed: int):
    """Images (B,3,64,64 in [-1,1]), their captions, and one hard-negative caption per image."""
    rng = random.Random(f"{seed}-text-{step}")
    images, texts, negatives = [], [], []
    for _ in range(size):
        scene_seed = rng.randrange(world.TEST_SEED_START)
        scene = world.make_empty_scene(scene_seed) if rng.random() < EMPTY_SCENE_RATE else world.make_scene(scene_seed)
        images.append(scene.render(IMAGE_SIZE))
        phrasing, with_background, with_sizes = rng.randrange(4), rng.random() < 0.7, rng.random() < 0.3
        background, objects = _changed(scene, rng)
        text = world.caption(scene.objects, scene.background if with_background or not scene.objects else None,
                             phrasing, with_sizes)
        negative = world.caption(objects, background if with_background or not objects else None, phrasing,
                                 with_sizes)
        if negative == text:  # a change the caption cannot show (e.g. without the background)
            negative = world.caption(objects, background, phrasing, with_sizes)
        texts.append(text)
        negatives.append(negative)
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), texts, negatives


def token_labels(tokenizer, ids: torch.Tensor, texts: list[str]):
    """Per token: the world word it is (index into WORDS), and the colour and shape of the object
    it belongs to (objects are listed as [size] colour shape, so a colour or size word belongs to
    the next shape word and a shape word to itself); IGNORE elsewhere."""
    word = torch.full(ids.shape, IGNORE)
    colour, shape = torch.full(ids.shape, IGNORE), torch.full(ids.shape, IGNORE)
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    for row in range(ids.shape[0]):
        tokens = [t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids[row])]
        pending: list[int] = []  # positions of this object's words before its shape word
        pending_colour = None
        for position, token in enumerate(tokens):
            if token in WORDS:
                word[row, position] = WORDS.index(token)
            if token in colours:
                pending.append(position)
                pending_colour = colours.index(token)
            elif token in world.SIZES:
                pending.append(position)
            elif token in shapes and pending_colour is not None:
                for p in (*pending, position):
                    colour[row, p] = pending_colour
                    shape[row, p] = shapes.index(token)
                pending, pending_colour = [], None
    return word, colour, shape


# ---------------------------------------------------------------------------------- training


def losses(model, heads, tokenizer, images, texts, negatives, decorrelate: float):
    ids = tokenizer(texts + negatives, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    batch_size = images.shape[0]
    text_out = model.text_model(input_ids=ids)
    text_embeds = F.normalize(model.text_projection(text_out.pooler_output), dim=-1)
    image_embeds = F.normalize(model.visual_projection(model.vision_model(pixel_values=images).pooler_output), dim=-1)
    logits = model.logit_scale.exp() * image_embeds @ text_embeds.T  # (B, 2B): true captions, then negatives
    target = torch.arange(batch_size)
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch_size].T, target)) / 2
    states = text_out.last_hidden_state[:batch_size]
    word, colour, shape = token_labels(tokenizer, ids[:batch_size], texts)
    flat = states.reshape(-1, states.shape[-1])
    token = (F.cross_entropy(heads.word(flat), word.flatten(), ignore_index=IGNORE)
             + F.cross_entropy(heads.colour(flat), colour.flatten(), ignore_index=IGNORE)
             + F.cross_entropy(heads.shape(flat), shape.flatten(), ignore_index=IGNORE))
    total = contrastive + token
    decor = torch.zeros(())
    if decorrelate:
        unit = F.normalize(states, dim=-1)
        cos = unit @ unit.transpose(1, 2)
        labelled = word >= 0
        different = labelled[:, :, None] & labelled[:, None, :] & (word[:, :, None] != word[:, None, :])
        decor = (cos.square() * different).sum() / different.sum().clamp(min=1)
        total = total + decorrelate * decor
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return total, {"contrastive": float(contrastive), "token": float(token), "decorrelation": float(decor),
                   "image_to_text_accuracy": float(accuracy)}


def train(args, log_file: Path | None = None):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from pipelines.tokenizers import clip_tokenizer

    model, heads, tokenizer = build_clip(args.seed), TokenHeads(), clip_tokenizer()
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    path = args.work / "text_tower.pt"
    state = load_checkpoint(path)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["lr_scheduler"])
        step, history = state["step"], state["history"]
        log(f"text tower: resumed at step {step}", log_file)
    model.train()
    started, first = time.time(), step
    running: dict[str, float] = {}
    while step < args.steps:
        images, texts, negatives = batch(step, args.batch, args.seed)
        loss, parts = losses(model, heads, tokenizer, images, texts, negatives, args.decorrelate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        running = {k: v if k not in running else 0.95 * running[k] + 0.05 * v for k, v in parts.items()}
        if step % 50 == 0 or step == args.steps:
            rate = (time.time() - started) / max(1, step - first)
            log(f"text tower step {step}/{args.steps} " + " ".join(f"{k} {v:.3f}" for k, v in running.items())
                + f" ({rate:.2f} s/step)", log_file)
            history.append((step, {k: round(v, 4) for k, v in running.items()}))
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_atomic({"model": model.state_dict(), "heads": heads.state_dict(),
                         "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                         "step": step, "history": history}, path)
    return model, history


def text_encoder_of(model):
    """The trained text tower as the built-in model's `CLIPTextModel` (same config, same weights)."""
    encoder = build_text_encoder()
    encoder.load_state_dict(model.text_model.state_dict(), strict=True)
    return encoder.eval().requires_grad_(False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/builtin"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--decorrelate", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = args.work / "text_tower.log"
    log(f"arguments: {vars(args)}", log_file)
    model, _history = train(args, log_file)
    encoder = text_encoder_of(model)
    encoder.save_pretrained(args.work / "text_encoder", safe_serialization=True)
    log(f"wrote {args.work / 'text_encoder'}", log_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
