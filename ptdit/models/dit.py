"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, arXiv 2212.09748).

Follows facebookresearch/DiT `models.py`: adaLN-Zero blocks, class conditioning with an extra
null class for classifier-free guidance, learned sigma, frozen 2-D sin-cos positions kept as a
(non-trainable) parameter, LayerNorm without affine at eps 1e-6 (`norm_eps` sets the MLP-branch
norm's, for diffusers' DiT). Parameter names are the
official ones, so `DiT-XL-2-256x256.pt` loads with `load_state_dict` unchanged.

Video latents (B, C, F, H, W) run as full spatio-temporal attention over all F·h·w tokens with a
3-D sin-cos table (ptdit.layers.sincos_3d): the full-3D-attention baseline of video DiTs.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import checks
from ..attention import Attention
from ..layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    ShapeCache,
    TimestepEmbedder,
    modulate,
    position_table,
    unpatchify,
)
from .inputs import LatentShape, check_labels, check_timesteps, parse_latent


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32            # latent side of the configured image (256 px / 8)
    in_channels: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    # eps of each block's MLP-branch LayerNorm (norm2): the one LayerNorm diffusers' DiT
    # `norm_eps` sets (default 1e-5 there); norm1 and the final norm are 1e-6 in both codes.
    norm_eps: float = 1e-6
    # Timestep frequencies max_period^(-i/(128 - freq_shift)): 0 in the official DiT, 1 in
    # diffusers' DiTTransformer2DModel (downscale_freq_shift=1, hard-coded there).
    freq_shift: int = 0

    family: ClassVar[str] = "DiT"
    condition: ClassVar[str] = "class"

    def __post_init__(self):
        checks.check_sizes(self, 4)
        checks.positive(self, "num_classes")
        checks.positive(self, "norm_eps", number=True)
        checks.one_of(self, "freq_shift", (0, 1))
        checks.latent_size(self)

    @property
    def out_channels(self) -> int:
        """Noise, and with learned sigma the variance too."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def base_grid(self) -> int:
        """Token side of the configured image, the grid the stored positions are built on."""
        return self.input_size // self.patch_size

    def attention_layout(self) -> str:
        return "global self-attention"


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, kind="global", qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1))
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then a linear to p·p·C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, class-conditional."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, freq_shift=config.freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        grid = config.base_grid
        # Frozen table for the configured image size, a parameter as in the official code (so
        # checkpoints load unchanged and it counts in parameters()); other shapes compute theirs.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, config.num_heads, config.mlp_ratio, config.norm_eps)
             for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self._per_shape = ShapeCache()   # the position table of the last other shape
        self.initialize_weights()

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by sin-cos embedding:
        grid = self.config.base_grid
        table = position_table(self.config.hidden_size, None, grid, grid)
        self.pos_embed.data.copy_(table[None].to(self.pos_embed.dtype))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks:
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def positions(self, shape: LatentShape) -> Tensor:
        """(1, T, D) positions: the stored table for the configured image size, else computed on
        coordinates interpolated to the configured grid, as diffusers' DiT does (the official
        code supports the configured size only)."""
        F, h, w = shape.grid
        base = self.config.base_grid
        if not shape.video and h == w == base:
            return self.pos_embed
        like = self.pos_embed
        key = (shape.grid, shape.video, like.device, like.dtype)
        return self._per_shape.get(key, lambda: position_table(
            self.config.hidden_size, F if shape.video else None, h, w, base_size=base,
            device=like.device, dtype=like.dtype)[None])

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """
        x: (B, C, H, W) image latents or (B, C, F, H, W) video latents
        t: (B,) diffusion timesteps (0..999)
        y: (B,) class labels; `num_classes` is the null class
        returns (B, 2C, H, W) or (B, 2C, F, H, W): noise and (learned) variance
        """
        shape = parse_latent(x, self.in_channels, self.patch_size, (1, 1, 1),
                             self.x_embedder.proj.weight.dtype)
        B = shape.batch
        t = check_timesteps(t, B, x.device)
        check_labels(y, B, self.y_embedder.embedding_table.num_embeddings)
        x = self.x_embedder(shape.as_video(x)) + self.positions(shape)   # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                      # (B, D)
        for block in self.blocks:
            x = block(x, c)                                              # (B, T, D)
        x = self.final_layer(x, c)                                       # (B, T, p·p·2C)
        x = unpatchify(x, shape.grid, self.patch_size, self.out_channels)  # (B, 2C, F, H, W)
        return shape.restore(x)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Forward pass with classifier-free guidance; x and y hold the conditional half first,
        then the unconditional (null-class) half, as in the official sampler."""
        if len(x) % 2:
            raise ValueError("forward_with_cfg takes the conditional half then the null-class "
                             f"half: an even batch, got {len(x)}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        # Guidance on the first three channels only, as the official code does "for exact
        # reproducibility"; apply it to all in_channels for the FID-optimal variant.
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)
