"""ASE calculator for a trained polyfid model (energy, forces, stress; any fidelity head)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from polyfid.data.batch import single_frame_batch
from polyfid.errors import ConfigError
from polyfid.models import load_model
from polyfid.models.potential import Potential
from polyfid.neighbors.checks import model_geometry
from polyfid.numerics import resolve_device


class PolyfidCalculator(Calculator):
    """Energy (eV), forces (eV/Å) and, for periodic cells, stress (eV/Å³, ASE's sign and
    Voigt order) from a polyfid model file or a Potential.

    fidelity: the level of theory to predict (a head of the model; default its first).
    dtype: "float32" (fast) or "float64".
    compile: compile the model with torch.compile (~25 s at the first call; HIP-NN then makes
    1.5-2x as many calls per second on small molecules, worth it for long MD; HIP-HOP-NN's
    compiled CPU code is slower than eager, leave it off there).

    A structure with atoms closer than the model's data.min_distance, wider than its
    data.max_extent (open directions), non-finite positions or a singular cell raises
    polyfid.errors.GeometryError (a ValueError) before any neighbour list is built.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: str | Path | Potential,
        fidelity: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        compile: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        dtypes = {"float32": torch.float32, "float64": torch.float64}
        if dtype not in dtypes:
            raise ConfigError(f"dtype: expected float32 or float64, got {dtype!r}")
        torch_dtype = dtypes[dtype]
        device = resolve_device(device)
        if isinstance(model, torch.nn.Module):  # a copy: the caller's model keeps its dtype and gradients
            self.model = copy.deepcopy(model).to(dtype=torch_dtype, device=device).eval()
        else:
            self.model = load_model(model, dtype=torch_dtype, device=device)
        self.head = self.model.head_index(fidelity)
        self.fidelity = self.model.fidelities[self.head]
        self.dtype, self.device = torch_dtype, device
        for p in self.model.parameters():
            p.requires_grad_(False)  # only positions need gradients in MD
        self._predict = self.model.compiled() if compile else self.model
        self._geometry = model_geometry(self.model)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic = bool(a.pbc.any())
        want_stress = "stress" in properties and periodic
        batch = single_frame_batch(
            a.numbers, a.positions, self.model.cutoff, a.cell.array if periodic else None,
            a.pbc if periodic else None, dtype=self.dtype, where="PolyfidCalculator: the structure",
            **self._geometry,
        )
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        out = self._predict(batch, forces=True, stress=want_stress, heads=[self.head])
        energy = float(out["energy"][0, self.head].detach())
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["forces"] = out["forces"][:, 0].detach().cpu().numpy().astype(np.float64)
        if want_stress:
            s = out["stress"][0, 0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
