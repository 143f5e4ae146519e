"""Rotation invariants of Cartesian tensors as contraction multigraphs.

A full contraction of symmetric traceless tensors is a multigraph: one node per tensor factor,
labelled by the tensor's type, with as many edge ends as the tensor's order; an edge is one
summed index shared by two factors. Loops are absent (a traced index of a traceless tensor
gives zero), disconnected graphs are products of smaller invariants (functionally dependent by
construction), and isomorphic graphs (relabelling factors of the same type) are the same
polynomial. So the candidates are the connected, loop-free multigraphs up to label-preserving
isomorphism, one per degree sequence. A scalar (order 0) is its own one-node invariant.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from string import ascii_lowercase

from polyfid.errors import ConfigError


@dataclass(frozen=True)
class TensorType:
    """One symmetric traceless tensor the invariants are built from: a name and its order l."""

    name: str
    order: int


@dataclass(frozen=True)
class Contraction:
    """A connected contraction multigraph.

    nodes: the tensor type (index into the type list) of each factor, sorted;
    edges: ((a, b), multiplicity) for node pairs a < b sharing `multiplicity` indices.
    """

    nodes: tuple[int, ...]
    edges: tuple[tuple[tuple[int, int], int], ...]

    @property
    def n_tensors(self) -> int:
        return len(self.nodes)

    def subscripts(self) -> list[str]:
        """einsum subscripts of each factor (one letter per shared index)."""
        subs = [""] * len(self.nodes)
        letters = iter(ascii_lowercase)
        for (a, b), m in self.edges:
            for _ in range(m):
                c = next(letters)
                subs[a] += c
                subs[b] += c
        return subs

    def einsum(self) -> str:
        return ",".join(self.subscripts()) + "->"

    def name(self, types: list[TensorType]) -> str:
        """Index notation, e.g. ``v_a Q_ab v_b``; summation over repeated indices."""
        return " ".join(types[t].name + (f"_{s}" if s else "") for t, s in zip(self.nodes, self.subscripts()))


def _canonical(nodes: tuple[int, ...], adj: dict[tuple[int, int], int]) -> tuple:
    """The smallest edge list over all permutations of nodes that keep every node's type."""
    n = len(nodes)
    groups = [[i for i in range(n) if nodes[i] == t] for t in sorted(set(nodes))]
    best = None
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        where = {}
        for g, p in zip(groups, perms):
            where.update(zip(g, p))
        key = tuple(sorted((tuple(sorted((where[a], where[b]))), m) for (a, b), m in adj.items()))
        if best is None or key < best:
            best = key
    return best


