"""The layer vocabulary: what a diffusers attention-layer name is, and the named layer sets.

Every method policy picks its layers here instead of parsing module names itself.  Pure Python on
names (the strings `attention_layer_names` lists); nothing here imports torch or a pipeline.

**The parser** (`parse`) turns a name into a `Layer`:

- UNets (SD 1.x/2.x, SDXL): ``{down,up}_blocks.B.attentions.A.transformer_blocks.T.attnK`` and
  ``mid_block.attentions.A.transformer_blocks.T.attnK``: section ``"down"``/``"mid"``/``"up"``,
  block B (None in the mid block), attention A, transformer block T, kind ``attn1``/``attn2``.
- Transformers: ``transformer_blocks.B.attn1``/``attn2`` (PixArt), ``transformer_blocks.B.attn``
  (SD3 joint attention, FLUX dual-stream; SD3.5 adds ``attn2``), section ``"dit"``, and
  ``single_transformer_blocks.B.attn`` (FLUX single-stream), section ``"single"``; block B.

Kinds are the diffusers suffixes: `SELF` (``attn1``, image self-attention), `CROSS` (``attn2``,
text cross-attention) and `JOINT` (``attn``, one attention over image and text tokens).  On
SD3.5 ``attn2`` is an image-only self-attention; a name cannot tell, so the sets below select it
with the cross-attention layers (as the policies always did) and the processors skip it at run
time, because its calls carry no text keys.  A name outside this grammar is not an attention
layer of a supported family: `parse` returns None and no set contains it.

**UNet levels.**  Level k is the grid latent / 2^k: ``down_blocks.k``, ``up_blocks.(n_up-1-k)``
and the mid block at level ``n_down - 1`` (n_down / n_up: the UNet's number of down / up blocks,
`Layer.level`).

**Named sets** (each returns names in the order given, unless it says otherwise):
`cross_attention`, `self_attention`, `text_attention` (cross + joint), `joint_attention` (of a
block family: `BLOCK_FAMILIES`), `decoder_self_attention`, all with the filters of `select`
(section, UNet level, transformer block); `unet_levels` (the levels that have a kind of layer),
`unet_depth_from_names`, `execution_order`, `dit_blocks` and `in_third` (the DiT blocks of a
depth third, `THIRDS`).

**Thirds by depth** (`third`).  One split, two boundary rules, because the two policies that use
thirds always disagreed on block counts not divisible by 3 and their outputs must not change:

- ``rule="depth"`` (RefAM's `choose_layers`): block i of n is in the range [a/3, b/3) when its
  depth i/n is, i.e. indices ceil(n*a/3) .. ceil(n*b/3) - 1.  The same depth i/n is what RefAM's
  l_gas threshold compares against, so a range and l_gas mean the same thing.  A range may be
  empty (2 blocks: first {0}, middle {1}, last {}).
- ``rule="partition"`` (the heatmaps' "down"/"mid"/"up" groups on transformers): the blocks are
  cut at floor(n*a/3) and every group keeps at least one block, so each menu choice draws a map
  even on a 2-block model (first {0}, middle {0}, last {1}).

They agree when n is a multiple of 3 (SD3's 24 blocks, FLUX's 19 + 38 = 57) and differ otherwise,
e.g. PixArt's 28 blocks: 10/9/9 by depth, 9/9/10 by partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

#: Layer kinds (the diffusers module suffixes).
SELF, CROSS, JOINT = "attn1", "attn2", "attn"
KINDS = (SELF, CROSS, JOINT)

#: Sections, in execution order: UNet encoder, middle, decoder; transformer blocks (FLUX runs
#: every dual-stream block before the single-stream ones).
UNET = ("down", "mid", "up")
TRANSFORMER = ("dit", "single")
SECTIONS = UNET + TRANSFORMER

#: Transformer block families: FLUX's dual-stream ("dit") and single-stream blocks.
BLOCK_FAMILIES = {"dual": ("dit",), "single": ("single",), "both": TRANSFORMER}

#: Depth ranges in thirds: name -> (first third, end third).
THIRDS = {"first": (0, 1), "middle": (1, 2), "last": (2, 3), "middle+last": (1, 3), "all": (0, 3)}
THIRD_RULES = ("depth", "partition")

_UNET_PREFIX = {"down_blocks": "down", "up_blocks": "up"}
_DIT_PREFIX = {"transformer_blocks": "dit", "single_transformer_blocks": "single"}
_RANK = {section: i for i, section in enumerate(SECTIONS)}


@dataclass(frozen=True)
class Layer:
    """One attention layer, parsed from its name (see the module docstring)."""

    name: str
    section: str  # one of SECTIONS
    block: int | None  # UNet down/up block index, or the block index of a transformer; None: mid block
    attention: int | None  # UNet: index in the block's `attentions`; None in transformers
    transformer_block: int | None  # UNet: index in `transformer_blocks`; None in transformers
    kind: str  # one of KINDS

    @property
    def unet(self) -> bool:
        return self.section in UNET

    def level(self, n_down: int, n_up: int | None = None) -> int | None:
        """UNet downsampling level k (grid = latent / 2^k); None in transformers."""
        if self.section == "down":
            return self.block
        if self.section == "mid":
            return n_down - 1
        if self.section == "up":
            return (n_down if n_up is None else n_up) - 1 - self.block
        return None

    @property
    def order(self) -> tuple:
        """Sort key in execution order (UNet: down, mid, up; FLUX: dual before single blocks)."""
        return (_RANK[self.section], self.block or 0, self.attention or 0, self.transformer_block or 0, self.kind)


def _index(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def parse(name: str) -> Layer | None:
    """The `Layer` a diffusers attention-layer name denotes, or None for any other name."""
    parts = name.split(".")
    kind = parts[-1]
    if parts[0] in _DIT_PREFIX:
        block = _index(parts[1]) if len(parts) == 3 else None
        if block is None or kind not in KINDS:
            return None
        return Layer(name, _DIT_PREFIX[parts[0]], block, None, None, kind)
    if kind not in (SELF, CROSS):
        return None
    if parts[0] == "mid_block":
        section, block, rest = "mid", None, parts[1:]
    elif parts[0] in _UNET_PREFIX and len(parts) > 1 and _index(parts[1]) is not None:
        section, block, rest = _UNET_PREFIX[parts[0]], _index(parts[1]), parts[2:]
    else:
        return None
    if len(rest) != 5 or rest[0] != "attentions" or rest[2] != "transformer_blocks":
        return None
    attention, transformer_block = _index(rest[1]), _index(rest[3])
    if attention is None or transformer_block is None:
        return None
    return Layer(name, section, block, attention, transformer_block, kind)


def parse_all(names: Iterable[str]) -> list[Layer]:
    """The parsed layers among `names`, in the given order (other names are left out)."""
    return [layer for layer in map(parse, names) if layer is not None]


def _as_tuple(value) -> tuple | None:
    if value is None:
        return None
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def select(names: Iterable[str], *, kind=None, section=None, level=None, unet_depth: int | None = None,
           up_depth: int | None = None, transformer_block: int | None = None) -> list[str]:
    """The layers among `names` (in the given order) that pass every filter given.

    kind: one of KINDS or a tuple of them; section: one of SECTIONS or a tuple (`UNET`,
    `TRANSFORMER`); level: one UNet level or a tuple (needs `unet_depth`, the number of down
    blocks, and `up_depth` when the number of up blocks differs; selects UNet layers only);
    transformer_block: the UNet transformer-block index (selects UNet layers only).
    """
    kinds, sections, levels = _as_tuple(kind), _as_tuple(section), _as_tuple(level)
    if levels is not None and unet_depth is None:
        raise ValueError("a UNet level filter needs unet_depth (the number of down blocks)")
    chosen = []
    for layer in parse_all(names):
        if kinds is not None and layer.kind not in kinds:
            continue
        if sections is not None and layer.section not in sections:
            continue
        if levels is not None and (not layer.unet or layer.level(unet_depth, up_depth) not in levels):
            continue
        if transformer_block is not None and layer.transformer_block != transformer_block:
            continue
        chosen.append(layer.name)
    return chosen


def matches(name: str, **filters) -> bool:
    """Whether the one layer `name` passes `select`'s filters."""
    return bool(select((name,), **filters))


