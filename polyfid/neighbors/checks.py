"""Geometry checks at the door of every neighbour list.

vesin, the neighbour-list library, kills the process with SIGFPE (no Python exception) on a
non-periodic box wider than about 1e5 Å, or a NaN cell, and hangs on a slab whose atoms lie far
along its open direction; coincident atoms pass it but turn every weight of a network into NaN
at the first optimiser step. So positions and cell are checked before vesin is called
(`check_before`), and the shortest pair distance from the list it returns (`check_pairs`: one
reduction over distances vesin computes anyway). `check_geometry` runs both on one frame.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from polyfid.errors import GeometryError

#: Å; default of data.min_distance: closer atoms are refused
MIN_DISTANCE = 0.1
#: Å; default of data.max_extent: atoms spanning more along x, y or z are refused
MAX_EXTENT = 1000.0
#: Å; spans above this are refused whatever max_extent says: vesin crashes (SIGFPE) from
#: about 1e5 Å (less for cutoffs below 1 Å), and float32 positions there are 0.01 Å coarse
SAFE_EXTENT = 2e4
#: Å³; periodic cells with |det| below this are singular
MIN_CELL_VOLUME = 1e-6
_AXES = "xyz"


def _atom(k: int, numbers: np.ndarray | None) -> str:
    """'atom 3 (O)', or 'atom 3' without atomic numbers."""
    if numbers is None:
        return f"atom {k}"
    from ase.data import chemical_symbols

    z = int(numbers[k])
    return f"atom {k} ({chemical_symbols[z] if 0 < z < len(chemical_symbols) else z})"


def completed_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell (3, 3) Å with each open direction's row (often left zero by ASE: graphene, a
    nanotube) replaced by a unit vector orthogonal to the periodic rows: a basis of space whose
    periodic rows are the lattice vectors."""
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.all():
        return cell
    full = cell.copy()
    per = cell[pbc]
    # the right-singular vectors beyond the periodic rows' rank span their orthogonal complement
    _, _, vt = np.linalg.svd(per if len(per) else np.zeros((1, 3)))
    full[~pbc] = vt[len(per):][: int((~pbc).sum())]
    return full


def periodic_measure(cell: np.ndarray, pbc: np.ndarray) -> float:
    """Length (1 periodic direction, Å), area (2, Å²) or volume (3, Å³) the periodic lattice
    vectors span: sqrt of the Gram determinant of cell[pbc]. Zero when they are dependent."""
    per = np.asarray(cell, dtype=np.float64)[np.asarray(pbc, dtype=bool)]
    return float(np.sqrt(max(np.linalg.det(per @ per.T), 0.0)))


def wrap(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, 3) Å wrapped into the cell (3, 3) Å along the periodic directions, and the
    integer cell offsets (N, 3) taken off: positions = wrapped + offsets @ cell. What is left
    of a frame's span is its width along the open directions, which is what vesin grids."""
    frac = np.linalg.solve(completed_cell(cell, pbc).T, positions.T).T  # rows of cell are lattice vectors
    offsets = np.where(np.asarray(pbc, dtype=bool), np.floor(frac), 0.0)
    return positions - offsets @ cell, offsets.astype(np.int64)


