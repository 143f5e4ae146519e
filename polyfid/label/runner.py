"""Label many structures at one level: skip what the store has, compute the rest in worker
processes, write each result to the store the moment it arrives.

Failures (SCF not converged, overlapping atoms, engine errors) are recorded with their
reason and never stop the batch. Any `concurrent.futures.Executor` can run the work (for a
cluster: a Dask client's ``get_executor()``); by default a local process pool.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

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
    """One calculation in a worker: (energy, forces, seconds, failure reason, worker id)."""
    _set_threads(threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()
    try:
        e, f = compute(level, numbers, positions, forces=forces, charge=charge, multiplicity=mult)
        return e, f, time.perf_counter() - t0, None, worker
    except (CalculationFailed, LevelError) as err:
        return None, None, time.perf_counter() - t0, str(err), worker
    except Exception as err:  # an engine's own error must not stop the batch
        return None, None, time.perf_counter() - t0, f"{type(err).__name__}: {err}", worker


@dataclass
class LabelReport:
    """What a labelling call did: computed now, found in the store, failed (reason)."""

    level: str
    computed: int
    cached: int
    failed: list[tuple[int, str]]
    seconds: float
    workers: dict[str, int] = field(default_factory=dict)  # "host:pid" -> calculations done there

    def __str__(self) -> str:
        s = f"{self.level}: {self.computed} computed, {self.cached} already in the store, {len(self.failed)} failed"
        if self.workers:
            s += f" ({len(self.workers)} worker{'s' if len(self.workers) > 1 else ''})"
        return s + (f"; first failure: frame {self.failed[0][0]}: {self.failed[0][1]}" if self.failed else "")


def _todo(keys: Sequence[str], done: set[str]) -> dict[str, int]:
    """{key: first index} of the structures not yet done (each distinct structure once)."""
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in done and k not in todo:
            todo[k] = i
    return todo


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
        todo = _todo(keys, done)
        cached = len(frames) - len(todo)
        failed: list[tuple[int, str]] = []
        used: dict[str, int] = {}
        if todo:
            failed, used = _run(frames, list(todo.values()), lv.name, st, forces, workers, threads_per_worker,
                                executor, progress)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for key, _, reason in st.failures(lv.name):
            if key in done and key in first:  # failures recorded by earlier runs are reported too
                failed.append((first[key], reason))
        return LabelReport(lv.name, len(todo), cached, sorted(failed), time.perf_counter() - t0, used)
    finally:
        if own_store:
            st.close()


def local_executor(workers: int = 1, threads_per_worker: int = 1) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes whose BLAS/OpenMP use `threads_per_worker` threads.

    spawn: workers must not inherit torch's OpenMP state from the parent; the thread limits are
    in the environment before the workers import numpy and their BLAS.
    """
    import multiprocessing as mp

    saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({v: str(threads_per_worker) for v in saved})
    try:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        for f in [ex.submit(int, 0) for _ in range(workers)]:  # start the workers while the variables are set
            f.result()
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    return ex


def _run(frames, indices, level, store, forces, workers, threads, executor, progress):
    """Compute frames[indices]; (failures, calculations per worker). A KeyboardInterrupt cancels
    what has not started and propagates: every result stored so far stays."""
    from tqdm.auto import tqdm

    failed: list[tuple[int, str]] = []
    used: dict[str, int] = {}
    futures: dict = {}
    own = executor is None
    if own:
        executor = local_executor(workers, threads)
    try:
        futures = {
            executor.submit(_work, level, frames[i].numbers, frames[i].positions, forces,
                            frames[i].charge, frames[i].multiplicity, threads): i
            for i in indices
        }
        # tqdm's rate and remaining-time estimate are the ETA the user watches
        with tqdm(total=len(futures), disable=not progress, unit="calc", desc=level, smoothing=0.1) as bar:
            for fut in as_completed(futures):
                i = futures[fut]
                e, f, secs, reason, worker = fut.result()
                store.put(frames[i], level, e, None if f is None else np.asarray(f), secs, reason)
                used[worker] = used.get(worker, 0) + 1
                if reason is not None:
                    failed.append((i, reason))
                bar.update(1)
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
        else:
            for fut in futures:
                fut.cancel()
    return failed, used


#: cost ~ n_atoms**p: formal scaling of each kind of method (xTB and SCF costs are dominated by
#: the cubic diagonalisation; MP2 N^5, CCSD N^6, (T) N^7)
SCALING = {"xtb": 3, "hf": 3, "dft": 3, "mp2": 5, "ccsd": 6, "ccsd(t)": 7}


@dataclass
class CostEstimate:
    """Projected cost of labelling: `todo` structures left, `seconds` of wall time with
    `workers` parallel workers, from `measured` timings (per-structure seconds scaled with
    n_atoms**`exponent`)."""

    level: str
    todo: int
    cached: int
    measured: int
    seconds_per_structure: float  # mean over the structures left
    seconds: float
    workers: int
    exponent: int

    def __str__(self) -> str:
        if not self.todo:
            return f"{self.level}: all {self.cached} structures are in the store; nothing to compute"
        return (f"{self.level}: {self.todo} structures to compute ({self.cached} in the store); "
                f"~{self.seconds_per_structure:.2f} s each (from {self.measured} timed, scaled as n_atoms^"
                f"{self.exponent}) -> about {_duration(self.seconds)} with {self.workers} worker(s)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_cost(
    frames: Sequence[Frame],
    level: str,
    store: LabelStore | str,
    forces: bool = False,
    sample: int = 2,
    workers: int = 1,
    threads_per_worker: int = 1,
    executor: Executor | None = None,
) -> CostEstimate:
    """Time per structure measured on a sample, projected onto the structures not yet in the store.

    Timings already in the store at this level are used first; if fewer than `sample` exist,
    that many structures left to do (spread over the list) are computed now, and their results
    kept in the store, so the estimate costs nothing in the end.
    """
    lv = parse_level(level)
    own_store = not isinstance(store, LabelStore)
    st = LabelStore(store) if own_store else store
    try:
        todo = _todo([frame_key(fr) for fr in frames], st.done(lv.name, forces))
        timings = st.timings(lv.name, forces)
        missing = max(0, sample - len(timings))
        if todo and missing:
            idx = list(todo.values())
            pick = [idx[j] for j in np.linspace(0, len(idx) - 1, min(missing, len(idx))).round().astype(int)]
            label_frames([frames[i] for i in pick], lv.name, st, forces=forces, workers=1,
                         threads_per_worker=threads_per_worker, executor=executor, progress=False)
            done = st.done(lv.name, forces)
            todo = {k: i for k, i in todo.items() if k not in done}
            timings = st.timings(lv.name, forces)
        p = SCALING[lv.kind]
        n_left = np.array([len(frames[i].numbers) for i in todo.values()], dtype=float)
        if timings:
            n_t, sec = (np.array(v, dtype=float) for v in zip(*timings))
            c = float(np.median(sec / n_t**p))
        else:
            c = 0.0
        per = c * n_left**p
        return CostEstimate(lv.name, len(todo), len(frames) - len(todo), len(timings),
                            float(per.mean()) if len(per) else 0.0,
                            float(per.sum()) / max(1, workers), max(1, workers), p)
    finally:
        if own_store:
            st.close()
