"""Demonstrations that run end to end on real data computed on the spot.

`xtb_ethanol`: GFN2-xTB (tblite) Langevin MD data for ethanol, a HIP-NN trained on it, test
errors, and MD with the trained model checked against xTB. Run it with ``polyfid demo``.
"""

from polyfid.demo.xtb_ethanol import MDSettings, generate, load_or_generate, run_demo, run_md, xtb_calculator

__all__ = ["MDSettings", "generate", "load_or_generate", "run_demo", "run_md", "xtb_calculator"]
