"""What the quantum-chemistry engines print goes to a log beside the label store, not the terminal."""

from __future__ import annotations

import os
import sys

from polyfid.label.runner import engine_output, log_beside


def test_engine_output_goes_to_the_log_and_comes_back(tmp_path, capfd) -> None:
    log = tmp_path / "labels.log"
    print("before")
    with engine_output(log):
        print("pyscf: Krylov solver reached subspace convergence but true residual is large")
        os.write(2, b"tblite: a C-level warning on fd 2\n")
        print("a Python warning", file=sys.stderr)  # what warnings.warn prints outside pytest
        sys.stdout.flush()
    print("after")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and "Krylov" not in err and "tblite" not in err
    text = log.read_text()
    assert "Krylov" in text and "fd 2" in text and "a Python warning" in text
    with engine_output(log):  # appended, not overwritten
        print("second")
    assert log.read_text().startswith(text) and log.read_text().endswith("second\n")


def test_an_unwritable_log_leaves_the_output_where_it_was(tmp_path, capfd) -> None:
    with engine_output(tmp_path / "no such folder" / "labels.log"):
        print("still shown")
    assert capfd.readouterr().out == "still shown\n"
    assert log_beside(tmp_path / "labels.sqlite") == tmp_path / "labels.log"


def test_blocks_overlapping_in_threads_restore_the_output(tmp_path, capfd) -> None:
    """A Dask worker runs several calculations in threads of one process: the redirection is
    shared and undone when the last block ends, and stdout/stderr work afterwards."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    inside = threading.Barrier(2)

    def job(k: int) -> None:
        with engine_output(tmp_path / "labels.log"):
            inside.wait(timeout=10)  # both blocks open at once
            os.write(2, f"engine {k}\n".encode())
            inside.wait(timeout=10)

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(job, range(2)))
    print("after", file=sys.stderr)
    os.write(2, b"fd after\n")
    err = capfd.readouterr().err
    assert "after" in err and "fd after" in err and "engine" not in err
    assert sorted((tmp_path / "labels.log").read_text().split("\n")[:2]) == ["engine 0", "engine 1"]
