"""Layers shared by DiT, PixArt-alpha and PT-DiT: embedders, MLP, modulation, sin-cos tables.

Letters: B batch, C channels, F latent frames, H/W latent height/width, T tokens, D width.
Parameter names follow facebookresearch/DiT and PixArt-alpha (x_embedder.proj, t_embedder.mlp,
y_embedder.embedding_table, y_embedder.y_proj.fc1, mlp.fc1, ...), so their checkpoints map 1:1.
"""

import math

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1+scale)+shift; shift, scale: (B, 1, D) or (B, D), per sample."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


class ShapeCache:
    """Remembers the value computed for the last key (shape, device, dtype): per-shape tables
    and masks are built once for a run of same-shape calls and rebuilt when the key changes, so
    never stale. Not module state: it is in no state dict."""

    def __init__(self):
        self.key, self.value = None, None
        # Python bookkeeping: torch.compile calls it, not traces it. Wrapped per instance, when
        # a model is built, so that importing ptdit does not import torch._dynamo (seconds).
        self.get = torch.compiler.disable(self._get)

    def _get(self, key, compute):
        if key != self.key:
            self.key, self.value = None, None   # free the old value before building the new
            # Built outside inference mode, so a value made during validation under
            # torch.inference_mode() still serves training calls afterwards.
            with torch.inference_mode(False):
                self.value, self.key = compute(), key
        return self.value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for fixed tables and sinusoids: at least float32, float64 when the model is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#################################################################################
