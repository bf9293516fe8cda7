"""``python -m benchmarks.gpu``: handprop on a GPU (CuPy) beside PyTorch-CUDA (issues 16, 31).

Measurements in one process, every contender warmed up first, the devices synchronized
around every timed region, medians of several runs:

- ``seed``: experiments/baseline.cfg's run, loaded, split and initialised by
  ``handprop.run`` as ``handprop train`` does (784-100-10 sigmoid, softmax cross-entropy,
  full-batch gradient descent, lr 2.5, 1000 epochs, float32, 18000 training and 2000 test
  images): the 1000 epochs with handprop on the device, its step a CUDA graph replayed
  (``graph = "auto"``), eagerly (``"off"``) and through the trainer's own loop
  (``run_epoch``), against the same algorithm by hand in PyTorch
  (``torch_ref.hand_written_body``, no autograd) from the same initial weights, eager and
  as a CUDA graph (``torch.cuda.graph``); graph and eager handprop's parameters after the
  same epochs; test accuracy of each, and of one handprop run on the CPU for as many
  epochs as fit ``--cpu-budget`` seconds beside the device's run of as many epochs.
- ``cnn``: epochs of experiments/cnn.toml's network (conv 32 3, relu, maxpool 2, conv 64 3,
  relu, maxpool 2, dense 128, relu, dropout 0.5, dense 10; its seed and He init; Adam 1e-3,
  batch 128, shuffled; constant lr and no augmentation) on the 60000 training images:
  handprop with graphs and without against ``torch_ref.cnn_training`` (nn.Conv2d, cuDNN
  with ``benchmark = True``, autograd, torch.optim.Adam); the speed-up over handprop's CPU
  epoch (``--cpu-epoch-seconds``); the timed epochs are the training (one warm-up epoch,
  then as many timed ones as fit ``--cnn-budget`` seconds, every side the same count):
  test accuracy after them, and graph vs eager handprop's parameters.
- ``layers``: each pass of one eager training step, host and GPU time.
- ``compile`` (alone: ``--only compile --json gpu_compile.json``): the seed epoch through
  ``torch.compile(mode="reduce-overhead")``, its compile time apart.

Everything is float32 on both sides: TF32 is off in PyTorch (cuDNN's convolutions would
use it by default; ``--torch-tf32`` allows it), as it is in CuPy. The results go to
``OUT/gpu_results.json`` after every part, so a run cut short keeps what it measured, and
a Markdown table is printed at the end (and stored in the JSON).

    python -m benchmarks.gpu --out gpu_out          # on the GPU machine (gpu_check.sh)
    python -m benchmarks.gpu --device cpu --quick   # the harness's logic on any machine
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import torch_ref
from benchmarks.cases import (
    ADAM_LR,
    BASELINE_CFG,
    BATCH,
    CNN_EPOCH_BATCHES,
    dense_params,
    pass_name,
)
from benchmarks.common import (
    REPO_ROOT,
    Row,
    Target,
    atomic_write_text,
    machine_description,
    median,
    now_iso,
    numpy_blas_threads,
    results_table,
    versions,
)

CNN_CFG = REPO_ROOT / "experiments" / "cnn.toml"
TARGETS = {  # issue 31
    "seed": Target("<=", 1.0),
    "cnn": Target("<=", 1.3),
    "cpu_speedup": Target(">=", 20.0),
}
#: --device choices: "array_api_strict" runs handprop's device path on the CPU (tests)
DEVICES = ("cuda", "cpu", "array_api_strict")
#: --quick: epochs of the seed runs, training images and test images of the CNN
QUICK_SEED_EPOCHS, QUICK_CNN_TRAIN, QUICK_TEST = 20, 10 * BATCH, 2000


class TerminatedError(Exception):
    """SIGTERM (``timeout``) arrived: stop measuring, keep what was measured."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise TerminatedError(f"stopped by signal {signum} (timeout)")


# -- where the code runs --------------------------------------------------------------


@dataclass
class Device:
    """handprop's array namespace, PyTorch's device, and how to wait for both."""

    name: str  # one of DEVICES
    xp: Any
    torch: Any = None  # None: PyTorch skipped, for the reason in torch_why
    torch_device: str = "cpu"
    torch_why: str = ""
    facts: dict[str, str] = field(default_factory=dict)

    def sync(self) -> None:
        """Wait for every queued kernel of both libraries (no-op on the CPU)."""
        if self.name == "cuda":
            import cupy

            cupy.cuda.Device().synchronize()
        if self.torch is not None and self.torch_device == "cuda":
            self.torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, result) of ``fn()``, the devices idle before and after."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def launch_profile(
    rep: Report, dev: Device, case: str, what: str, fns: dict[str, Callable[[], Any]]
) -> None:
    """Where a step's time goes on the GPU: for each of ``fns`` the host's time per call
    (Python and kernel launches) beside the GPU's (CUDA events around the call, so idle
    gaps between its kernels count), from ``cupyx.profiler.benchmark``. A GPU time close
    to the host's says the GPU waited for launches. Nothing on the CPU."""
    if dev.name != "cuda":
        return
    from cupyx.profiler import benchmark

    found = rep.details.setdefault("launch_profile", {})
    for name, fn in fns.items():
        result = benchmark(fn, n_repeat=30, n_warmup=3)
        cpu_ms = float(np.median(result.cpu_times)) * 1e3
        gpu_ms = float(np.median(result.gpu_times[0])) * 1e3
        found[f"{case} {name}"] = {"cpu_ms": cpu_ms, "gpu_ms": gpu_ms}
        rep.rows.append(
            Row(
                case,
                f"ms per {what}, {name}: host (launch) / GPU",
                cpu_ms,
                "GPU time (CUDA events)",
                gpu_ms,
                cpu_ms / gpu_ms,
                note="cupyx.profiler.benchmark, median of 30 after 3 warm-up calls. The GPU "
                "time runs from the call's first kernel to its last kernel's end, gaps included: "
                "near the host's time (or above), the GPU waited for launches",
            )
        )


