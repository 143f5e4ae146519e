"""An ACE-style descriptor basis in Cartesian form, and its pruning to a functionally
independent subset.

Atomic base A (`moments.atomic_base`): per channel c = (neighbour element m, radial function ν)
the moment tensors A^l_ic of orders l = 0..l_max. Basis B: every rotation invariant made of
1..max_correlation factors A^l_c, i.e. the connected contraction multigraphs whose nodes are
the tensor types (c, l) (`polyfid.invariants`), optionally truncated by an ACE-style total
degree Σ (ν + l) ≤ max_degree. Correlation order k (k factors) gives (k + 1)-body functions.

Pruning: the Jacobian of B with respect to the coordinates of all A tensors (Σ_c Σ_l (2l + 1)
of them) at random points, and the greedy rank selection of `polyfid.invariants.select`; at
most (coordinates − 3) functions survive. `ACEBasis.__call__` evaluates a basis on structures,
batched by graph shape: one broadcast contraction per shape for all its channel choices.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from polyfid.descriptors.moments import InverseGaussianRadial, Radial, _symbol, atomic_base
from polyfid.invariants import (
    Contraction,
    Selection,
    TensorType,
    enumerate_contractions,
    random_points,
    select_independent,
)


def _contract(ops: list[tuple[torch.Tensor, str]]) -> torch.Tensor:
    """Full contraction of tensors shaped (N, 3, ..., 3, G) with index letters for the 3-axes;
    letters shared by two factors are summed. Pairwise broadcast products and sums, not einsum:
    einsum would batch N·G tiny matrices through bmm, slow on CPU (twice more in force training).
    """
    x, lx = ops[0]
    for y, ly in ops[1:]:
        union = lx + "".join(c for c in ly if c not in lx)
        xa = x.reshape(x.shape[:1] + x.shape[1:-1] + (1,) * (len(union) - len(lx)) + x.shape[-1:])
        perm = [0] + [1 + ly.index(c) for c in union if c in ly] + [len(ly) + 1]
        yt = y.permute(perm)
        # put y's axes in union order, with singleton axes for letters it lacks
        shape = [y.shape[0]] + [3 if c in ly else 1 for c in union] + [y.shape[-1]]
        ya = yt.reshape(shape)
        prod = xa * ya
        shared = [1 + union.index(c) for c in ly if c in lx]
        x = prod.sum(dim=shared) if shared else prod
        lx = "".join(c for c in union if not (c in lx and c in ly))
    return x  # (N, G) once every letter is paired


@dataclass
class ACEBasis:
    """A (possibly pruned) Cartesian ACE basis.

    elements: atomic numbers of the neighbour-element channels; radial: r (P,) Å -> (P, n_radial);
    l_max ≤ 3; max_correlation: most A factors per function (≤ 4 gives up to 5-body functions);
    max_degree: keep functions with Σ (ν + l) ≤ max_degree over their factors (None: no limit).
    """

    elements: list[int]
    radial: Radial = field(default_factory=InverseGaussianRadial)
    l_max: int = 2
    max_correlation: int = 4
    max_degree: int | None = None
    functions: list[Contraction] | None = None
    #: the greedy decisions that produced this basis, when it comes from `prune`
    selection: Selection | None = None

    def __post_init__(self) -> None:
        self.elements = [int(z) for z in self.elements]
        self.n_radial = int(self.radial(torch.tensor([1.0], dtype=torch.float64)).shape[1])
        self.types = [TensorType(f"{_symbol(z)}{nu}{'svQT'[l_]}", l_)
                      for z in self.elements for nu in range(self.n_radial) for l_ in range(self.l_max + 1)]
        if self.functions is None:
            self.functions = [c for c in enumerate_contractions(self.types, self.max_correlation)
                              if self.max_degree is None or self.degree(c) <= self.max_degree]
        self._groups = self._group()

    # type t = (channel c, order l) with c = element block · n_radial + ν
    def _channel(self, t: int) -> int:
        return t // (self.l_max + 1)

    def _order(self, t: int) -> int:
        return t % (self.l_max + 1)

    def degree(self, c: Contraction) -> int:
        return sum(self._channel(t) % self.n_radial + self._order(t) for t in c.nodes)

    @property
    def n_functions(self) -> int:
        return len(self.functions)

    @property
    def n_coordinates(self) -> int:
        return len(self.elements) * self.n_radial * sum(2 * l_ + 1 for l_ in range(self.l_max + 1))

    def names(self) -> list[str]:
        return [c.name(self.types) for c in self.functions]

    def body_orders(self) -> dict[int, int]:
        """{body order (factors + 1): number of functions}."""
        return dict(sorted(Counter(c.n_tensors + 1 for c in self.functions).items()))

    def prune(self, n_points: int = 2, seed: int = 0, tol: float = 1e-8) -> ACEBasis:
        """The functionally independent subset (greedy Jacobian rank on the A coordinates)."""
        sel = select_independent(self.functions, self.types, random_points(self.types, n_points, seed), tol)
        return ACEBasis(self.elements, self.radial, self.l_max, self.max_correlation, self.max_degree,
                        [self.functions[i] for i in sel.selected], sel)

    def _group(self) -> list[tuple[list[int], list[int], list[str], torch.Tensor]]:
        """Functions of one graph shape (orders of the factors in node order, and edges),
        evaluated together: (function indices, orders, subscripts, channels (factors, G))."""
        shapes: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.functions):
            shapes.setdefault((tuple(self._order(t) for t in c.nodes), c.edges), []).append(k)
        groups = []
        for (orders, _), members in shapes.items():
            subs = self.functions[members[0]].subscripts()
            chans = torch.tensor([[self._channel(t) for t in self.functions[k].nodes] for k in members]).T
            groups.append((members, list(orders), subs, chans))
        return groups

    def __call__(self, positions: torch.Tensor, species: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor,
                 shifts: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3) Å positions, (N,) atomic numbers, (P,) directed pairs  ->  (N, n_functions),
        column order = `functions`."""
        base = atomic_base(positions, species, pair_i, pair_j, self.radial, self.elements, self.l_max, shifts)
        out = positions.new_zeros(positions.shape[0], self.n_functions)
        cols = []
        for members, orders, subs, chans in self._groups:
            ops = [(base[o].index_select(-1, chans[f].to(positions.device)), subs[f]) for f, o in enumerate(orders)]
            cols.append((members, _contract(ops)))
        index = torch.tensor([k for members, _ in cols for k in members], device=positions.device)
        values = torch.cat([v for _, v in cols], dim=1)
        return out.index_copy(1, index, values)


def ace_counts(basis: ACEBasis, pruned: ACEBasis) -> dict[str, object]:
    """Descriptor counts per body order before and after pruning, and the rank evidence."""
    sel = pruned.selection
    return {
        "coordinates": basis.n_coordinates, "max_rank": basis.n_coordinates - 3,
        "full": basis.n_functions, "pruned": pruned.n_functions,
        "full_by_body_order": basis.body_orders(), "pruned_by_body_order": pruned.body_orders(),
        "smallest_kept": None if sel is None else sel.smallest_kept,
        "largest_rejected": None if sel is None else sel.largest_rejected,
    }

