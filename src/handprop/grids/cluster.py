"""Experiment grids on a Dask distributed cluster: rows are tasks, run folders come back.

``handprop experiments grid.csv --scheduler tcp://HOST:8786`` sends each row to the
workers behind that scheduler (``--scheduler local``, or ``--cluster local --jobs N``,
starts a ``LocalCluster`` on this machine). Workers need not share a disk with the
client:

- the client claims each row's folder in ``--out`` as a local grid does (made by
  handprop, marker first, locked while the row is out), skips complete rows, and ships
  what an unfinished row's folder holds (its config, checkpoint, history, split) with
  the task, so that an interrupted row resumes on whichever worker takes it;
- the worker trains the row into a temporary run folder of its own (made by
  :func:`handprop.run.claim.make_folder`, in its local directory), with handprop's threads
  and BLAS held to the worker's ``nthreads``; one row runs on a worker at a time (a
  worker resource, set by a plugin on every worker, late joiners included), and returns
  the folder's files as bytes;
- the client writes them into ``--out/<run_name>`` with atomic writes, metrics last.

A worker that cannot find the data, or a row that raises, is one failed row naming the
worker; a worker that dies mid-row has the row rerun elsewhere (the scheduler's
``allowed-failures``, plus ``retries`` for errors). Ctrl-C cancels the rows not yet
finished and writes the summary of those that did. An address where no scheduler answers
(nothing there, a silent server, a web server, a worker, a malformed address) is one
line within seconds (:func:`check_scheduler`), and the grid folder is locked while one
process runs it, as a local grid's is.

Dask is imported only here, and only when a cluster is asked for: ``import handprop``
and local grids never need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from handprop.atomic import atomic_write_bytes
from handprop.errors import ConfigError, HandpropError, Interrupted
from handprop.grids.grid import (
    GridRow,
    RunSummary,
    _in_order,
    _let_pass,
    _one_line,
    existing_row,
    run_one,
    write_summary,
)
from handprop.run.claim import (
    GRID_MARKER,
    RUN_MARKER,
    FolderLock,
    GridLock,
    make_folder,
    make_or_adopt,
    remove_if_unused,
)

#: seconds to reach a scheduler before saying it cannot be reached
CONNECT_TIMEOUT_S = 5.0
#: the address schemes --scheduler takes (Dask's others need certificates, UCX, or run
#: inside one process)
SCHEMES = ("tcp", "ws")
#: reruns of a row whose task raised (a worker that died is handled by the scheduler:
#: its rows go to other workers, up to distributed.scheduler.allowed-failures times)
ROW_RETRIES = 2
#: the worker resource a row takes: one row at a time on a worker, using its nthreads
ROW_RESOURCE = "handprop-row"
INSTALL_HINT = 'pip install -e ".[cluster]"'
#: the run-folder files written in this order when a row comes back: metrics.json,
#: which says the row is complete, last
_WRITE_LAST = "metrics.json"
#: seconds between looks at the rows' futures
_POLL_S = 0.02


class ClusterError(HandpropError):
    """Dask is missing, or the scheduler cannot be reached or asked."""


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError(
            f"--scheduler needs Dask distributed, which is not installed: {INSTALL_HINT}"
        ) from None
    return distributed


# -- connecting ----------------------------------------------------------------------------


@contextlib.contextmanager
def connect(scheduler: str, jobs: int | None = None) -> Iterator[Any]:
    """A Dask client on ``scheduler`` (``tcp://HOST:PORT``), or on a new LocalCluster of
    ``jobs`` worker processes for ``"local"``; closed (the LocalCluster stopped) on exit.

    Raises
    ------
    ClusterError
        Dask is not installed, or no scheduler answers at the address within
        :data:`CONNECT_TIMEOUT_S` seconds (and a little more for its reply): see
        :func:`check_scheduler`.
    """
    distributed = _distributed()
    import dask

    cluster = None
    timeout = f"{CONNECT_TIMEOUT_S}s"
    if scheduler != "local":
        check_scheduler(scheduler)
    with dask.config.set({"distributed.comm.timeouts.connect": timeout}):
        if scheduler == "local":
            cores = os.cpu_count() or 1
            n = jobs or min(cores, 4)
            cluster = distributed.LocalCluster(
                n_workers=n,
                threads_per_worker=max(1, cores // n),
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
            client = distributed.Client(cluster, set_as_default=False)
        else:
            try:
                client = _client_class()(
                    scheduler, timeout=timeout, set_as_default=False, direct_to_workers=False
                )
            except Exception as exc:  # it answered the check a moment ago: gone since
                raise _unreachable(scheduler, exc) from None
    try:
        client.register_plugin(_plugin(), name="handprop-one-row-per-worker")
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)


def check_scheduler(address: str) -> None:
    """Ask ``address`` who it is, as a Dask client would, all within
    :data:`CONNECT_TIMEOUT_S` seconds and a little more: whatever is there (nothing, a
    silent server, a web server, another protocol), this returns or raises, and leaves
    nothing behind to print at exit.

    Raises
    ------
    ClusterError
        Not an address (one line saying why), nothing answers there, something that is
        not a Dask scheduler answers, or nothing answers in time.
    """
    _distributed()
    import asyncio
    import threading

    from distributed.comm import connect as dask_connect
    from distributed.comm.addressing import parse_address

    expect = (
        "give the address `dask scheduler` prints, tcp://HOST:PORT (port 8786 unless "
        "it was started with another)"
    )
    try:
        scheme = parse_address(address, strict=False)[0]
    except (TypeError, ValueError) as exc:
        raise ClusterError(
            f"{address}: not a Dask scheduler's address ({_why(exc)}); {expect}"
        ) from None
    if scheme not in SCHEMES:
        raise ClusterError(
            f"{address}: handprop reaches a Dask scheduler over "
            f"{' or '.join(s + '://' for s in SCHEMES)}, not {scheme}://; {expect}"
        )

    class NoReplyError(Exception):
        """Connected, and nothing came back in time."""

    async def identity() -> Any:
        comm = await dask_connect(address, timeout=CONNECT_TIMEOUT_S)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> Any:
        try:  # dask's connect bounds the connection, not the handshake after it
            return await asyncio.wait_for(identity(), CONNECT_TIMEOUT_S + _REPLY_S)
        except asyncio.TimeoutError:
            raise NoReplyError from None

    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["reply"] = asyncio.run(bounded())
        except BaseException as exc:  # reported below, in the caller's thread
            outcome["error"] = exc

    # a thread of its own: asyncio.run needs a thread without a running event loop
    thread = threading.Thread(target=ask, name="handprop-scheduler-check", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 2 * _REPLY_S)
    error = outcome.get("error", None if "reply" in outcome else NoReplyError())
    reply = outcome.get("reply")
    if isinstance(error, NoReplyError):
        raise ClusterError(
            f"{address}: something there takes connections but does not answer as a Dask "
            f"scheduler (nothing came back within {CONNECT_TIMEOUT_S + _REPLY_S:g} s); " + expect
        )
    if isinstance(error, ValueError):  # malformed, or a scheme Dask has no comm for
        raise ClusterError(
            f"{address}: not a Dask scheduler's address ({_why(error)}); " + expect
        ) from None
    if isinstance(error, OSError) and "Timed out trying to connect" in str(error):
        raise _unreachable(address, error)
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    if error is not None or not isinstance(reply, dict):
        why = _why(error) if error is not None else f"it replied {str(reply)[:60]!r}"
        raise ClusterError(
            f"{address}: something there answers, but not as a Dask scheduler ({why}); " + expect
        )
    if reply.get("type") != "Scheduler":
        what = f"a Dask {reply['type']}" if isinstance(reply.get("type"), str) else "not"
        raise ClusterError(f"{address}: {what} a Dask scheduler; " + expect)


#: seconds, after connecting, for the handshake and the reply to ``identity``
_REPLY_S = 2.0


def _why(exc: BaseException) -> str:
    """An exception as the words in a message's brackets."""
    if isinstance(exc, MemoryError):  # a frame length read from someone else's bytes
        return "its reply is not Dask's protocol"
    return " ".join(str(exc).split()) or type(exc).__name__


def _unreachable(address: str, exc: BaseException) -> ClusterError:
    return ClusterError(
        f"{address}: cannot reach a Dask scheduler within {CONNECT_TIMEOUT_S:g} s "
        f"({_why(exc)}); start one with `dask scheduler` and give its address as "
        "tcp://HOST:PORT"
    )


def _client_class() -> Any:
    """Dask's Client, quiet when it fails to start: no close at garbage collection (a
    traceback at exit, after a wait of 10 s) for a client that never connected."""
    distributed = _distributed()

    class Client(distributed.Client):
        _failed = False

        def start(self, **kwargs: Any) -> None:
            try:
                super().start(**kwargs)
            except BaseException:
                self._failed = True
                raise

        def __del__(self) -> None:
            if not self._failed:
                super().__del__()

    return Client


def _plugin() -> Any:
    """A worker plugin giving every worker, present and future, one ROW_RESOURCE."""
    distributed = _distributed()

    class OneRowPerWorker(distributed.WorkerPlugin):
        async def setup(self, worker: Any) -> None:
            await worker.set_resources(**{ROW_RESOURCE: 1})

    return OneRowPerWorker()


# -- on a worker ---------------------------------------------------------------------------


def train_row(
    cfg: Any, shipped: dict[str, bytes], checkpoint_seconds: float | None
) -> tuple[RunSummary, dict[str, bytes]]:
    """A Dask task: one grid row trained (or resumed from the ``shipped`` files) in a
    temporary run folder on this worker; its summary and the folder's files."""
    from distributed import get_worker

    worker = get_worker()
    threads = worker.state.nthreads
    base = getattr(worker, "local_directory", None) or None
    with tempfile.TemporaryDirectory(prefix="handprop-row-", dir=base) as tmp:
        try:
            folder = make_folder(tmp, cfg.name)
            for name, data in shipped.items():
                atomic_write_bytes(folder / _safe_name(name), data)
        except HandpropError as exc:
            summary, files = RunSummary(cfg.name, "failed", message=str(exc)), {}
        else:
            summary = run_one(cfg, folder, threads, False, checkpoint_seconds)
            files = _folder_files(folder)
    if summary.status == "failed" and summary.message:
        summary = dataclasses.replace(
            summary, message=f"on worker {worker.address}: {summary.message}"
        )
    return summary, files


def _folder_files(folder: Path) -> dict[str, bytes]:
    """A run folder's files (not its marker, not temporaries)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def _safe_name(name: str) -> str:
    """A file name that stays inside its run folder."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"{name!r}: not a run-folder file name")
    return name


# -- on the client -------------------------------------------------------------------------


@dataclasses.dataclass
class _Claim:
    """A row's folder in --out, locked while the row is on the cluster."""

    row: GridRow
    folder: Path
    made: bool
    lock: FolderLock | None

    def release(self) -> None:
        """Unlock; a folder made for the row that got nothing back goes again."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.made:
            remove_if_unused(self.folder)  # holds only the marker: leave no trace


def _claim(row: GridRow, out: Path) -> tuple[_Claim | None, RunSummary | None]:
    """The row's folder claimed and its files to ship, or the row's summary when it
    needs no cluster (complete: skipped; not handprop's, another config: failed)."""
    made, lock = False, None
    try:
        folder, made = make_or_adopt(out / row.name)
        lock = FolderLock(folder)
        skipped = existing_row(row.config, folder)
        if skipped is None:
            return _Claim(row, folder, made, lock), None
        lock.release()
        return None, skipped
    except (HandpropError, OSError) as exc:
        if lock is not None:
            lock.release()
        if made:
            remove_if_unused(out / row.name)
        return None, RunSummary(row.name, "failed", message=_one_line(exc))


def _shipped(folder: Path) -> dict[str, bytes]:
    """What an unfinished row's folder holds, for the worker to resume from."""
    from handprop.run.writer import RUN_FILES

    return {n: (folder / n).read_bytes() for n in RUN_FILES if (folder / n).is_file()}


def _write_back(claim: _Claim, summary: RunSummary, files: dict[str, bytes]) -> RunSummary:
    """The worker's run folder written into the row's folder: every file atomically,
    metrics.json last; run files the worker no longer has (a completed run's
    checkpoint) removed after."""
    from handprop.run.writer import RUN_FILES

    summary = dataclasses.replace(summary, name=claim.row.name)
    try:
        names = sorted(files, key=lambda n: (n == _WRITE_LAST, n))
        for name in names:
            if name == RUN_MARKER:
                continue
            atomic_write_bytes(claim.folder / _safe_name(name), files[name])
        for name in RUN_FILES:
            if name not in files:
                (claim.folder / name).unlink(missing_ok=True)
    except (HandpropError, OSError) as exc:
        return RunSummary(claim.row.name, "failed", message=_one_line(exc))
    return summary


def _failure(row: GridRow, exc: BaseException) -> RunSummary:
    """A row whose task raised on the cluster (after its retries)."""
    kind = type(exc).__name__
    if kind == "KilledWorker":
        message = (
            "the workers running it died each time (killed, or out of memory); "
            "run the grid again to retry it"
        )
    else:
        text = " ".join(str(exc).split())
        message = f"{kind}: {text}" if text else kind
    return RunSummary(row.name, "failed", message=f"on the cluster: {message}")


def run_grid_on_cluster(
    rows: list[GridRow],
    out: str | Path,
    client: Any,
    progress: bool = True,
    on_done: Callable[[RunSummary], None] | None = None,
    checkpoint_seconds: float | None = None,
) -> list[RunSummary]:
    """Run every row on the cluster behind ``client`` into ``out/<run_name>``; return
    the summaries in row order (as :func:`handprop.grids.grid.run_grid` does).

    Ctrl-C (or SIGTERM) cancels the rows not yet finished (running ones are reported
    interrupted, queued ones cancelled), writes the summary and raises
    :class:`~handprop.errors.Interrupted` carrying the summaries (its ``outcome``).
    """
    out, _ = make_or_adopt(out, GRID_MARKER)
    with GridLock(out):  # one process runs the grid at a time
        return _run_grid_on_cluster(rows, out, client, progress, on_done, checkpoint_seconds)


def _run_grid_on_cluster(
    rows: list[GridRow],
    out: Path,
    client: Any,
    progress: bool,
    on_done: Callable[[RunSummary], None] | None,
    checkpoint_seconds: float | None,
) -> list[RunSummary]:
    _allow_open_files(len(rows))
    results: dict[str, RunSummary] = {}
    claims: dict[str, _Claim] = {}
    futures: dict[Any, _Claim] = {}
    bar = _Bar(len(rows), progress)

    def done(summary: RunSummary) -> None:
        results[summary.name] = summary
        bar.update(summary)
        if on_done:
            with bar.writing():
                on_done(summary)

    def finish(future: Any) -> None:
        claim = futures.pop(future)
        try:
            summary, files = future.result()
        except Exception as exc:
            done(_failure(claim.row, exc))
            claim.release()
            return
        summary = _write_back(claim, summary, files)
        claim.release()
        done(summary)

    grid = uuid.uuid4().hex[:8]
    try:
        for row in rows:
            claim, summary = _claim(row, out)
            if summary is not None:
                done(summary)
                continue
            claims[row.name] = claim
            future = client.submit(
                train_row,
                row.config,
                _shipped(claim.folder),
                checkpoint_seconds,
                key=f"handprop-{grid}-{row.name}",
                resources={ROW_RESOURCE: 1},
                retries=ROW_RETRIES,
                pure=False,
            )
            futures[future] = claim
        pending = list(futures)
        asked = 0.0
        while pending:
            for future in [f for f in pending if f.done()]:
                pending.remove(future)
                finish(future)
            if bar.bar is not None and time.monotonic() - asked > 0.5:
                bar.running(_running(client, pending))
                asked = time.monotonic()
            if pending:
                time.sleep(_POLL_S)
    except KeyboardInterrupt as exc:
        previous = {s: signal.signal(s, _let_pass) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _stop(client, futures, finish, done)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            bar.close()
            for claim in claims.values():
                claim.release()
        summaries = _in_order(rows, results)
        write_summary(out, summaries)
        raise Interrupted.after(exc, summaries) from exc
    finally:
        bar.close()
        for claim in claims.values():
            claim.release()
    summaries = _in_order(rows, results)
    write_summary(out, summaries)
    return summaries


def _stop(
    client: Any,
    futures: dict[Any, _Claim],
    finish: Callable[[Any], None],
    done: Callable[[RunSummary], None],
) -> None:
    """After Ctrl-C: rows already back are written; the others are cancelled, those
    running reported interrupted (their folders keep the last checkpoint that came
    back, so the next run resumes from it), queued ones left to be "cancelled"."""
    running = set()
    with contextlib.suppress(Exception):
        running = {k for keys in client.run(_executing).values() for k in keys}
    unfinished = []
    for future in list(futures):
        if future.status in ("finished", "error"):
            finish(future)
        else:
            unfinished.append(future)
    with contextlib.suppress(Exception):
        client.cancel(unfinished, force=True)
    for future in unfinished:
        claim = futures.pop(future)
        if future.key in running:
            done(
                RunSummary(
                    claim.row.name,
                    "interrupted",
                    message="stopped on the cluster before it finished; "
                    "run the grid again to continue it",
                )
            )


def _executing(dask_worker: Any) -> list[str]:
    """The keys a worker is executing now (run on each worker by ``client.run``)."""
    return [str(ts.key) for ts in dask_worker.state.executing]


def _running(client: Any, pending: list[Any]) -> int:
    """How many of the grid's rows workers are running now: the workers holding one
    (a worker runs one row at a time; the scheduler may queue more on it)."""
    if not pending:
        return 0
    keys = {f.key for f in pending}
    try:
        processing = client.processing()
    except Exception:
        return 0
    return sum(1 for ks in processing.values() if keys.intersection(ks))


def _allow_open_files(rows: int) -> None:
    """Each row out on the cluster holds its folder's lock (an open file): raise the
    soft limit on open files toward the hard one when a large grid needs it."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = rows + 256
        if soft != resource.RLIM_INFINITY and soft < need:
            top = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


class _Bar:
    """Rows done / failed / running across the cluster (tqdm, on stderr)."""

    def __init__(self, total: int, show: bool) -> None:
        self.bar = None
        self.failed = 0
        self.now_running = 0
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="grid", unit="row", dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            done = self.bar.n - self.failed
            self.bar.set_postfix_str(
                f"done {done}, failed {self.failed}, running {self.now_running}"
            )

    def update(self, summary: RunSummary) -> None:
        if summary.status not in ("completed", "skipped"):
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def running(self, n: int) -> None:
        if n != self.now_running:
            self.now_running = n
            self._postfix()

    def writing(self) -> Any:
        if self.bar is None:
            return contextlib.nullcontext()
        return self.bar.external_write_mode()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