def open_device(name: str, tf32: bool = False) -> Device:
    """The Device for ``name``; :class:`handprop.nn.backend.DeviceError` when "cuda"
    cannot be used here."""
    from handprop.nn import backend

    if name == "cuda":
        xp = backend.device_namespace("cuda")  # raises DeviceError: no GPU or no CuPy
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        facts = {
            "gpu": gpu,
            "cupy": cupy.__version__,
            "cuda runtime": str(cupy.cuda.runtime.runtimeGetVersion()),
        }
    elif name == "array_api_strict":
        import array_api_strict as xp

        facts = {"namespace": f"array_api_strict {xp.__version__}"}
    else:
        xp, facts = np, {}
    dev = Device(name, xp, facts=facts)
    torch, why = torch_ref.import_torch()
    if torch is None:
        dev.torch_why = why
    elif name == "cuda" and not torch.cuda.is_available():
        dev.torch_why = f"PyTorch {torch.__version__} sees no CUDA device"
    else:
        dev.torch, dev.torch_device = torch, "cuda" if name == "cuda" else "cpu"
        facts["torch"] = torch.__version__
        if dev.torch_device == "cuda":
            # float32 on both sides: cuDNN's convolutions default to TF32, CuPy does not
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
            facts["torch cuda"] = str(torch.version.cuda)
            facts["cudnn"] = str(torch.backends.cudnn.version())
            facts["torch settings"] = f"cudnn.benchmark, TF32 {'on' if tf32 else 'off'}"
    return dev


# -- the report -----------------------------------------------------------------------


@dataclass
class Report:
    """What the run has measured so far; written whole after every part."""

    path: Path
    settings: dict[str, Any]
    device: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    status: str = "running"
    started: str = field(default_factory=now_iso)
    t0: float = field(default_factory=time.perf_counter)

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {message}", flush=True)

    def ordered_rows(self) -> list[Row]:
        """The rows by case: the timings first, the accuracies last."""
        order = {"seed": 0, "cnn": 1, "accuracy": 2}
        return sorted(self.rows, key=lambda r: order.get(r.case, 3))

    def write(self) -> None:
        import json

        data = {
            "started": self.started,
            "written": now_iso(),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "status": self.status,
            "command": " ".join(sys.argv),
            "settings": self.settings,
            "device": self.device,
            "versions": versions(),
            "machine": machine_description(numpy_blas_threads(), None),
            "rows": [asdict(r) for r in self.ordered_rows()],
            "table": results_table(self.ordered_rows()),
            "details": self.details,
            "errors": self.errors,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, indent=2, default=str) + "\n")

    def run_part(self, name: str, part: Callable[[], None]) -> None:
        """Run one part; an exception becomes a skipped row and an entry in ``errors``
        (the parts after it still run); the report is written either way."""
        self.say(f"--- {name}")
        try:
            part()
        except TerminatedError:
            raise
        except Exception as exc:  # a measurement harness reports, it does not stop
            line = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.rows.append(Row.skipped(name, line))
            self.errors.append({"part": name, "error": line, "traceback": traceback.format_exc()})
            self.say(f"{name} failed: {line}")
            print(traceback.format_exc(), flush=True)
        finally:
            self.write()


def interleaved(
    dev: Device,
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    times: dict[str, list[float]],
    reset: dict[str, Callable[[], None]] | None = None,
    budget: float = math.inf,
) -> dict[str, list[float]]:
    """Seconds of each run appended to ``times[name]`` (kept in the report as they come),
    ``repeats`` rounds, the order rotating every round so that no contender always
    follows the same one; ``reset[name]()`` before each call, outside the timed region.
    Stops early (after at least one round) when another round would pass ``budget``
    seconds. Returns ``times``."""
    names = list(runs)
    for name in names:
        times[name] = []
    start = time.perf_counter()
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            if reset:
                reset[name]()
            times[name].append(dev.timed(runs[name])[0])
        elapsed = time.perf_counter() - start
        if elapsed * (rep + 2) / (rep + 1) > budget:
            break
    return times


