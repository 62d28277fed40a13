"""PT-DiT: Proxy-Tokenized Diffusion Transformer (Qihoo-T2X, arXiv 2409.04005).

The released architecture (Ascend/MindSpeed-MM `PTDiTDiffuser`, see shared/reference/
official_ptdit.md), with DiT/PixArt-family parameter names and three release bugs fixed:
modulation is batch-correct (the release mixes samples when timesteps differ), positions are
right on non-square grids, and the shifted-window mask is built per shape (never a stale cache).

Token layout: between blocks the stream is (B, T, D) in *window-major* order — windows in raster
order over the window grid, tokens in raster order inside each window — so (B, nW, N, D) is a
free view with one window per row, and window attention is batched attention over windows.

A block, in forward order (GIIM = global information interaction, TCM = texture complement):
  proxies  P = mean of each window's tokens                                  (B, nW, D)
  GIIM     P += ProxyAttn(LN(P));  X += ProxyOut(CrossAttn(LN(X) -> LN(P)))   zero-init ProxyOut
  TCM      X += g_msa · WindowAttn(mod(LN(X)))
           X += ShiftOut(g_sw · unroll(ShiftWindowAttn(mod_sw(LN(roll(X))), mask)))  zero-init
  text     X += CrossAttn(X -> captions)                                     no norm, no gate
  MLP      X += g_mlp · MLP(mod(LN(X)))
Timestep conditioning is adaLN-single; the shifted branch adds its own 3×D table to the first
three timestep vectors. The class-conditional variant (PT-DiT/S-Class) has no text
cross-attention: its label embedding is added to the embedded timestep before the shared
projection, as DiT adds c = t + y.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..attention import (Attention, CrossAttention, proxy_tokens, shift_window_bias,
                         shift_windows, text_bias, window_count, window_partition,
                         window_reverse)
from ..configs import PTDiTConfig
from ..layers import (CaptionEmbedder, LabelEmbedder, Mlp, PatchEmbed, T2IFinalLayer,
                      TimestepEmbedder, modulate, position_table, unpatchify)
from ._common import check_labels, check_text, check_timesteps, parse_latent


class WindowLayout(NamedTuple):
    """How one forward pass cuts its token grid: grid (F, h, w), window (c0, c1, c2) in tokens,
    and the shifted-window bias (nW, 1, N, N) or None."""
    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    shift_bias: Tensor | None

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1] * self.window[2]

    @property
    def num_windows(self) -> int:
        return window_count(self.grid, self.window)


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


#################################################################################
#                                 Core PT-DiT Model                             #
#################################################################################

class PTDiTBlock(nn.Module):
    """A proxy-tokenized block: GIIM, TCM (window + shifted window), text cross-attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 text: bool = True, giim: bool = True, shift_window: bool = True):
        super().__init__()
        D = hidden_size
        self.giim, self.shift_window, self.text = giim, shift_window, text
        if giim:
            self.norm_proxy = _layer_norm(D)
            self.proxy_attn = Attention(D, num_heads, kind="proxy")
            self.norm_query = _layer_norm(D)
            self.norm_proxy_kv = _layer_norm(D)
            self.proxy_cross_attn = CrossAttention(D, num_heads, kind="proxy_cross")
            self.proxy_out = nn.Linear(D, D)
        self.norm1 = _layer_norm(D)
        self.attn = Attention(D, num_heads, kind="window")
        if shift_window:
            self.norm_shift = _layer_norm(D)
            self.shift_attn = Attention(D, num_heads, kind="shift_window")
            self.shift_out = nn.Linear(D, D)
            self.shift_scale_shift_table = nn.Parameter(torch.randn(3, D) / D**0.5)
        if text:
            self.cross_attn = CrossAttention(D, num_heads, kind="text_cross")
        self.norm2 = _layer_norm(D)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def forward(self, x: Tensor, y: Tensor | None, t: Tensor, y_bias: Tensor | None,
                layout: WindowLayout) -> Tensor:
        """x (B, T, D) window-major, y (B, L, D) captions, t (B, 6·D), y_bias (B, 1, 1, L)."""
        B, T, D = x.shape
        nW, N = layout.num_windows, layout.window_tokens
        t = t.reshape(B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t).chunk(6, dim=1)
        if self.giim:
            p = proxy_tokens(x, N)                                           # (B, nW, D)
            p = p + self.proxy_attn(self.norm_proxy(p))
            x = x + self.proxy_out(
                self.proxy_cross_attn(self.norm_query(x), self.norm_proxy_kv(p)))
        h = modulate(self.norm1(x), shift_msa, scale_msa).view(B, nW, N, D)  # window rows
        x = x + gate_msa * self.attn(h).view(B, T, D)
        if self.shift_window:
            shift_sw, scale_sw, gate_sw = (self.shift_scale_shift_table[None] + t[:, :3]).chunk(
                3, dim=1)
            h = modulate(self.norm_shift(x), shift_sw, scale_sw)
            h = shift_windows(h, layout.grid, layout.window).view(B, nW, N, D)  # rolled windows
            h = self.shift_attn(h, layout.shift_bias).view(B, T, D)
            h = shift_windows(h, layout.grid, layout.window, inverse=True)
            x = x + self.shift_out(gate_sw * h)
        if self.text:
            x = x + self.cross_attn(x, y, y_bias)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PTDiT(nn.Module):
    """Proxy-tokenized diffusion transformer for images (B, C, H, W) and video (B, C, F, H, W)."""

    def __init__(self, config: PTDiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        text = config.condition == "text"

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))
        if text:
            self.y_embedder = CaptionEmbedder(config.caption_channels, D)
        else:
            self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.blocks = nn.ModuleList([
            PTDiTBlock(D, config.num_heads, config.mlp_ratio, text=text, giim=config.giim,
                       shift_window=config.shift_window)
            for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # As released: PyTorch's default init, N(0,1)/√D modulation tables (set in __init__),
        # and zero for the two projections that close the proxy and shifted-window branches,
        # so that both branches start as the identity.
        for block in self.blocks:
            for out in (getattr(block, "proxy_out", None), getattr(block, "shift_out", None)):
                if out is not None:
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)

    def layout(self, grid: tuple[int, int, int], window: tuple[int, int, int],
               like: Tensor) -> WindowLayout:
        bias = (shift_window_bias(grid, window, like.dtype, like.device)
                if self.config.shift_window else None)
        return WindowLayout(grid, window, bias)

    def positions(self, layout: WindowLayout, like: Tensor) -> Tensor:
        """(1, T, D) 3-D sin-cos table in window-major order."""
        F, h, w = layout.grid
        table = position_table(self.config.hidden_size, F, h, w,
                               scale=self.config.pos_interp_scale, device=like.device)
        return window_partition(table.reshape(1, F, h, w, -1), layout.window).to(like.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, y_mask: Tensor | None = None) -> Tensor:
        """
        x: (B, C, H, W) image latents or (B, C, F, H, W) video / multi-view latents
        t: (B,) diffusion timesteps (0..1000)
        y: (B, L, caption_channels) T5 features (text models) or (B,) class labels (S-Class)
        y_mask: optional (B, L) caption keep-mask, 1 keeps a token (text models only)
        returns (B, 2C, H, W) or (B, 2C, F, H, W)
        """
        dtype = self.x_embedder.proj.weight.dtype
        shape = parse_latent(x, self.in_channels, self.patch_size, (1, 1, 1), dtype)
        window = self.config.window_for(shape.grid)
        parse_latent(x, self.in_channels, self.patch_size, window, dtype)
        B = shape.batch
        t = check_timesteps(t, B)
        x = self.x_embedder(shape.as_video(x))                            # (B, T, D) raster
        layout = self.layout(shape.grid, window, x)
        x = window_partition(x.unflatten(1, shape.grid), window)          # (B, T, D) window-major
        x = x + self.positions(layout, x)
        t = self.t_embedder(t)                                            # (B, D)
        if self.config.condition == "text":
            y = check_text(y, y_mask, B, self.config.caption_channels, dtype)
            y_bias = text_bias(y_mask, x.dtype)                           # (B, 1, 1, L)
            y = self.y_embedder(y)                                        # (B, L, D)
        else:
            check_labels(y, B, self.config.num_classes)
            if y_mask is not None:
                raise ValueError("y_mask applies to captions; this model is class-conditional")
            t = t + self.y_embedder(y)                                    # c = t + y, (B, D)
            y, y_bias = None, None
        t0 = self.t_block(t)                                              # (B, 6·D)
        for block in self.blocks:
            x = block(x, y, t0, y_bias, layout)                           # (B, T, D)
        x = self.final_layer(x, t)                                        # (B, T, p·p·2C)
        x = window_reverse(x, shape.grid, window).flatten(1, 3)           # raster order
        x = unpatchify(x, shape.grid, self.patch_size, self.out_channels)
        return shape.restore(x)
