"""ZOO-Prune: zeroth-order projector sensitivity plus diversity, for VLM visual tokens (Kim et
al., arXiv 2509.24837; docs/methods.md section 5)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.methods.base import require
from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    ProjectorForm,
    VisualGeometry,
    VisualMethod,
    VisualSignal,
    VisualTokens,
    projector_form,
)
from tokcomp.ops import cosine_distances, greedy_maxmin

#: Elements (tokens x directions x hidden width) evaluated at once: 16 tokens at LLaVA size,
#: enough rows for the second layer's matmul to amortise reading its weight (one token at a
#: time made the exact path 1.6-2x slower on the CPU), small enough to bound memory.
_CHUNK_ELEMENTS = 1 << 22
#: The precisions of the MLP path's second-layer product (see ZOOPrune.precision).
PRECISIONS = ("auto", "float32", "bfloat16")
#: The largest perturbation of a pre-activation for which the bfloat16 MLP path linearises
#: the activation's central difference: act(z + d) - act(z - d) = 2 d act'(z) + (d^3 / 3)
#: act'''(z) + ..., the cubic term at most 2.7e-7 here for GELU, about the float32
#: rounding of act(z +- d) itself.
_LINEAR_STEP = 1e-2
#: The step of the float64 central difference that gives an elementwise activation's slope
#: act'(z) (rounding and truncation both near 1e-9).
_SLOPE_STEP = 1e-4


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware, faster than float32 (CPU:
    AVX512-BF16 or AMX; CUDA: compute capability 8.0 and up)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def unit_directions(count: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """(count, width) float32 directions u ~ N(0, I) / ||.||, drawn on the CPU from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, width, generator=generator), dim=-1).to(device)


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row of (B, N) `scores` to [0, 1]; a constant row becomes ones
    (no token is more sensitive than another)."""
    low = scores.amin(dim=1, keepdim=True)
    span = scores.amax(dim=1, keepdim=True) - low
    return torch.where(
        span > 0, (scores - low) / span.clamp_min(torch.finfo(scores.dtype).tiny), 1.0
    )


@register
@dataclass(kw_only=True)
class ZOOPrune(VisualMethod):
    """Sensitivity-aware diverse selection of `keep` visual tokens per image.

    Sensitivity S_i = (1/m) sum_j ||P(x_i + h u_j) - P(x_i - h u_j)|| / (2h) through the
    projector P only, with m = `directions` unit directions shared by all tokens (drawn from
    `seed`) and h = `step`; s = min-max normalised S. Then greedy max-min on D = 1 - cosine of
    the projector outputs with weights s, first pick argmax s (ops.greedy_maxmin).

    Cost: for an MLP projector (Linear, activation, Linear) the first layer's response is exact
    from W1 x and W1 u computed once, (W1 x + b1) +/- h W1 u; per direction only the
    activation and the second layer remain, and the second layer is applied to the difference
    of the activations (its bias cancels). `sketch=r` replaces the output norm by the norm of
    a seeded Gaussian projection to r dimensions (Johnson-Lindenstrauss), so the second layer
    costs r instead of D columns per direction; eval/bench_vlm.py measures its agreement with
    the exact scores. A single Linear projector has the same sensitivity mean_j ||W u_j|| for
    every token (s = 1, plain max-min diversity). Any other projector (e.g. one with a
    normalisation inside) takes the general path: all 2*m*N perturbed rows through P, batched
    (correct, about 2m times the projector's cost). The MLP path computes its first layer in
    float32 and its second-layer product in `precision` ("auto": bfloat16 where the device
    multiplies bfloat16 natively, float32 elsewhere; see product_dtype); the general path runs
    in the projector's dtype.
    """

    name: ClassVar[str] = "zoo"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.FEATURES})

    keep: int | float = 64

    directions: int = 64
    step: float = 0.01
    seed: int = 0
    sketch: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.name, "directions", self.directions, self.directions >= 1, "an int >= 1")
        require(self.name, "step", self.step, 0 < self.step < math.inf, "a finite number > 0")
        sketch = self.sketch
        require(self.name, "sketch", sketch, sketch is None or sketch >= 1, "None or an int >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"zoo: precision is one of {PRECISIONS}, got {self.precision!r}")

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        return self.choose(visual, self.sensitivity(visual), keep)

    def choose(self, visual: VisualTokens, sensitivity: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` tokens picked by sensitivity-weighted max-min given (B, N) sensitivities."""
        weight = minmax(sensitivity)
        dist = cosine_distances(visual.outputs)
        return greedy_maxmin(dist, weight, weight.argmax(dim=1), keep).sort(dim=1).values

    def sensitivity(self, visual: VisualTokens) -> torch.Tensor:
        """(B, N) float32 finite-difference sensitivity S of every token to the projector."""
        x = visual.features
        u = unit_directions(self.directions, x.shape[-1], self.seed, x.device)
        chain = visual.projector
        form = projector_form(chain)
        if form is ProjectorForm.LINEAR:
            norms = (u @ chain[0].weight.float().T).norm(dim=-1).mean()
            return norms.expand(x.shape[:2]).clone()
        if form is ProjectorForm.MLP:
            return self._mlp_sensitivity(x, chain[0], chain[1], chain[2], u)
        return self._general_sensitivity(visual, u)

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The sensitivity pass of the projector's form, plus the N x N cosine distances."""
        distances = tokens * tokens * geometry.output_width
        return self.sensitivity_macs(geometry, tokens) + distances

    def sensitivity_macs(self, geometry: VisualGeometry, tokens: int) -> int:
        """MACs of `sensitivity` for `tokens` tokens. Single Linear: the directions through it.
        MLP: W1 x, W1 u, the sketch matrix times W2 (sketched only), and per token and
        direction the activation difference through W2's (or the sketch's) rows. Otherwise:
        2 x directions x tokens rows through the projector."""
        m, form = self.directions, geometry.projector_form
        if form is ProjectorForm.LINEAR:
            features, width = geometry.projector_widths
            return m * features * width
        if form is ProjectorForm.OTHER:
            return 2 * m * tokens * geometry.projector_token_macs
        features, hidden, width = geometry.projector_widths
        rows = width if self.sketch is None or self.sketch >= width else self.sketch
        sketch = rows * width * hidden if rows < width else 0
        return (tokens + m) * features * hidden + sketch + tokens * m * hidden * rows

    def _mlp_sensitivity(
        self, x: torch.Tensor, first: nn.Linear, act: nn.Module, second: nn.Linear, u: torch.Tensor
    ) -> torch.Tensor:
        weight = second.weight.float()
        if self.sketch is not None and self.sketch < weight.shape[0]:
            weight = self._sketch_matrix(weight) @ weight
        weight = weight.to(self.product_dtype(x.device))
        base = _linear32(first, x).flatten(0, 1)
        delta = self.step * (u @ first.weight.float().T)
        fast = weight.dtype == torch.bfloat16
        differences = _linearised if fast and _linearisable(act, delta) else _differences
        rows = max(1, _CHUNK_ELEMENTS // (self.directions * delta.shape[1]))
        scores = [_mean_norms(differences(z, delta, act), weight) for z in base.split(rows)]
        return torch.cat(scores).view(x.shape[:2]) / (2 * self.step)

    def product_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the MLP path's second-layer product on `device` (`precision`;
        bfloat16 is the fast path)."""
        if self.precision == "auto":
            return torch.bfloat16 if native_bfloat16(device) else torch.float32
        return getattr(torch, self.precision)

    def _sketch_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """(r, D) Gaussian matrix with entries N(0, 1/r): ||R y|| estimates ||y||."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        sketch = torch.randn(self.sketch, weight.shape[0], generator=generator) / self.sketch**0.5
        return sketch.to(weight.device)

    def _general_sensitivity(self, visual: VisualTokens, u: torch.Tensor) -> torch.Tensor:
        x = visual.features
        delta = (self.step * u).to(x.dtype)
        tokens = x.flatten(0, 1)
        rows = max(1, _CHUNK_ELEMENTS // (self.directions * x.shape[-1]))
        scores = []
        for chunk in tokens.split(rows):
            shifted = torch.cat([chunk[:, None] + delta, chunk[:, None] - delta])
            out = visual.project(shifted).float()
            plus, minus = out.chunk(2)
            scores.append((plus - minus).norm(dim=-1).mean(dim=1))
        return torch.cat(scores).view(x.shape[:2]) / (2 * self.step)


def _differences(z: torch.Tensor, delta: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """(T, m, H) act(z + d) - act(z - d) for (T, H) pre-activations z and (m, H) steps d."""
    z = z[:, None, :]
    diff = act(z + delta)
    diff -= act(z - delta)
    return diff


def _linearised(z: torch.Tensor, delta: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """`_differences` to first order for an elementwise activation: 2 d act'(z), the slope
    act'(z) from one float64 central difference per token and feature."""
    wide = z.double()
    slope = (act(wide + _SLOPE_STEP) - act(wide - _SLOPE_STEP)) / (2 * _SLOPE_STEP)
    return slope.float()[:, None, :] * (2 * delta)


def _linearisable(act: nn.Module, delta: torch.Tensor) -> bool:
    """Whether `_linearised` stands for `_differences`: small steps, elementwise activation."""
    return bool(delta.abs().max() <= _LINEAR_STEP) and elementwise(
        act, delta.shape[1], delta.device
    )


def elementwise(act: nn.Module, width: int, device: torch.device) -> bool:
    """Whether `act` acts on each of `width` features alone, with one function for all (as
    GELU or SiLU; not a normalisation): checked on a seeded probe, by shifting one feature
    and by permuting them (up to float rounding: vectorised and scalar code paths of one
    function may differ in the last bit)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, width, generator=generator).to(device)
    out = act(probe)
    shifted = probe.clone()
    shifted[:, 0] += 10.0
    order = torch.randperm(width, generator=generator).to(device)
    same_elsewhere = torch.allclose(act(shifted)[:, 1:], out[:, 1:], rtol=1e-6, atol=1e-7)
    return same_elsewhere and torch.allclose(
        act(probe[:, order]), out[:, order], rtol=1e-6, atol=1e-7
    )


def _mean_norms(diff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T,) mean over directions of ||W diff|| for (T, m, H) differences: the product in W's
    dtype, the norms accumulated in float32."""
    product = diff.to(weight.dtype) @ weight.T
    return torch.linalg.vector_norm(product, dim=-1, dtype=torch.float32).mean(dim=1)


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied in float32 (a no-op cast for float32 models)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)
