"""The PixCell transformer: PixArt-XL/2 (adaLN-single DiT) conditioned on UNI2-h embeddings.

Read top to bottom: sin-cos helpers, the condition embedders (what is PixCell's own), the model, presets.
Everything else (patch embedding, transformer blocks, adaLN-single, attention) is diffusers' own code, so the
state dict is exactly the published Hugging Face layout of PixCell-256/1024 (`formats/*_diffusers_keys.json`):

    pos_embed.proj                       patch embedding (its sin-cos table is recomputed, never stored)
    adaln_single.*                       timestep embedding + the shared 6*D modulation (adaLN-single)
    y_pos_embed.y_pos_embed              fixed sin-cos embedding of the UNI token grid (only when T > 1)
    caption_projection.linear_1/2        UNI (1536) -> hidden MLP
    caption_projection.uncond_embedding  the fixed random "null" condition for classifier-free guidance
    transformer_blocks.i.*               diffusers BasicTransformerBlock (self-attn, cross-attn, MLP)
    scale_shift_table, proj_out          final adaLN modulation and linear head (16 eps + 16 variance channels)
    guidance_embedder.*                  only in a distilled few-step student (`guidance_embeds=True`): the
                                         guidance scale w as an input, added to the timestep embedding
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import Tensor, nn

from .config_types import ConfigTypeError, check_config_types

#################################################################################
#                             Sin-cos position helpers                          #
#################################################################################


def sincos_2d(
    embed_dim: int,
    grid_size: int,
    base_size: int,
    interpolation_scale: float,
    phase: float = 0.0,
) -> Tensor:
    """2-D sin-cos embedding of a (grid_size x grid_size) grid, row-major: (grid_size**2, embed_dim).

    Positions are `arange(g) / (g / base_size) / interpolation_scale + phase` (PixArt-alpha, Sec. 2.3 "position
    embedding interpolation"); the first half of the channels encodes the column, the second half the row.
    With phase=0 this equals diffusers' `get_2d_sincos_pos_embed` used by `PatchEmbed`; PixCell adds a phase
    of `base_size // T` for the UNI token grid (published `UNIPosEmbed`).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    # Positions in float32, frequencies and the outer product in float64: the reference code's precision.
    pos = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size) / interpolation_scale
    col, row = torch.meshgrid(pos, pos, indexing="xy")  # (g, g) each: column and row coordinate of each cell
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # (D/4,)

    def one_axis(p: Tensor) -> Tensor:  # (g, g) -> (g*g, D/2), sin then cos
        out = torch.outer((p.reshape(-1) + phase).double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    # The reference calls the column half "emb_h" (it meshgrids w first); the column comes first either way.
    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()  # (g*g, D)


#################################################################################
#                          UNI condition embedders                              #
#################################################################################


class UNITokenPosEmbed(nn.Module):
    """Fixed 2-D sin-cos embedding added to the T = s*s UNI tokens (one per 256 px tile, row-major).

    Only built when T > 1. The published PixCell fixes its interpolation scale at 2 for every stage and adds a
    phase of base_size // T; the table is stored in the checkpoint (`y_pos_embed.y_pos_embed`) and loaded.
    """

    def __init__(self, num_tokens: int, embed_dim: int, base_size: int, interpolation_scale: float = 2.0):
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"caption_num_tokens must be a square (1, 4, 16, ...), got {num_tokens}")
        table = sincos_2d(embed_dim, side, base_size, interpolation_scale, phase=base_size // num_tokens)
        self.register_buffer("y_pos_embed", table.unsqueeze(0))  # (1, T, C)

    def forward(self, uni: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return uni + self.y_pos_embed.to(uni.dtype)


class UNIProjection(nn.Module):
    """UNI2-h embedding (1536) -> hidden size, plus the fixed random null condition used for guidance.

    `uncond_embedding` is a buffer (not trained), as in PixArt's CaptionEmbedder: N(0, 1/C) noise of shape
    (T, C), fixed at initialisation and shipped inside every checkpoint.
    """

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        self.register_buffer("uncond_embedding", torch.randn(num_tokens, in_features) / in_features**0.5)

    def forward(self, uni: Tensor) -> Tensor:  # (B, T, C) -> (B, T, D)
        return self.linear_2(self.act_1(self.linear_1(uni)))


class GuidanceEmbedding(nn.Module):
    """The guidance scale w of a distilled student -> (B, D), added to the timestep embedding.

    LCM's guidance embedding (Luo et al. 2023, Sec. 4.2: the student takes w as an input, "w-conditioned"):
    a sin-cos embedding of 1000 w (256 channels, like the timestep's), then an MLP. The last layer starts at zero,
    so a student initialised from its teacher computes exactly the teacher's function until it learns to use w.
    """

    def __init__(self, hidden_size: int, channels: int = 256):
        super().__init__()
        self.proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(channels, hidden_size)
        nn.init.zeros_(self.embedder.linear_2.weight)
        nn.init.zeros_(self.embedder.linear_2.bias)

    def forward(self, guidance: Tensor, dtype: torch.dtype) -> Tensor:  # (B,) -> (B, D)
        return self.embedder(self.proj(guidance * 1000.0).to(dtype))


#################################################################################
#            Shared by the transformer and the ControlNet                       #
#################################################################################


class PixCellModelMixin:
    """What the transformer and the ControlNet share: strict loading, the input path and the block step.

    Both models hold the same input modules (`pos_embed`, `adaln_single`, `y_pos_embed`, `caption_projection`),
    so the ControlNet (`diffusion/model/controlnet.py`) reuses this code instead of copying it. Put it before
    `ModelMixin` in the bases, so `from_pretrained` wraps diffusers' own.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """diffusers' `from_pretrained`, made strict: missing, unexpected or mis-shaped keys are a ValueError.

        A hub id that cannot be reached (gated, offline) raises one OSError line saying what to pass instead.
        """
        want_info = kwargs.pop("output_loading_info", False)
        name = str(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            name += f" (subfolder {kwargs['subfolder']})"
        try:
            # config.json's values against the constructor's types first: `"num_layers": "two"` is one line, not
            # a TypeError inside the constructor
            config = cls.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"))
            check_config_types(cls, config, f"{name}: config.json")
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, output_loading_info=True, **kwargs
            )
        except ConfigTypeError:
            raise
        except ValueError as err:  # shape mismatch inside diffusers' loader
            raise ValueError(
                f"{name}: does not match its config ({str(err).splitlines()[0][:300]})"
            ) from None
        except OSError as err:
            local = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if local.is_dir():  # a local folder whose files cannot be read (truncated, not safetensors)
                files = sorted(p.name for p in local.glob("*.safetensors")) or ["no weights file"]
                raise OSError(
                    f"{local}: cannot read the weights ({', '.join(files)}): {str(err).splitlines()[0][:200]}"
                ) from None
            raise OSError(
                f"cannot load a {cls.__name__} from {name} ({type(err).__name__}): pass a local folder or "
                "original checkpoint, or log in to the Hub (HF_TOKEN) with network access"
            ) from None
        bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}" for k, v in bad.items())
            raise ValueError(f"{name}: does not match the model ({detail or info['error_msgs'][0]})")
        return (model, info) if want_info else model

    def embed_inputs(
        self,
        hidden_states: Tensor,  # (B, C_in, H, W)
        encoder_hidden_states: Tensor,  # (B, T, C_uni)
        timestep: Tensor,  # (B,) or scalar
        guidance: Tensor | None = None,  # (B,) guidance scales: distilled students only
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> patch tokens x (B, N, D) with sin-cos positions, UNI tokens y (B, T, D), the adaLN-single
        modulation t_mod (B, 6D) and the raw timestep embedding t_emb (B, D)."""
        batch = hidden_states.shape[0]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        x = self.pos_embed(hidden_states)  # (B, N, D), sin-cos position added
        embedder = getattr(self, "guidance_embedder", None)
        if (guidance is None) != (embedder is None):
            raise ValueError(
                "guidance: a distilled student (guidance_embeds=True) takes the guidance scale as an input, "
                "a plain PixCell model does not"
                if embedder is not None
                else "guidance: this model has no "
                "guidance embedding (guidance_embeds=False); guide with the unconditional pass instead"
            )
        if embedder is None:
            t_mod, t_emb = self.adaln_single(
                timestep, {"resolution": None, "aspect_ratio": None}, batch_size=batch, hidden_dtype=x.dtype
            )  # (B, 6D), (B, D)
        else:  # adaLN-single's own two lines, with the guidance embedding added to the timestep embedding
            ada = self.adaln_single
            t_emb = ada.emb(
                timestep, resolution=None, aspect_ratio=None, batch_size=batch, hidden_dtype=x.dtype
            )
            t_emb = t_emb + embedder(guidance.reshape(-1).expand(batch), t_emb.dtype)
            t_mod = ada.linear(ada.silu(t_emb))
        y = encoder_hidden_states.to(x.dtype)
        if self.y_pos_embed is not None:
            y = self.y_pos_embed(y)
        y = self.caption_projection(y)  # (B, T, D)
        return x, y, t_mod, t_emb

    def run_block(self, block: nn.Module, x: Tensor, y: Tensor, t_mod: Tensor) -> Tensor:
        """One transformer block, (B, N, D) -> (B, N, D), with gradient checkpointing when enabled."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return torch.utils.checkpoint.checkpoint(
                block, x, None, y, None, t_mod, None, None, use_reentrant=False
            )
        return block(x, encoder_hidden_states=y, timestep=t_mod)


#################################################################################
#                                 The model                                     #
#################################################################################


class PixCellTransformer2DModel(PixCellModelMixin, ModelMixin, ConfigMixin):
    """PixArt-style DiT over 16-channel SD3.5-VAE latents, cross-attending to T UNI2-h tokens.

    forward(hidden_states (B, 16, H, W), encoder_hidden_states (B, T, 1536), timestep (B,)) -> (B, 32, H, W):
    channels 0..15 predict the noise eps, 16..31 the learned-range variance interpolation v (iDDPM Eq. 15).

    The config fields are the published ones, so `from_pretrained` reads the released `transformer/config.json`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]
    _repeated_blocks = ["BasicTransformerBlock"]  # regional torch.compile (`compile_repeated_blocks`)

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,  # heads per attention layer
        attention_head_dim: int = 72,  # channels per head; hidden = heads * head_dim = 1152
        in_channels: int = 16,  # SD3.5-VAE latent channels
        out_channels: int | None = 32,  # eps + learned variance
        num_layers: int = 28,  # transformer blocks
        dropout: float = 0.0,
        norm_num_groups: int = 32,  # unused; kept because the published config carries it
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 32,  # latent side the model was trained at (32 -> 256 px, 128 -> 1024 px)
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,  # patch position interpolation: 0.5 / 1.0 / 2
        use_additional_conditions: bool | None = False,  # PixArt's resolution conditioning: never used here
        caption_channels: int | None = 1536,  # UNI2-h embedding size
        caption_num_tokens: int = 1,  # T: 1 (256 px), 4 (512 px), 16 (1024 px)
        attention_type: str | None = "default",
        guidance_embeds: bool = False,  # a distilled student: the guidance scale is an input (not in PixCell)
    ):
        super().__init__()
        if norm_type != "ada_norm_single":
            raise ValueError(f"PixCell uses norm_type='ada_norm_single', got {norm_type!r}")
        if use_additional_conditions:
            raise ValueError(
                "PixCell has no resolution/aspect conditioning: use_additional_conditions must be False"
            )
        if caption_channels is None:
            raise ValueError("caption_channels (the UNI embedding size, 1536 for UNI2-h) is required")
        self.inner_dim = inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False
        base_size = sample_size // patch_size
        if interpolation_scale is None:  # diffusers' PixArt default
            interpolation_scale = max(sample_size // 64, 1)

        # 1. Inputs: patches, timestep, UNI condition.
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner_dim,
            interpolation_scale=interpolation_scale,
        )
        self.adaln_single = AdaLayerNormSingle(inner_dim, use_additional_conditions=False)
        self.y_pos_embed = (
            UNITokenPosEmbed(caption_num_tokens, caption_channels, base_size)
            if caption_num_tokens > 1
            else None
        )
        self.caption_projection = UNIProjection(caption_channels, inner_dim, caption_num_tokens)
        if guidance_embeds:  # absent from the published layout, so the published weights still load strictly
            self.guidance_embedder = GuidanceEmbedding(inner_dim)

        # 2. Blocks.
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    num_embeds_ada_norm=num_embeds_ada_norm,
                    attention_bias=attention_bias,
                    upcast_attention=upcast_attention,
                    norm_type=norm_type,
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                    attention_type=attention_type,
                )
                for _ in range(num_layers)
            ]
        )

        # 3. Output: final adaLN (shift, scale from the raw timestep embedding) and linear head.
        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner_dim) / inner_dim**0.5)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * self.out_channels)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's initialisation (DiT Sec. 3 / PixArt-alpha code), for training from scratch."""

        # Transformer linears: Xavier uniform, zero bias.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding initialised like a linear layer, not a conv.
        w = self.pos_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # Timestep MLP, shared modulation and condition MLP: small normal.
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.normal_(self.adaln_single.linear.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_2.weight, std=0.02)
        # Cross-attention output projections start at zero: the condition enters gradually.
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        # Output head starts at zero.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # A student's guidance embedding starts at zero (GuidanceEmbedding), after the Xavier pass above.
        if hasattr(self, "guidance_embedder"):
            nn.init.zeros_(self.guidance_embedder.embedder.linear_2.weight)

    # ------------------------------------------------------------------ conditions

    @property
    def num_tokens(self) -> int:
        return self.config.caption_num_tokens

    def null_condition(self, batch_size: int) -> Tensor:
        """The fixed null condition, (B, T, C): the unconditional input for classifier-free guidance."""
        return self.caption_projection.uncond_embedding.unsqueeze(0).expand(batch_size, -1, -1)

    def drop_condition(self, uni: Tensor, drop: Tensor) -> Tensor:
        """Replace the conditions of the rows where `drop` (B,) is True by the null condition.

        Applied to the raw UNI input, so the null tokens take the same path as real ones (token position
        embedding, then projection) in training and in sampling. Quirk of the original trainer, kept in
        mind when comparing with it: it swapped the null tokens in *after* the token position embedding,
        so PixCell-512/1024 saw null tokens without it during training. The published samplers and
        pipeline feed the null tokens through the full path, which is what this reproduces exactly.
        """
        null = self.null_condition(uni.shape[0]).to(uni)
        return torch.where(drop.view(-1, 1, 1), null, uni)

    def check_condition(self, uni: Tensor, name: str = "uni_embeds") -> None:
        """One-line ValueError for a condition of the wrong shape or with non-finite values."""
        expected = (self.config.caption_num_tokens, self.config.caption_channels)
        if uni.ndim != 3 or tuple(uni.shape[1:]) != expected:
            raise ValueError(
                f"{name}: expected shape (batch, {expected[0]}, {expected[1]}) for this model "
                f"({expected[0]} UNI token(s) of dim {expected[1]}), got {tuple(uni.shape)}"
            )
        if not torch.isfinite(uni).all():
            raise ValueError(f"{name}: contains NaN or Inf values")

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: Tensor,  # (B, C_in, H, W) noisy latents
        encoder_hidden_states: Tensor,  # (B, T, 1536) UNI tokens (or the null condition)
        timestep: Tensor,  # (B,) or scalar, in [0, 1000)
        added_cond_kwargs: dict | None = None,  # accepted for diffusers-pipeline compatibility; unused
        return_dict: bool = True,
        block_residuals: Sequence[Tensor] | None = None,  # ControlNet: (B, N, D) added after block i
        guidance: Tensor | None = None,  # (B,) guidance scales w: only for a student (guidance_embeds=True)
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """`block_residuals[i]` (B, N, D), when given, is added to the hidden states after block i, for the
        first len(block_residuals) blocks: the published PixCell ControlNet's injection point
        (`diffusion/model/controlnet.py`). None leaves the forward exactly as before."""
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        if block_residuals is not None and len(block_residuals) > len(self.transformer_blocks):
            raise ValueError(
                f"block_residuals: {len(block_residuals)} given, the model has {len(self.transformer_blocks)} blocks"
            )

        x, y, t_mod, t_emb = self.embed_inputs(hidden_states, encoder_hidden_states, timestep, guidance)
        for i, block in enumerate(self.transformer_blocks):
            x = self.run_block(block, x, y, t_mod)
            if block_residuals is not None and i < len(block_residuals):
                x = x + block_residuals[i].to(x.dtype)

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None].to(self.scale_shift_table.dtype)).chunk(
            2, dim=1
        )  # (B, 1, D) each
        x = self.norm_out(x) * (1 + scale.to(x.dtype)) + shift.to(x.dtype)
        x = self.proj_out(x)  # (B, N, p*p*C_out)

        x = x.reshape(batch, h, w, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, self.out_channels, h * p, w * p)
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)

    def _set_gradient_checkpointing(self, *args, **kwargs) -> None:
        # diffusers' enable/disable_gradient_checkpointing hook (signature changed across versions).
        enable = kwargs.get(
            "enable", kwargs.get("value", args[0] if args and isinstance(args[0], bool) else True)
        )
        self.gradient_checkpointing = bool(enable)