def spread_s(values: Sequence[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g} s"


# -- data -------------------------------------------------------------------------------


def load_run(cfg_path: Path, mnist: Path) -> tuple[Any, Any, Any]:
    """(config, data, network on the host) of an experiment file, as ``handprop train``
    loads, splits and initialises them; features shaped to the network's input."""
    from handprop.config import load_config
    from handprop.run import build_network, load_split

    cfg = load_config(cfg_path).replace(data_dir=str(mnist))
    data = load_split(cfg, progress=False)
    net = build_network(cfg, data)
    for name in ("X_train", "X_test"):
        X = getattr(data, name)
        setattr(data, name, np.ascontiguousarray(X.reshape(len(X), *net.input_shape)))
    return cfg, data, net


def accuracy(predicted: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == y))


# -- a. the seed config -------------------------------------------------------------------


def hp_epochs(step: Any, Xd: Any, yd: Any, epochs: int) -> Callable[..., float]:
    """``n`` full-batch epochs through a :class:`~handprop.scale.TrainingStep` (a CUDA
    graph replayed, or the eager passes), the loss left on the device until the end."""

    def run(n: int = epochs) -> float:
        loss = math.nan
        for _ in range(n):
            loss, _ = step.train_pass(Xd, yd)
            step.update()
        return float(loss)

    return run


def trainer_epochs(model: Any, opt: Any, step: Any, Xd: Any, yd: Any, epochs: int) -> Callable:
    """``n`` epochs as ``handprop train`` runs them (:func:`handprop.run.run_epoch`:
    the loss and the training accuracy read back every epoch)."""
    from handprop.run import run_epoch

    def run(n: int = epochs) -> float:
        loss = math.nan
        for _ in range(n):
            loss, _ = run_epoch(model, opt, Xd, yd, yd.shape[0], None, lambda loss: None, step=step)
        return loss

    return run


def relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max |b| of two parameter vectors (on any device)."""
    from handprop.nn import backend

    a, b = backend.to_host(a).astype(np.float64), backend.to_host(b).astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def part_seed(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """experiments/baseline.cfg's 1000 epochs on the device: handprop with CUDA graphs
    (and without) vs PyTorch by hand, eager and as a CUDA graph; handprop on the CPU for
    the accuracy; graph and eager handprop's parameters compared."""
    from handprop.nn import GD, backend
    from handprop.scale import DataParallel, TrainingStep

    cfg, data, net = load_run(BASELINE_CFG, args.mnist)
    epochs = QUICK_SEED_EPOCHS if args.quick else cfg.epochs
    X, y, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
    init = dense_params(net)  # the initial weights, for PyTorch
    info: dict[str, Any] = {"epochs": epochs, "train": len(y), "test": len(yte)}
    rep.details["seed"] = info
    rep.say(f"seed: {len(y)}x{X.shape[1]} float32, {epochs} epochs, lr {cfg.learning_rate}")

    net.to(dev.xp)
    p0 = backend.asarray(backend.to_host(net.params).copy(), net.xp)
    Xd, yd = backend.asarray(X, net.xp), backend.asarray(y, net.xp)
    model, gd = DataParallel(net), GD(cfg.learning_rate)  # as the trainer runs it
    graph_step = TrainingStep(model, gd, "auto")
    eager_step = TrainingStep(model, gd, "off")

    def hp_reset() -> None:
        net.params[...] = p0

    runs: dict[str, Callable[[], Any]] = {
        "handprop graph": hp_epochs(graph_step, Xd, yd, epochs),
        "handprop eager": hp_epochs(eager_step, Xd, yd, epochs),
        "handprop train loop": trainer_epochs(model, gd, graph_step, Xd, yd, epochs),
    }
    resets: dict[str, Callable[[], None]] = dict.fromkeys(runs, hp_reset)
    if dev.torch is not None:
        body, tensors = torch_ref.hand_written_body(
            dev.torch, X, y, init, cfg.learning_rate, device=dev.torch_device
        )
        t0 = [t.clone() for t in tensors]

        def torch_reset() -> None:
            for t, start in zip(tensors, t0, strict=True):
                t.copy_(start)

        def torch_runs(epoch: Callable[[], float]) -> Callable[..., float]:
            def run(n: int = epochs) -> float:
                loss = math.nan
                for _ in range(n):
                    loss = epoch()  # float(loss): the host waits every epoch
                return loss

            return run

        runs["torch"] = torch_runs(lambda: float(body()))
        resets["torch"] = torch_reset
        if dev.torch_device == "cuda":
            try:
                runs["torch graph"] = torch_runs(torch_ref.graphed(dev.torch, body))
                resets["torch graph"] = torch_reset
            except Exception as exc:  # reported, the rest still measured
                info["torch_graph_error"] = f"{type(exc).__name__}: {exc}"
                rep.say(f"torch CUDA graph failed: {info['torch_graph_error']}")
                traceback.print_exc()
    warm = {}
    for name, run in runs.items():  # warm-up: kernels compiled, graphs captured
        resets[name]()
        warm[name] = dev.timed(lambda run=run: run(min(epochs, 20)))[0]
    info["warmup_seconds"] = warm
    info["graph"] = {
        "captures": graph_step.captures,
        "replays": graph_step.replays,
        "off_reason": graph_step.off_reason,
    }
    rep.say(f"seed warm-up (s): {warm}; graph: {info['graph']}")
    times = interleaved(
        dev, runs, args.repeats, info.setdefault("seconds", {}), resets, args.seed_budget
    )
    info["graph"]["replays"] = graph_step.replays
    med = {name: median(t) for name, t in times.items()}
    # the same 1000 epochs from the same weights, graph and eager: equal to rounding
    finals = {}
    for name in ("handprop eager", "handprop graph"):
        hp_reset()
        runs[name]()
        finals[name] = backend.to_host(net.params).copy()
    info["graph_vs_eager_params"] = relative_difference(*finals.values())
    info["handprop_final_loss"] = float(model.loss_value(Xd, yd))
    info["handprop_accuracy"] = accuracy(model.predict(Xte), yte)
    spreads = ", ".join(f"{k} {spread_s(v)}" for k, v in times.items())
    note = (
        f"{len(y)} train / {len(yte)} test images (baseline.cfg's split and init), median of "
        f"{len(times['handprop graph'])} runs after a warm-up; {spreads}"
    )
    hp_s = med["handprop graph"]
    if "torch" in med:
        torch_reset()
        runs["torch"]()
        weights = [t.cpu().numpy() for t in tensors]
        info["torch_final_loss"] = float(body())  # the loss of the weights after them
        t_acc = accuracy(torch_ref.inference(dev.torch, Xte, weights)().argmax(1), yte)
        info["torch_accuracy"] = t_acc
        rep.rows.append(
            Row.compare(
                "seed",
                f"s / {epochs} epochs, handprop CUDA graphs",
                hp_s,
                f"PyTorch {dev.torch_device} eager (by hand)",
                med["torch"],
                TARGETS["seed"],
                f"{note}; final loss handprop {info['handprop_final_loss']:.5f}, torch "
                f"{info['torch_final_loss']:.5f}; PyTorch reads the loss every epoch, "
                "handprop at the end (its train loop's row reads it every epoch)",
            )
        )
        for name, ref in (
            ("handprop eager", "torch"),
            ("handprop train loop", "torch"),
            ("handprop graph", "torch graph"),
        ):
            if name in med and ref in med:
                rep.rows.append(
                    Row.compare(
                        "seed",
                        f"s / {epochs} epochs, {name}",
                        med[name],
                        f"PyTorch {ref}",
                        med[ref],
                        None,
                        "train loop: handprop.run.run_epoch, the loss and the training "
                        "accuracy read every epoch; torch graph: torch.cuda.graph of the "
                        "hand-written epoch, loss read every epoch",
                    )
                )
        rep.rows.append(
            Row.compare(
                "accuracy",
                f"seed config test acc after {epochs} epochs",
                info["handprop_accuracy"],
                f"PyTorch {dev.torch_device} (by hand)",
                t_acc,
                None,
                f"handprop on {dev.name} with CUDA graphs; same initial weights, same algorithm",
            )
        )
    else:
        rep.rows.append(
            Row("seed", f"s / {epochs} epochs", hp_s, note=f"{note}; torch: {dev.torch_why}")
        )
    rep.rows.append(
        Row(
            "checks",
            f"seed: graph vs eager parameters after {epochs} epochs, max abs diff / max abs",
            info["graph_vs_eager_params"],
            note=f"{info['graph_vs_eager_params']:.3g}; graph: {info['graph']}",
        )
    )
    rep.write()
    profiled = {"handprop graph": lambda: hp_epochs(graph_step, Xd, yd, 1)()}
    profiled["handprop eager"] = lambda: hp_epochs(eager_step, Xd, yd, 1)()
    if "torch" in runs:
        profiled["torch"] = lambda: float(body())
    launch_profile(rep, dev, "seed", "epoch", profiled)
    rep.write()
    seed_on_cpu(rep, cfg, data, epochs, med.get("handprop graph"), args.cpu_budget, dev)


