"""Devices: ``device`` in configs and grids, ``--device`` on train, predict and
experiments, refused in one line before anything is written; and the whole device path
(network, optimizer state, data, checkpoints, model files) run on this CPU through
array-api-strict standing in for CuPy, and with CuPy itself on a GPU machine that asks
for it (HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy, as benchmarks/gpu_check.sh
sets)."""

import json
import os
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from handprop import nn
from handprop.cli import main
from handprop.config import DEVICE_NAMES, load_config, parse_toml_config, to_toml
from handprop.errors import ConfigError
from handprop.grids.grid import read_grid
from handprop.nn import backend
from handprop.run import resume_run, train_run
from handprop.run.build import fits_on_device

NO_GPU = "cudaErrorNoDevice: no CUDA-capable device is detected"
#: what "cuda" computes with in the end-to-end tests: conftest's backends but NumPy
CUDA_BACKENDS = [
    name.strip()
    for name in os.environ.get("HANDPROP_TEST_BACKENDS", "numpy,array_api_strict").split(",")
    if name.strip() != "numpy"
]

MLP = """
dataset = "digits"
total = 600
train = 500
test = 100
hidden = [16]
activation = "relu"
dropout = 0.2
optimizer = "adam"
learning_rate = 0.01
weight_decay = 0.001
batch_size = 50
validation = 0.1
epochs = 4
eval_every = 2
seed = 2
"""

CNN = """
dataset = "digits"
total = 600
train = 500
test = 100
layers = ["conv 4 3 pad=1", "relu", "maxpool 2", "dense 16", "relu", "dropout 0.2"]
init = "he_normal"
optimizer = "adam"
learning_rate = 0.003
batch_size = 50
augment_shift = 1
epochs = 3
eval_every = 3
seed = 2
"""


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: "), result.output
    return lines[0]


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def fresh_devices(monkeypatch):
    """No device checked yet in this test (backend caches a working "cuda")."""
    monkeypatch.setattr(backend, "_checked", {})


@pytest.fixture
def no_cupy(monkeypatch, fresh_devices):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError


@pytest.fixture
def cupy_without_gpu(monkeypatch, fresh_devices):
    """A CuPy that imports, as it does on a machine without a GPU, and fails on first
    use."""
    stub = types.ModuleType("cupy")
    stub.float32 = np.float32

    def arange(*args, **kwargs):
        raise RuntimeError(NO_GPU)

    stub.arange = arange
    monkeypatch.setitem(sys.modules, "cupy", stub)


