"""Model files: a network saved as ``.npz``, and loaded back without trusting it.

A model file holds two arrays: ``params`` (the flat parameter vector) and
``architecture`` (JSON text, see :meth:`Network.architecture`).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from handprop.atomic import atomic_write_bytes
from handprop.errors import HandpropError, ModelFileError, ResourceError, ShapeError
from handprop.files import MAX_MODEL_BYTES, regular_file
from handprop.nn import backend
from handprop.nn.network import MODEL_FORMAT, MODEL_VERSION, Network, chain_shapes
from handprop.nn.params import ParamSlot
from handprop.nn.spec import architecture_layers, check_architecture, is_int

#: the largest architecture text a model file may hold (a real one is a few KB)
MAX_ARCHITECTURE_BYTES = 16 * 2**20
#: parameters are read into the network's vector this many bytes at a time
READ_CHUNK = 16 * 2**20


def check_meta(meta: dict[str, Any], net: Network) -> None:
    """The facts ``predict`` relies on: class names, image shape, pixel scale and the
    name of the image preparation (which ``handprop.images`` knows).

    Raises ShapeError naming the first one of the wrong type or size.
    """
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ShapeError(f"class_names must be a list of strings, got {names!r:.80}")
        if len(names) != net.n_classes:
            raise ShapeError(
                f"class_names lists {len(names)} names for the network's {net.n_classes} classes"
            )
    image = meta.get("image_shape")
    if image:
        if (
            not isinstance(image, list)
            or len(image) != 2
            or not all(is_int(s) and s >= 1 for s in image)
        ):
            raise ShapeError(f"image_shape must be [height, width], got {image!r:.80}")
        if math.prod(image) != math.prod(net.input_shape):
            raise ShapeError(
                f"image_shape {image} does not match the input shape {net.input_shape}"
            )
    pixel_max = meta.get("pixel_max")
    if pixel_max is not None and not (
        isinstance(pixel_max, (int, float))
        and not isinstance(pixel_max, bool)
        and math.isfinite(pixel_max)
        and pixel_max > 0
    ):
        raise ShapeError(f"pixel_max must be a finite number > 0, got {pixel_max!r:.80}")
    prep = meta.get("image_prep")
    if prep is not None and not isinstance(prep, str):
        raise ShapeError(f"image_prep must be a name, got {prep!r:.80}")


def save(net: Network, path: str | Path) -> None:
    """Save as .npz: ``params`` (the flat vector) and ``architecture`` (JSON text)."""
    atomic_write_bytes(path, model_bytes(net))


def model_bytes(net: Network) -> bytes:
    """The bytes of the .npz file :func:`save` writes."""
    buf = io.BytesIO()
    params = backend.to_host(net.params)  # a model trained on a GPU loads anywhere
    np.savez(buf, params=params, architecture=np.array(json.dumps(net.architecture())))
    return buf.getvalue()


def load(path: str | Path) -> Network:
    """Load a model saved by :func:`save`; refuse anything else with a clear message.

    Nothing in the file is trusted: its arrays are read with ``allow_pickle=False`` (a
    pickled object inside one could run code on load), their headers are checked
    before the data is read (a header may claim terabytes), the architecture and the
    metadata are checked value by value, and the parameters must be finite (and a
    batchnorm layer's running variance >= 0), a fault named by its layer and slot. A
    FIFO, a device or a file over :data:`~handprop.files.MAX_MODEL_BYTES` is refused
    before it is opened. Every fault is a :class:`ModelFileError` (or a
    :class:`ResourceError` for a model too large for this machine) naming the file.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder, not a model file")
        if not path.exists():
            raise ModelFileError(f"{path}: no such model file")
        regular_file(path, "model file", MAX_MODEL_BYTES, ModelFileError)
        with path.open("rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a .npz is a zip archive
                raise ModelFileError(f"{path}: not a readable .npz model file (not a zip archive)")
        with zipfile.ZipFile(path) as zf:
            return _read_model(zf, path)
    except ModelFileError:
        raise
    except ResourceError as exc:
        raise ResourceError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ModelFileError(
            f"{path}: cannot read the model file ({exc.strerror or exc})"
        ) from None
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
        raise ModelFileError(
            f"{path}: not a readable .npz model file (truncated or corrupt: {exc})"
        ) from None


def _npy_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the .npy member ``name``, read from its header only."""
    with zf.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ModelFileError(f"{path}: {name!r} has unsupported .npy version {version}")
    if dtype.hasobject:
        raise ModelFileError(
            f"{path}: {name!r} holds pickled objects, which handprop refuses to load "
            "(a model file holds numbers and JSON text only)"
        )
    return shape, dtype


def _read_model(zf: zipfile.ZipFile, path: Path) -> Network:
    members = {n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")}
    missing = {"params", "architecture"} - members
    if missing:
        raise ModelFileError(f"{path}: not a handprop model, missing {', '.join(sorted(missing))}")

    shape, dtype = _npy_header(zf, "architecture", path)
    if shape != () or dtype.kind != "U":
        raise ModelFileError(f"{path}: 'architecture' must be one JSON string")
    if dtype.itemsize > MAX_ARCHITECTURE_BYTES:
        raise ModelFileError(
            f"{path}: the architecture text is {dtype.itemsize // 4:,} characters long; "
            "a handprop model's is a few thousand"
        )
    with zf.open("architecture.npy") as f:
        arch_text = str(np.lib.format.read_array(f, allow_pickle=False))
    try:
        arch = json.loads(arch_text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: architecture is not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: architecture JSON is nested too deeply") from None
    if not isinstance(arch, dict) or arch.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: architecture does not describe a handprop model")
    if arch.get("version") != MODEL_VERSION:
        raise ModelFileError(
            f"{path}: model format version {arch.get('version')!r:.40} is not supported "
            f"(this handprop reads version {MODEL_VERSION})"
        )

    # the parameters' header first: a file may claim more than it holds, or than fits
    shape, dtype = _npy_header(zf, "params", path)
    try:
        check_architecture(arch)
        layers = architecture_layers(arch)
        out = chain_shapes(layers, tuple(arch["input_shape"]))
        if len(out) != 1:
            raise ShapeError(f"the output must be one vector of class scores, got shape {out}")
    except HandpropError as exc:
        raise ModelFileError(f"{path}: bad architecture: {exc}") from None
    n_params = sum(math.prod(s) for layer in layers for s in layer.param_shapes().values())
    if shape != (n_params,):
        raise ModelFileError(
            f"{path}: the architecture needs {n_params:,} parameters, "
            f"the file holds an array of shape {shape}"
        )
    if dtype != np.dtype(arch["dtype"]):
        raise ModelFileError(
            f"{path}: parameters are {dtype}, the architecture says {arch['dtype']}"
        )
    try:
        # the memory check comes here, before anything of that size is allocated
        net = Network(
            layers, arch["input_shape"], arch["loss"], arch["dtype"], arch.get("meta") or {}
        )
    except ResourceError:
        raise
    except HandpropError as exc:
        raise ModelFileError(f"{path}: bad architecture: {exc}") from None
    try:
        check_meta(net.meta, net)
    except ShapeError as exc:
        raise ModelFileError(f"{path}: bad metadata: {exc}") from None

    # straight into the network's own vector, a chunk at a time: no second copy
    with zf.open("params.npy") as f:
        _npy_skip_header(f)
        data = memoryview(net.params).cast("B")
        done = 0
        while done < len(data):
            got = f.readinto(data[done : done + READ_CHUNK])
            if not got:
                raise ModelFileError(
                    f"{path}: truncated: the parameters stop after {done:,} of {len(data):,} bytes"
                )
            done += got
        if f.read(1):
            raise ModelFileError(f"{path}: the parameters hold more data than their header says")
    check_params(net, str(path))
    return net


def _slot_name(net: Network, slot: ParamSlot) -> str:
    layer = net.layers[slot.layer]
    return f"{layer.kind} layer {slot.layer}'s {slot.name}"


def check_params(net: Network, name: str) -> None:
    """Refuse parameters a network cannot predict with: NaN or infinite values (a
    diverged training), or negative values in a slot that must be >= 0 (a batchnorm
    layer's running variance: the square root of a negative variance makes every
    probability NaN). ModelFileError starts with ``name`` and names the layer and slot.
    """
    bad: list[tuple[ParamSlot, int]] = []
    for slot in net.layout.slots:
        n = sum(
            int(np.count_nonzero(~np.isfinite(net.params[i : min(i + 2**20, slot.stop)])))
            for i in range(slot.offset, slot.stop, 2**20)
        )
        if n:
            bad.append((slot, n))
    if bad:
        total = sum(n for _, n in bad)
        where = ", ".join(f"{_slot_name(net, s)}: {n:,}" for s, n in bad[:3])
        more = f", and {len(bad) - 3} more slot" + "s" * (len(bad) > 4) if len(bad) > 3 else ""
        raise ModelFileError(
            f"{name}: {total:,} of {net.n_params:,} parameters are NaN or infinite "
            f"({where}{more}); the model is broken (did its training diverge?)"
        )
    for slot in net.layout.slots:
        what = dict(getattr(net.layers[slot.layer], "nonnegative", ())).get(slot.name)
        if what is None:
            continue
        values = net.params[slot.offset : slot.stop]
        negative = np.flatnonzero(values < 0)
        if len(negative):
            i = int(negative[0])
            raise ModelFileError(
                f"{name}: {_slot_name(net, slot)} ({what}) has {len(negative):,} negative "
                f"value{'s' * (len(negative) > 1)} of {slot.size:,} (the first {values[i]:g}, "
                f"at [{i}]); a {what} is never < 0: the model is broken"
            )


def _npy_skip_header(f: Any) -> None:
    """Read past a .npy header (version 1.0 or 2.0, already checked)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
