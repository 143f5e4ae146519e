"""Residual wrapper and activations shared by the networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"softplus": nn.Softplus, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (softplus, silu, tanh, gelu)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def activation_derivative(act: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """f'(h) for the activations with a cheap closed form (None: use autograd)."""
    if isinstance(act, nn.Softplus) and act.beta == 1:
        return torch.sigmoid(h)
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    if isinstance(act, nn.Tanh):
        return 1.0 - torch.tanh(h).square()
    return None


class Residual(nn.Module):
    """y = W_res · act(base(x, ...)) + A x, with A the identity when sizes agree (hippynn's
    ResNetWrapper). `base` maps n_in -> n_mid features (N, n_mid)."""

    def __init__(self, base: nn.Module, n_in: int, n_mid: int, n_out: int, act: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.act = act
        self.res = nn.Linear(n_mid, n_out)
        self.adjust = nn.Linear(n_in, n_out, bias=False) if n_in != n_out else None

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return self.around(x, self.act(self.base(x, *args)))

    def around(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A x + W_res h + b, given h = act(base(x))."""
        skip = x if self.adjust is None else F.linear(x, self.adjust.weight)
        # (A x + b) + h Wᵀ with the gemm accumulating into the sum: one pass less over y
        return (skip + self.res.bias).addmm_(h, self.res.weight.t())

    def backward_around(self, gy: torch.Tensor, act_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Given dE/dy and f'(base pre-activation): (dE/dx through the skip, dE/d(pre-activation))."""
        gx = gy if self.adjust is None else gy @ self.adjust.weight
        return gx, (gy @ self.res.weight) * act_grad


class AtomLinear(nn.Linear):
    """Linear on-site layer, xavier-normal initialised (the HIP-NN atom layer)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        nn.init.xavier_normal_(self.weight)
