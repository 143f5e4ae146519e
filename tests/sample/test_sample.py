"""Sampling: structures from names/SMILES/files, xTB MD and normal modes, de-duplication,
farthest-point selection."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule

from polyfid.sample import (
    SampleSettings,
    SourceError,
    deduplicate,
    farthest_point,
    inverse_distance_descriptor,
    load_structures,
    normal_mode_samples,
    sample,
    write_structures,
    xtb_calculator,
)


def stretched_water(d: float) -> Atoms:
    a = molecule("H2O")
    a.positions[1] += d * (a.positions[1] - a.positions[0])
    return a


def test_structures_from_name_smiles_and_file(tmp_path) -> None:
    (w,) = load_structures("H2O")
    assert w.get_chemical_formula() == "H2O"
    (e,) = load_structures("CCO")
    assert e.get_chemical_formula() == "C2H6O" and e.info["charge"] == 0 and e.info["multiplicity"] == 1
    d = np.linalg.norm(e.positions[:, None] - e.positions[None], axis=-1) + 10 * np.eye(len(e))
    assert 0.9 < d.min() < 1.2  # a relaxed embedding: C-H / O-H bond lengths, no overlaps
    (nh4,) = load_structures("[NH4+]")
    assert nh4.info["charge"] == 1 and nh4.get_chemical_formula() == "H4N"
    (rad,) = load_structures("[CH3]")
    assert rad.info["multiplicity"] == 2
    f = write_structures(tmp_path / "two.extxyz", [w, e])
    assert [a.get_chemical_formula() for a in load_structures(str(f))] == ["H2O", "C2H6O"]
    with pytest.raises(SourceError, match="RDKit cannot parse"):
        load_structures("not-a-molecule((")


def test_descriptor_is_invariant_and_separates() -> None:
    a = molecule("CH3CH2OH")
    b = a.copy()
    b.rotate(37, "x", center="COM")
    b.translate([1.0, -2.0, 0.5])
    perm = np.random.default_rng(0).permutation(len(a))
    b = b[perm]
    x = inverse_distance_descriptor([a, b, stretched_water(0.1), stretched_water(0.0)])
    np.testing.assert_allclose(x[0], x[1], atol=1e-12)
    assert np.abs(x[2] - x[3]).max() > 1e-3


def test_deduplicate_and_farthest_point() -> None:
    chain = [stretched_water(d) for d in np.linspace(0.0, 0.5, 11)]
    assert deduplicate(chain + [chain[3].copy(), chain[7].copy()]) == list(range(11))
    # the extremes first, then the middle: farthest-point order on a one-parameter family
    picked = farthest_point(chain, 3, first=0)
    assert picked[:2] == [0, 10] and picked[2] in (4, 5, 6)
    assert len(set(farthest_point(chain, 11, seed=1))) == 11
    assert 0 not in farthest_point(chain, 5, seed=2, exclude=[0])
    with pytest.raises(ValueError, match="cannot select 12"):
        farthest_point(chain, 12)


def test_md_sampling_labels_and_deduplicates() -> None:
    s = SampleSettings(temperatures_K=[300.0, 800.0], md_frames=3, stride=3, equilibration=5, seed=4)
    frames = sample(load_structures("H2O"), s)
    assert len(frames) == 6
    assert [a.info["temperature_K"] for a in frames] == [300.0] * 3 + [800.0] * 3
    ref = xtb_calculator("gfn2-xtb")
    for a in frames[::2]:
        b = a.copy()
        b.calc = ref
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-6)
    # no MD: the structures themselves, duplicates removed
    two = sample([frames[0], frames[0].copy(), frames[1]], SampleSettings(md_frames=0))
    assert len(two) == 2


def test_normal_mode_samples_have_the_harmonic_mean_energy() -> None:
    calc = xtb_calculator("gfn2-xtb")
    t = 300.0
    frames = normal_mode_samples(molecule("H2O"), calc, [t], 60, seed=1)
    from polyfid.sample import relax

    e0 = relax(molecule("H2O"), calc).get_potential_energy()
    de = np.array([a.get_potential_energy() for a in frames]) - e0
    # equipartition: 3 vibrational modes, <V> = 3/2 kT (anharmonicity and 60 samples: loose bounds)
    assert np.all(de > -1e-4)
    assert 0.6 < de.mean() / (1.5 * units.kB * t) < 1.6
    assert all(a.info["sampler"] == "normal_modes" for a in frames)
