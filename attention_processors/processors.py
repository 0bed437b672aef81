"""Controlled attention processors, one per attention shape the project supports.

Each does exactly the work of the stock diffusers processor it replaces (same projections, norms,
rotary embeddings, masks, output projections, in the same order) and hands the prepared
query/key/value to `core.controlled_attention`, which runs SDPA with the controller's bias or
the explicit-probability path, then lets the controller capture and post-process.  The fused
attention goes through diffusers' attention dispatcher with the backend the stock processor
carried (``_attention_backend``, set by ``model.set_attention_backend``; see `core`).

| shape                        | stock processor        | sequence order          | ours                       |
|------------------------------|------------------------|-------------------------|----------------------------|
| UNet attn1/attn2, PixArt     | AttnProcessor2_0       | image queries; text keys in attn2 | ControlledAttnProcessor |
| SD3 / SD3.5 joint attention  | JointAttnProcessor2_0  | [image, text]           | ControlledJointAttnProcessor |
| FLUX dual-stream blocks      | FluxAttnProcessor      | [text, image]           | ControlledFluxAttnProcessor |
| FLUX single-stream blocks    | FluxAttnProcessor      | [text, image], concatenated before the call; n_txt from the state | ControlledFluxAttnProcessor |

Processors are plain callables with the stock parameter order (FLUX calls its processor
positionally) and carry no attention kwargs: state is bound at construction, because PixArt's
pipeline passes none and diffusers filters kwargs by signature anyway.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .core import AttentionCall, AttentionController, controlled_attention


class _Controlled:
    # what `ModelMixin.set_attention_backend` sets on processors (None: the registry's active
    # backend); `controlled_processor_for` copies the stock processor's value
    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: str, controller: AttentionController, backend=None):
        self.name = name
        self.controller = controller
        self._attention_backend = backend

    def _call(self, kind, q, k, v, image_queries, text_keys, mask) -> AttentionCall:
        return AttentionCall(self.name, kind, q, k, v, image_queries, text_keys, self.controller.state, attn_mask=mask,
                             backend=self._attention_backend)


class ControlledAttnProcessor(_Controlled):
    """UNet attn1 (self) / attn2 (cross) and PixArt blocks: AttnProcessor2_0 plus control."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_q, n_k = query.shape[2], key.shape[2]
        call = self._call(
            "cross" if is_cross else "self", query, key, value,
            slice(0, n_q), slice(0, n_k) if is_cross else None, attention_mask,
        )
        hidden_states = controlled_attention(self.controller, call)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        # the tensor the transformer block adds to its residual: the intervention point of `post`
        hidden_states = self.controller.post(call, hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ControlledJointAttnProcessor(_Controlled):
    """SD3/SD3.5 joint attention ([image, text]) as JointAttnProcessor2_0, plus control."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch_size, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_keys = None
        if encoder_hidden_states is not None:
            txt_q = heads(attn.add_q_proj(encoder_hidden_states))
            txt_k = heads(attn.add_k_proj(encoder_hidden_states))
            txt_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                txt_q = attn.norm_added_q(txt_q)
            if attn.norm_added_k is not None:
                txt_k = attn.norm_added_k(txt_k)
            query = torch.cat([query, txt_q], dim=2)
            key = torch.cat([key, txt_k], dim=2)
            value = torch.cat([value, txt_v], dim=2)
            text_keys = slice(n_img, key.shape[2])

        call = self._call("self" if text_keys is None else "joint", query, key, value, slice(0, n_img), text_keys, attention_mask)
        hidden_states = controlled_attention(self.controller, call)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = self.controller.post(call, hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def flux_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
    """A FLUX attention's projections as diffusers' `FluxAttnProcessor` makes them, before the
    head split and the q/k norms: (query, key, value) of `hidden_states` and, in a dual-stream
    block (`added_kv_proj_dim` set) given `encoder_hidden_states`, (query, key, value) of the text,
    else (None, None, None).  After `fuse_projections` (``attn.fused_projections``) from the fused
    ``to_qkv`` / ``to_added_qkv`` weights, as the stock processor.  (diffusers' own helper is
    private, so a diffusers release may rename it; this is the public modules' arithmetic.)"""
    fused = getattr(attn, "fused_projections", False)
    if fused:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    text = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if fused:
            text = tuple(attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
        else:
            text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states))
    return (query, key, value), text


class ControlledFluxAttnProcessor(_Controlled):
    """FLUX dual-stream ([text, image], separate inputs) and single-stream (concatenated) blocks.

    A single-stream block receives text and image already concatenated; the text length comes
    from ``state.n_txt`` (read from the transformer input by `attach`) and is checked against
    the image grid, so a wrong split raises instead of silently mislabelling tokens.  Its `post`
    sees the raw attention output of the image tokens (single blocks project it together with the
    MLP branch, outside the processor).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        (query, key, value), (txt_q, txt_k, txt_v) = flux_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        dual = txt_q is not None
        if dual:
            txt_q = attn.norm_added_q(txt_q.unflatten(-1, (-1, attn.head_dim)))
            txt_k = attn.norm_added_k(txt_k.unflatten(-1, (-1, attn.head_dim)))
            txt_v = txt_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([txt_q, query], dim=1)
            key = torch.cat([txt_k, key], dim=1)
            value = torch.cat([txt_v, value], dim=1)
            n_txt = encoder_hidden_states.shape[1]
        else:
            n_txt = self._single_stream_text_length(query.shape[1])
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # (B, N, heads, D) -> SDPA layout (B, heads, N, D)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        n_total = query.shape[2]
        call = self._call(
            "joint" if dual else "single", query, key, value,
            slice(n_txt, n_total), slice(0, n_txt) if n_txt else None, attention_mask,
        )
        hidden_states = controlled_attention(self.controller, call)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if dual:
            encoder_hidden_states, hidden_states = hidden_states[:, :n_txt], hidden_states[:, n_txt:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return self.controller.post(call, hidden_states), encoder_hidden_states
        image = self.controller.post(call, hidden_states[:, n_txt:])
        return torch.cat([hidden_states[:, :n_txt], image], dim=1)

    def _single_stream_text_length(self, n_total: int) -> int:
        state = self.controller.state
        n_txt = state.n_txt
        if n_txt is None:
            raise RuntimeError(f"{self.name}: single-stream FLUX attention needs state.n_txt (the text length)")
        if state.latent_hw is not None:
            n_img = state.latent_hw[0] * state.latent_hw[1]
            if n_txt + n_img != n_total:
                raise ValueError(
                    f"{self.name}: {n_total} tokens do not split into n_txt={n_txt} text tokens "
                    f"and a {state.latent_hw[0]}x{state.latent_hw[1]} image grid"
                )
        return n_txt


_VARIANTS = {
    AttnProcessor2_0: ControlledAttnProcessor,
    JointAttnProcessor2_0: ControlledJointAttnProcessor,
    FluxAttnProcessor: ControlledFluxAttnProcessor,
}


def controlled_processor_for(name: str, stock, controller: AttentionController):
    """The controlled processor replacing `stock` on layer `name`, with `stock`'s attention backend."""
    for stock_type, variant in _VARIANTS.items():
        if type(stock) is stock_type:
            return variant(name, controller, getattr(stock, "_attention_backend", None))
    raise TypeError(
        f"layer {name} uses {type(stock).__name__}, which has no controlled variant "
        f"(supported: {', '.join(t.__name__ for t in _VARIANTS)}); reset it with set_default_attn_processor()"
    )