def check_before(
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    max_extent: float = MAX_EXTENT,
    where: str = "frame",
    numbers: np.ndarray | None = None,
) -> np.ndarray | None:
    """Refuse, before any neighbour list is built, a frame vesin would crash on or that no
    potential should see: non-finite positions (N, 3) Å; for periodic frames a non-finite or
    singular cell (3, 3) Å (its periodic lattice vectors spanning less than 1e-6 Å, Å² or Å³);
    atoms spanning more than `max_extent` Å (capped at SAFE_EXTENT) along x, y or z (for periodic
    frames, after wrapping the periodic directions).

    Returns None, or for a periodic frame whose atoms lie far outside its cell (an unwrapped MD
    trajectory) the cell offsets (N, 3) of `wrap`: the neighbour list is then built on the
    wrapped positions. Raises GeometryError naming `where` (a file:index or "frame k"), the
    atoms and the option. Cheap when the frame is fine: one min and one max over the positions
    (plus a 3x3 determinant for periodic frames)."""
    limit = min(max_extent, SAFE_EXTENT)
    periodic = pbc is not None and bool(np.any(pbc))
    if not periodic and positions.size:
        # the fast path, a few µs per frame matter over 1e5 frames: the span over all coordinates
        # bounds each axis's; NaN compares False and inf - x is inf or NaN, so only finite
        # positions pass
        if positions.max() - positions.min() <= limit:
            return None
    if periodic:
        if cell is None:
            raise GeometryError(f"{where}: periodic boundaries {np.asarray(pbc).tolist()} but no cell")
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        if not np.all(np.isfinite(cell)):
            raise GeometryError(f"{where}: the cell contains NaN or inf: {cell.tolist()}")
        # only the periodic lattice vectors must be independent: an open direction's row may be
        # zero (ASE's graphene, nanotubes, slabs without vacuum)
        n_per = int(np.count_nonzero(pbc))
        measure = periodic_measure(cell, pbc)
        if measure < MIN_CELL_VOLUME:
            what = {1: "length", 2: "area", 3: "volume"}[n_per]
            raise GeometryError(f"{where}: the periodic cell is singular ({what} {measure:.3g} Å^{n_per} spanned by "
                                f"the periodic lattice vectors of {cell.tolist()}, pbc {np.asarray(pbc).tolist()})")
    if positions.shape[0] == 0:
        return None
    span = positions.max(0) - positions.min(0)
    if bool(np.all(span <= limit)):
        return None
    bad = ~np.isfinite(positions)
    if bad.any():
        k, ax = (int(v) for v in np.argwhere(bad)[0])
        raise GeometryError(f"{where}: {_atom(k, numbers)} has a non-finite position "
                            f"({_AXES[ax]} = {positions[k, ax]})")
    pos, offsets = wrap(positions, cell, pbc) if periodic else (positions, None)
    span = pos.max(0) - pos.min(0)
    if bool(np.all(span <= limit)):
        return offsets
    ax = int(np.argmax(span))
    lo, hi = int(np.argmin(pos[:, ax])), int(np.argmax(pos[:, ax]))
    why = (f"more than data.max_extent = {max_extent:g} Å" if limit == max_extent else
           f"more than {SAFE_EXTENT:g} Å, the widest box the neighbour list handles "
           f"(data.max_extent is {max_extent:g})")
    wrapped = " (periodic directions wrapped)" if periodic else ""
    raise GeometryError(
        f"{where}: the atoms span {span[ax]:.4g} Å along {_AXES[ax]}{wrapped}, {why}: "
        f"{_atom(lo, numbers)} at {_AXES[ax]} = {pos[lo, ax]:.6g} Å, {_atom(hi, numbers)} at "
        f"{pos[hi, ax]:.6g} Å; a fragment flown off or a corrupt frame? drop the frame or raise data.max_extent")


#: Å; frames farther than this from the origin are moved near it before positions become
#: float32 (whose spacing there is 6e-5 Å; at 1e7 Å it is 1 Å, and forces come out wrong or NaN)
FAR = 1e3


def recentred(positions: np.ndarray, cell: np.ndarray | None = None, pbc: np.ndarray | None = None) -> np.ndarray:
    """Positions (N, 3) Å of one frame moved near the origin by a symmetry of the frame, if any
    lies farther than FAR: an open frame by its centroid, a periodic one by whole lattice vectors
    (its energy and forces, and its pair list, unchanged). Otherwise the positions as given, so
    that ordinary data is untouched to the last bit."""
    if positions.size == 0 or float(np.abs(positions).max()) <= FAR:
        return positions
    centre = positions.mean(0, keepdims=True)
    if pbc is None or not np.any(pbc):
        return positions - centre
    _, offsets = wrap(centre, np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool))
    return positions - offsets @ np.asarray(cell, dtype=np.float64)


