"""Experiment grids on a real Dask cluster: a scheduler and workers in processes of
their own, each worker in a folder of its own (no disk shared with the grid's run
folders), all on 127.0.0.1 and all killed when the test ends, passed or not."""

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason='needs Dask distributed: pip install -e ".[cluster]"')

from handprop.grids.grid import read_grid, run_one

HEADER = "run_name,d,dtrain,dtest,m,alpha,epochs,dataset,eval_every,data_dir"
GRID = [
    "a,400,300,100,8,2.0,30,digits,10,",
    "b,400,300,100,12,1.0,30,digits,10,",
    "c,400,300,100,6,2.0,20,digits,10,",
    "nodata,400,300,100,8,2.0,20,mnist,10,/nonexistent/handprop-data",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes, each in its own session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[Path, subprocess.Popen] = {}

    def _start(self, args: list[str], cwd: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(cwd / "log.txt", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HANDPROP_THREADS": "1"},
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start(self, workers: int) -> None:
        self._start(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            self.root / "scheduler",
        )
        for i in range(workers):
            folder = self.root / f"worker{i}"
            self.workers[folder] = self._start(
                [
                    "worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--local-directory",
                    str(folder / "scratch"),
                ],
                folder,
            )
        from distributed import Client

        with Client(self.address, timeout=20) as client:
            client.wait_for_workers(workers, timeout=30)

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(proc)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.stop()  # never leave a scheduler or worker behind, even when the test failed


HANDPROP = [sys.executable, "-c", "from handprop.cli import main; main()"]


def handprop(*args, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HANDPROP, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


@contextlib.contextmanager
def grid_on_cluster(grid: Path, cluster, cwd: Path, *options: str):
    """``handprop experiments GRID --out out --scheduler ... -q`` running in a process
    group of its own; killed with its group on the way out if it still runs."""
    args = ["experiments", str(grid), "--out", "out", "--scheduler", cluster.address, "-q"]
    command = subprocess.Popen(
        [*HANDPROP, *args, *options],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield command
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.communicate()


def npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_a_grid_on_a_cluster_gives_the_local_numbers(tmp_path, cluster):
    cluster.start(workers=2)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    grid = client_dir / "g.csv"
    grid.write_text("\n".join([HEADER, *GRID]) + "\n")
    result = handprop(
        "experiments", grid, "--out", "out", "--scheduler", cluster.address, "-q", cwd=client_dir
    )
    assert result.returncode == 1, result.stderr  # the row without data failed
    out = client_dir / "out"
    with (out / "summary.csv").open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert [table[n]["status"] for n in "abc"] == ["completed"] * 3
    # the worker that could not find the data: that row alone, with the worker's words
    assert table["nodata"]["status"] == "failed"
    assert "on worker tcp://127.0.0.1:" in table["nodata"]["message"]
    assert "/nonexistent/handprop-data" in table["nodata"]["message"]
    assert not (out / "nodata").exists()  # refused before it began: no trace
    # the run folders came back whole, handprop's (marker), no checkpoint left over
    for name in "abc":
        folder = out / name
        assert (folder / ".handprop-run").is_file()
        assert {"config.toml", "model.npz", "metrics.json", "history.csv"} <= {
            p.name for p in folder.iterdir()
        }
        assert not (folder / "checkpoint.npz").exists()
    # the workers trained in their own folders and kept nothing
    for worker in cluster.workers:
        assert not list(worker.rglob("metrics.json"))

    # the same numbers as a local run with the same threads
    for row in read_grid(grid)[:3]:
        local = run_one(row.config, tmp_path / "local" / row.name, 1, False)
        far = out / row.name
        metrics = json.loads((far / "metrics.json").read_text())
        assert (metrics["accuracy"], metrics["final_loss"]) == (local.accuracy, local.final_loss)
        assert float(table[row.name]["accuracy"]) == pytest.approx(local.accuracy, abs=1e-6)
        mine, theirs = npz(tmp_path / "local" / row.name / "model.npz"), npz(far / "model.npz")
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
        assert (far / "predictions.csv").read_bytes() == (
            tmp_path / "local" / row.name / "predictions.csv"
        ).read_bytes()

    # again: complete rows are skipped on the client, the failed one tried again
    again = handprop(
        "experiments", grid, "--out", "out", "--scheduler", cluster.address, "-q", cwd=client_dir
    )
    assert "a: skipped" in again.stdout and "nodata: failed" in again.stdout, again.stderr


def test_a_worker_killed_mid_row_has_its_row_rerun_elsewhere(tmp_path, cluster):
    cluster.start(workers=2)
    grid = tmp_path / "g.csv"
    grid.write_text(f"{HEADER}\nlong,400,300,100,16,1.0,4000,digits,4000,\n")
    with grid_on_cluster(grid, cluster, tmp_path, "--checkpoint-every", "0.1") as command:
        # the row is running once a worker's own folder holds its checkpoint
        deadline = time.monotonic() + 30
        victim = None
        while victim is None:
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "the row never started on a worker"
            victim = next(
                (w for w in cluster.workers if list(w.rglob("long/checkpoint.npz"))), None
            )
            time.sleep(0.05)
        cluster.kill(cluster.workers[victim])
        out, err = command.communicate(timeout=60)
    assert command.returncode == 0, err
    assert "long: completed" in out
    metrics = json.loads((tmp_path / "out" / "long" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == 4000


def test_an_unreachable_scheduler_is_one_line_quickly(tmp_path):
    grid = tmp_path / "g.csv"
    grid.write_text(f"{HEADER}\n{GRID[0]}\n")
    started = time.monotonic()
    result = handprop(
        "experiments",
        grid,
        "--scheduler",
        f"tcp://127.0.0.1:{free_port()}",
        cwd=tmp_path,
        timeout=30,
    )
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("handprop: error: tcp://127.0.0.1:")
    assert "cannot reach a Dask scheduler" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_dask_is_imported_only_when_a_cluster_is_asked_for():
    code = (
        "import sys, handprop, handprop.grids.grid, handprop.cli.experiments; "
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ctrl_c_cancels_the_rows_left_and_writes_the_summary(tmp_path, cluster):
    cluster.start(workers=2)
    grid = tmp_path / "g.csv"
    long = ",400,300,100,16,1.0,100000,digits,100000,"
    grid.write_text(
        f"{HEADER}\nquick,400,300,100,8,2.0,10,digits,10,\n"
        + "\n".join(f"long{i}{long}" for i in range(3))
        + "\n"
    )
    with grid_on_cluster(grid, cluster, tmp_path) as command:
        deadline = time.monotonic() + 30
        while not (tmp_path / "out" / "quick" / "metrics.json").exists():
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "the quick row never came back"
            time.sleep(0.05)
        time.sleep(0.5)  # the long rows are running or queued
        os.killpg(command.pid, signal.SIGINT)
        _, err = command.communicate(timeout=30)
    assert command.returncode == 130, err
    with (tmp_path / "out" / "summary.csv").open() as f:
        table = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert table["quick"] == "completed"
    assert sorted(table[f"long{i}"] for i in range(3)) in (
        ["cancelled", "interrupted", "interrupted"],
        ["cancelled", "cancelled", "interrupted"],
    )
    # nothing came back for the long rows: no folder left behind for them
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["quick"]


class Server:
    """A TCP server on 127.0.0.1 that is not a Dask scheduler, in a thread, accepting
    for as long as the test runs: ``silent`` holds each connection and says nothing,
    ``garbage`` answers each with bytes that are not Dask's, ``http`` is a web server.
    :meth:`stop` closes it and every connection (bounded waits)."""

    def __init__(self, kind: str) -> None:
        import threading

        self.kind = kind
        self.conns: list[socket.socket] = []
        self.http = None
        if kind == "http":
            from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

            self.http = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
            self.port = self.http.server_address[1]
            self.thread = threading.Thread(
                target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)
            self.sock.settimeout(0.05)
            self.port = self.sock.getsockname()[1]
            self.stopping = False
            self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            if self.kind == "garbage":
                with contextlib.suppress(OSError):
                    conn.sendall(b"\xff\x00HTTP/1.1 418 I'm a teapot\r\n" * 64)

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        else:
            self.stopping = True
            self.thread.join(timeout=5)
            self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def server():
    started: list[Server] = []

    def start(kind: str) -> Server:
        started.append(Server(kind))
        return started[-1]

    yield start
    for s in started:  # stopped even when the test failed
        s.stop()


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        # takes the connection and never answers: waited forever before
        ("silent", "something there takes connections but does not answer as a Dask scheduler"),
        # a web server: "out of memory" and a Client.__del__ traceback before
        ("http", "something there takes connections but does not answer as a Dask scheduler"),
        ("garbage", "something there answers, but not as a Dask scheduler"),
        ("closed", "cannot reach a Dask scheduler within 5 s"),
        ("udp", "handprop reaches a Dask scheduler over tcp:// or ws://, not udp://"),
        ("malformed", "not a Dask scheduler's address (missing port number"),
    ],
)
def test_a_wrong_scheduler_is_one_line_within_seconds(tmp_path, server, kind, says):
    """Whatever is at the address, one line within ~10 s, and nothing printed after it
    (no TimeoutError traceback, no Client.__del__ at exit)."""
    if kind in ("silent", "http", "garbage"):
        address = f"tcp://127.0.0.1:{server(kind).port}"
    elif kind == "closed":
        address = f"tcp://127.0.0.1:{free_port()}"
    elif kind == "udp":
        address = f"udp://127.0.0.1:{free_port()}"
    else:
        address = "tcp://127.0.0.1"
    grid = tmp_path / "g.csv"
    grid.write_text(f"{HEADER}\n{GRID[0]}\n")
    started = time.monotonic()
    result = handprop("experiments", grid, "--scheduler", address, cwd=tmp_path, timeout=30)
    assert time.monotonic() - started < 12, result.stderr
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"handprop: error: {address}: "), lines[0]
    assert says in lines[0]
    assert not (tmp_path / "runs").exists()
