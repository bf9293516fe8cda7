"""``python -m benchmarks.gpu``: handprop on a GPU (CuPy) beside PyTorch-CUDA (issue 16).

Three measurements in one process, every contender warmed up first, the devices
synchronized around every timed region, medians of several runs:

- ``seed``: experiments/baseline.cfg's run, loaded, split and initialised by
  ``handprop.run`` as ``handprop train`` does (784-100-10 sigmoid, softmax cross-entropy,
  full-batch gradient descent, lr 2.5, 1000 epochs, float32, 18000 training and 2000 test
  images): the 1000 epochs with handprop on the device against the same algorithm by hand
  in PyTorch (``torch_ref.hand_written_epoch``, no autograd) from the same initial
  weights; test accuracy of both, and of one handprop run on the CPU when it fits
  ``--cpu-budget`` seconds (else a shorter run, said so).
- ``cnn``: epochs of experiments/cnn.toml's network (conv 32 3, relu, maxpool 2, conv 64 3,
  relu, maxpool 2, dense 128, relu, dropout 0.5, dense 10; its seed and He init; Adam 1e-3,
  batch 128, shuffled; constant lr and no augmentation) on the 60000 training images:
  handprop against ``torch_ref.cnn_training`` (nn.Conv2d, cuDNN with ``benchmark = True``,
  autograd, torch.optim.Adam); handprop's speed-up over its CPU epoch
  (``--cpu-epoch-seconds``, measured on the 2-core development machine).
- ``accuracy``: the timed CNN epochs are the training (one warm-up epoch, then as many
  timed ones as fit ``--cnn-budget`` seconds, both sides the same count); test accuracy on
  the 10000 test images after them, handprop and PyTorch.

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
TARGETS = {
    "seed": Target("<=", 1.5),
    "cnn": Target("<=", 2.0),
    "cpu_speedup": Target(">=", 10.0),
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


def part_seed(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """experiments/baseline.cfg's 1000 epochs on the device: handprop vs PyTorch by hand;
    handprop on the CPU once; test accuracy of each."""
    from handprop.nn import GD, backend
    from handprop.scale import DataParallel

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

    def hp_epochs(n: int = epochs) -> float:
        loss = math.nan
        for _ in range(n):
            loss = model.loss_and_grad(Xd, yd)  # a float: the host waits every epoch
            gd.step(net.params, net.grads)
        return loss

    def hp_reset() -> None:
        net.params[...] = p0

    runs: dict[str, Callable[[], Any]] = {"handprop": hp_epochs}
    resets: dict[str, Callable[[], None]] = {"handprop": hp_reset}
    if dev.torch is not None:
        t_epoch, tensors = torch_ref.hand_written_epoch(
            dev.torch, X, y, init, cfg.learning_rate, device=dev.torch_device
        )
        t0 = [t.clone() for t in tensors]

        def torch_epochs(n: int = epochs) -> float:
            loss = math.nan
            for _ in range(n):
                loss = t_epoch()  # float(loss): the host waits every epoch, as handprop's
            return loss

        def torch_reset() -> None:
            for t, start in zip(tensors, t0, strict=True):
                t.copy_(start)

        runs["torch"], resets["torch"] = torch_epochs, torch_reset
    for name, run in runs.items():  # warm-up: kernels compiled, memory pools filled
        resets[name]()
        dev.timed(lambda run=run: run(min(epochs, 20)))
    times = interleaved(
        dev, runs, args.repeats, info.setdefault("seconds", {}), resets, args.seed_budget
    )
    # after the last round every contender holds the weights of `epochs` epochs
    hp_s = median(times["handprop"])
    info["handprop_final_loss"] = float(model.loss_value(Xd, yd))
    info["handprop_accuracy"] = accuracy(model.predict(Xte), yte)
    note = (
        f"{len(y)} train / {len(yte)} test images (baseline.cfg's split and init), "
        f"median of {len(times['handprop'])} runs after a warm-up; handprop "
        f"{spread_s(times['handprop'])}"
    )
    if "torch" in times:
        weights = [t.cpu().numpy() for t in tensors]
        t_acc = accuracy(torch_ref.inference(dev.torch, Xte, weights)().argmax(1), yte)
        info.update(torch_final_loss=t_epoch(), torch_accuracy=t_acc)
        rep.rows.append(
            Row.compare(
                "seed",
                f"s / {epochs} epochs",
                hp_s,
                f"PyTorch {dev.torch_device} (by hand)",
                median(times["torch"]),
                TARGETS["seed"],
                f"{note}, torch {spread_s(times['torch'])}; final loss handprop "
                f"{info['handprop_final_loss']:.5f}, torch {info['torch_final_loss']:.5f}",
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
                f"handprop on {dev.name}; same initial weights, same algorithm",
            )
        )
    else:
        rep.rows.append(
            Row(
                "seed", f"s / {epochs} epochs", hp_s, note=f"{note}; torch skipped: {dev.torch_why}"
            )
        )
    rep.write()
    profiled = {"handprop": lambda: hp_epochs(1)}
    if "torch" in times:
        profiled["torch"] = t_epoch
    launch_profile(rep, dev, "seed", "epoch", profiled)
    rep.write()
    seed_on_cpu(rep, cfg, data, epochs, hp_s, args.cpu_budget)


def seed_on_cpu(
    rep: Report, cfg: Any, data: Any, epochs: int, device_s: float, budget: float
) -> None:
    """The same run with handprop on the CPU (NumPy, its threads), once: all ``epochs``
    when a short probe says they fit ``budget`` seconds, else as many as fit."""
    from handprop.nn import GD, get_threads
    from handprop.run import build_network
    from handprop.scale import DataParallel

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
    info.update(
        cpu_epochs=done,
        cpu_seconds_per_epoch=per_epoch,
        cpu_accuracy=acc,
        cpu_threads=get_threads(),
    )
    short = (
        "" if done == epochs else f"; SHORTER RUN: {done} of {epochs} epochs (budget {budget:g} s)"
    )
    rep.rows.append(
        Row.compare(
            "seed",
            f"s / {epochs} epochs, handprop CPU",
            per_epoch * epochs,
            "handprop on the device",
            device_s,
            None,
            f"{get_threads()} handprop threads, {os.cpu_count()} cores; ratio = the device's "
            f"speed-up{'' if done == epochs else ', from the epochs run'}{short}",
        )
    )
    rep.rows.append(
        Row.compare(
            "accuracy",
            f"seed config test acc after {done} epochs, handprop CPU",
            acc,
            "handprop on the device",
            info["handprop_accuracy"],
            None,
            f"the device's after {epochs} epochs{short}",
        )
    )


# -- b + c. the CNN: epoch time and accuracy ----------------------------------------------


def part_cnn(rep: Report, dev: Device, args: argparse.Namespace) -> None:
    """experiments/cnn.toml's network, shuffled epochs of batch 128 with Adam, handprop and
    PyTorch interleaved epoch by epoch; then both networks' test accuracy."""
    from handprop.nn import Adam, backend
    from handprop.run import run_epoch
    from handprop.scale import DataParallel

    cfg, data, net = load_run(CNN_CFG, args.mnist)
    X, y, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
    if args.quick:
        X, y = X[:QUICK_CNN_TRAIN], y[:QUICK_CNN_TRAIN]
        Xte, yte = Xte[:QUICK_TEST], yte[:QUICK_TEST]
    net.to(dev.xp)
    p0 = backend.asarray(backend.to_host(net.params).copy(), net.xp)
    # as the trainer does: the training set moved once, epochs through run_epoch
    Xd, yd = backend.asarray(X, net.xp), backend.asarray(y, net.xp)
    model = DataParallel(net)

    def epoch_of(n: int, opt: Any, seed: Any) -> float:
        """One epoch over the first n images as the trainer runs it: the generator for
        the order and the dropout masks, a gather per batch, the loss read every step."""
        rng = np.random.default_rng(seed)
        net.set_rng(rng)
        return run_epoch(model, opt, Xd[:n, ...], yd[:n], BATCH, rng, lambda loss: None)[0]

    # a probe of a few steps, so that a slow path cannot spend the session's device time:
    # an epoch longer than a sixth of --cnn-budget runs on fewer images, scaled
    probe_opt = Adam(ADAM_LR)
    epoch_of(3 * BATCH, probe_opt, 0)  # CuPy compiles its kernels on first use
    per_step = dev.timed(lambda: epoch_of(5 * BATCH, probe_opt, 1))[0] / 5
    net.params[...] = p0  # back to the initial weights; a new Adam below
    steps = min(math.ceil(len(y) / BATCH), max(10, int(args.cnn_budget / 6 / per_step)))
    n = min(len(y), steps * BATCH)
    X, y = X[:n], y[:n]
    scale = CNN_EPOCH_BATCHES / steps  # to a 469-step epoch when fewer run
    info: dict[str, Any] = {"train": n, "test": len(yte), "steps_per_epoch": steps}
    info["probe_seconds_per_step"] = per_step
    rep.details["cnn"] = info
    rep.say(
        f"cnn: {n} images, {steps} steps of {BATCH} per epoch (probe: {per_step * 1e3:.1f} "
        f"ms/step), {', '.join(cfg.layers)}"
    )
    adam, epoch = Adam(ADAM_LR), [0]

    def hp_epoch() -> float:
        epoch[0] += 1
        return epoch_of(n, adam, [cfg.seed, epoch[0]])

    runs: dict[str, Callable[[], Any]] = {"handprop": hp_epoch}
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
    trained = 1 + len(times["handprop"])
    info.update(epochs_trained=trained, scale=scale)
    hp_s = median(times["handprop"]) * scale
    note = (
        f"{steps} steps of {BATCH}"
        + (f" (x{scale:.3g} to {CNN_EPOCH_BATCHES})" if steps != CNN_EPOCH_BATCHES else "")
        + f", shuffled, float32; median of {len(times['handprop'])} epochs after 1 warm-up "
        f"(handprop {warm['handprop']:.2f} s); handprop {spread_s(times['handprop'])}"
    )
    if "torch" in times:
        how = "cuDNN, " if dev.torch_device == "cuda" else ""
        rep.rows.append(
            Row.compare(
                "cnn",
                "s / epoch",
                hp_s,
                f"PyTorch {dev.torch_device} ({how}autograd, Adam)",
                median(times["torch"]) * scale,
                TARGETS["cnn"],
                f"{note}, torch {spread_s(times['torch'])} (warm-up {warm['torch']:.2f} s)",
            )
        )
    else:
        rep.rows.append(
            Row("cnn", "s / epoch", hp_s, note=f"{note}; torch skipped: {dev.torch_why}")
        )
    speedup = args.cpu_epoch_seconds / hp_s
    rep.rows.append(
        Row(
            "cnn",
            "speed-up over handprop CPU",
            hp_s,
            "handprop CPU epoch (given)",
            args.cpu_epoch_seconds,
            speedup,
            str(TARGETS["cpu_speedup"]),
            TARGETS["cpu_speedup"].check(speedup),
            "ratio = CPU / device; CPU: --cpu-epoch-seconds, measured on the 2-core "
            "development machine, 2 threads (python -m benchmarks.gpu --device cpu --quick)",
        )
    )
    rep.write()
    info["handprop_accuracy"] = accuracy(model.predict(Xte), yte)
    ref = None
    if "torch" in times:
        ref = info["torch_accuracy"] = accuracy(t_predict(Xte), yte)
    rep.rows.append(
        Row.compare(
            "accuracy",
            f"CNN test acc after {trained} epochs",
            info["handprop_accuracy"],
            f"PyTorch {dev.torch_device}" if ref is not None else "",
            ref,
            None,
            f"trained on {n} images, tested on {len(yte)}; cnn.toml's seed and init, Adam "
            f"{ADAM_LR:g}, batch {BATCH}, constant lr, no shifts (cnn.toml: cosine schedule, "
            "shifts of 2 px, 20 epochs); PyTorch's default init",
        )
    )
    xb, yb = Xd[:BATCH, ...], yd[:BATCH]

    def hp_step() -> None:
        model.train_pass(xb, yb)
        adam.step(net.params, net.grads)

    def hp_forward() -> None:
        net.forward(xb)

    launch_profile(
        rep, dev, "cnn", "step", {"handprop step": hp_step, "handprop inference": hp_forward}
    )
    rep.write()


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
        help="folder of gpu_results.json (default: $OUT, else ./gpu_out)",
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
        help="parts to run, of: seed, cnn, layers (default: all three)",
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
        help="seconds for the seed run on the CPU (default 60)",
    )
    p.add_argument(
        "--cpu-epoch-seconds",
        type=float,
        default=14.2,
        help="handprop's CNN epoch on the CPU, measured elsewhere (default 14.2: the "
        "2-core development machine, 2 threads, by --device cpu --quick)",
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


PARTS = {"seed": part_seed, "cnn": part_cnn, "layers": part_layers}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from handprop.nn.backend import DeviceError

    try:
        dev = open_device(args.device, args.torch_tf32)
    except DeviceError as exc:
        print(f"python -m benchmarks.gpu: {exc}", file=sys.stderr)
        return 2
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rep = Report(args.out / "gpu_results.json", settings, device={"name": dev.name, **dev.facts})
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
        rep.write()
    print("\n" + results_table(rep.ordered_rows()) + "\n", flush=True)
    rep.say(f"{rep.status}; results in {rep.path}")
    return 0 if rep.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