#################################################################################
#                                   Presets                                     #
#################################################################################

_XL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152)

PIXCELL_MODELS: dict[str, dict] = {
    # Published models (configs as in the Hugging Face transformer/config.json).
    "PixCell-XL/2-256": dict(**_XL, sample_size=32, interpolation_scale=0.5, caption_num_tokens=1),
    "PixCell-XL/2-512": dict(**_XL, sample_size=64, interpolation_scale=1.0, caption_num_tokens=4),
    "PixCell-XL/2-1024": dict(**_XL, sample_size=128, interpolation_scale=2.0, caption_num_tokens=16),
    # Tiny models for tests and the CPU demo (random or briefly trained weights; never a real PixCell).
    "PixCell-tiny-64": dict(
        num_attention_heads=2,
        attention_head_dim=36,
        num_layers=2,
        cross_attention_dim=72,
        sample_size=8,
        interpolation_scale=0.5,
        caption_num_tokens=1,
    ),
    "PixCell-tiny-256": dict(
        num_attention_heads=2,
        attention_head_dim=36,
        num_layers=2,
        cross_attention_dim=72,
        sample_size=32,
        interpolation_scale=0.5,
        caption_num_tokens=1,
    ),
    # The CPU demo's model (`make demo`): 4 blocks of width 128, trained for minutes.
    "PixCell-demo-256": dict(
        num_attention_heads=2,
        attention_head_dim=64,
        num_layers=4,
        cross_attention_dim=128,
        sample_size=32,
        patch_size=2,
        interpolation_scale=0.5,
        caption_num_tokens=1,
    ),
    "PixCell-tiny-128-T16": dict(
        num_attention_heads=2,
        attention_head_dim=36,
        num_layers=2,
        cross_attention_dim=72,
        sample_size=16,
        interpolation_scale=2.0,
        caption_num_tokens=16,
    ),
}