# ----------------------------------------------------------------------------- named sets


def cross_attention(names: Iterable[str], **filters) -> list[str]:
    """Text cross-attention layers (``attn2``: UNets, PixArt; also SD3.5's image-only ``attn2``)."""
    return select(names, kind=CROSS, **filters)


def self_attention(names: Iterable[str], **filters) -> list[str]:
    """Image self-attention layers (``attn1``: UNets, PixArt)."""
    return select(names, kind=SELF, **filters)


def text_attention(names: Iterable[str], **filters) -> list[str]:
    """Layers whose keys may hold text: cross-attention (``attn2``) and joint attention (``attn``)."""
    return select(names, kind=(CROSS, JOINT), **filters)


def joint_attention(names: Iterable[str], blocks: str = "both") -> list[str]:
    """Joint image+text attention (``attn``: SD3, FLUX) of one block family of `BLOCK_FAMILIES`."""
    if blocks not in BLOCK_FAMILIES:
        raise ValueError(f"unknown block family {blocks!r}; use one of {', '.join(BLOCK_FAMILIES)}")
    return select(names, kind=JOINT, section=BLOCK_FAMILIES[blocks])


def decoder_self_attention(names: Iterable[str]) -> list[str]:
    """The UNet decoder's self-attention layers (``up_blocks.*...attn1``)."""
    return self_attention(names, section="up")


