"""Self-attention maps of DiT, PixArt-alpha and PT-DiT along denoising calls, reduced on the fly
to the window statistics of `analysis.window_similarity`.

    calls = noised_inputs(x0, [999, 500, 100], cond, uncond, schedule=schedule_of(model))
    rows, maps = analyse(model, calls, windows=[2, 4, 8, 16], layers=[0, 13, 27])

(noised_inputs: analysis.model_calls; kept maps: analysis.attention_maps.)

What is analysed — "self-attention over all tokens", the attention PT-DiT's premise is about:
- DiT and PixArt-alpha (ours, kind "global"; diffusers' `DiTTransformer2DModel` and
  `PixArtTransformer2DModel`, their `attn1`): token self-attention, maps (T, T) over the token
  grid (F, H/p, W/p) in raster order;
- PT-DiT has no token self-attention. Its one attention over all positions is the proxy
  self-attention (kind "proxy"): maps (nW, nW) over the grid of proxies (F/c0, h/c1, w/c2),
  raster order, so its windows are windows of proxies (would coarser proxies do?). Window,
  shifted-window and cross attentions (rows over one window's tokens, or over another stream)
  are not analysed.

How maps are taken, never editing model code:
- our models, default: the analysed modules (only those: the others keep their backend, SDPA,
  and never form maps) run the `math` backend, and an observer (`ptdit.attention.observe`)
  reduces each call's probabilities (rows, H, L, L) head by head. The values V, which the
  observer does not hand over, come from a forward hook on the module's `qkv` projection. The
  math backend holds the scores and the probabilities of all heads of the call at once: two
  layer-maps of the batch.
- our models, `headwise=True`: the modules keep their backend; the `qkv` hook recomputes
  softmax(q·kᵀ/√d) one head at a time (exact for the analysed kinds, which take no bias), so at
  most one head's map (rows, L, L) exists at a time.
- diffusers: a processor on the chosen `attn1` modules computes what `AttnProcessor` does —
  `attn.get_attention_scores(q, k, mask)`, then · v — one head at a time, hands each head's
  probabilities and values to the reducer, and returns the normal output. It is installed
  module by module with `set_processor` (what `set_attn_processor` does underneath; diffusers'
  DiT has no `set_attn_processor`); cross-attention processors stay as they are.
One layer's maps of PixArt-XL/2 at 1024 px (4096 tokens, 16 heads, float32) are 1 GiB; what
each way peaks at there is measured in results/commands/commands.md.

Each model call (`ModelCall`: the input, the forward's other arguments, step and timestep) is
reduced per (kind, layer, head, step, timestep, branch): under classifier-free guidance the
batch is the conditional half then the unconditional half ("cond", "uncond"), otherwise all
"cond"; samples of one branch are pooled. Maps are dropped once reduced; `keep_maps=True` (or a
predicate of the stream's `Key`, to keep a few) keeps
the first sample of each branch (float32 numpy (L, L)) for figures — for small cases.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from math import prod
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ptdit.attention import attention_backend, name_attention_modules, observe
from ptdit.models.inputs import VAE_SPATIAL

from .attention_maps import AttentionMap, Key
from .model_calls import ModelCall
from .window_similarity import DEFAULT_MAX_PAIRS, Plan, WindowStats, plan, to_rows

ANALYSED_KINDS = ("global", "proxy")


class _Target(NamedTuple):
    module: nn.Module
    layer: int
    kind: str
    heads: int


def _layer_of(name: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    if match is None:
        raise ValueError(f"attention module {name!r} sits in no numbered block")
    return int(match.group(1))


def _diffusers_attention(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers `Attention` modules (they take processors) by qualified name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "set_processor") and hasattr(m, "get_attention_scores")}


def _is_diffusers(model: nn.Module) -> bool:
    return bool(_diffusers_attention(model))


def _patch_size(model: nn.Module) -> int:
    return model.config.patch_size if _is_diffusers(model) else model.patch_size


def _token_grid(x: Tensor, patch: int) -> tuple[int, int, int]:
    """(F, H/p, W/p) of a latent batch (B, C, H, W) or (B, C, F, H, W)."""
    return (x.shape[2] if x.dim() == 5 else 1, x.shape[-2] // patch, x.shape[-1] // patch)


def _targets(model: nn.Module, layers: Sequence[int] | None) -> dict[str, _Target]:
    """Qualified name -> the self-attention module analysed in each chosen layer."""
    if _is_diffusers(model):
        modules = {n: m for n, m in _diffusers_attention(model).items() if n.endswith(".attn1")}
        found = {n: _Target(m, _layer_of(n), "global", m.heads) for n, m in modules.items()}
    else:
        modules = name_attention_modules(model)
        kinds = {m.kind for m in modules.values()}
        kind = next((k for k in ANALYSED_KINDS if k in kinds), None)
        if kind is None:
            raise ValueError(
                f"{type(model).__name__} has no attention over all positions to analyse (kinds "
                f"{sorted(kinds) or 'none'}; analysed: {', '.join(ANALYSED_KINDS)}): window "
                "and cross attentions are not what PT-DiT's window redundancy is about; a "
                "PT-DiT needs its proxy self-attention (giim=True)")
        found = {n: _Target(m, _layer_of(n), kind, m.num_heads) for n, m in modules.items()
                 if m.kind == kind}
    if not found:
        raise ValueError(f"{type(model).__name__} has no self-attention module to analyse")
    available = sorted({t.layer for t in found.values()})
    if layers is not None:
        unknown = sorted(set(layers) - set(available))
        if unknown:
            raise ValueError(f"layers {unknown} do not exist; allowed: {available[0]}…"
                             f"{available[-1]}")
        found = {n: t for n, t in found.items() if t.layer in set(layers)}
    return found


class _LastLayerDone(Exception):
    """Ends a forward pass once the last analysed layer has been reduced."""


class Capture:
    """Attaches the reduction to `model` for a `with` block; `run(call)` runs one model call
    and reduces its maps into `stats` (Key -> WindowStats), keeping maps in `maps` when asked.
    (A sampler can instead call `begin(call)` before each of its own forward calls.) With
    `stop_early`, `run` ends each forward pass after the last analysed layer and returns None:
    the layers after it do not change the maps."""

    def __init__(self, model: nn.Module, *, windows: Iterable | None = None,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 keep_maps: bool | Callable[[Key], bool] = False,
                 max_pairs: int | None = DEFAULT_MAX_PAIRS,
                 max_distance: int | None = None, edge_margin=None, seed: int = 0,
                 headwise: bool = False, stop_early: bool = False):
        self.model = model
        self.diffusers, self.patch = _is_diffusers(model), _patch_size(model)
        self.targets = _targets(model, layers)
        n_heads = next(iter(self.targets.values())).heads
        self.heads = list(range(n_heads)) if heads is None else sorted(set(heads))
        if not self.heads or not all(0 <= h < n_heads for h in self.heads):
            raise ValueError(f"heads must be in 0…{n_heads - 1}, got {heads}")
        self.windows = None if windows is None else list(windows)
        self.plan_options = dict(max_pairs=max_pairs, max_distance=max_distance,
                                 edge_margin=edge_margin, seed=seed)
        self.keep_maps, self.headwise, self.stop_early = keep_maps, headwise, stop_early
        self.stats: dict[Key, WindowStats] = {}
        self.maps: list[AttentionMap] = []
        self._plans: dict[tuple, Plan] = {}
        self._values: dict[str, Tensor] = {}
        self._call: ModelCall | None = None
        self._begun = False
        self._stack: ExitStack | None = None

    def __enter__(self) -> "Capture":
        stack = ExitStack()
        try:
            if self.diffusers:
                self._install_processors(stack)
            else:
                self._install_hooks(stack)
            if self.stop_early:
                last = max(self.targets.values(), key=lambda t: t.layer).module
                stack.callback(last.register_forward_hook(self._stop).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack, self._call = None, None
        self._values.clear()

    def begin(self, call: ModelCall | None) -> None:
        """Attributes the attention calls that follow to `call`; None: the forward passes that
        follow are not reduced (a sampler's steps that are not analysed)."""
        self._call, self._begun = call, True

    def run(self, call: ModelCall):
        """Runs `model(call.x, **call.kwargs)` without autograd and reduces its maps."""
        if self._stack is None:
            raise RuntimeError("Capture.run outside its `with` block")
        self.begin(call)
        try:
            with torch.no_grad():
                return self.model(call.x, **call.kwargs)
        except _LastLayerDone:
            return None

    @staticmethod
    def _stop(*_) -> None:
        raise _LastLayerDone

    # -- installation -------------------------------------------------------------------------

    def _install_hooks(self, stack: ExitStack) -> None:
        for name, target in self.targets.items():
            module = target.module
            hook = self._recompute if self.headwise else self._keep_values
            handle = module.qkv.register_forward_hook(
                lambda _, __, out, name=name, hook=hook: hook(name, out))
            stack.callback(handle.remove)
            if not self.headwise:
                stack.enter_context(attention_backend(module, "math"))
        if not self.headwise:
            stack.enter_context(observe(self.model, self._observer, names=list(self.targets)))

    def _install_processors(self, stack: ExitStack) -> None:
        # Module by module (what set_attn_processor does underneath): diffusers' DiT has no
        # set_attn_processor of its own, and the cross-attentions keep theirs.
        for name, target in self.targets.items():
            stack.callback(target.module.set_processor, target.module.processor)
            target.module.set_processor(_ReducingProcessor(self, name))

    # -- the three sources of maps ------------------------------------------------------------

    def _split(self, name: str, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A qkv projection's output (..., L, 3D) -> q, k, v (rows, H, L, d), as Attention does."""
        H = self.targets[name].heads
        qkv = qkv.unflatten(-1, (3, H, qkv.shape[-1] // (3 * H)))
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)
        return tuple(x.reshape(-1, *x.shape[-3:]) for x in (q, k, v))

    def _keep_values(self, name: str, qkv: Tensor) -> None:
        self._values[name] = self._split(name, qkv)[2]

    def _observer(self, record, probs: Tensor) -> None:
        values = self._values.pop(record.name)                  # (rows, H, L, d)
        if self._skipped():
            return
        for h in self.heads:
            self.take(record.name, h, probs[:, h], values[:, h])

    def _recompute(self, name: str, qkv: Tensor) -> None:
        if self._skipped():
            return
        q, k, v = self._split(name, qkv)
        for h in self.heads:
            scores = (q[:, h] @ k[:, h].transpose(-2, -1)) * q.shape[-1] ** -0.5
            probs = scores.softmax(dim=-1)
            del scores                                           # one head's map at a time
            self.take(name, h, probs, v[:, h])

    # -- reduction ----------------------------------------------------------------------------

    def _skipped(self) -> bool:
        return self._call is None and self._begun

    def take(self, name: str, head: int, probs: Tensor, values: Tensor) -> None:
        """Reduces one head's maps probs (rows, L, L), values (rows, L, d) of module `name`."""
        call = self._call
        if self._skipped():
            return
        if call is None:
            raise RuntimeError("attention ran under Capture without a call: use run(call), or "
                               "begin(call) before the forward")
        target = self.targets[name]
        grid = self._grid(target.kind, call)
        if probs.shape[0] != call.x.shape[0] or probs.shape[-1] != prod(grid):
            raise RuntimeError(f"{name}: maps {tuple(probs.shape)} do not match the call's "
                               f"batch {call.x.shape[0]} and grid {grid}")
        plan_ = self._plan(grid)
        for branch, rows in call.branches():
            key = Key(target.kind, target.layer, head, call.step, float(call.timestep), branch)
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = WindowStats(plan_)
                if self.keep_maps is True or callable(self.keep_maps) and self.keep_maps(key):
                    self.maps.append(AttentionMap(key, grid,
                                                  probs[rows][0].float().cpu().numpy()))
            elif stats.plan is not plan_:
                raise ValueError(f"calls of step {call.step} mix token grids "
                                 f"({stats.plan.grid} and {grid}); analyse one shape at a time")
            stats.add(probs[rows], values[rows])

    def _grid(self, kind: str, call: ModelCall) -> tuple[int, int, int]:
        """The grid the call's maps are over: tokens (F, H/p, W/p), or PT-DiT's proxies."""
        grid = _token_grid(call.x, self.patch)
        if kind == "proxy":
            window = self.model.config.window_for(grid)
            grid = tuple(n // c for n, c in zip(grid, window))
        return grid

    def _plan(self, grid: tuple[int, int, int]) -> Plan:
        if grid not in self._plans:
            self._plans[grid] = plan(grid, self.windows, **self.plan_options)
        return self._plans[grid]


class _ReducingProcessor:
    """diffusers self-attention processor: `AttnProcessor`'s computation one head at a time,
    each head's probabilities (B, L, L) and values (B, L, d) handed to the capture."""

    def __init__(self, capture: Capture, name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 *args, **kwargs) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: the reducing processor is for self-attention only")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError(f"{self.name}: q/k normalisation is not handled by the reducing "
                             "processor (AttnProcessor does not apply it either)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B, L, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, L, B)   # (B·H, ·, L)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        H = attn.heads
        q, k, v = (attn.head_to_batch_dim(f(hidden_states)).unflatten(0, (B, H))
                   for f in (attn.to_q, attn.to_k, attn.to_v))              # (B, H, L, d)
        mask = None if attention_mask is None else attention_mask.unflatten(0, (B, H))
        heads = []
        for h in range(H):
            probs = attn.get_attention_scores(q[:, h], k[:, h],
                                              None if mask is None else mask[:, h])  # (B, L, L)
            if h in self.capture.heads:
                self.capture.take(self.name, h, probs, v[:, h])
            heads.append(torch.bmm(probs, v[:, h]))
            del probs
        hidden_states = attn.batch_to_head_dim(torch.stack(heads, dim=1).flatten(0, 1))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))       # proj, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


#################################################################################
#                                    Analysis                                   #
#################################################################################

def describe(model: nn.Module, call: ModelCall, factor: int = VAE_SPATIAL) -> dict:
    """The shape columns of a model call's rows: model, checkpoint and weights ('untrained'
    unless the caller's meta says otherwise), resolution in pixels (`factor` pixels per input
    pixel: the VAE's 8, or 1 in pixel space), latent frames, tokens, batch."""
    x = call.x
    H, W = x.shape[-2:]
    name = getattr(model, "name", None) or type(model).__name__
    return {"model": name, "checkpoint": "untrained", "weights": "untrained",
            "resolution": H * factor if H == W else f"{H * factor}x{W * factor}",
            "latent_frames": x.shape[2] if x.dim() == 5 else 1,
            "tokens": prod(_token_grid(x, _patch_size(model))), "batch": x.shape[0]}


def analyse(model: nn.Module, calls: Iterable[ModelCall], *, windows: Iterable | None = None,
            layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            steps: Iterable[int] | None = None, keep_maps: bool = False, meta: dict | None = None,
            max_pairs: int | None = DEFAULT_MAX_PAIRS, max_distance: int | None = None,
            edge_margin=None, seed: int = 0, headwise: bool = False,
            factor: int = VAE_SPATIAL) -> tuple[list[dict], list[AttentionMap]]:
    """Runs `calls` through `model` and returns (tidy rows, kept maps): the window statistics of
    its self-attention per kind, layer, head, step, timestep and branch (window_similarity's
    metrics and row schema). `windows`: sides, (h, w) or (f, h, w) in tokens (None: 2, 4, 8, 16;
    those not dividing the grid are skipped with a warning); `layers`, `heads`, `steps`: subsets
    (None: all; calls of other steps are not run); `meta` overrides the describe() columns
    (model, checkpoint, weights, …); `max_pairs`, `max_distance`, `edge_margin`, `seed`: the
    pair plan (window_similarity.plan); `headwise`: see the module docstring; `factor`: pixels
    per input pixel (describe). Every forward pass ends after the last analysed layer. All
    calls must share one latent shape."""
    first = None
    steps = None if steps is None else set(steps)
    with Capture(model, windows=windows, layers=layers, heads=heads, keep_maps=keep_maps,
                 max_pairs=max_pairs, max_distance=max_distance, edge_margin=edge_margin,
                 seed=seed, headwise=headwise, stop_early=True) as capture:
        for call in calls:
            if steps is None or call.step in steps:
                first = first or call
                capture.run(call)
    if first is None:
        raise ValueError("no model calls to analyse")
    return (to_rows(capture.stats, {**describe(model, first, factor), **(meta or {})}),
            capture.maps)


__all__ = ["ANALYSED_KINDS", "Capture", "analyse", "describe"]
