"""Distance sensitivities of the HIP-NN family."""

from __future__ import annotations

import math

import torch
from torch import nn


class CosineCutoff(nn.Module):
    """φ(r) = cos²(π r / 2 r_c) for r < r_c, else 0: value and slope vanish at r_c."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        phi = torch.cos((0.5 * math.pi / self.cutoff) * r).square()
        return torch.where(r < self.cutoff, phi, 0.0)

    def derivative(self, r: torch.Tensor) -> torch.Tensor:
        """dφ/dr = −(π/2r_c) sin(π r / r_c) inside the cutoff (Å⁻¹)."""
        a = 0.5 * math.pi / self.cutoff
        return torch.where(r < self.cutoff, torch.sin((2 * a) * r) * -a, 0.0)


class InverseSensitivity(nn.Module):
    """s_ν(r) = exp(−(1/r − 1/μ_ν)² / (2σ_ν²)) · φ_cut(r), ν = 1..n.

    Learned μ (Å) spread evenly in 1/r between `soft_min` and `soft_max`; learned 1/σ
    (stored as `inv_sigma`, Å, initialised as hippynn does).

    The layers of a network share r, so the forward takes 1/r and φ_cut(r), computed once:
    inv_r (P, 1) Å⁻¹ and cut (P, 1)  ->  (P, n).
    """

    def __init__(self, n: int, soft_min: float, soft_max: float, cutoff: float) -> None:
        super().__init__()
        inv_mu = torch.linspace(1.0 / soft_max, 1.0 / soft_min, n)
        self.inv_mu = nn.Parameter(inv_mu.unsqueeze(0))
        self.inv_sigma = nn.Parameter(torch.full((1, n), 2.0 * n * soft_min))
        self.cutoff = float(cutoff)

    def forward(self, inv_r: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        return self.parts(inv_r, cut)[0]

    def parts(self, inv_r: torch.Tensor, cut: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(s, g, d, scale): s = g·φ_cut, g = exp(−d²), d = (1/r − 1/μ)·scale, scale = 1/(√2σ)."""
        # (1/r − 1/μ)/(√2 σ) as one fused op: √½σ⁻¹ · 1/r − √½σ⁻¹/μ
        scale = self.inv_sigma * math.sqrt(0.5)
        d = torch.addcmul(-self.inv_mu * scale, inv_r, scale)
        # exact zeros where exp underflows (denormal floats slow CPU matmuls ~10x):
        # exp(−∞) where the exponent is below −60
        g = torch.exp(nn.functional.threshold(d.square().neg(), -60.0, -math.inf))
        return g * cut, g, d, scale

    @staticmethod
    def radial_derivative(parts: tuple[torch.Tensor, ...], inv_r: torch.Tensor, cut: torch.Tensor,
                          dcut: torch.Tensor) -> torch.Tensor:
        """ds/dr (P, n) from `parts`: g·(2·d·scale·φ/r² + φ')."""
        _, g, d, scale = parts
        return g * torch.addcmul(dcut, d * scale, (2.0 * inv_r.square()) * cut)
