"""A grid folder and the processes running it: one `handprop experiments` at a time, and
`--jobs` workers that die with the grid's process, `kill -9` included.

The commands run in subprocesses of their own session; whatever is left of them (the
grid's process, its workers) is killed with the group when the test ends, failed or not.
"""

import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from handprop.errors import OutputError
from handprop.grids.grid import read_grid, run_grid
from handprop.run.claim import GRID_LOCK, GridLock

HEADER = "run_name,d,dtrain,dtest,m,alpha,epochs,dataset,eval_every"
HANDPROP = [sys.executable, "-c", "from handprop.cli import main; main()"]


def summary_statuses(out: Path) -> dict[str, str]:
    with (out / "summary.csv").open() as f:
        return {r["run"]: r["status"] for r in csv.DictReader(f)}


# -- one process per grid folder ---------------------------------------------------------


def test_a_grid_in_use_is_refused_in_one_line_touching_nothing(tmp_path, command):
    grid = tmp_path / "g.csv"
    grid.write_text(f"{HEADER}\na,400,300,100,8,2.0,5,digits,5\nb,400,300,100,8,2.0,5,digits,5\n")
    out = tmp_path / "out"
    run_grid(read_grid(grid), out, progress=False)

    def files() -> dict[Path, tuple[bytes, int]]:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    with GridLock(out):  # as another `handprop experiments` running the grid holds it
        before = files()
        code, stdout, err = command("experiments", grid, "--out", "out", "-q").finish(60)
        # the cluster path takes the same lock before it asks the cluster for anything
        from handprop.grids.cluster import run_grid_on_cluster

        with pytest.raises(OutputError, match="is in use by another handprop experiments"):
            run_grid_on_cluster(read_grid(grid), out, client=None, progress=False)
        after = files()
    assert code == 1, err
    assert stdout == ""
    assert err.strip().splitlines() == [
        f"handprop: error: out is in use by another handprop experiments (pid {os.getpid()}); "
        "wait for it or choose another --out"
    ]
    assert after == before  # no row's status, no summary, not even the lock file's pid
    assert summary_statuses(out) == {"a": "completed", "b": "completed"}
    # released: the same command runs (and skips the completed rows)
    code, stdout, err = command("experiments", grid, "--out", "out", "-q").finish(60)
    assert code == 0, err
    assert "a: skipped, already completed" in stdout


def test_a_second_grid_started_while_one_runs_is_refused(tmp_path, command):
    grid = tmp_path / "g.csv"
    grid.write_text(f"{HEADER}\nlong,400,300,100,8,2.0,200000,digits,200000\n")
    first = command("experiments", grid, "--out", "out", "-q", "--checkpoint-every", "0.05")
    out = tmp_path / "out"
    first.wait_for(lambda: (out / "long" / "checkpoint.npz").is_file())
    code, _, err = command("experiments", grid, "--out", "out", "-q").finish(60)
    assert code == 1, err
    assert err.strip().splitlines() == [
        f"handprop: error: out is in use by another handprop experiments "
        f"(pid {first.proc.pid}); wait for it or choose another --out"
    ]
    assert not (out / "summary.csv").exists()  # the second one wrote nothing
    assert first.proc.poll() is None  # and the first runs on


def test_the_grid_lock_is_not_re_entrant_and_holds_its_holders_pid(tmp_path):
    from handprop.run.claim import GRID_MARKER, make_or_adopt

    out, _ = make_or_adopt(tmp_path / "g", GRID_MARKER)
    with GridLock(out):
        assert (out / GRID_LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError, match=rf"\(pid {os.getpid()}\)"):
            GridLock(out)
    GridLock(out).release()  # free again
    with pytest.raises(OutputError, match="was not made by handprop"):
        GridLock(tmp_path)


# -- --jobs workers die with the grid ----------------------------------------------------


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc/PID/task/*/children)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead and waiting to be reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_jobs_workers_die_with_a_killed_grid_and_a_rerun_continues(tmp_path, command):
    epochs = 30000  # about 4 s a row on one core: running when killed, quick to finish
    grid = tmp_path / "g.csv"
    grid.write_text(
        f"{HEADER}\na,400,300,100,8,2.0,{epochs},digits,{epochs}\n"
        f"b,400,300,100,8,2.0,{epochs},digits,{epochs}\n"
    )
    out = tmp_path / "out"
    first = command(
        "experiments", grid, "--out", "out", "--jobs", "2", "-q", "--checkpoint-every", "0.1"
    )
    first.wait_for(lambda: all((out / r / "checkpoint.npz").is_file() for r in "ab"))
    workers = descendants(first.proc.pid)
    assert len(workers) >= 2, workers
    os.kill(first.proc.pid, signal.SIGKILL)  # the grid's process alone, as `kill -9 PID`
    first.proc.communicate(timeout=30)
    deadline = time.monotonic() + 5
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, [w for w in workers if alive(w)]
        time.sleep(0.05)

    # at once: the grid is free (no orphan holds it or a row), and the rows resume
    code, _, err = command("experiments", grid, "--out", "out", "--jobs", "2", "-q").finish()
    assert code == 0, err
    assert summary_statuses(out) == {"a": "completed", "b": "completed"}
    for r in "ab":
        metrics = json.loads((out / r / "metrics.json").read_text())
        assert metrics["epochs_completed"] == epochs
