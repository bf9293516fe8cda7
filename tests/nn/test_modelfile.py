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


# -- hostile model files: one ModelFileError (or ResourceError) line naming the file -----


def write_model(path, params, arch):
    write_npz(path, params=params, architecture=np.array(json.dumps(arch)))
    return path


def test_architecture_nested_too_deeply_is_refused(tmp_path, rng):
    params, _ = good_arrays(rng)
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    write_npz(tmp_path / "m.npz", params=params, architecture=np.array(deep))
    with pytest.raises(ModelFileError, match=r"m\.npz: architecture JSON is nested too deeply"):
        load(tmp_path / "m.npz")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pixel_max", "abc", "pixel_max must be a finite number > 0, got 'abc'"),
        ("pixel_max", float("nan"), "pixel_max must be a finite number > 0"),
        ("image_shape", "x", r"image_shape must be \[height, width\], got 'x'"),
        ("image_shape", [3, 3], r"image_shape \[3, 3\] does not match the input shape \(4,\)"),
        ("class_names", 5, "class_names must be a list of strings, got 5"),
        ("class_names", ["a"], "class_names lists 1 names for the network's 2 classes"),
        ("class_names", ["a", "b", "c"], "class_names lists 3 names for the network's 2 classes"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, rng, key, value, message):
    params, arch = good_arrays(rng)
    arch["meta"] = {key: value}
    write_model(tmp_path / "m.npz", params, arch)
    with pytest.raises(ModelFileError, match=r"m\.npz: bad metadata: " + message):
        load(tmp_path / "m.npz")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a["layers"][0].update(d_out="3"), r"layer 0 \(dense\): d_out must be a number"),
        (lambda a: a["layers"][0].update(d_out=True), r"d_out must be a number, got True"),
        (lambda a: a["layers"][0].update(d_out=0), "dense needs sizes >= 1"),
        (lambda a: a["layers"][0].update(evil=1), "unknown setting 'evil'"),
        (lambda a: a.update(input_shape="x"), "input_shape must be a list"),
        (lambda a: a.update(layers=5), "layers must be a non-empty list"),
        (lambda a: a.update(layers=[5]), "layer 0 must be an object with a 'type'"),
        (lambda a: a.update(meta=[1]), "meta must be a JSON object"),
        (lambda a: a.update(dtype=["float32"]), "dtype must be float32 or float64"),
    ],
)
def test_wrong_types_in_the_architecture_are_refused(tmp_path, rng, mutate, message):
    params, arch = good_arrays(rng)
    mutate(arch)
    write_model(tmp_path / "m.npz", params, arch)
    with pytest.raises(ModelFileError, match=r"m\.npz: bad architecture: .*" + message):
        load(tmp_path / "m.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_are_refused(tmp_path, rng, bad):
    params, arch = good_arrays(rng)
    params = params.copy()
    params[3] = bad
    write_model(tmp_path / "m.npz", params, arch)
    with pytest.raises(ModelFileError, match=r"m\.npz: 1 of 23 parameters are NaN or infinite"):
        load(tmp_path / "m.npz")
    write_model(tmp_path / "all.npz", np.full_like(params, np.nan), arch)
    with pytest.raises(ModelFileError, match=r"all\.npz: 23 of 23 parameters"):
        load(tmp_path / "all.npz")


def test_non_finite_parameters_are_named_by_layer_and_slot(tmp_path, rng):
    params, arch = good_arrays(rng)  # 4-3-2: dense W (4, 3), b (3,), sigmoid, dense W, b
    params = params.copy()
    params[[3, 13]] = np.nan, np.inf  # layer 0's W, layer 0's b
    write_model(tmp_path / "m.npz", params, arch)
    with pytest.raises(ModelFileError) as err:
        load(tmp_path / "m.npz")
    assert str(err.value) == (
        f"{tmp_path / 'm.npz'}: 2 of 23 parameters are NaN or infinite (dense layer 0's W: 1, "
        "dense layer 0's b: 1); the model is broken (did its training diverge?)"
    )
    write_model(tmp_path / "all.npz", np.full_like(params, np.nan), arch)
    with pytest.raises(ModelFileError, match=r"dense layer 2's W: 6, and 1 more slot\)"):
        load(tmp_path / "all.npz")


def batchnorm_net():
    return Network.from_layers(["dense 4", "batchnorm", "relu"], (3,), 2, rng=0)


def test_a_negative_batchnorm_running_variance_is_refused_naming_the_slot(tmp_path, rng):
    """A running variance < 0 made sqrt(running_var + eps) NaN: every probability NaN,
    predicted and exported with exit status 0. Refused at load, naming layer and slot."""
    net = batchnorm_net()
    bn = net.layers[1]
    assert bn.kind == "batchnorm"
    bn.running_var[...] = [1.0, -0.25, 2.0, -3.0]
    save(net, tmp_path / "model.npz")
    with pytest.raises(ModelFileError) as err:
        load(tmp_path / "model.npz")
    assert str(err.value) == (
        f"{tmp_path / 'model.npz'}: batchnorm layer 1's running_var (running variance) has 2 "
        "negative values of 4 (the first -0.25, at [1]); a running variance is never < 0: "
        "the model is broken"
    )
    bn.running_var[...] = 0.0  # a constant feature: var 0 is fine (eps keeps sqrt > 0)
    save(net, tmp_path / "zero.npz")
    assert np.isfinite(load(tmp_path / "zero.npz").predict_proba(rng.normal(size=(3, 3)))).all()


def test_non_finite_batchnorm_statistics_are_named(tmp_path):
    net = batchnorm_net()
    net.layers[1].running_mean[2] = np.nan
    save(net, tmp_path / "model.npz")
    with pytest.raises(ModelFileError, match=r"\(batchnorm layer 1's running_mean: 1\)"):
        load(tmp_path / "model.npz")


def test_truncated_and_corrupt_files_are_refused(tmp_path, rng):
    params, arch = good_arrays(rng)
    data = write_model(tmp_path / "good.npz", params, arch).read_bytes()
    for name, content in [
        ("half.npz", data[: len(data) // 2]),
        ("tail.npz", data[:-5]),
        ("zero.npz", b""),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError, match=name.replace(".", r"\.") + ": not a readable"):
            load(tmp_path / name)
    flipped = bytearray(data)
    flipped[data.index(b"params.npy") + 150] ^= 0xFF  # inside the parameters' bytes
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match=r"crc\.npz: .*(CRC|corrupt)"):
        load(tmp_path / "crc.npz")


def test_object_arrays_are_refused_without_mentioning_allow_pickle(tmp_path, rng):
    _, arch = good_arrays(rng)
    obj = np.empty(3, dtype=object)
    write_npz(tmp_path / "m.npz", params=obj, architecture=np.array(json.dumps(arch)))
    with pytest.raises(ModelFileError, match=r"m\.npz: 'params' holds pickled objects") as err:
        load(tmp_path / "m.npz")
    assert "allow_pickle" not in str(err.value)


def test_a_folder_is_not_a_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="is a folder, not a model file"):
        load(tmp_path)


def npy_header_only(shape, descr="<f4"):
    """A .npy member whose header claims ``shape`` but whose data is a few bytes."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(8)


def write_claiming(path, arch, shape):
    buf = io.BytesIO()
    np.save(buf, np.array(json.dumps(arch)))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("architecture.npy", buf.getvalue())
        z.writestr("params.npy", npy_header_only(shape))
    return path


def test_a_params_header_claiming_terabytes_is_refused_before_reading(tmp_path, rng):
    _, arch = good_arrays(rng)
    write_claiming(tmp_path / "m.npz", arch, (10**12,))
    with pytest.raises(ModelFileError, match=r"needs 23 parameters, .* shape \(1000000000000,\)"):
        load(tmp_path / "m.npz")
    write_claiming(tmp_path / "short.npz", arch, (23,))
    with pytest.raises(ModelFileError, match=r"short\.npz: truncated: the parameters stop"):
        load(tmp_path / "short.npz")


def test_an_architecture_claiming_terabytes_is_refused_with_the_estimate(tmp_path, rng):
    _, arch = good_arrays(rng)
    arch["layers"][0]["d_out"] = arch["layers"][2]["d_in"] = 10**12
    write_claiming(tmp_path / "m.npz", arch, (4 * 10**12 + 10**12 + 2 * 10**12 + 2,))
    from handprop.errors import ResourceError

    with pytest.raises(ResourceError, match=r"m\.npz: the network 4-1000000000000-2 .* TiB"):
        load(tmp_path / "m.npz")
