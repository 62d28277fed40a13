"""PT-DiT: Proxy-Tokenized Diffusion Transformer (Qihoo-T2X, arXiv 2409.04005).

The released architecture (Ascend/MindSpeed-MM `PTDiTDiffuser`, step by step in
docs/ptdit_release.md), with DiT/PixArt-family parameter names and three release bugs fixed:
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

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .. import checks
from ..attention import (
    Attention,
    CrossAttention,
    Windows,
    proxy_tokens,
    shift_permutation,
    shift_window_bias,
    text_bias,
    window_partition,
    window_reverse,
)
from ..layers import (
    CaptionEmbedder,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    ShapeCache,
    T2IFinalLayer,
    TimestepEmbedder,
    compute_dtype,
    modulate,
    position_table,
    unpatchify,
)
from .inputs import check_labels, check_text, check_timesteps, parse_latent


@dataclass(frozen=True, kw_only=True)
class PTDiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 4
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    condition: str = "text"         # "text": T5 cross-attention; "class": label added to t
    caption_channels: int = 4096
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    # Window = proxy pooling window, in tokens (frames, rows, cols). None follows the paper's
    # schedule: `windows_per_side`² windows over the token grid, `temporal_window` latent frames.
    window: tuple[int, int, int] | None = None
    windows_per_side: int = 8
    temporal_window: int = 4
    proxies_per_window: int = 1
    giim: bool = True               # proxy self-attention + proxy→token cross-attention
    shift_window: bool = True
    pos_interp_scale: float = 1.0

    family: ClassVar[str] = "PT-DiT"

    def __post_init__(self):
        checks.check_sizes(self, 16)   # 3-D positions: D/4 temporal, 3D/8 per spatial axis
        checks.positive(self, "caption_channels", "num_classes", "windows_per_side",
                        "temporal_window")
        checks.positive(self, "pos_interp_scale", number=True)
        checks.flags(self, "giim", "shift_window")
        checks.one_of(self, "condition", ("text", "class"))
        if self.proxies_per_window != 1:
            raise ValueError(
                f"proxies_per_window={self.proxies_per_window!r} is not supported: PT-DiT uses "
                "one proxy (the window mean) per window; the release's strided several-proxy "
                "variant (proxy_compress_ratios < compress_ratios) is not part of the paper. "
                "Allowed: 1")
        if self.window is not None:
            object.__setattr__(self, "window", checks.window(self.window))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def attention_layout(self) -> str:
        if self.window is not None:
            window = "window {}x{}x{}".format(*self.window)
        else:
            n = self.windows_per_side
            window = f"{n}x{n} windows/frame, {self.temporal_window} frames/window"
        parts = ["proxy self", "proxy->token cross"] if self.giim else []
        parts += ["window"] + (["shifted window"] if self.shift_window else [])
        parts += ["text cross"] if self.condition == "text" else []
        return " + ".join(parts) + f" ({window})"

    def grid_multiple(self, frames: int) -> tuple[tuple[int, int, int], str]:
        """What a token grid of `frames` frames must be a multiple of (frames, rows, cols), and
        what that is ("window", or the schedule's "windows per side")."""
        if self.window is not None:
            return self.window, "window"
        n = self.windows_per_side
        return (1 if frames == 1 else self.temporal_window, n, n), "windows per side"

    def window_for(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The window (frames, rows, cols) in tokens for a token grid (F, H, W) that is a
        multiple of `grid_multiple(F)` (the models check that first, with messages in pixels)."""
        if self.window is not None:
            return self.window
        F, H, W = grid
        (tf, n, _), _ = self.grid_multiple(F)
        if F % tf or H % n or W % n:
            raise ValueError(f"token grid {grid} does not split into the schedule's {n}x{n} "
                             f"windows of {tf} frames; pass window=(f, h, w) explicitly")
        return (tf, H // n, W // n)


class WindowLayout(NamedTuple):
    """How one forward pass cuts its token grid, built once per (grid, window, device, dtype)
    and shared by every batch size: the windows; for the shifted windows, the gathers that roll
    the window-major stream and back, (T,) each, and the additive mask (nW, 1, N, N) that each
    sample's rows broadcast against."""
    windows: Windows
    shift_index: Tensor | None
    unshift_index: Tensor | None
    shift_bias: Tensor | None


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
        windows = layout.windows
        nW, N = windows.num_windows, windows.window_tokens
        t = t.reshape(B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t).chunk(6, dim=1)
        if self.giim:
            p = proxy_tokens(x, N)                                           # (B, nW, D)
            p = p + self.proxy_attn(self.norm_proxy(p))
            x = x + self.proxy_out(
                self.proxy_cross_attn(self.norm_query(x), self.norm_proxy_kv(p)))
        h = modulate(self.norm1(x), shift_msa, scale_msa).view(B * nW, N, D)  # a window per row
        x = x + gate_msa * self.attn(h, None, windows).view(B, T, D)
        if self.shift_window:
            shift_sw, scale_sw, gate_sw = (self.shift_scale_shift_table[None] + t[:, :3]).chunk(
                3, dim=1)
            h = modulate(self.norm_shift(x), shift_sw, scale_sw)
            h = h[:, layout.shift_index].view(B, nW, N, D)           # a rolled window per row
            h = self.shift_attn(h, layout.shift_bias, windows).view(B, T, D)  # mask (nW, 1, N, N)
            x = x + self.shift_out(gate_sw * h[:, layout.unshift_index])    # rolled back
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
        self.out_channels = config.out_channels
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
        self._per_shape = ShapeCache()   # window layout, masks and positions of the last shape
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

    def layout(self, grid: tuple[int, int, int], window: tuple[int, int, int], like: Tensor
               ) -> tuple[WindowLayout, Tensor]:
        """The window layout and the (1, T, D) position table in window-major order, in the
        table's compute dtype (float32, float64 for float64 models); cached per shape, one for
        every batch size."""
        key = (grid, window, like.device, like.dtype)
        return self._per_shape.get(key, lambda: self._build_layout(grid, window, like))

    def _build_layout(self, grid, window, like) -> tuple[WindowLayout, Tensor]:
        shift = unshift = bias = None
        if self.config.shift_window:
            shift, unshift = (i.to(like.device) for i in shift_permutation(grid, window))
            bias = shift_window_bias(grid, window, like.dtype, like.device)    # (nW, 1, N, N)
        F, h, w = grid
        table = position_table(self.config.hidden_size, F, h, w,
                               scale=self.config.pos_interp_scale, device=like.device,
                               dtype=compute_dtype(like.dtype))
        positions = window_partition(table.reshape(1, F, h, w, -1), window)
        return WindowLayout(Windows(grid, window), shift, unshift, bias), positions

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None
                ) -> Tensor:
        """
        x: (B, C, H, W) image latents or (B, C, F, H, W) video / multi-view latents
        t: (B,) diffusion timesteps (0..1000)
        text: (B, L, caption_channels) T5 features — for the class-conditional PT-DiT/S-Class,
            (B,) class labels instead
        text_mask: optional (B, L) caption keep-mask, 1 keeps a token (text models only)
        returns (B, 2C, H, W) or (B, 2C, F, H, W)
        """
        dtype = self.x_embedder.proj.weight.dtype
        frames = x.shape[2] if isinstance(x, Tensor) and x.dim() == 5 else 1  # checked below
        multiple, unit = self.config.grid_multiple(frames)
        shape = parse_latent(x, self.in_channels, self.patch_size, multiple, dtype, unit)
        window = self.config.window_for(shape.grid)
        B = shape.batch
        t = check_timesteps(t, B, x.device)
        x = self.x_embedder(shape.as_video(x))                            # (B, T, D) raster
        layout, positions = self.layout(shape.grid, window, x)
        x = window_partition(x.unflatten(1, shape.grid), window)          # (B, T, D) window-major
        x = (x.to(positions.dtype) + positions).to(dtype)   # added in float32 as released
        t = self.t_embedder(t)                                            # (B, D)
        if self.config.condition == "text":
            y = check_text(text, text_mask, B, self.config.caption_channels, dtype)
            y_bias = text_bias(text_mask, x.dtype)                        # (B, 1, 1, L)
            y = self.y_embedder(y)                                        # (B, L, D)
        else:
            check_labels(text, B, self.y_embedder.embedding_table.num_embeddings)
            if text_mask is not None:
                raise ValueError("text_mask applies to captions; this model is class-conditional")
            t = t + self.y_embedder(text)                                 # c = t + y, (B, D)
            y, y_bias = None, None
        t0 = self.t_block(t)                                              # (B, 6·D)
        for block in self.blocks:
            x = block(x, y, t0, y_bias, layout)                           # (B, T, D)
        x = self.final_layer(x, t)                                        # (B, T, p·p·2C)
        x = window_reverse(x, shape.grid, window).flatten(1, 3)           # raster order
        x = unpatchify(x, shape.grid, self.patch_size, self.out_channels)
        return shape.restore(x)
