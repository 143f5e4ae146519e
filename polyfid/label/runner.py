"""Label many structures at one level: skip what the store has, compute the rest in worker
processes, write each result to the store the moment it arrives.

Failures (SCF not converged, overlapping atoms, engine errors) are recorded with their
reason and never stop the batch. Any `concurrent.futures.Executor` can run the work (for a
cluster: a Dask client's ``get_executor()``); by default a local process pool.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from polyfid.data.frame import Frame
from polyfid.label.levels import CalculationFailed, LevelError, compute, parse_level
from polyfid.label.store import LabelStore, frame_key


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from pyscf import lib

        lib.num_threads(n)
    except ImportError:
        pass


def _work(level: str, numbers, positions, forces: bool, charge: int, mult: int, threads: int):
    """One calculation in a worker: (energy, forces, seconds, failure reason)."""
    _set_threads(threads)
    t0 = time.perf_counter()
    try:
        e, f = compute(level, numbers, positions, forces=forces, charge=charge, multiplicity=mult)
        return e, f, time.perf_counter() - t0, None
    except (CalculationFailed, LevelError) as err:
        return None, None, time.perf_counter() - t0, str(err)
    except Exception as err:  # an engine's own error must not stop the batch
        return None, None, time.perf_counter() - t0, f"{type(err).__name__}: {err}"


@dataclass
class LabelReport:
    """What a labelling call did: computed now, found in the store, failed (reason)."""

    level: str
    computed: int
    cached: int
    failed: list[tuple[int, str]]
    seconds: float

    def __str__(self) -> str:
        s = f"{self.level}: {self.computed} computed, {self.cached} already in the store, {len(self.failed)} failed"
        return s + (f" (first: frame {self.failed[0][0]}: {self.failed[0][1]})" if self.failed else "")


def label_frames(
    frames: Sequence[Frame],
    level: str,
    store: LabelStore | str,
    forces: bool = False,
    workers: int = 1,
    threads_per_worker: int = 1,
    executor: Executor | None = None,
    progress: bool = True,
) -> LabelReport:
    """Compute `level` energies (and forces) of `frames` not yet in `store`.

    workers: local processes (ignored when an `executor` is given); threads_per_worker: OMP
    threads of each calculation. Re-running after a kill recomputes nothing that finished.
    """
    lv = parse_level(level)
    if forces and not lv.has_forces:
        raise LevelError(f"level {lv.name!r} has no analytic forces; label energies only")
    periodic = [fr.source or str(i) for i, fr in enumerate(frames) if fr.pbc.any()]
    if periodic:
        raise LevelError(f"periodic frames ({', '.join(periodic[:3])}{', ...' if len(periodic) > 3 else ''}): "
                         "polyfid.label computes isolated molecules only")
    own_store = not isinstance(store, LabelStore)
    st = LabelStore(store) if own_store else store
    t0 = time.perf_counter()
    try:
        done = st.done(lv.name, forces)
        keys = [frame_key(fr) for fr in frames]
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in done and k not in todo:
                todo[k] = i
        cached = len(frames) - len(todo)
        failed: list[tuple[int, str]] = []
        if todo:
            failed = _run(frames, list(todo.values()), lv.name, st, forces, workers, threads_per_worker,
                          executor, progress)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for key, _, reason in st.failures(lv.name):
            if key in done and key in first:  # failures recorded by earlier runs are reported too
                failed.append((first[key], reason))
        return LabelReport(lv.name, len(todo), cached, sorted(failed), time.perf_counter() - t0)
    finally:
        if own_store:
            st.close()


def _run(frames, indices, level, store, forces, workers, threads, executor, progress) -> list[tuple[int, str]]:
    from tqdm.auto import tqdm

    failed = []
    own = executor is None
    if own:
        import multiprocessing as mp

        # spawn: workers must not inherit torch's OpenMP state from the parent; the thread
        # limits are in the environment before the workers import numpy and their BLAS
        saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update({v: str(threads) for v in saved})
        try:
            executor = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            executor.submit(int, 0).result()  # start the workers while the variables are set
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
    try:
        futures = {
            executor.submit(_work, level, frames[i].numbers, frames[i].positions, forces,
                            frames[i].charge, frames[i].multiplicity, threads): i
            for i in indices
        }
        with tqdm(total=len(futures), disable=not progress, unit="calc", desc=level) as bar:
            for fut in as_completed(futures):
                i = futures[fut]
                e, f, secs, reason = fut.result()
                store.put(frames[i], level, e, None if f is None else np.asarray(f), secs, reason)
                if reason is not None:
                    failed.append((i, reason))
                bar.update(1)
    finally:
        if own:
            executor.shutdown(cancel_futures=True)
    return failed
