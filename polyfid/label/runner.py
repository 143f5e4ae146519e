"""Label many structures at one level: skip what the store has, compute the rest in worker
processes, write each result to the store the moment it arrives.

Failures (SCF not converged, overlapping atoms, engine errors) are recorded with their
reason and never stop the batch. Any `concurrent.futures.Executor` can run the work (for a
cluster: a Dask client's ``get_executor()``); by default a local process pool whose workers
exit when the process that started them dies.

Several runs may label into one store at once (two terminals, two cluster jobs): each claims a
few structures at a time in the store before computing them (see
:meth:`polyfid.label.store.LabelStore.claim`), so nothing is computed twice; a run waits for the
structures another run is computing, and takes them over if that run dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polyfid.data.frame import Frame
from polyfid.errors import LabellingAborted
from polyfid.label.levels import CalculationFailed, Level, LevelError, compute, parse_level
from polyfid.label.store import CLAIM_TIMEOUT, LabelStore, frame_key

#: seconds between renewals of a run's claims (others take a claim over after CLAIM_TIMEOUT)
HEARTBEAT = CLAIM_TIMEOUT / 6
#: seconds between looks at the structures another run is computing
POLL = 0.5
#: for tests only: seconds each calculation sleeps first, so that a run can be caught mid-way
DELAY_ENV = "POLYFID_LABEL_TEST_DELAY"


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from pyscf import lib

        lib.num_threads(n)
    except ImportError:
        pass


_ENGINE_OUTPUT = threading.Lock()
_engine_output_state: dict = {"depth": 0, "saved": None}


@contextlib.contextmanager
def engine_output(log: str | Path | None) -> Iterator[None]:
    """Send what the engines print (PySCF's and tblite's warnings, Python warnings: file
    descriptors 1 and 2) to the end of `log` while the block runs; None: leave it where it goes.
    For worker processes: in a process that shows a progress bar on stderr it would hide the bar.

    The descriptors belong to the whole process: blocks that overlap in threads (a Dask worker
    with several threads) share the first one's redirection, undone when the last one ends."""
    if log is None:
        yield
        return
    st = _engine_output_state
    with _ENGINE_OUTPUT:
        if st["depth"] == 0:
            st["saved"] = _redirect(log)
        st["depth"] += 1
    try:
        yield
    finally:
        with _ENGINE_OUTPUT:
            st["depth"] -= 1
            if st["depth"] == 0:
                _restore(st["saved"])
                st["saved"] = None


def _redirect(log: str | Path) -> tuple | None:
    """Point descriptors 1, 2 and sys.stdout/stderr at `log`; what _restore needs, or None when
    the log cannot be opened (a worker on another host (Dask) may not see the folder: the
    output then stays where it goes)."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    # Python-level writers too: sys.stdout may not be file descriptor 1 (a notebook, pytest)
    text = open(os.dup(fd), "a", buffering=1)  # noqa: SIM115 (closed by _restore)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = sys.stderr = text
    return saved, streams, text


def _restore(state: tuple | None) -> None:
    if state is None:
        return
    saved, streams, text = state
    text.flush()
    sys.stdout, sys.stderr = streams
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    text.close()
    for f in saved:
        os.close(f)


def log_beside(store: str | Path) -> Path:
    """The engine log of a label store: labels.sqlite -> labels.log."""
    return Path(store).with_suffix(".log")


def _work(level: str, numbers, positions, forces: bool, charge: int, mult: int, threads: int,
          log: str | None = None):
    """One calculation in a worker: (energy, forces, seconds, failure reason, worker id); what
    the engine prints goes to `log`."""
    _set_threads(threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    try:
        with engine_output(log):
            e, f = compute(level, numbers, positions, forces=forces, charge=charge, multiplicity=mult)
        return e, f, time.perf_counter() - t0, None, worker
    except (CalculationFailed, LevelError) as err:
        return None, None, time.perf_counter() - t0, str(err), worker
    except Exception as err:  # an engine's own error must not stop the batch
        return None, None, time.perf_counter() - t0, f"{type(err).__name__}: {err}", worker


@dataclass
class LabelReport:
    """What a labelling call did: computed now, found in the store (or computed meanwhile by
    another run), failed (frame index, reason)."""

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


def check_electrons(frames: Sequence[Frame]) -> None:
    """LevelError unless every frame's charge and multiplicity fit its electron count: N
    electrons (sum of atomic numbers minus the charge) with multiplicity 2S+1 need N − 2S even
    and 0 ≤ 2S ≤ N."""
    bad = []
    for i, fr in enumerate(frames):
        n_el = int(np.sum(fr.numbers)) - int(fr.charge)
        mult = int(fr.multiplicity)
        unpaired = mult - 1
        if n_el < 0 or unpaired < 0 or unpaired > n_el or (n_el - unpaired) % 2:
            bad.append((fr.source or f"frame {i}", n_el, int(fr.charge), mult))
    if not bad:
        return
    where, n_el, charge, mult = bad[0]
    if n_el < 0:
        why = "a negative electron count"
    elif mult < 1:
        why = "a multiplicity must be 1 or more"
    elif mult - 1 > n_el:
        why = f"at most {n_el} unpaired electrons, so a multiplicity of at most {n_el + 1}"
    else:
        why = (f"an {'even' if n_el % 2 == 0 else 'odd'} electron count needs an "
               f"{'odd multiplicity (1, 3, ...)' if n_el % 2 == 0 else 'even multiplicity (2, 4, ...)'}")
    more = f" (and {len(bad) - 1} more structure{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    raise LevelError(f"{where}: {n_el} electrons (charge {charge:+d}) cannot have multiplicity {mult}: {why}{more}; "
                     "set charge and multiplicity in the file (info keys charge, multiplicity) or with "
                     "--charge/--multiplicity")


def check_frames(frames: Sequence[Frame], level: str | Level, forces: bool = False) -> Level:
    """The parsed level; LevelError, before anything is computed, for what cannot be labelled:
    forces of a method without analytic gradients, periodic frames, charge and multiplicity
    that do not fit a structure's electron count."""
    lv = parse_level(level) if isinstance(level, str) else level
    if forces and not lv.has_forces:
        raise LevelError(f"level {lv.name!r} has no analytic forces; label energies only")
    periodic = [fr.source or str(i) for i, fr in enumerate(frames) if fr.pbc.any()]
    if periodic:
        raise LevelError(f"periodic frames ({', '.join(periodic[:3])}{', ...' if len(periodic) > 3 else ''}): "
                         "polyfid.label computes isolated molecules only")
    check_electrons(frames)
    return lv