def _connected(n: int, adj: dict[tuple[int, int], int]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        a = todo.pop()
        for (i, j) in adj:
            for x, y in ((i, j), (j, i)):
                if x == a and y not in seen:
                    seen.add(y)
                    todo.append(y)
    return len(seen) == n


def _adjacencies(degrees: list[int]):
    """Every symmetric loop-free integer matrix with the given row sums (as {(a, b): m}, a < b)."""
    n = len(degrees)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    left = list(degrees)

    def fill(k: int, adj: dict):
        if k == len(pairs):
            if not any(left):
                yield dict(adj)
            return
        a, b = pairs[k]
        # pairs are ordered by a: once past node a's last pair, its degree must be used up
        if b == a + 1 and any(left[i] for i in range(a)):
            return
        for m in range(min(left[a], left[b]), -1, -1):
            left[a] -= m
            left[b] -= m
            if m:
                adj[(a, b)] = m
            yield from fill(k + 1, adj)
            adj.pop((a, b), None)
            left[a] += m
            left[b] += m

    yield from fill(0, {})


def _multisets(types: list[TensorType], n: int):
    """Type multisets of n factors that can form a connected loop-free contraction."""
    for combo in itertools.combinations_with_replacement(range(len(types)), n):
        orders = [types[t].order for t in combo]
        if n == 1:
            if orders[0] == 0:
                yield combo
            continue
        # connected: no scalar factor; loop-free: no order exceeds the sum of the others
        if 0 in orders or sum(orders) % 2 or 2 * max(orders) > sum(orders):
            continue
        yield combo


def enumerate_contractions(types: list[TensorType], max_tensors: int) -> list[Contraction]:
    """All connected contraction multigraphs of 1..max_tensors factors, one per isomorphism class.

    Ordered by number of factors, then total order, then canonical form (the greedy selection
    prefers the cheapest invariants).
    """
    found: dict[tuple, Contraction] = {}
    for n in range(1, max_tensors + 1):
        for combo in _multisets(types, n):
            for adj in _adjacencies([types[t].order for t in combo]):
                if not _connected(n, adj):
                    continue
                key = (combo, _canonical(combo, adj))
                if key not in found:
                    found[key] = Contraction(combo, key[1])
    return sorted(found.values(), key=lambda c: (c.n_tensors, sum(types[t].order for t in c.nodes), c.nodes, c.edges))


def parse_contraction(text: str, types: list[TensorType]) -> Contraction:
    """Index notation (``"v_a Q_ab v_b"``, summation over repeated indices) -> its canonical graph.

    Every index must occur exactly twice, on two different factors (a trace of a traceless
    tensor vanishes), and each factor must carry as many indices as its order.
    """
    by_name = {t.name: i for i, t in enumerate(types)}
    factors = []
    for token in text.split():
        name, _, idx = token.partition("_")
        if name not in by_name:
            raise ConfigError(f"{text!r}: unknown tensor {name!r}; expected one of {sorted(by_name)}")
        order = types[by_name[name]].order
        if len(idx) != order:
            raise ConfigError(f"{text!r}: {token!r} has {len(idx)} indices, {name} has order {order}")
        factors.append((by_name[name], idx))
    if not factors:
        raise ConfigError("empty contraction")
    order = sorted(range(len(factors)), key=lambda k: factors[k][0])
    nodes = tuple(factors[k][0] for k in order)
    where: dict[str, list[int]] = {}
    for pos, k in enumerate(order):
        for c in factors[k][1]:
            where.setdefault(c, []).append(pos)
    adj: dict[tuple[int, int], int] = {}
    for c, at in where.items():
        if len(at) != 2 or at[0] == at[1]:
            raise ConfigError(f"{text!r}: index {c!r} must appear exactly twice, on two different factors")
        key = (min(at), max(at))
        adj[key] = adj.get(key, 0) + 1
    if not _connected(len(nodes), adj):
        raise ConfigError(f"{text!r} is a product of smaller invariants (its graph is disconnected)")
    return Contraction(nodes, _canonical(nodes, adj))


def brute_force_count(types: list[TensorType], max_tensors: int) -> int:
    """Independent count for tests: pair up index slots in every possible way (perfect
    matchings of the edge ends), drop loops and disconnected graphs, and identify graphs by
    trying every type-preserving relabelling against all graphs seen so far."""
    count = 0
    for n in range(1, max_tensors + 1):
        for combo in itertools.combinations_with_replacement(range(len(types)), n):
            stubs = [i for i, t in enumerate(combo) for _ in range(types[t].order)]
            seen: list[dict] = []
            for matching in _matchings(stubs):
                if any(a == b for a, b in matching):
                    continue
                adj: dict[tuple[int, int], int] = {}
                for a, b in matching:
                    key = (min(a, b), max(a, b))
                    adj[key] = adj.get(key, 0) + 1
                if not _connected(n, adj):
                    continue
                if not any(_isomorphic(combo, adj, other) for other in seen):
                    seen.append(adj)
            count += len(seen)
    return count


def _matchings(stubs: list[int]):
    if not stubs:
        yield []
        return
    first, rest = stubs[0], stubs[1:]
    for k in range(len(rest)):
        for m in _matchings(rest[:k] + rest[k + 1:]):
            yield [(first, rest[k])] + m


def _isomorphic(nodes: tuple[int, ...], a: dict, b: dict) -> bool:
    n = len(nodes)
    for perm in itertools.permutations(range(n)):
        if any(nodes[perm[i]] != nodes[i] for i in range(n)):
            continue
        mapped = {}
        for (i, j), m in a.items():
            key = (min(perm[i], perm[j]), max(perm[i], perm[j]))
            mapped[key] = m
        if mapped == b:
            return True
    return False