def seed_on_cpu(
    rep: Report, cfg: Any, data: Any, epochs: int, device_s: float, budget: float, dev: Device
) -> None:
    """The same run with handprop on the CPU (NumPy, its threads) for as many epochs as
    fit ``budget`` seconds (all when they do), then the device's run of as many epochs
    from the same weights: their test accuracy and parameters side by side."""
    from handprop.nn import GD, backend, get_threads
    from handprop.run import build_network
    from handprop.scale import DataParallel, TrainingStep

    net = build_network(cfg, data)  # the same initial weights again
    model, gd = DataParallel(net), GD(cfg.learning_rate)
    X, y = data.X_train, data.y_train
    info = rep.details["seed"]

    def run(n: int) -> None:
        for _ in range(n):
            model.loss_and_grad(X, y)
            gd.step(net.params, net.grads)

    probe = min(epochs, 10)
    start = time.perf_counter()
    run(probe)
    per_epoch = (time.perf_counter() - start) / probe
    todo = epochs - probe
    if per_epoch * todo > budget:
        todo = max(0, int(budget / per_epoch) - probe)
    start = time.perf_counter()
    run(todo)
    seconds = time.perf_counter() - start
    done = probe + todo
    per_epoch = seconds / todo if todo else per_epoch
    acc = accuracy(model.predict(data.X_test), data.y_test)
    # the device, the same epochs from the same weights (CUDA graphs)
    there = build_network(cfg, data).to(dev.xp)
    step = TrainingStep(DataParallel(there), GD(cfg.learning_rate), "auto")
    Xd, yd = backend.asarray(X, there.xp), backend.asarray(y, there.xp)
    hp_epochs(step, Xd, yd, done)()
    device_acc = accuracy(DataParallel(there).predict(data.X_test), data.y_test)
    diff = relative_difference(there.params, net.params)
    info.update(
        cpu_epochs=done,
        cpu_seconds_per_epoch=per_epoch,
        cpu_accuracy=acc,
        cpu_threads=get_threads(),
        device_accuracy_same_epochs=device_acc,
        device_vs_cpu_params=diff,
    )
    short = "" if done == epochs else f"; {done} of {epochs} epochs (budget {budget:g} s)"
    if device_s is not None:
        rep.rows.append(
            Row.compare(
                "seed",
                f"s / {epochs} epochs, handprop CPU",
                per_epoch * epochs,
                "handprop on the device (graphs)",
                device_s,
                None,
                f"{get_threads()} handprop threads, {os.cpu_count()} cores; ratio = the "
                f"device's speed-up{short}",
            )
        )
    rep.rows.append(
        Row.compare(
            "accuracy",
            f"seed config test acc after {done} epochs: GPU (graphs) vs CPU",
            device_acc,
            "handprop CPU",
            acc,
            None,
            f"the same initial weights and epochs; parameters' max abs diff / max abs {diff:.2g}",
        )
    )


# -- b + c. the CNN: epoch time and accuracy ----------------------------------------------


