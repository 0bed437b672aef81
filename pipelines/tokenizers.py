"""Tokenizers built offline, without the model hub.

CLIP: `clip_tokenizer()` rebuilds the tokenizer of the real Stable Diffusion checkpoints from
OpenAI's CLIP BPE merges file shipped in `assets/bpe_simple_vocab_16e6.txt.gz`.  The vocabulary
is derived from the merges exactly as OpenAI's `SimpleTokenizer` does it, so the ids are the same
as those of `openai/clip-vit-large-patch14` (49,408 entries; "a photo of a cat" ->
[49406, 320, 1125, 539, 320, 2368, 49407]).  The tiny built-in models use it, and so can any
CLIP-based checkpoint whose own tokenizer files are missing.

`check_fits(tokenizer, text, max_length)` refuses a text longer than the model's text window in
one sentence, so that no prompt is silently cut.

T5: `t5_tokenizer()` builds a small Unigram (sentencepiece-style) tokenizer in memory.  This
vocabulary is OURS and serves the tiny built-in models only (PixArt, SD3, FLUX variants): it has
nothing to do with the 32k vocabulary of the real T5 checkpoints, which always bring their own
tokenizer files.  It follows T5's conventions so code written against real T5 works unchanged:
`<pad>`=0, `</s>`=1, `<unk>`=2, pieces starting a word carry the "▁" marker, and the Metaspace
pre-tokenizer gives offset mappings that map pieces back to words.

OmniGen: `omnigen_tokenizer()` builds a small Llama-style BPE tokenizer in memory for the tiny
OmniGen pipeline (`tiny-omnigen`).  Its vocabulary is OURS too (a few hundred pieces, not
Phi-3's 32k): real OmniGen checkpoints bring their own.  It behaves as Phi-3's tokenizer does where
OmniGen's multimodal processor and SaaS's spans depend on it: `transformers.LlamaTokenizer`
(byte-level fallback, "▁" word markers, offset mappings), `<unk>`=0, `<s>`=1 added at the start of
every text, and the chat template's `<|user|>`, `<|end|>`, `<|assistant|>` (and `<|endoftext|>`,
end and padding) as special tokens; `<|diffusion|>` is plain text, as in Phi-3.
"""

from __future__ import annotations

import functools
import gzip
import string
from pathlib import Path

from transformers import CLIPTokenizer, LlamaTokenizer, T5Tokenizer

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CLIP_BPE_PATH = ASSETS_DIR / "bpe_simple_vocab_16e6.txt.gz"

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# Number of merges OpenAI's SimpleTokenizer keeps: the vocabulary is 256 byte symbols, their
# 256 end-of-word forms, these merges and the two special tokens, 49,408 in all.
_CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 256 - 256 - 2


