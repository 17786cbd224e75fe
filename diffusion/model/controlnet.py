"""The PixCell cell-mask ControlNet (published as `StonyBrook-CVLab/PixCell-256-Cell-ControlNet`, folder controlnet/).

A trainable copy of the first `n_controlnet_blocks` blocks of a frozen PixCell transformer reads the noisy latent
plus the VAE latent of a mask image; after each copied block a zero-initialised linear layer produces a residual
(B, N, D) that the base model adds to its hidden states after its own block i (`block_residuals` of
`PixCellTransformer2DModel.forward`), scaled by the conditioning scale. The UNI2-h embedding still enters both
models through their cross-attention: it sets the style, the mask sets the layout.

Built by composition: the ControlNet builds a `PixCellTransformer2DModel` of depth `n_controlnet_blocks` and
adopts its modules, so the state dict is exactly the published layout (`formats/pixcell_256_controlnet_keys.json`):

    pos_embed, adaln_single, caption_projection, transformer_blocks.{0..26}   as in the base transformer
    cond_pos_embed.proj                  zero-initialised patch embedding of the mask latent (16 -> D)
    controlnet_blocks.{0..26}            zero-initialised Linear(D, D) after each copied block
    norm_out, scale_shift_table, proj_out   present in the published class, unused (kept for strict loading)

At initialisation the ControlNet's residuals are exactly zero, so base + ControlNet == base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from .pixcell_transformer import PixCellModelMixin, PixCellTransformer2DModel

# Modules adopted from the transformer of depth n_controlnet_blocks (every one but the ControlNet's own).
_ADOPTED = ("pos_embed", "adaln_single", "y_pos_embed", "caption_projection", "transformer_blocks")
_UNUSED = ("norm_out", "proj_out")  # plus the parameter scale_shift_table
CONTROLNET_ONLY = ("cond_pos_embed.", "controlnet_blocks.")  # key prefixes the base transformer does not have


@dataclass
class PixCellControlNetOutput(BaseOutput):
    """controlnet_block_samples: one (B, N, D) residual per copied block, already times the conditioning scale."""

    controlnet_block_samples: tuple[Tensor, ...]


class PixCellControlNet(PixCellModelMixin, ModelMixin, ConfigMixin):
    """Cell-mask ControlNet for PixCell: forward(noisy latents, mask latents, UNI, t) -> per-block residuals.

    The config is the base transformer's (published: PixCell-256, num_layers=28) plus `n_controlnet_blocks`
    (published: 27), the number of leading blocks copied.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 16,
        out_channels: int | None = 32,
        num_layers: int = 28,  # depth of the base transformer this ControlNet serves
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = False,
        caption_channels: int | None = 1536,
        caption_num_tokens: int = 1,
        attention_type: str | None = "default",
        n_controlnet_blocks: int | None = 27,  # copied blocks (None: all num_layers)
    ):
        super().__init__()
        n_blocks = num_layers if n_controlnet_blocks is None else n_controlnet_blocks
        if not 1 <= n_blocks <= num_layers:
            raise ValueError(
                f"n_controlnet_blocks={n_controlnet_blocks}: expected 1..num_layers ({num_layers})"
            )
        trunk = PixCellTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=n_blocks,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            caption_num_tokens=caption_num_tokens,
            attention_type=attention_type,
        )
        for name in _ADOPTED + _UNUSED:
            setattr(self, name, getattr(trunk, name))
        self.scale_shift_table = trunk.scale_shift_table
        self.inner_dim = trunk.inner_dim
        self.gradient_checkpointing = False

        # The mask latent's patch embedding. As published it is a full PatchEmbed, so it also adds the sin-cos
        # position table to the mask tokens: the ControlNet's tokens carry that table twice. Kept, because the
        # released weights were trained that way. Zero weights and bias: it contributes only the table at init.
        self.cond_pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
            interpolation_scale=self.pos_embed.interpolation_scale,
        )
        # One zero-initialised projection per copied block ("zero convolutions", ControlNet Sec. 3.1).
        self.controlnet_blocks = nn.ModuleList(
            nn.Linear(self.inner_dim, self.inner_dim) for _ in range(n_blocks)
        )
        self.zero_init_control()

    def zero_init_control(self) -> None:
        """Zero the ControlNet's own layers: its residuals vanish and the base model is unchanged."""
        for module in (self.cond_pos_embed.proj, *self.controlnet_blocks):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_transformer(
        cls, transformer: PixCellTransformer2DModel, n_controlnet_blocks: int | None = 27
    ) -> PixCellControlNet:
        """A fresh ControlNet for `transformer`: its input path and first blocks copied, the control layers zero.

        (The published recipe initialises from the frozen base PixCell-256 this way.)
        """
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        if config.pop("guidance_embeds", False):  # the student's guidance embedding is not the ControlNet's
            raise ValueError("a ControlNet is made from a PixCell transformer, not from a distilled student")
        n = (
            config["num_layers"]
            if n_controlnet_blocks is None
            else min(n_controlnet_blocks, config["num_layers"])
        )
        param = next(transformer.parameters())
        with torch.device(param.device):
            controlnet = cls(**config, n_controlnet_blocks=n)
        base = transformer.state_dict()
        own = controlnet.state_dict()
        missing = [k for k in own if not k.startswith(CONTROLNET_ONLY) and k not in base]
        if missing:
            raise ValueError(f"transformer lacks ControlNet keys {missing[:3]}: not a PixCell transformer?")
        controlnet.load_state_dict(
            {k: base[k] for k in own if not k.startswith(CONTROLNET_ONLY)}, strict=False
        )
        return controlnet if param.dtype == torch.float32 else controlnet.to(param.dtype)

    # ------------------------------------------------------------------ forward

    def check_conditioning(self, hidden_states: Tensor, conditioning: Tensor) -> None:
        """One-line ValueError unless the mask latents match the noisy latents (B, C_in, h, w)."""
        if conditioning.shape != hidden_states.shape:
            raise ValueError(
                f"controlnet conditioning: expected mask latents of shape {tuple(hidden_states.shape)} (the "
                f"VAE latent of the mask image, like the image latents), got {tuple(conditioning.shape)}"
            )

    def forward(
        self,
        hidden_states: Tensor,  # (B, C_in, h, w) noisy latents
        conditioning: Tensor,  # (B, C_in, h, w) VAE latents of the mask image, model space
        encoder_hidden_states: Tensor,  # (B, T, C_uni) UNI tokens
        timestep: Tensor,  # (B,) or scalar
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> PixCellControlNetOutput | tuple[tuple[Tensor, ...]]:
        """-> `controlnet_block_samples`: n_controlnet_blocks residuals (B, N, D) for `block_residuals`."""
        self.check_conditioning(hidden_states, conditioning)
        x, y, t_mod, _ = self.embed_inputs(hidden_states, encoder_hidden_states, timestep)
        x = x + self.cond_pos_embed(conditioning.to(x.dtype))  # (B, N, D)
        samples = []
        for block, control in zip(self.transformer_blocks, self.controlnet_blocks):
            x = self.run_block(block, x, y, t_mod)
            samples.append(control(x) * conditioning_scale)
        if not return_dict:
            return (tuple(samples),)
        return PixCellControlNetOutput(controlnet_block_samples=tuple(samples))

    def _set_gradient_checkpointing(self, *args, **kwargs) -> None:
        PixCellTransformer2DModel._set_gradient_checkpointing(self, *args, **kwargs)


def controlled_forward(
    transformer: PixCellTransformer2DModel,
    controlnet: PixCellControlNet,
    hidden_states: Tensor,  # (B, C_in, h, w)
    mask_latents: Tensor,  # (B, C_in, h, w)
    encoder_hidden_states: Tensor,  # (B, T, C_uni)
    timestep: Tensor,  # (B,)
    conditioning_scale: float = 1.0,
) -> Tensor:
    """Base transformer steered by the ControlNet: (B, 2 C_in, h, w), eps and variance channels.

    Both models see the same noisy latents, timestep and UNI tokens (training and sampling alike).
    """
    residuals = controlnet(
        hidden_states, mask_latents, encoder_hidden_states, timestep, conditioning_scale, return_dict=False
    )[0]
    return transformer(
        hidden_states, encoder_hidden_states, timestep, return_dict=False, block_residuals=residuals
    )[0]


def load_controlnet(
    source: str | Path, torch_dtype: torch.dtype | None = None, subfolder: str = "controlnet"
) -> PixCellControlNet:
    """Load a ControlNet strictly from a hub id (subfolder `controlnet`), a pipeline folder or a model folder."""
    path = Path(source)
    if path.is_dir():
        folder = path / subfolder if (path / subfolder / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no ControlNet here (expected config.json or {subfolder}/config.json)"
            )
        model = PixCellControlNet.from_pretrained(folder)
    elif path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"ControlNet {source}: no such folder (nor a hub id of the form owner/name)")
    else:
        model = PixCellControlNet.from_pretrained(str(source), subfolder=subfolder)
    return model.to(torch_dtype) if torch_dtype is not None else model