def part_cnn(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """experiments/cnn.toml's network, shuffled epochs of batch 128 with Adam: handprop
    with CUDA graphs and without, and PyTorch (cuDNN), interleaved epoch by epoch; then
    their test accuracy, and graph vs eager handprop's parameters."""
    from handprop.nn import Adam, backend
    from handprop.run import build_network, run_epoch
    from handprop.scale import DataParallel, TrainingStep

    cfg, data, net = load_run(CNN_CFG, args.mnist)
    X, y, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
    if args.quick:
        X, y = X[:QUICK_CNN_TRAIN], y[:QUICK_CNN_TRAIN]
        Xte, yte = Xte[:QUICK_TEST], yte[:QUICK_TEST]
    nets = {"graph": net, "eager": build_network(cfg, data)}  # the same initial weights
    for each in nets.values():
        each.to(dev.xp)
    p0 = backend.asarray(backend.to_host(net.params).copy(), net.xp)
    # as the trainer does: the training set moved once, epochs through run_epoch
    Xd, yd = backend.asarray(X, net.xp), backend.asarray(y, net.xp)
    models = {k: DataParallel(v) for k, v in nets.items()}

    def epoch_of(kind: str, n: int, opt: Any, seed: Any, step: Any = None) -> float:
        """One epoch over the first n images as the trainer runs it: the generator for
        the order and the dropout masks, a gather per batch, the losses summed there."""
        rng = np.random.default_rng(seed)
        nets[kind].set_rng(rng)
        xs, ys = Xd[:n, ...], yd[:n]
        return run_epoch(models[kind], opt, xs, ys, BATCH, rng, lambda loss: None, step=step)[0]

    # a probe of a few eager steps, so that a slow path cannot spend the session's device
    # time: an epoch longer than a sixth of --cnn-budget runs on fewer images, scaled
    probe_opt = Adam(ADAM_LR)
    epoch_of("eager", 3 * BATCH, probe_opt, 0)  # CuPy compiles its kernels on first use
    per_step = dev.timed(lambda: epoch_of("eager", 5 * BATCH, probe_opt, 1))[0] / 5
    nets["eager"].params[...] = p0  # back to the initial weights; a new Adam below
    steps = min(math.ceil(len(y) / BATCH), max(10, int(args.cnn_budget / 6 / per_step)))
    n = min(len(y), steps * BATCH)
    X, y = X[:n], y[:n]
    scale = CNN_EPOCH_BATCHES / steps  # to a 469-step epoch when fewer run
    info: dict[str, Any] = {"train": n, "test": len(yte), "steps_per_epoch": steps}
    info["probe_seconds_per_step"] = per_step
    rep.details["cnn"] = info
    rep.say(
        f"cnn: {n} images, {steps} steps of {BATCH} per epoch (probe, eager: "
        f"{per_step * 1e3:.1f} ms/step), {', '.join(cfg.layers)}"
    )
    opts = {kind: Adam(ADAM_LR) for kind in nets}
    tsteps = {
        "graph": TrainingStep(models["graph"], opts["graph"], "auto"),
        "eager": TrainingStep(models["eager"], opts["eager"], "off"),
    }
    counters = dict.fromkeys(nets, 0)

    def hp_epoch(kind: str) -> Callable[[], float]:
        def run() -> float:
            counters[kind] += 1
            return epoch_of(kind, n, opts[kind], [cfg.seed, counters[kind]], tsteps[kind])

        return run

    runs: dict[str, Callable[[], Any]] = {
        "handprop graph": hp_epoch("graph"),
        "handprop eager": hp_epoch("eager"),
    }
    if dev.torch is not None:
        runs["torch"], t_predict = torch_ref.cnn_training(
            dev.torch, X, y, BATCH, ADAM_LR, cfg.seed, device=dev.torch_device, shuffle=True
        )
    start = time.perf_counter()
    warm = {name: dev.timed(run)[0] for name, run in runs.items()}  # epoch 1: warm-up
    rep.say("cnn warm-up epochs: " + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()))
    left = args.cnn_budget - (time.perf_counter() - start)
    info["warmup_seconds"] = warm
    times = interleaved(dev, runs, args.cnn_epochs - 1, info.setdefault("seconds", {}), budget=left)
    g = tsteps["graph"]
    info["graph"] = {"captures": g.captures, "replays": g.replays, "off_reason": g.off_reason}
    trained = 1 + len(times["handprop graph"])
    info.update(epochs_trained=trained, scale=scale)
    med = {name: median(t) * scale for name, t in times.items()}
    hp_s = med["handprop graph"]
    spreads = ", ".join(f"{k} {spread_s(v)}" for k, v in times.items())
    note = (
        f"{steps} steps of {BATCH}"
        + (f" (x{scale:.3g} to {CNN_EPOCH_BATCHES})" if steps != CNN_EPOCH_BATCHES else "")
        + f", shuffled, float32; median of {len(times['handprop graph'])} epochs after 1 "
        f"warm-up ({', '.join(f'{k} {v:.2f} s' for k, v in warm.items())}); {spreads}; "
        f"graph: {info['graph']}"
    )
    if "torch" in times:
        how = "cuDNN, " if dev.torch_device == "cuda" else ""
        for name, target in (("handprop graph", TARGETS["cnn"]), ("handprop eager", None)):
            rep.rows.append(
                Row.compare(
                    "cnn",
                    f"s / epoch, {name}",
                    med[name],
                    f"PyTorch {dev.torch_device} ({how}autograd, Adam)",
                    med["torch"],
                    target,
                    note if target is not None else "",
                )
            )
    else:
        rep.rows.append(Row("cnn", "s / epoch", hp_s, note=f"{note}; torch: {dev.torch_why}"))
    speedup = args.cpu_epoch_seconds / hp_s
    rep.rows.append(
        Row(
            "cnn",
            "speed-up of the graphs over handprop CPU",
            hp_s,
            "handprop CPU epoch (given)",
            args.cpu_epoch_seconds,
            speedup,
            str(TARGETS["cpu_speedup"]),
            TARGETS["cpu_speedup"].check(speedup),
            "ratio = CPU / device; CPU: --cpu-epoch-seconds, benchmarks/RESULTS.md's cnn epoch "
            "on the 2-core development machine",
        )
    )
    info["graph_vs_eager_params"] = relative_difference(nets["graph"].params, nets["eager"].params)
    rep.rows.append(
        Row(
            "checks",
            f"cnn: graph vs eager parameters after {trained} epochs, max abs diff / max abs",
            info["graph_vs_eager_params"],
            note=f"{info['graph_vs_eager_params']:.3g}; the same weights, batches and masks; "
            "Adam amplifies float rounding where gradients are near 0",
        )
    )
    rep.write()
    accs = {kind: accuracy(models[kind].predict(Xte), yte) for kind in nets}
    info.update({f"handprop_{kind}_accuracy": a for kind, a in accs.items()})
    ref = None
    if "torch" in times:
        ref = info["torch_accuracy"] = accuracy(t_predict(Xte), yte)
    for kind, acc in accs.items():
        rep.rows.append(
            Row.compare(
                "accuracy",
                f"CNN test acc after {trained} epochs, handprop {kind}",
                acc,
                f"PyTorch {dev.torch_device}" if ref is not None else "",
                ref,
                None,
                f"trained on {n} images, tested on {len(yte)}; cnn.toml's seed and init, Adam "
                f"{ADAM_LR:g}, batch {BATCH}, constant lr, no shifts (cnn.toml: cosine schedule, "
                "shifts of 2 px, 20 epochs); PyTorch's default init",
            )
        )
    xb, yb = Xd[:BATCH, ...], yd[:BATCH]

    def eager_step() -> None:
        tsteps["eager"].train_pass(xb, yb)
        tsteps["eager"].update()

    def graph_step() -> None:
        tsteps["graph"].train_pass(xb, yb)
        tsteps["graph"].update()

    def hp_forward() -> None:
        nets["eager"].forward(xb)

    launch_profile(
        rep,
        dev,
        "cnn",
        "step",
        {"graph step": graph_step, "eager step": eager_step, "inference": hp_forward},
    )
    rep.write()