def _bytes_to_unicode_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by CLIP and GPT-2 byte-level BPE, in id order.

    Printable byte ranges map to themselves; the remaining bytes map to chr(256 + n) in order,
    which keeps whitespace and control bytes out of the merge table.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Parsing 48k merges takes a noticeable fraction of a second: do it once per process.
    lines = gzip.open(CLIP_BPE_PATH).read().decode("utf-8").split("\n")
    # Line 0 is a version header; OpenAI keeps the next 48,894 lines.
    merge_lines = lines[1 : 1 + _CLIP_MERGE_COUNT]
    byte_chars = _bytes_to_unicode_chars()
    vocab_list = (
        byte_chars
        + [c + "</w>" for c in byte_chars]
        + ["".join(m.split()) for m in merge_lines]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {token: index for index, token in enumerate(vocab_list)}
    merges = [tuple(m.split()) for m in merge_lines]
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The SD CLIP tokenizer, built from the shipped BPE merges file.

    `pad_token="!"` gives SDXL's second tokenizer (`tokenizer_2`), which pads with "!" (id 0)
    instead of the end-of-text token.  The merges file is parsed once per process; each call
    returns a new tokenizer object (about 30 ms) because personalization adds placeholder tokens
    to a pipeline's tokenizer, and that must not leak into other pipelines.
    """
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


# Whole-word pieces for the tiny T5 vocabulary: words that show up in test prompts and in the
# methods' scenes (objects, colours, shapes, positions, medical terms for the steering tests).
_T5_WORDS = """
a an the this that these those some any each every all no
of in on at to for with by from into onto over under above below behind beside between near
and or but not is are was were be been being has have had it its they their there here
left right top bottom middle center centre front back up down inside outside next
red orange yellow green blue purple pink brown black white gray grey gold silver
circle square triangle rectangle star heart ring cube sphere box ball disk dot line
cat dog bird horse cow sheep fish mouse rabbit bear lion tiger elephant
man woman person people boy girl child baby face hand head eye hair
photo picture image painting drawing sketch portrait render style art
car bus bike bicycle boat train plane house tree flower grass sky sun moon cloud water sea
river mountain road street city table chair cup bottle book lamp window door wall floor room
apple banana orange cake pizza food
big small large tiny little tall short long wide round old new young happy sad
one two three four five many
wearing holding sitting standing running walking looking
background foreground scene object shape color colour texture light dark bright
polyp lesion tissue colon normal medical endoscopy
""".split()

_T5_PUNCTUATION = list(".,;:!?'\"-()[]/&+*#%=@_")


@functools.lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """Unigram pieces with log-probabilities: longer pieces score higher so whole words win.

    Every single character exists both as a word start ("▁a") and as a continuation ("a"), and
    "▁" exists alone, so any text made of these characters segments without `<unk>`; other
    characters fall back to `<unk>` (id 2).
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen: set[str] = {piece for piece, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    add("▁", -8.0)
    # A single letter scores -6 and a whole word -2 - 0.1 * len: a word always beats its letters.
    for word in _T5_WORDS:
        add("▁" + word, -2.0 - 0.1 * len(word))
    characters = string.ascii_lowercase + string.digits + string.ascii_uppercase
    for char in characters:
        add("▁" + char, -6.0)
        add(char, -6.5)
    for char in _T5_PUNCTUATION:
        add(char, -6.0)
        add("▁" + char, -6.5)
    return tuple(pieces)


# Real T5 tokenizers declare 512; pipelines pass their own max_sequence_length anyway.
T5_MAX_LENGTH = 512


def t5_tokenizer() -> T5Tokenizer:
    """Our tiny T5-style Unigram tokenizer (tiny models only; see the module docstring).

    A new object per call, for the same reason as `clip_tokenizer`.
    """
    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def t5_vocab_size() -> int:
    """Size of the tiny T5 vocabulary, for the embedding table of the tiny T5 encoders."""
    return len(_t5_vocab())


def check_fits(tokenizer, text: str, max_length: int, what: str = "prompt") -> int:
    """The token count of `text` (special tokens included); a text over `max_length` tokens is
    refused in one sentence instead of being cut silently by the pipeline."""
    from .errors import UserInputError

    count = len(tokenizer(text or "", truncation=False).input_ids)
    if count > max_length:
        raise UserInputError(f"The {what} is {count} tokens long, but this model reads at most {max_length} "
                             f"(special tokens included); shorten it.")
    return count


# Whole-word pieces of the tiny OmniGen vocabulary: the chat template's words, the words of
# OmniGen's default negative prompt (so its row stays short), the SaaS paper's example edit and
# the shapes world's edits (pipelines/builtin/world.py).  Any other text still encodes, letter by
# letter or, outside printable ASCII, byte by byte.
_OMNIGEN_WORDS = """
an image according to the following instructions
low quality jpeg artifacts ugly duplicate morbid mutilated extra fingers mutated hands poorly drawn
face mutation deformed blurry dehydrated bad anatomy proportions limbs cloned disfigured gross
malformed missing arms legs fused too many
make add remove it into with of in on to the a and
bike rusty graffiti wall weather rainy
red orange yellow green blue purple pink brown black white gray beige
circle square triangle shape background striped checkered gradient
""".split()
# Pieces that follow no space: the chat template's markup that is not a special token in Phi-3
# either, and the template's first word, which follows a newline.
_OMNIGEN_UNSPACED = ("<img>", "</img>", "<|diffusion|>", "Generate")
#: Phi-3's special tokens OmniGen's chat template uses (ids after the vocabulary)
OMNIGEN_SPECIAL_TOKENS = ("<|assistant|>", "<|end|>", "<|user|>")
#: the tiny OmniGen transformer's embedding table (pipelines/tiny_models.py): every id must fit
OMNIGEN_TINY_VOCAB_LIMIT = 1000


@functools.lru_cache(maxsize=1)
def _omnigen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Llama's layout: <unk>, <s>, </s>, the 256 byte-fallback pieces <0x00>..<0xFF>, then single
    characters, then every prefix of every word piece, each made by one merge of the previous
    prefix and the next character.  Merges only ever extend a prefix of a whole piece, so BPE
    either builds the whole word or leaves its letters single."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for piece in ["▁" + word for word in _OMNIGEN_WORDS] + list(_OMNIGEN_UNSPACED):
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                vocab[piece[:end]] = len(vocab)
                merges.append((piece[: end - 1], piece[end - 1]))
    return vocab, merges


def omnigen_tokenizer() -> LlamaTokenizer:
    """Our tiny OmniGen tokenizer (tiny models only; see the module docstring).  A new object per call."""
    vocab, merges = _omnigen_vocab_and_merges()
    tokenizer = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), bos_token="<s>", eos_token="<|endoftext|>",
                               unk_token="<unk>", pad_token="<|endoftext|>", add_bos_token=True,
                               add_eos_token=False, model_max_length=T5_MAX_LENGTH * 8,
                               extra_special_tokens=list(OMNIGEN_SPECIAL_TOKENS))
    if len(tokenizer) > OMNIGEN_TINY_VOCAB_LIMIT:
        raise AssertionError(f"the tiny OmniGen vocabulary has {len(tokenizer)} ids, more than its model's "
                             f"{OMNIGEN_TINY_VOCAB_LIMIT}")
    return tokenizer
