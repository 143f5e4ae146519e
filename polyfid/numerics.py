"""Floating-point settings of the CPU that training and inference run under.

Subnormal ("denormal") floats, magnitudes below 1.2e-38 in float32, take a slow microcode path
on many x86 CPUs. They appear as training goes on (Gaussian sensitivities of pairs far from a
centre, small gradients squared into Adam's second moments): on an Intel Xeon a training step of
a trained rMD17 aspirin HIP-HOP-NN took 275-325 ms with them and 212 ms with them flushed to zero
(fresh weights: the same either way). On an AMD EPYC, two 600 s aspirin runs side by side, with
and without flushing, trained at the same 171 and 170 frames/s. Flushing changes nothing that
matters: such values are 1e-38 of the unit scale of the inputs and weights.

The mode is a per-thread CPU register. `flush_denormals` sets the calling thread's, which runs
all of the work with `torch.set_num_threads(1)` (the setting for training on a small or shared
machine, and the benchmarks'). torch's intra-op worker threads take the mode of the thread that
started them, when torch first runs a parallel region, and keep it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (the CPU's FTZ/DAZ modes)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    return float(tiny * 1.0) == 0.0


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero inside the block (enabled=True) and restore the mode the
    thread had before on exit. Yields whether flushing is on inside the block: False where the
    CPU does not support it (then nothing changes)."""
    before = flushing_denormals()
    if not enabled or before:
        yield before
        return
    on = torch.set_flush_denormal(True)
    try:
        yield on
    finally:
        torch.set_flush_denormal(before)