def part_compile(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """PyTorch's own fast path for the seed config, for honesty: the hand-written epoch
    through ``torch.compile(mode="reduce-overhead")`` (Inductor and CUDA graphs), its
    compile time apart, against the eager epoch. Run alone (``--only compile``): its
    compile can take long, and gpu_check.sh gives it a timeout of its own."""
    if dev.torch is None:
        raise RuntimeError(f"no PyTorch: {dev.torch_why}")
    cfg, data, net = load_run(BASELINE_CFG, args.mnist)
    epochs = QUICK_SEED_EPOCHS if args.quick else cfg.epochs
    init = dense_params(net)
    body, tensors = torch_ref.hand_written_body(
        dev.torch, data.X_train, data.y_train, init, cfg.learning_rate, device=dev.torch_device
    )
    t0 = [t.clone() for t in tensors]
    info: dict[str, Any] = {"epochs": epochs}
    rep.details["compile"] = info

    def reset() -> None:
        for t, start in zip(tensors, t0, strict=True):
            t.copy_(start)

    epoch = torch_ref.compiled(dev.torch, body)
    start = time.perf_counter()
    for _ in range(3):  # compiles, records its CUDA graphs
        epoch()
    dev.sync()
    info["compile_seconds"] = time.perf_counter() - start
    rep.say(f"torch.compile warm-up: {info['compile_seconds']:.1f} s")

    def many(fn: Callable[[], float]) -> Callable[[], float]:
        return lambda: [fn() for _ in range(epochs)][-1]

    runs = {"torch.compile": many(epoch), "torch": many(lambda: float(body()))}
    resets = dict.fromkeys(runs, reset)
    times = interleaved(dev, runs, args.repeats, info.setdefault("seconds", {}), resets)
    rep.rows.append(
        Row.compare(
            "seed",
            f"s / {epochs} epochs, PyTorch torch.compile reduce-overhead",
            median(times["torch.compile"]),
            "PyTorch eager",
            median(times["torch"]),
            None,
            f"compile and CUDA-graph recording took {info['compile_seconds']:.1f} s (not timed); "
            "the loss read every epoch on both sides",
        )
    )


# -- main ---------------------------------------------------------------------------------


def default_mnist() -> Path:
    """``$HANDPROP_TEST_MNIST``, else ``.mnist`` in the repository, else
    ``../shared/data/mnist`` next to it."""
    env = os.environ.get("HANDPROP_TEST_MNIST")
    if env:
        return Path(env)
    local = REPO_ROOT / ".mnist"
    return local if local.is_dir() else REPO_ROOT.parent / "shared" / "data" / "mnist"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda",
        help="where handprop runs (PyTorch: cuda for cuda, else the CPU); array_api_strict "
        "runs handprop's device path on the CPU, for testing (default: cuda)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "gpu_out"),
        help="folder of the results (default: $OUT, else ./gpu_out)",
    )
    p.add_argument(
        "--json",
        default="gpu_results.json",
        help="the results file's name in --out (default gpu_results.json)",
    )
    p.add_argument(
        "--mnist",
        type=Path,
        default=None,
        help="MNIST folder (default: $HANDPROP_TEST_MNIST, else .mnist, else ../shared/data/mnist)",
    )
    p.add_argument(
        "--only",
        default="seed,cnn,layers",
        help="parts to run, of: seed, cnn, layers, compile (default: seed,cnn,layers; "
        "compile, PyTorch's torch.compile, is slow to warm up: run it alone)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"logic check: {QUICK_SEED_EPOCHS} seed epochs, {QUICK_CNN_TRAIN} CNN training and "
            f"{QUICK_TEST} test images, 2 repeats"
        ),
    )
    p.add_argument("--repeats", type=int, default=None, help="timed seed runs (default 3)")
    p.add_argument(
        "--seed-budget",
        type=float,
        default=60.0,
        help="seconds of timed seed runs, both sides together: fewer rounds (at least one) "
        "when they would take longer (default 60)",
    )
    p.add_argument(
        "--cnn-epochs",
        type=int,
        default=None,
        help="CNN epochs at most, the first a warm-up (default 4)",
    )
    p.add_argument(
        "--cnn-budget",
        type=float,
        default=90.0,
        help="seconds of CNN training, both sides together (default 90)",
    )
    p.add_argument(
        "--cpu-budget",
        type=float,
        default=60.0,
        help="seconds for the seed run on the CPU (default 60); the device then runs as "
        "many epochs, for the accuracy side by side",
    )
    p.add_argument(
        "--cpu-epoch-seconds",
        type=float,
        default=11.28,
        help="handprop's CNN epoch on the CPU, measured elsewhere (default 11.28: "
        "benchmarks/RESULTS.md's cnn case, the 2-core development machine, 2 threads)",
    )
    p.add_argument(
        "--torch-tf32",
        action="store_true",
        help="let PyTorch use TF32 (cuDNN's default; off by default: both sides float32)",
    )
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    args.mnist = args.mnist or default_mnist()
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.cnn_epochs = max(2, args.cnn_epochs or (3 if args.quick else 4))
    return args