def label_frames(
    frames: Sequence[Frame],
    level: str,
    store: LabelStore | str,
    forces: bool = False,
    workers: int = 1,
    threads_per_worker: int = 1,
    executor: Executor | None = None,
    progress: bool = True,
    log: str | Path | None = None,
) -> LabelReport:
    """Compute `level` energies (eV) and forces (eV/Å) of `frames` not yet in `store`.

    workers: local processes (with an `executor`: how many calculations it runs at once, when
    the executor cannot tell); threads_per_worker: OMP threads of each calculation. Re-running
    after a kill recomputes nothing that finished; other runs on the same store at the same time
    compute none of the same structures (the store's claims). Raises LevelError before any
    calculation for frames that cannot be labelled (see :func:`check_frames`). What the engines
    print goes to `log` (default: beside the store, labels.sqlite -> labels.log).
    """
    lv = check_frames(frames, level, forces)
    own_store = not isinstance(store, LabelStore)
    st = LabelStore(store) if own_store else store
    log = str(Path(log).absolute() if log is not None else log_beside(st.path).absolute())
    t0 = time.perf_counter()
    try:
        done = st.done(lv.name, forces)
        keys = [frame_key(fr) for fr in frames]
        todo = _todo(keys, done)
        failed: list[tuple[int, str]] = []
        used: dict[str, int] = {}
        computed: set[str] = set()
        if todo:
            computed, failed, used = _run(frames, todo, lv.name, st, forces, workers, threads_per_worker, executor,
                                          progress, log)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for key, _, reason in st.failures(lv.name):
            if key not in computed and key in first:  # failures recorded earlier, or by another run, are reported
                failed.append((first[key], reason))
        return LabelReport(lv.name, len(computed), len(frames) - len(computed), sorted(failed),
                           time.perf_counter() - t0, used)
    finally:
        if own_store:
            st.close()


def _worker_init(parent: int) -> None:
    """First thing in each local worker: exit when `parent` (the process that started it) dies,
    so that no worker, and through them no multiprocessing resource tracker, outlives it
    holding memory and the caller's stdout. SIGKILL leaves the parent no chance to stop them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            # PR_SET_PDEATHSIG: the kernel kills this worker when the thread that started it
            # ends (that thread is the one that creates the pool: see local_executor)
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    # elsewhere, and should a calculation hold the signal off: watch for the parent's death
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="polyfid-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def local_executor(workers: int = 1, threads_per_worker: int = 1) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes whose BLAS/OpenMP use `threads_per_worker` threads.

    spawn: workers must not inherit torch's OpenMP state from the parent; the thread limits are
    in the environment before the workers import numpy and their BLAS. The workers stay in the
    caller's process group and exit as soon as this process dies (even by SIGKILL); they are
    all started here, so use and shut the pool down from a thread that outlives it.
    """
    import multiprocessing as mp

    saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({v: str(threads_per_worker) for v in saved})
    try:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(os.getpid(),))
        for f in [ex.submit(int, 0) for _ in range(workers)]:  # start the workers while the variables are set
            f.result()
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    return ex


