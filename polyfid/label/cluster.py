"""Executors for labelling beyond one machine: Dask distributed.

A Dask client provides a ``concurrent.futures`` executor (``client.get_executor()``), which
:func:`polyfid.label.label_frames` takes as it takes a local process pool: the results still
come back to this process, which alone writes the store. Install with ``pip install
polyfid[cluster]`` (``dask[distributed]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor

from polyfid.errors import ConfigError


@contextlib.contextmanager
def _dask_client(address: str, workers: int, threads_per_worker: int):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise ConfigError(f"labelling on a Dask cluster needs dask[distributed] ({e}); "
                           "pip install 'polyfid[cluster]'") from None
    if address == "local":
        n = str(threads_per_worker)
        env = {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          env=env) as cluster, Client(cluster) as client:
            yield client
    else:
        with _connect(Client, address) as client:
            yield client


def _connect(client_class, address: str):
    """A Dask client of the scheduler at `address`; ConfigError naming --dask and the address when
    the address is malformed or no scheduler answers there (within distributed's connect timeout)."""
    try:
        return client_class(address)
    except (OSError, ValueError, TypeError) as e:
        why = "a malformed scheduler address" if isinstance(e, (ValueError, TypeError)) else \
            "cannot reach the Dask scheduler"
        raise ConfigError(f"--dask {address}: {why} ({type(e).__name__}: {e}); give a running scheduler's "
                          "address (tcp://host:8786) or 'local'") from None


@contextlib.contextmanager
def dask_executor(address: str = "local", workers: int = 2, threads_per_worker: int = 1) -> Iterator[Executor]:
    """A Dask executor: ``address`` is a scheduler (``tcp://host:8786``) or ``"local"`` for a
    local cluster of `workers` processes, each running one calculation at a time with
    `threads_per_worker` OpenMP threads."""
    with _dask_client(address, workers, threads_per_worker) as client:
        yield client.get_executor()


@contextlib.contextmanager
def executor_for(dask: str | None, workers: int = 1, threads_per_worker: int = 1) -> Iterator[tuple[Executor, int]]:
    """(executor, number of workers): a local pool of `workers` processes, or with `dask` a Dask
    executor (``"local"``: a local cluster of `workers`; else the scheduler's workers)."""
    if dask is None:
        from polyfid.label.runner import local_executor

        ex = local_executor(workers, threads_per_worker)
        try:
            yield ex, workers
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    else:
        with _dask_client(dask, workers, threads_per_worker) as client:
            yield client.get_executor(), max(1, len(client.scheduler_info()["workers"]))