def pair_distances(positions: np.ndarray, i: np.ndarray, j: np.ndarray, shifts: np.ndarray,
                   cell: np.ndarray | None = None) -> np.ndarray:
    """Distances (P,) Å of pairs i, j (P,) with integer cell shifts (P, 3) of positions (N, 3) Å
    in cell (3, 3) Å (None: open). numpy, for many small frames at once (PackedData): there
    asking vesin for each frame's distances costs more in its Python wrapper than this."""
    d = positions[j] - positions[i]
    if cell is not None and shifts.any():
        d += shifts @ cell
    return np.sqrt(np.einsum("pk,pk->p", d, d))


def check_pairs(
    i: np.ndarray,
    j: np.ndarray,
    distances: np.ndarray,
    min_distance: float = MIN_DISTANCE,
    where: str = "frame",
    numbers: np.ndarray | None = None,
) -> None:
    """Refuse a frame two of whose atoms (or an atom and a periodic image) are closer than
    `min_distance` Å, from a neighbour list: i, j (P,) atom indices, distances (P,) Å.
    One reduction when the frame is fine."""
    if not len(distances) or distances.min() >= min_distance:
        return
    p = int(np.argmin(distances))
    a, b = sorted((int(i[p]), int(j[p])))
    pair = (f"{_atom(a, numbers)} is {distances[p]:.3g} Å from its own periodic image" if a == b else
            f"{_atom(a, numbers)} and {_atom(b, numbers)} are {distances[p]:.3g} Å apart")
    raise GeometryError(
        f"{where}: {pair}, closer than data.min_distance = {min_distance:g} Å (coincident or overlapping atoms "
        "drive every weight of a network to NaN); fix or drop the frame, or lower data.min_distance")


def check_geometry(
    numbers: np.ndarray | None,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    min_distance: float = MIN_DISTANCE,
    max_extent: float = MAX_EXTENT,
    where: str = "frame",
) -> None:
    """All geometry checks on one structure: numbers (N,), positions (N, 3) Å, cell (3, 3) Å
    (rows are lattice vectors) with pbc (3,) bool, or None for an open structure. Raises
    GeometryError naming `where` and the atoms; returns None for a fine frame."""
    from polyfid.neighbors import neighbor_pairs

    # a cutoff of at least 1 Å: vesin's grid over a wide box of tiny cells crashes sooner
    neighbor_pairs(np.asarray(positions, dtype=np.float64), max(float(min_distance), 1.0), cell, pbc,
                   numbers=numbers, where=where, min_distance=min_distance, max_extent=max_extent)


#: the geometry options of data (and of a model file's metadata), Å
GEOMETRY_KEYS = ("min_distance", "max_extent")


def model_geometry(model: object) -> dict[str, float]:
    """The geometry limits (``min_distance``, ``max_extent``, Å) `model` was trained with, as
    keyword arguments of PackedData / single_frame_batch: what `load_model` read from the
    file's metadata, else the defaults (a file written before they were recorded)."""
    limits = dict(getattr(model, "geometry_limits", None) or {})
    return {"min_distance": MIN_DISTANCE, "max_extent": MAX_EXTENT} | limits


def check_frames(frames: Iterable, min_distance: float = MIN_DISTANCE, max_extent: float = MAX_EXTENT,
                 name: str = "") -> None:
    """`check_geometry` on each frame (anything with numbers, positions, cell, pbc and source,
    e.g. polyfid.data.Frame) of a data set called `name`; a frame without a source is named
    "frame k" (0-based). Raises GeometryError for the first that fails."""
    prefix = f"{name}: " if name else ""
    for k, f in enumerate(frames):
        check_geometry(f.numbers, f.positions, f.cell, f.pbc, min_distance, max_extent,
                       getattr(f, "source", "") or f"{prefix}frame {k}")
