"""Per-atom descriptors of atomic environments, differentiable in the positions (torch).

`atomic_base` builds the ACE-like Cartesian atomic base (radial × neighbour-element channels,
tensor orders l = 0..3); `MomentInvariants` turns it into the pruned set of rotation invariants
per channel (DESIGN.md, "Descriptor pruning")."""

from polyfid.descriptors.moments import (
    BesselRadial,
    InverseGaussianRadial,
    MomentInvariants,
    atomic_base,
    cosine_cutoff,
    element_index,
    normalise_invariants,
)

__all__ = ["BesselRadial", "InverseGaussianRadial", "MomentInvariants", "atomic_base", "cosine_cutoff",
           "element_index", "normalise_invariants"]
