import io
import json
import zipfile

import numpy as np
import pytest

from handprop.errors import ModelFileError
from handprop.nn import Network, load, save


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_save_load_round_trips_bit_exactly(tmp_path, rng, dtype, loss):
    net = Network.from_spec(
        "6-5-4-3",
        activation=["relu", "tanh"],
        loss=loss,
        dtype=dtype,
        rng=rng,
        meta={"class_names": ["a", "b", "c"]},
    )
    net.params[:] = rng.normal(size=net.n_params)
    path = tmp_path / "model.npz"
    save(net, path)
    back = load(path)
    assert back.params.dtype == net.params.dtype
    assert back.params.tobytes() == net.params.tobytes()
    assert back.architecture() == net.architecture()
    X = rng.normal(size=(5, 6))
    np.testing.assert_array_equal(back.predict_proba(X), net.predict_proba(X))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def write_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def good_arrays(rng):
    net = Network.from_spec("4-3-2", rng=rng)
    return net.params, net.architecture()


def test_missing_keys_are_refused(tmp_path, rng):
    params, _ = good_arrays(rng)
    write_npz(tmp_path / "m.npz", params=params)
    with pytest.raises(ModelFileError, match="m.npz: not a handprop model, missing architecture"):
        load(tmp_path / "m.npz")


def test_wrong_sizes_are_refused(tmp_path, rng):
    params, arch = good_arrays(rng)
    write_npz(tmp_path / "m.npz", params=params[:-1], architecture=np.array(json.dumps(arch)))
    with pytest.raises(ModelFileError, match=r"needs 23 parameters.*shape \(22,\)"):
        load(tmp_path / "m.npz")


def test_wrong_dtype_is_refused(tmp_path, rng):
    params, arch = good_arrays(rng)
    write_npz(
        tmp_path / "m.npz",
        params=params.astype(np.float64),
        architecture=np.array(json.dumps(arch)),
    )
    with pytest.raises(
        ModelFileError, match="parameters are float64, the architecture says float32"
    ):
        load(tmp_path / "m.npz")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a["layers"].append({"type": "softplus"}), "unknown type 'softplus'"),
        (lambda a: a["layers"][0].update(d_in=5), "expects inputs of shape"),
        (lambda a: a["layers"][0].pop("d_out"), "bad architecture"),
        (lambda a: a.update(format="other"), "does not describe a handprop model"),
        (lambda a: a.update(version=99), "version 99 is not supported"),
        (lambda a: a.update(loss="hinge"), "unknown loss"),
    ],
)
def test_bad_architecture_is_refused(tmp_path, rng, mutate, message):
    params, arch = good_arrays(rng)
    mutate(arch)
    write_npz(tmp_path / "m.npz", params=params, architecture=np.array(json.dumps(arch)))
    with pytest.raises(ModelFileError, match=message):
        load(tmp_path / "m.npz")


def test_architecture_that_is_not_json_is_refused(tmp_path, rng):
    params, _ = good_arrays(rng)
    write_npz(tmp_path / "m.npz", params=params, architecture=np.array("{not json"))
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load(tmp_path / "m.npz")


def test_pickled_content_is_refused(tmp_path, rng):
    params, _ = good_arrays(rng)
    obj = np.empty(1, dtype=object)
    obj[0] = {"evil": True}
    write_npz(tmp_path / "m.npz", params=params, architecture=obj)
    with pytest.raises(ModelFileError, match="pickled objects"):
        load(tmp_path / "m.npz")


def test_non_npz_and_missing_files_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFileError, match="junk.npz: not a readable"):
        load(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(ModelFileError, match="missing architecture, params"):
        load(tmp_path / "empty.npz")
    with pytest.raises(ModelFileError, match="no such model file"):
        load(tmp_path / "absent.npz")
