"""Mixed-precision details the trainers share: fp32 attention under autocast, gradient checkpointing.

PixArt/PixCell train in fp16 with the attention itself in fp32 (`fp32_attention=True` in the original configs):
q, k, v projections run in the autocast dtype, the softmax(q k^T) v product in fp32, which avoids fp16 overflow
in the attention logits at long token counts (4096 tokens at 1024 px).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

MIXED_PRECISION = ("no", "fp16", "bf16")


class FP32AttnProcessor:
    """diffusers attention processor: projections in the ambient dtype, scaled-dot-product attention in fp32.

    Covers the attention layers PixCell's BasicTransformerBlocks use (no masks, no spatial/group/cross norms);
    anything else is refused rather than computed differently from diffusers' own processor.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,  # (B, N, D)
        encoder_hidden_states: Tensor | None = None,  # (B, T, D_ctx) for cross-attention
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("FP32AttnProcessor supports unmasked attention without spatial/group norm only")
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def set_fp32_attention(model: nn.Module) -> int:
    """Switch every diffusers Attention layer in `model` to FP32AttnProcessor; returns how many were switched."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(FP32AttnProcessor())
            count += 1
    return count


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The compute dtype of a `mixed_precision` setting ('no' -> float32)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def set_gradient_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Recompute each transformer block in the backward pass (PixCell-XL at 1024 px needs it to fit)."""
    if enable:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    if getattr(model, "gradient_checkpointing", enable) != enable:
        raise RuntimeError(f"{type(model).__name__}: gradient checkpointing could not be set to {enable}")
