"""Demonstrations that run end to end on real data computed on the spot.

`multifidelity` (``polyfid demo``): ethanol sampled with GFN2-xTB MD, labelled with xTB forces
and a few MP2/cc-pVDZ energies; the multi-fidelity model against the energies-only model.
`xtb_ethanol` (``polyfid demo --single-level``): GFN2-xTB data, a HIP-NN trained on it, test
errors, and MD with the trained model checked against xTB.
"""

from polyfid.demo.multifidelity import MultiFidelityDemoSettings
from polyfid.demo.multifidelity import run_demo as run_multifidelity_demo
from polyfid.demo.xtb_ethanol import MDSettings, generate, load_or_generate, run_demo, run_md, xtb_calculator

__all__ = ["MDSettings", "MultiFidelityDemoSettings", "generate", "load_or_generate", "run_demo",
           "run_md", "run_multifidelity_demo", "xtb_calculator"]