def build_pixcell(preset: str, **overrides) -> PixCellTransformer2DModel:
    """Build a model from a preset name in PIXCELL_MODELS, with config overrides."""
    if preset not in PIXCELL_MODELS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PIXCELL_MODELS)}")
    return PixCellTransformer2DModel(**{**PIXCELL_MODELS[preset], **overrides})


def compile_blocks(model: nn.Module, options: bool | dict | None) -> int:
    """Regional compilation: each repeated transformer block is torch.compiled in place through diffusers'
    `compile_repeated_blocks`, so one compiled graph serves all 28 blocks, compile time stays short, gradient
    checkpointing wraps the compiled blocks, and parameter names (checkpoints, EMA) do not change.
    `options`: False/None = off, True = torch.compile defaults, or the training config's `compile` dict
    (`enabled` plus torch.compile keyword arguments). Returns the number of blocks compiled."""
    if isinstance(options, dict):
        kwargs = dict(options)
        if not kwargs.pop("enabled", True):
            return 0
    elif options is True:
        kwargs = {}
    elif not options:
        return 0
    else:
        raise ValueError(f"compile: expected True, False or a dict of torch.compile kwargs, got {options!r}")
    model.compile_repeated_blocks(**kwargs)
    names = set(getattr(model, "_repeated_blocks", ()))
    return sum(type(m).__name__ in names for m in model.modules())