def stand_in_for_cuda(monkeypatch, name: str):
    """Make "cuda" compute with the namespace ``name``: array-api-strict refuses every
    call outside the standard, so a NumPy leak anywhere on the device path fails here,
    without a GPU."""
    xp = pytest.importorskip(name)
    pytest.importorskip("array_api_compat")
    real = backend.device_namespace
    monkeypatch.setattr(backend, "device_namespace", lambda d: xp if d == "cuda" else real(d))
    return xp


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make "cuda" array-api-strict."""
    return stand_in_for_cuda(monkeypatch, "array_api_strict")


@pytest.fixture(params=CUDA_BACKENDS)
def cuda(request, monkeypatch):
    """What "cuda" computes with: array-api-strict standing in, or CuPy on a GPU."""
    if request.param == "cupy":
        try:
            return backend.device_namespace("cuda")
        except backend.DeviceError as exc:
            pytest.skip(f"cupy asked for, but {exc}")
    return stand_in_for_cuda(monkeypatch, request.param)


# -- config, CSV, command line -----------------------------------------------------------


def test_the_config_knows_the_backends_devices():
    assert DEVICE_NAMES == backend.DEVICES


def test_device_defaults_to_cpu_and_round_trips(tmp_path):
    cfg = parse_toml_config(MLP, "m.toml")
    assert cfg.device == "cpu"
    cuda = parse_toml_config(MLP + 'device = "cuda"\n', "m.toml")
    assert cuda.device == "cuda"
    assert 'device = "cuda"' in to_toml(cuda)
    assert load_config(write(tmp_path / "c.toml", to_toml(cuda))) == cuda


def test_an_unknown_device_names_the_line():
    with pytest.raises(ConfigError) as err:
        parse_toml_config(MLP + 'device = "gpu"\n', "m.toml")
    assert str(err.value) == (
        "m.toml line 17: device must be one of cpu, cuda, got 'gpu'; did you mean 'cuda'?"
    )
    with pytest.raises(ConfigError, match=r"device must be one of cpu, cuda, got 1 \(an integer\)"):
        parse_toml_config(MLP + "device = 1\n", "m.toml")


def test_a_grid_sets_the_device_per_row(tmp_path):
    csv = write(
        tmp_path / "g.csv",
        "run_name,d,dtrain,dtest,m,alpha,epochs,dataset,device\n"
        "a,600,500,100,16,2.0,2,digits,cuda\n"
        "b,600,500,100,16,2.0,2,digits,\n",
    )
    assert [r.config.device for r in read_grid(csv)] == ["cuda", "cpu"]
    write(csv, csv.read_text().replace(",cuda\n", ",tpu\n"))
    with pytest.raises(ConfigError) as err:
        read_grid(csv)
    assert str(err.value).startswith(f"{csv} row 2 column device: device must be one of cpu, cuda")


@pytest.mark.parametrize("command", ["train", "predict", "experiments"])
def test_an_unknown_device_option_is_one_line(tmp_path, command):
    cfg = write(tmp_path / "m.toml", MLP + f'out = "{tmp_path / "runs"}"\n')
    args = {"train": [cfg], "predict": [tmp_path, cfg], "experiments": [tmp_path / "g.csv"]}
    line = one_error_line(run(command, *args[command], "--device", "gpu"))
    assert line.endswith("--device must be one of cpu, cuda, got 'gpu'; did you mean 'cuda'?")
    assert not (tmp_path / "runs").exists()


def test_cuda_without_cupy_is_one_line_and_writes_nothing(tmp_path, no_cupy):
    cfg = write(tmp_path / "m.toml", MLP + f'out = "{tmp_path / "runs"}"\n')
    line = one_error_line(run("train", cfg, "-q", "--device", "cuda"))
    assert "device = 'cuda' needs CuPy" in line and "handprop[gpu]" in line
    assert not (tmp_path / "runs").exists()


def test_a_config_asking_for_cuda_without_cupy_writes_nothing(tmp_path, no_cupy):
    cfg = write(tmp_path / "m.toml", MLP + f'device = "cuda"\nout = "{tmp_path / "runs"}"\n')
    assert "cuda" in one_error_line(run("train", cfg, "-q"))
    assert not (tmp_path / "runs").exists()
    # the library says so too, before a folder is made
    with pytest.raises(backend.DeviceError, match="needs CuPy"):
        train_run(load_config(cfg), progress=False)
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu_says_so(tmp_path, cupy_without_gpu):
    cfg = write(tmp_path / "m.toml", MLP + f'out = "{tmp_path / "runs"}"\n')
    line = one_error_line(run("train", cfg, "-q", "--device", "cuda"))
    assert line == f"handprop: error: device = 'cuda': no usable GPU here ({NO_GPU})"
    assert not (tmp_path / "runs").exists()


def test_predict_and_experiments_refuse_cuda_before_reading_or_writing(tmp_path, no_cupy):
    csv = write(
        tmp_path / "g.csv",
        "run_name,d,dtrain,dtest,m,alpha,epochs,dataset\na,600,500,100,16,2.0,2,digits\n",
    )
    line = one_error_line(run("experiments", csv, "--out", tmp_path / "grid", "--device", "cuda"))
    assert "needs CuPy" in line
    assert not (tmp_path / "grid").exists()
    write(
        csv,
        csv.read_text()
        .replace("dataset\n", "dataset,device\n")
        .replace("digits\n", "digits,cuda\n"),
    )
    assert "needs CuPy" in one_error_line(run("experiments", csv, "--out", tmp_path / "grid"))
    assert not (tmp_path / "grid").exists()
    # predict checks the device before the model or the inputs
    line = one_error_line(run("predict", tmp_path / "absent.npz", "x.png", "--device", "cuda"))
    assert "needs CuPy" in line


def test_resume_on_cuda_without_cupy_leaves_the_run_as_it_was(tmp_path, ctrl_c_after_step, no_cupy):
    cfg = parse_toml_config(MLP + f'out = "{tmp_path}"\n', "m.toml")
    ctrl_c_after_step(11)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, default_name="cut", progress=False)
    ctrl_c_after_step(None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()}
    assert "needs CuPy" in one_error_line(
        run("train", "--resume", tmp_path / "cut", "--device", "cuda")
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()} == before


def test_a_run_whose_config_says_cuda_resumes_only_where_cuda_works(
    tmp_path, ctrl_c_after_step, no_cupy
):
    cfg = parse_toml_config(MLP + f'out = "{tmp_path}"\n', "m.toml")
    ctrl_c_after_step(11)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, default_name="cut", progress=False)
    ctrl_c_after_step(None)
    # the device may change between the checkpoint and the resume (it is not checked
    # against the checkpoint's config); here it asks for a GPU this machine lacks
    config = tmp_path / "cut" / "config.toml"
    config.write_text(config.read_text().replace('device = "cpu"', 'device = "cuda"'))
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()}
    assert "needs CuPy" in one_error_line(run("train", "--resume", tmp_path / "cut", "-q"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()} == before
    # --device cpu takes it to the end
    result = run("train", "--resume", tmp_path / "cut", "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert load_config(config).device == "cpu"


def test_a_grid_row_done_on_one_device_is_not_redone_on_another(tmp_path):
    from handprop.grids.grid import existing_row
    from handprop.run.writer import CONFIG_FILE

    cfg = parse_toml_config(MLP, "m.toml")
    (tmp_path / CONFIG_FILE).write_text(to_toml(cfg.replace(device="cuda")))
    assert existing_row(cfg, tmp_path) is None  # not complete: resumed, on the CPU
    with pytest.raises(ConfigError, match="holds a run with another config"):
        existing_row(cfg.replace(seed=3), tmp_path)
    # a grid begun before configs had a device (no device line) goes on
    old = "\n".join(line for line in to_toml(cfg).splitlines() if "device" not in line)
    (tmp_path / CONFIG_FILE).write_text(old + "\n")
    assert existing_row(cfg, tmp_path) is None


def test_device_cpu_is_the_default_and_recorded(tmp_path):
    cfg = write(tmp_path / "m.toml", MLP.replace("epochs = 4", "epochs = 1"))
    result = run("train", cfg, "-q", "--device", "cpu", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "on cpu" not in result.output  # said only for another device
    run_dir = tmp_path / "runs" / "m"
    assert load_config(run_dir / "config.toml").device == "cpu"
    assert json.loads((run_dir / "metrics.json").read_text())["device"] == "cpu"


def test_fits_on_device(monkeypatch, fake_cuda):
    import handprop.run.build as build

    assert fits_on_device(10**15, np)  # the host holds its data already
    assert fits_on_device(10**15, fake_cuda)  # free memory unknown: assumed to fit
    monkeypatch.setattr(build, "device_free_bytes", lambda xp: 1000)
    assert fits_on_device(800, fake_cuda) and not fits_on_device(800, fake_cuda, reserve=200)


# -- the device path ----------------------------------------------------------------------


def params_of(run_dir):
    net = nn.load(run_dir / "model.npz")  # loads on the host, whatever trained it
    assert isinstance(net.params, np.ndarray) and net.device == "cpu"
    return net.params


def assert_close(a, b, xp):
    """The parameters of a run on ``xp`` against the CPU's. array-api-strict computes
    with NumPy: the same numbers to rounding. A GPU sums in other orders, which a few
    epochs of Adam amplify where gradients are near 0."""
    gpu = backend.device_name(xp) == "cuda"
    np.testing.assert_allclose(a, b, rtol=1e-3 if gpu else 1e-5, atol=1e-4 if gpu else 1e-6)


@pytest.mark.parametrize("config", [MLP, CNN], ids=["mlp-dropout-adam-validation", "cnn-augmented"])
def test_a_cuda_run_reaches_the_cpu_runs_parameters(tmp_path, cuda, config):
    cfg = write(tmp_path / "net.toml", config)
    for device in ("cpu", "cuda"):
        result = run("train", cfg, "-q", "--device", device, "--out", tmp_path / device)
        assert result.exit_code == 0, result.output
        assert "test accuracy" in result.output
    cpu, on = tmp_path / "cpu" / "net", tmp_path / "cuda" / "net"
    assert_close(params_of(on), params_of(cpu), cuda)
    assert load_config(on / "config.toml").device == "cuda"
    assert json.loads((on / "metrics.json").read_text())["device"] == backend.device_name(cuda)
    assert json.loads((cpu / "metrics.json").read_text())["device"] == "cpu"
    # predictions.csv: the same test rows, probabilities to rounding
    pred = [np.loadtxt(d / "predictions.csv", delimiter=",", skiprows=1) for d in (cpu, on)]
    np.testing.assert_array_equal(pred[0][:, :2], pred[1][:, :2])
    np.testing.assert_allclose(pred[0][:, 3:], pred[1][:, 3:], atol=1e-3)


def test_a_training_set_too_large_for_the_device_goes_batch_by_batch(tmp_path, monkeypatch, cuda):
    import handprop.run.build as build

    cfg = parse_toml_config(MLP + f'out = "{tmp_path}"\n', "m.toml")
    expected = params_of(train_run(cfg, default_name="cpu", progress=False).run_dir)
    placed = []
    real_place = build.place_training_data

    def place(*args):
        X, y = real_place(*args)
        placed.append(type(X))
        return X, y

    monkeypatch.setattr(build, "place_training_data", place)
    monkeypatch.setattr(build, "device_free_bytes", lambda xp: 1)
    result = train_run(cfg.replace(device="cuda"), default_name="small", progress=False)
    assert placed == [np.ndarray]  # left on the host: each batch moved
    assert_close(params_of(result.run_dir), expected, cuda)
    # the full batch (gradient descent), moved whole each epoch
    gd = cfg.replace(optimizer="gd", batch_size=None, dropout=0.0, learning_rate=0.5)
    expected = params_of(train_run(gd, default_name="gd-cpu", progress=False).run_dir)
    result = train_run(gd.replace(device="cuda"), default_name="gd", progress=False)
    assert_close(params_of(result.run_dir), expected, cuda)


@pytest.mark.parametrize("then", ["cuda", "cpu"])
def test_a_cuda_checkpoint_loads_on_the_host_and_resumes(tmp_path, cuda, ctrl_c_after_step, then):
    cfg = parse_toml_config(MLP + f'out = "{tmp_path}"\n', "m.toml")
    expected = params_of(train_run(cfg, default_name="full", progress=False).run_dir)

    ctrl_c_after_step(11)  # in the second epoch (450 training samples: 9 batches of 50)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg.replace(device="cuda"), default_name="cut", progress=False)
    ctrl_c_after_step(None)
    with np.load(tmp_path / "cut" / "checkpoint.npz", allow_pickle=False) as ck:
        assert int(ck["epoch"]) == 1 and int(ck["opt_t"]) == 9
        for name in ("params", "opt_m", "opt_v"):
            assert ck[name].dtype == np.float32 and ck[name].shape == expected.shape

    result = run("train", "--resume", tmp_path / "cut", "-q", "--device", then)
    assert result.exit_code == 0, result.output
    assert_close(params_of(tmp_path / "cut"), expected, cuda)
    assert load_config(tmp_path / "cut" / "config.toml").device == then


def test_resume_goes_on_on_the_device_it_began_on(tmp_path, cuda, ctrl_c_after_step):
    cfg = parse_toml_config(CNN + f'device = "cuda"\nout = "{tmp_path}"\n', "c.toml")
    ctrl_c_after_step(12)  # in the second epoch (10 batches per epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, default_name="cut", progress=False)
    ctrl_c_after_step(None)
    result = resume_run(tmp_path / "cut", progress=False)
    assert result.status == "completed"
    assert result.metrics["device"] == backend.device_name(cuda)
    on_cpu = train_run(cfg.replace(device="cpu"), default_name="cpu", progress=False)
    assert_close(params_of(tmp_path / "cut"), params_of(on_cpu.run_dir), cuda)


def test_predict_on_cuda_prints_what_the_cpu_prints(tmp_path, cuda):
    from handprop.data import load_dataset, write_idx

    cfg = write(tmp_path / "m.toml", MLP + f'out = "{tmp_path}"\n')
    assert run("train", cfg, "-q").exit_code == 0
    write_idx(tmp_path / "x.idx", load_dataset("digits").images[:5])
    cpu = run("predict", tmp_path / "m", tmp_path / "x.idx")
    on = run("predict", tmp_path / "m", tmp_path / "x.idx", "--device", "cuda")
    assert cpu.exit_code == 0 and on.exit_code == 0, on.output
    # each input's class the same; its probabilities, to 3 decimals, to rounding
    classes = [[line.split("(")[0] for line in r.output.splitlines()] for r in (cpu, on)]
    assert classes[0] == classes[1] and len(classes[1]) == 5


def test_experiments_on_cuda_then_again_on_the_cpu_skip_what_is_done(tmp_path, cuda):
    csv = write(
        tmp_path / "g.csv",
        "run_name,d,dtrain,dtest,m,alpha,epochs,dataset,eval_every\n"
        "a,600,500,100,16,2.0,3,digits,3\n"
        "b,600,500,100,8,2.0,3,digits,3\n",
    )
    grid = tmp_path / "grid"
    result = run("experiments", csv, "--out", grid, "-q", "--device", "cuda")
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        assert load_config(grid / name / "config.toml").device == "cuda"
        assert json.loads((grid / name / "metrics.json").read_text())["status"] == "completed"
    again = run("experiments", csv, "--out", grid, "-q", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "a: skipped" in again.output and "b: skipped" in again.output