def unet_depth_from_names(names: Iterable[str]) -> int:
    """Number of UNet levels as the names show it: 1 + the last down block with attention (this
    misses trailing down blocks without attention; pass the model's count where known)."""
    return 1 + max((layer.block for layer in parse_all(names) if layer.section == "down"), default=0)


def unet_levels(names: Iterable[str], unet_depth: int, up_depth: int | None = None, kind: str | None = CROSS) -> tuple[int, ...]:
    """The UNet levels (ascending) that hold a layer of `kind` (None: of any kind)."""
    return tuple(sorted({layer.level(unet_depth, up_depth) for layer in parse_all(names)
                         if layer.unet and (kind is None or layer.kind == kind)}))


def execution_order(names: Iterable[str]) -> list[str]:
    """The parsed layers among `names`, sorted in execution order (see `Layer.order`)."""
    return [layer.name for layer in sorted(parse_all(names), key=lambda layer: layer.order)]


def dit_blocks(names: Iterable[str]) -> list[tuple[str, int]]:
    """The transformer blocks (section, block index) that hold a layer of `names`, in execution order."""
    return sorted({(layer.section, layer.block) for layer in parse_all(names) if layer.section in TRANSFORMER},
                  key=lambda key: (_RANK[key[0]], key[1]))


def third(n: int, which: str, rule: str = "depth") -> range:
    """The indices of `n` items (in depth order) in the depth range `which` (a key of THIRDS).

    rule "depth": index i is in [a/3, b/3) when i/n is (ceil boundaries, may be empty);
    "partition": the items are cut at floor(n*a/3) and a range keeps at least one item.
    See the module docstring for why there are two rules.
    """
    if which not in THIRDS:
        raise ValueError(f"unknown depth range {which!r}; use one of {', '.join(THIRDS)}")
    a, b = THIRDS[which]
    if rule == "depth":
        return range(-(-n * a // 3), -(-n * b // 3))
    if rule == "partition":
        lo = n * a // 3
        return range(lo, min(max(n * b // 3, lo + 1), n))
    raise ValueError(f"unknown third rule {rule!r}; use one of {', '.join(THIRD_RULES)}")


def in_third(names: Iterable[str], which: str, rule: str = "depth") -> list[str]:
    """The transformer layers among `names` (in the given order) whose block lies in the depth
    range `which` of the blocks these names hold (`dit_blocks`, split by `third`)."""
    names = list(names)
    blocks = dit_blocks(names)
    keep = {blocks[i] for i in third(len(blocks), which, rule)}
    return [layer.name for layer in parse_all(names) if (layer.section, layer.block) in keep]