#                Embedding layers for timesteps, labels, captions               #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of each frame to D-dim tokens (a strided Conv2d, key `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, F, H, W) -> (B, F·(H/p)·(W/p), D), tokens in raster order (f, h, w)."""
        B, C, F, H, W = x.shape
        x = x.transpose(1, 2).reshape(B * F, C, H, W)
        x = self.proj(x)                                      # (B·F, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2).reshape(B, -1, x.shape[1])


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0,
                       freq_shift: int = 0) -> Tensor:
    """Sinusoidal timestep features [cos(t·f), sin(t·f)], f_i = max_period^(-i/(dim/2 - shift))
    (GLIDE; shift 0, diffusers' DiT uses 1).

    Computed in float32, as the official codes do, or in float64 for float64 inputs.
    """
    half = dim // 2
    dtype = compute_dtype(t.dtype if t.is_floating_point() else torch.float32)
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device)
        / (half - freq_shift)
    )
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps (0..1000 scale) into D-dim vectors: sinusoid -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:
        """(B,) -> (B, D)."""
        dtype = self.mlp[0].weight.dtype
        t_freq = timestep_embedding(t.to(compute_dtype(dtype)), self.frequency_embedding_size,
                                    freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS's size embedder: each of S scalars (image height, width or aspect ratio) through
    the timestep embedder, concatenated: (B, S) -> (B, S·D)."""

    def forward(self, s: Tensor) -> Tensor:
        return super().forward(s.flatten()).reshape(s.shape[0], -1)


class LabelEmbedder(nn.Module):
    """Embeds class labels; index `num_classes` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replaces labels by the null class: at random in training, or where forced (1)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """(B,) int64 -> (B, D)."""
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (timm's Mlp with DiT's approximate GELU; keys fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features (B, L, caption_channels) to (B, L, D) with a two-layer MLP (`y_proj`).

    With `null_tokens` > 0 it also holds PixArt-alpha's learned null caption (`y_embedding`, a
    buffer of null_tokens × caption_channels) that replaces a caption dropped for guidance.
    """

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float = 0.0,
                 null_tokens: int = 0):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.uncond_prob = uncond_prob
        if null_tokens:
            self.register_buffer(
                "y_embedding", torch.randn(null_tokens, caption_channels) / caption_channels**0.5
            )
        else:
            self.y_embedding = None

    def token_drop(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replaces whole captions by the null caption: at random in training, or where forced."""
        if self.y_embedding is None:
            raise ValueError("this model has no learned null caption (null_tokens=0)")
        if caption.shape[1] != self.y_embedding.shape[0]:
            raise ValueError(
                f"caption length {caption.shape[1]} must equal the null caption's "
                f"{self.y_embedding.shape[0]} tokens to drop captions for guidance"
            )
        if force_drop_ids is None:
            drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids[:, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if (self.training and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


#################################################################################
#                   Sine/cosine positional tables (MAE style)                   #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(T,) positions -> float64 (T, dim): [sin(pos·ω), cos(pos·ω)], ω_i = 10000^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even channel count, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: Tensor, grid_w: Tensor, dtype=torch.float64) -> Tensor:
    """Row coords (H,), column coords (W,) -> (H·W, dim), raster order; first half encodes columns.

    The 1-D tables are computed in float64 and cast, so any `dtype` holds the float64 table
    rounded once, without a float64 table of the whole grid."""
    H, W, half = len(grid_h), len(grid_w), dim // 2
    cols = sincos_1d(half, grid_w).to(dtype)[None].expand(H, W, half)
    rows = sincos_1d(half, grid_h).to(dtype)[:, None].expand(H, W, half)
    return torch.cat([cols, rows], dim=-1).reshape(H * W, dim)


def sincos_3d(dim: int, grid_f: Tensor, grid_h: Tensor, grid_w: Tensor,
              dtype=torch.float64) -> Tensor:
    """(F·H·W, dim) table, raster order (f, h, w): D/4 temporal channels, then 3D/4 spatial (2-D).

    The split follows the released PT-DiT (temporal first); spatial coordinates are (row, col)
    for every grid shape (the release transposes them on non-square grids, a bug not kept here).
    """
    if dim % 16:
        raise ValueError(f"3-D sin-cos positions need a width divisible by 16, got {dim}")
    F, H, W = len(grid_f), len(grid_h), len(grid_w)
    temporal = sincos_1d(dim // 4, grid_f).to(dtype)[:, None, :].expand(F, H * W, dim // 4)
    spatial = sincos_2d(3 * dim // 4, grid_h, grid_w, dtype)[None].expand(F, H * W, 3 * dim // 4)
    return torch.cat([temporal, spatial], dim=-1).reshape(F * H * W, dim)


def position_table(dim: int, frames: int | None, height: int, width: int, *, scale: float = 1.0,
                   base_size: int | None = None, device=None,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """(T, dim) table for a token grid: the float64 table rounded once to `dtype`.
    frames=None gives the 2-D (image) table.

    Spatial coordinate of index i along an axis of n tokens: i / (n / base_size) / scale
    (PixArt-alpha's interpolation; base_size=None means n, i.e. plain i / scale).
    """
    def axis(n: int) -> Tensor:
        # float32 coordinates, as the official codes (numpy float32 grids) and diffusers compute
        # them; the sines and cosines are then taken in float64.
        i = torch.arange(n, dtype=torch.float32, device=device)
        return (i / (n / (base_size or n)) / scale).to(torch.float64)

    if frames is None:
        return sincos_2d(dim, axis(height), axis(width), dtype)
    grid_f = torch.arange(frames, dtype=torch.float64, device=device)
    return sincos_3d(dim, grid_f, axis(height), axis(width), dtype)


#################################################################################
#                               Final layers                                    #
#################################################################################

class T2IFinalLayer(nn.Module):
    """PixArt-alpha's final layer: LayerNorm, modulation by a learned 2×D table plus the embedded
    timestep, then a linear to p·p·C_out per token (keys norm_final, linear, scale_shift_table)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, T, D), t (B, D) embedded timestep -> (B, T, p·p·C_out)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch_size: int, channels: int) -> Tensor:
    """(B, F·h·w, p·p·C) raster-order tokens -> (B, C, F, h·p, w·p); each token is (pr, pc, ch)."""
    F, h, w = grid
    p = patch_size
    B = x.shape[0]
    x = x.reshape(B, F, h, w, p, p, channels)
    x = torch.einsum("bfhwpqc->bcfhpwq", x)
    return x.reshape(B, channels, F, h * p, w * p)
