"""Where and how training and inference compute: the device (`resolve_device`), torch's CPU
threads (`set_threads`) and the floating-point mode of the CPU (`flush_denormals`). Every
device string of a configuration or argument becomes a torch.device here, and nowhere else.

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

from polyfid.errors import ConfigError

#: most torch threads or worker processes an option takes (torch.set_num_threads(100000) crashes
#: the process)
MAX_THREADS = 1024


def resolve_device(device: str | torch.device | None, where: str = "device") -> torch.device:
    """`device` (cpu, cuda, cuda:N, mps; None: cpu) as a torch.device this machine has, else a
    ConfigError naming `where`: torch would otherwise fail deep inside the first .to() with
    a traceback, after the data are read and the model built."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise ConfigError(f"{where}: expected cpu, cuda, cuda:N or mps, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else "no GPU is visible")
            raise ConfigError(f"{where}: {str(device)!r} asked but this machine has no CUDA device ({why}); use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{where}: {str(device)!r} asked but this machine has {n} CUDA device(s) "
                              f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: 'mps' asked but this machine has no Apple GPU available to torch; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{where}: expected cpu, cuda, cuda:N or mps, got {device!r}")
    return dev


def set_threads(n: int | None) -> None:
    """torch's CPU threads (None: torch's default, left as it is)."""
    if n is not None:
        torch.set_num_threads(n)


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
