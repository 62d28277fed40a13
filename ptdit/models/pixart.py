"""PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis (Chen et al., arXiv 2310.00426).

Follows PixArt-alpha/PixArt-alpha `diffusion/model/nets/PixArt.py`: adaLN-single (one shared
timestep projection `t_block` to 6·D plus a learned 6×D table per block), gated self-attention,
ungated cross-attention to T5 features through a caption-projection MLP, gated MLP, learned
sigma. Parameter names are the official ones (they grew from DiT's code).

Positions are computed for every input, as PixArtMS and diffusers do: coordinate i along an axis
of n tokens is i / (n / base_size) / pos_interp_scale, base_size = input_size / patch_size.
With `micro_condition` (PixArtMS, `PixArtMS.py`) the image size and aspect ratio are embedded like
timesteps (`csize_embedder`, `ar_embedder`, D/3 per scalar) and added to the embedded timestep.
Video latents (B, C, F, H, W) get full spatio-temporal attention and 3-D positions.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import checks
from ..attention import Attention, CrossAttention, text_bias
from ..layers import (
    CaptionEmbedder,
    Mlp,
    PatchEmbed,
    ShapeCache,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    modulate,
    position_table,
    unpatchify,
)
from .inputs import check_text, check_timesteps, parse_latent


@dataclass(frozen=True, kw_only=True)
class PixArtConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32            # latent side the positions are defined on (base_size·p)
    in_channels: int = 4
    mlp_ratio: float = 4.0
    caption_channels: int = 4096    # T5-XXL
    model_max_length: int = 120     # T5 tokens; also the length of the learned null caption
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    pos_interp_scale: float = 1.0   # PixArt's lewei_scale / diffusers' interpolation_scale
    norm_eps: float = 1e-6          # eps of the blocks' LayerNorms (diffusers' `norm_eps`)
    # PixArtMS micro-conditioning (the 1024-MS release): `csize_embedder` and `ar_embedder`
    # embed the image size (height, width) and aspect ratio, D/3 per scalar, added to t.
    micro_condition: bool = False
    null_caption: bool = True       # learned null caption `y_embedding` (diffusers drops it)

    family: ClassVar[str] = "PixArt"
    condition: ClassVar[str] = "text"

    def __post_init__(self):
        checks.check_sizes(self, 4)
        checks.positive(self, "caption_channels", "model_max_length")
        checks.positive(self, "norm_eps", "pos_interp_scale", number=True)
        checks.flags(self, "micro_condition", "null_caption")
        checks.latent_size(self)
        if self.micro_condition and self.hidden_size % 3:
            near = checks.nearest_multiples(self.hidden_size, 3, self.num_heads, 4)
            raise ValueError(
                f"micro_condition needs a width divisible by 3 (size and aspect-ratio embedders "
                f"are D/3 wide each), got {self.hidden_size}; nearest valid: "
                f"{checks.either(near)}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def base_grid(self) -> int:
        """Token side the positions are interpolated to (PixArt's base_size)."""
        return self.input_size // self.patch_size

    def attention_layout(self) -> str:
        return "global self-attention + text cross-attention"


#################################################################################
#                                 Core PixArt Model                             #
#################################################################################

class PixArtBlock(nn.Module):
    """A PixArt block: adaLN-single modulated self-attention, text cross-attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads, kind="global", qkv_bias=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads, kind="text_cross")
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, y_bias: Tensor | None) -> Tensor:
        """x (B, T, D), y (B, L, D) captions, t (B, 6·D), y_bias (B, 1, 1, L) or None."""
        B, _, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, D)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, y_bias)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PixArt(nn.Module):
    """Text-conditional diffusion transformer with adaLN-single."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        if config.micro_condition:
            self.csize_embedder = SizeEmbedder(D // 3)   # (height, width) -> 2·D/3
            self.ar_embedder = SizeEmbedder(D // 3)      # aspect ratio -> D/3
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))
        null_tokens = config.model_max_length if config.null_caption else 0
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.class_dropout_prob,
                                          null_tokens=null_tokens)
        self.blocks = nn.ModuleList(
            [PixArtBlock(D, config.num_heads, config.mlp_ratio, config.norm_eps)
             for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(D, config.patch_size, self.out_channels)
        self._per_shape = ShapeCache()   # the position table of the last shape
        self.initialize_weights()

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize timestep embedding MLP, the shared adaLN projection and caption MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.config.micro_condition:
            for embedder in (self.csize_embedder, self.ar_embedder):
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)

        # Zero-out the cross-attention output projections:
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)

        # Zero-out output layers:
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def positions(self, grid: tuple[int, int, int], video: bool, like: Tensor) -> Tensor:
        """(1, T, D) sin-cos table for a token grid, interpolated to the configured base size."""
        F, h, w = grid
        key = (grid, video, like.device, like.dtype)
        return self._per_shape.get(key, lambda: position_table(
            self.config.hidden_size, F if video else None, h, w,
            scale=self.config.pos_interp_scale, base_size=self.config.base_grid,
            device=like.device, dtype=like.dtype)[None])

    def size_condition(self, resolution: Tensor | None, aspect_ratio: Tensor | None,
                       batch: int) -> Tensor | None:
        """(B, D) PixArtMS size embedding [csize(height, width), ar(aspect ratio)], or None."""
        if not self.config.micro_condition:
            if resolution is not None or aspect_ratio is not None:
                raise ValueError("this model has no size/aspect-ratio embedders "
                                 "(micro_condition=False): pass neither resolution nor "
                                 "aspect_ratio")
            return None
        if resolution is None or aspect_ratio is None:
            raise ValueError(
                "this model is micro-conditioned (PixArtMS, micro_condition=True): pass "
                "resolution=(B, 2) image (height, width) in pixels and aspect_ratio=(B, 1) "
                "height/width, as PixArt-alpha's data_info img_hw / aspect_ratio")
        if aspect_ratio.dim() == 1:
            aspect_ratio = aspect_ratio[:, None]
        if resolution.shape != (batch, 2) or aspect_ratio.shape != (batch, 1):
            raise ValueError(f"resolution must be ({batch}, 2) and aspect_ratio ({batch}, 1) or "
                             f"({batch},) for a batch of {batch}, got {tuple(resolution.shape)} "
                             f"and {tuple(aspect_ratio.shape)}")
        return torch.cat([self.csize_embedder(resolution), self.ar_embedder(aspect_ratio)], dim=1)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None,
                resolution: Tensor | None = None, aspect_ratio: Tensor | None = None) -> Tensor:
        """
        x: (B, C, H, W) image latents or (B, C, F, H, W) video latents
        t: (B,) diffusion timesteps (0..999)
        text: (B, L, caption_channels) T5 features; text_mask: optional (B, L), 1 keeps a token
        resolution: (B, 2) image (height, width) in pixels, aspect_ratio: (B, 1) height/width;
            required with micro_condition, refused without
        returns (B, 2C, H, W) or (B, 2C, F, H, W)
        """
        dtype = self.x_embedder.proj.weight.dtype
        shape = parse_latent(x, self.in_channels, self.patch_size, (1, 1, 1), dtype)
        B = shape.batch
        t = check_timesteps(t, B, x.device)
        text = check_text(text, text_mask, B, self.config.caption_channels, dtype)
        x = self.x_embedder(shape.as_video(x))                          # (B, T, D)
        x = x + self.positions(shape.grid, shape.video, x)
        t = self.t_embedder(t)                                          # (B, D)
        size = self.size_condition(resolution, aspect_ratio, B)         # (B, D) or None
        if size is not None:
            t = t + size
        t0 = self.t_block(t)                                            # (B, 6·D)
        y = self.y_embedder(text)                                       # (B, L, D)
        y_bias = text_bias(text_mask, x.dtype)                          # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, y, t0, y_bias)                                 # (B, T, D)
        x = self.final_layer(x, t)                                      # (B, T, p·p·2C)
        x = unpatchify(x, shape.grid, self.patch_size, self.out_channels)
        return shape.restore(x)