def _parallelism(executor: Executor | None, workers: int) -> int:
    """How many calculations `executor` runs at once (a local pool's or a Dask cluster's
    workers), else `workers`."""
    n = getattr(executor, "_max_workers", None)
    if isinstance(n, int) and n > 0:
        return n
    client = getattr(executor, "_client", None)  # dask.distributed's ClientExecutor
    if client is not None:
        try:
            return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        except Exception:  # failing to ask only means the default
            pass
    return max(1, workers)


def _run(frames, todo: dict[str, int], level, store: LabelStore, forces, workers, threads, executor, progress,
         log: str):
    """Compute frames[todo.values()] under the store's claims; (keys computed here, failures,
    calculations per worker).

    At most twice the executor's parallelism is claimed and in flight at a time, so that two
    runs on one store share the work. Structures another live run holds are looked at again
    every POLL s until they are done or their claim is free (its owner died). A
    KeyboardInterrupt cancels what has not started and propagates: every result stored so far
    stays, and this run's claims are released.
    """
    from tqdm.auto import tqdm

    failed: list[tuple[int, str]] = []
    used: dict[str, int] = {}
    computed: set[str] = set()
    futures: dict[Future, str] = {}
    own = executor is None
    cap = 2 * _parallelism(executor, workers)
    queue = deque(todo)
    busy: dict[str, None] = {}  # held by another run: ordered, looked at again later
    next_poll = last_renew = time.monotonic()
    try:
        with tqdm(total=len(todo), disable=not progress, unit="calc", desc=level, smoothing=0.1) as bar:
            while queue or busy or futures:
                now = time.monotonic()
                room = cap - len(futures)
                # claim in batches (one transaction each) once half the slots are free
                batch = [queue.popleft() for _ in range(min(room, len(queue)))] if room >= max(1, cap // 2) else []
                if room - len(batch) > 0 and busy and now >= next_poll:
                    extra = list(busy)[: room - len(batch)]
                    for k in extra:
                        del busy[k]
                    batch += extra
                    next_poll = now + POLL
                if batch:
                    claimed, done, held = store.claim(batch, level, forces)
                    bar.update(len(done))  # finished meanwhile by another run
                    busy.update(dict.fromkeys(held))
                    if claimed and executor is None:
                        executor = local_executor(workers, threads)
                    for k in claimed:
                        fr = frames[todo[k]]
                        futures[executor.submit(_work, level, fr.numbers, fr.positions, forces, fr.charge,
                                                fr.multiplicity, threads, log)] = k
                if futures:
                    # wake up to renew the claims, or to look at busy structures when there is room
                    wake = last_renew + HEARTBEAT
                    if busy and len(futures) < cap:
                        wake = min(wake, next_poll)
                    timeout = max(0.01, wake - time.monotonic())
                    finished, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        k = futures.pop(fut)
                        i = todo[k]
                        try:
                            e, f, secs, reason, worker = fut.result()
                        except BrokenExecutor as err:  # a worker died: the pool cannot go on
                            raise _worker_lost(frames, todo, [k, *futures.values()], len(computed)) from err
                        store.put(frames[i], level, e, None if f is None else np.asarray(f), secs, reason)
                        computed.add(k)
                        used[worker] = used.get(worker, 0) + 1
                        if reason is not None:
                            failed.append((i, reason))
                        bar.update(1)
                elif busy:
                    time.sleep(max(0.0, next_poll - time.monotonic()))
                if futures and time.monotonic() >= last_renew + HEARTBEAT:
                    store.renew()
                    last_renew = time.monotonic()
    finally:
        try:
            store.release()  # whatever is still claimed was not finished here: free for other runs
        finally:
            if own and executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            else:
                for fut in futures:
                    fut.cancel()
    return computed, failed, used


def _worker_lost(frames, todo: dict[str, int], keys: list[str], stored: int) -> LabellingAborted:
    names = [frames[todo[k]].source or f"frame {todo[k]}" for k in keys]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return LabellingAborted(
        f"a labelling worker died (killed, e.g. by the out-of-memory killer, or crashed inside the engine) while "
        f"computing {', '.join(names[:5])}{more}; the {stored} results this run finished are in the store. Run the "
        "same command again to continue (with fewer --workers or more memory if a worker ran out of it)")


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
    log: str | Path | None = None,
) -> CostEstimate:
    """Time per structure measured on a sample, projected onto the structures not yet in the store.

    Timings already in the store at this level are used first; if fewer than `sample` exist,
    that many structures left to do (spread over the list) are computed now, and their results
    kept in the store, so the estimate costs nothing in the end. Raises LevelError before any
    calculation for frames that cannot be labelled (see :func:`check_frames`).
    """
    lv = check_frames(frames, level, forces)
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
                         threads_per_worker=threads_per_worker, executor=executor, progress=False, log=log)
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
