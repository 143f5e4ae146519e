"""Starting structures from a file, an ASE molecule name or a SMILES string.

A source is tried in that order: an existing path is read with ``ase.io`` (every frame); a
name that ``ase.build.molecule`` knows (``CH3CH2OH``, ``H2O``, the G2 set) is built; anything
else is parsed as SMILES by RDKit (ASE cannot parse SMILES), given hydrogens, embedded in 3D
(ETKDG, seeded) and relaxed with MMFF. Charge and multiplicity go into ``atoms.info`` (keys
``charge``, ``multiplicity``), where the data layer and the labeller read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyfid.errors import SourceError


def from_smiles(smiles: str, seed: int = 0):
    """ASE Atoms (Å) for a SMILES string: RDKit adds hydrogens, embeds (ETKDG) and relaxes (MMFF)."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem, Descriptors
    except ImportError as e:  # pragma: no cover - rdkit is a dependency
        raise SourceError(f"{smiles!r}: reading SMILES needs RDKit ({e})") from None
    from ase import Atoms

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise SourceError(f"{smiles!r}: not a file, not an ASE molecule name, and RDKit cannot parse it as SMILES")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise SourceError(f"{smiles!r}: RDKit could not embed the molecule in 3D")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    pos = mol.GetConformer().GetPositions()
    atoms = Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=np.asarray(pos))
    atoms.info.update(
        {"smiles": smiles, "charge": int(Chem.GetFormalCharge(mol)),
         "multiplicity": int(Descriptors.NumRadicalElectrons(mol)) + 1}
    )
    return atoms


def load_structures(source: str, seed: int = 0) -> list:
    """Every structure of `source` (file path, ASE molecule name or SMILES) as ASE Atoms."""
    import ase.io
    from ase.build import molecule

    path = Path(source)
    if path.exists():
        try:
            frames = ase.io.read(path, index=":")
        except Exception as e:
            raise SourceError(f"{path}: ase.io cannot read it ({type(e).__name__}: {e})") from None
        frames = frames if isinstance(frames, list) else [frames]
        if not frames:
            raise SourceError(f"{path}: no structures in the file")
        for i, a in enumerate(frames):
            a.info.setdefault("source", f"{path}:{i}")
        return frames
    try:
        atoms = molecule(source)
        atoms.info["source"] = f"ase.build.molecule({source!r})"
        return [atoms]
    except KeyError:
        pass
    atoms = from_smiles(source, seed=seed)
    atoms.info["source"] = f"smiles:{source}"
    return [atoms]
