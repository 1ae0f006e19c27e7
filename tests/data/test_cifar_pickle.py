"""CIFAR pickles are read without running code: real files load, anything else is refused."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mbdml.data import load_cifar_pickle
from mbdml.data.cifar_pickle import read_cifar_pickle
from mbdml.errors import DataError

RNG = np.random.default_rng(7)
NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# ------------------------------------------------------------ files as Python 2 wrote them
def _py2_str(b: bytes) -> bytes:
    # SHORT_BINSTRING / BINSTRING: a python-2 str, read back as bytes with encoding="bytes"
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_value(v: object) -> bytes:
    if isinstance(v, bytes):
        return _py2_str(v)
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e"
    assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
    n, m = v.shape
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
        + b"(" + _py2_int(1) + _py2_int(n) + _py2_int(m) + b"\x86"
        + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
        + b"\x89" + _py2_str(v.tobytes()) + b"tb"
    )


def py2_pickle(d: dict[bytes, object]) -> bytes:
    """A dict pickled the way the CIFAR 'python version' files were (cPickle, protocol 2)."""
    return b"\x80\x02}(" + b"".join(_py2_value(k) + _py2_value(v) for k, v in d.items()) + b"u."


def write_py2_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int]]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "batches.meta").write_bytes(py2_pickle({b"label_names": NAMES, b"num_cases_per_batch": per_batch}))
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = RNG.integers(0, 10, size=per_batch).tolist()
        (root / name).write_bytes(py2_pickle({b"batch_label": b"batch", b"labels": y, b"data": x, b"filenames": [b"a.png"] * per_batch}))
        if name != "test_batch":
            xs.append(x)
            ys += y
    return np.concatenate(xs), ys


def test_files_in_the_python2_format_load_as_numpy_reads_them(tmp_path: Path) -> None:
    x, y = write_py2_cifar10(tmp_path)
    # the hand-written bytes are what numpy itself reads as the CIFAR format
    with open(tmp_path / "data_batch_1", "rb") as f:
        plain = pickle.load(f, encoding="bytes")
    safe = read_cifar_pickle(tmp_path / "data_batch_1")
    assert np.array_equal(safe[b"data"], plain[b"data"]) and safe[b"data"].dtype == np.uint8
    assert safe[b"labels"] == plain[b"labels"] and safe[b"filenames"] == plain[b"filenames"]
    train = load_cifar_pickle(tmp_path, train=True)
    assert train.classes == [n.decode() for n in NAMES]
    assert torch.equal(train.images, torch.from_numpy(x.reshape(-1, 3, 32, 32))) and train.labels.tolist() == y


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_files_pickled_again_by_python3_and_numpy_load(tmp_path: Path, protocol: int) -> None:
    data = {
        b"data": RNG.integers(0, 256, size=(4, 3072), dtype=np.uint8),
        "labels": [0, 1, 2, 3],
        "label_names": ["a", "b"],
        b"batch_label": b"",
        "big_endian": np.arange(5, dtype=">f4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    }
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    back = read_cifar_pickle(path)
    assert back.keys() == data.keys()
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(back[key], value) and back[key].dtype == value.dtype and back[key].flags.writeable
        else:
            assert back[key] == value


class _Payload:
    """Pickles as a call chosen by the writer."""

    def __init__(self, call: object, args: tuple) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _evil_cifar_folder(root: Path, label_names: object) -> None:
    write_py2_cifar10(root)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": label_names}, f, protocol=2)


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mbdml", *argv], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("payload", ["os.system", "quiet eval"])
def test_a_meta_file_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "ran"
    if payload == "os.system":
        names = _Payload(os.system, (f"touch {marker}",))
    else:  # returns valid names, and would have trained to the end with exit 0
        names = _Payload(eval, (f"[open({str(marker)!r}, 'w').close()] and {[n.decode() for n in NAMES]!r}",))
    _evil_cifar_folder(tmp_path / "cifar", names)
    res = run_cli("train", "--dataset", str(tmp_path / "cifar"), "--save_dir", str(tmp_path / "runs"), "--max_epochs", "1", "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "batches.meta' is not a CIFAR pickle and may be malicious" in res.stderr and "nothing in it ran" in res.stderr
    named = ("'posix.system'", "'nt.system'") if payload == "os.system" else ("'__builtin__.eval'", "'builtins.eval'")
    assert any(n in res.stderr for n in named)
    assert not marker.exists()
    assert not list((tmp_path / "runs").rglob("config.json"))  # no run started


@pytest.mark.parametrize(
    "value, what",
    [
        (np.array([1, "a"], dtype=object), "'O8'"),
        (np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), "'V5'"),
        (np.int64(3), "scalar"),
        (np.array(["a", "b"]), "'U1'"),
    ],
)
def test_anything_but_arrays_of_numbers_is_refused(tmp_path: Path, value: object, what: str) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": value}, protocol=2))
    with pytest.raises(DataError, match="is not a CIFAR pickle and may be malicious") as err:
        read_cifar_pickle(path)
    assert what in str(err.value) and str(path) in str(err.value)


def test_self_referencing_containers_are_refused(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    (tmp_path / "meta").write_bytes(pickle.dumps({b"label_names": loop}))
    with pytest.raises(DataError, match="nested deeper"):
        read_cifar_pickle(tmp_path / "meta")


@pytest.mark.parametrize(
    "names, what",
    [([1, 2, 3], "a list holding int values such as '1'"), (b"airplane", "as a bytes"), ([], "an empty list"), ({"a": 1}, "as a dict")],
)
def test_label_names_that_are_not_a_list_of_strings_are_named(tmp_path: Path, names: object, what: str) -> None:
    _evil_cifar_folder(tmp_path, names)
    with pytest.raises(DataError) as err:
        load_cifar_pickle(tmp_path, train=True)
    msg = str(err.value)
    assert "batches.meta" in msg and "'label_names'" in msg and what in msg and "not a list of class names" in msg


def test_labels_that_are_not_whole_numbers_are_named(tmp_path: Path) -> None:
    write_py2_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}))
    with pytest.raises(DataError, match="test_batch' has 'labels' that is not a list of whole numbers"):
        load_cifar_pickle(tmp_path, train=False)