def part_layers(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """Where a training step's time goes, pass by pass: each layer's forward (training)
    and backward, the loss and the optimizer step, for the seed config's full batch and
    the CNN's batch of 128; host time per call and, on a GPU, the GPU's (CUDA events)."""
    for case, path, batch, opt in (
        ("seed", BASELINE_CFG, None, "gd"),
        ("cnn", CNN_CFG, BATCH, "adam"),
    ):
        found = rep.details.setdefault("layers", {}).setdefault(case, {})
        for name, fn in training_passes(dev, args.mnist, path, batch, opt):
            found[name] = time_call(dev, fn)
        total = {k: sum(v[k] for v in found.values()) for k in ("host_ms", "device_ms")}
        each = "; ".join(f"{k} {v['device_ms']:.3f}" for k, v in found.items())
        rep.rows.append(
            Row(
                case,
                f"ms per training step of {batch or 'the full batch'}, pass by pass, host / device",
                total["host_ms"],
                "device (CUDA events)" if dev.name == "cuda" else "",
                total["device_ms"] if dev.name == "cuda" else None,
                note=f"device ms: {each}",
            )
        )
        rep.write()


def training_passes(
    dev: Device, mnist: Path, path: Path, batch: int | None, opt: str
) -> list[tuple[str, Callable[[], Any]]]:
    """(name, call) for every pass of one training step of ``path``'s network on a batch
    of ``batch`` training images (None: all), each call repeatable on its own."""
    from handprop.nn import OPTIMIZERS, backend

    _, data, net = load_run(path, mnist)
    net.to(dev.xp)
    n = len(data.y_train) if batch is None else batch
    X = backend.asarray(data.X_train[:n], net.xp)
    y = backend.asarray(data.y_train[:n].astype(np.int64), net.xp)
    passes: list[tuple[str, Callable[[], Any]]] = []
    A, inputs, ctx = X, {}, net.training_context(n)  # one batch's dropout masks
    # the network's own steps: a ReLU before a max pool runs in the pool's step
    for i, layer in zip(net.passes, net.steps, strict=True):
        inputs[i] = A
        passes.append((f"{pass_name(net, i)} forward", lambda L=layer, a=A: L.forward(a, ctx)))
        A = layer.forward(A, ctx)
    passes.append(("loss", lambda: net.loss(A, y)))
    _, G = net.loss(A, y)
    for i, layer in reversed(list(zip(net.passes, net.steps, strict=True))):

        def backward(L: Any = layer, g: Any = G, i: int = i) -> Any:
            L.forward(inputs[i], ctx)  # its cache (the work arrays are reused)
            return L.backward(g, ctx, need_input_grad=i > 0)

        passes.append((f"{pass_name(net, i)} forward+backward", backward))
        G = layer.backward(G, ctx, need_input_grad=i > 0)
    step = OPTIMIZERS[opt](lr=1e-3)
    passes.append((f"{opt} step", lambda: step.step(net.params, net.grads)))
    return passes


def time_call(dev: Device, fn: Callable[[], Any], repeats: int = 20) -> dict[str, float]:
    """Median host and device milliseconds of ``fn()`` (device = host off a GPU)."""
    if dev.name == "cuda":
        from cupyx.profiler import benchmark

        result = benchmark(fn, n_repeat=repeats, n_warmup=3)
        host = float(np.median(result.cpu_times)) * 1e3
        return {"host_ms": host, "device_ms": float(np.median(result.gpu_times[0])) * 1e3}
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    host = float(np.median(times)) * 1e3
    return {"host_ms": host, "device_ms": host}


PARTS = {"seed": part_seed, "cnn": part_cnn, "layers": part_layers, "compile": part_compile}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from handprop.nn.backend import DeviceError

    try:
        dev = open_device(args.device, args.torch_tf32)
    except DeviceError as exc:
        print(f"python -m benchmarks.gpu: {exc}", file=sys.stderr)
        return 2
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rep = Report(args.out / args.json, settings, device={"name": dev.name, **dev.facts})
    torch_on = dev.torch_device if dev.torch is not None else f"skipped: {dev.torch_why}"
    rep.say(f"device {dev.name}: {dev.facts}; PyTorch {torch_on}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for name in args.only.split(","):
            rep.run_part(name, lambda part=PARTS[name]: part(rep, dev, args))
        rep.status = "complete" if not rep.errors else "complete with errors"
    except (TerminatedError, KeyboardInterrupt) as exc:
        rep.status = f"interrupted: {exc or type(exc).__name__}"
        rep.say(rep.status)
    finally:
        from handprop.nn.kernels import FUSED

        rep.details["fused_kernels"] = {  # a kernel that fell back ran its unfused passes
            name: f.failed or ("launched" if f._launched else "not launched")
            for name, f in FUSED.items()
        }
        rep.write()
    print("\n" + results_table(rep.ordered_rows()) + "\n", flush=True)
    rep.say(f"{rep.status}; results in {rep.path}")
    return 0 if rep.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
