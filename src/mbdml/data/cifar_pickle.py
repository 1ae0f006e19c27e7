"""Reading CIFAR's python pickles without running code from them.

A pickle names the functions to call to rebuild its objects, so ``pickle.load`` of a
file in a shared data folder runs whatever its writer chose. The CIFAR "python
version" files hold only dicts, lists, byte and text strings, whole numbers and numpy
arrays of numbers (``data``: uint8 ``(N, 3072)``). :class:`CifarUnpickler` admits the
few names that rebuild those and refuses every other one before it is looked up:

- ``numpy.core.multiarray._reconstruct`` (``numpy._core`` since numpy 2), ``numpy.ndarray``
  and ``numpy.dtype``: how numpy pickles an array up to protocol 4;
- ``numpy.core.numeric._frombuffer`` (``numpy._core``): the same under protocol 5;
- ``_codecs.encode`` (text to latin-1 bytes) and ``bytes`` with no argument: how
  Python 3 writes byte strings under protocol 2.

Even those are not numpy's own functions: they return inert records of the array's
shape, byte order, type code and raw bytes, checked here (numbers only: bool, int,
unsigned int, float; no fields, no object arrays) and turned into arrays with
``numpy.frombuffer`` once the whole file is read. So neither Python nor numpy ever
runs a call or a ``__setstate__`` that the file chose.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from mbdml.errors import DataError

__all__ = ["CifarUnpickler", "NotCifarPickle", "read_cifar_pickle"]

# numpy type codes of numbers: bool, signed and unsigned integers, floats
_NUMERIC_CODE = re.compile(r"(b1|[iu][1248]|f[248])")
_BYTE_ORDERS = ("<", ">", "|", "=")
_MAX_DEPTH = 8  # a CIFAR pickle is a dict of lists and arrays: depth 2


class NotCifarPickle(pickle.UnpicklingError):
    """The file asks for something a CIFAR pickle never holds."""


def _text(value: Any) -> Any:
    """A python-2 string read as bytes, as text; anything else unchanged."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _NdarrayType:
    """Stands for ``numpy.ndarray`` (the first argument of ``_reconstruct``)."""


_NDARRAY = _NdarrayType()


class _PendingDtype:
    """A numeric dtype named by the file, checked before numpy sees it."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        code = _text(code)  # python-2 files, read with encoding="bytes", give b"u1"
        if not isinstance(code, str) or _NUMERIC_CODE.fullmatch(code) is None:
            raise NotCifarPickle(f"an array of type {code!r} (only arrays of numbers are read)")
        if align not in (0, 1) or copy not in (0, 1):  # False/True, or 0/1 in python-2 files
            raise NotCifarPickle("a numpy dtype with unexpected arguments")
        self.code = code
        self.order = "|"

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, item size, alignment, flags)
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise NotCifarPickle("a numpy dtype with an unexpected state")
        order, subarray, names, fields = _text(state[1]), *state[2:5]
        if order not in _BYTE_ORDERS or subarray is not None or names is not None or fields is not None:
            raise NotCifarPickle("a structured or sub-array numpy dtype (only arrays of numbers are read)")
        self.order = order

    def resolve(self) -> np.dtype:
        return np.dtype(("" if self.order == "|" else self.order) + self.code)


class _PendingArray:
    """An array's shape, dtype and raw bytes, made into a numpy array at the end."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: _PendingDtype | None = None
        self.fortran = False
        self.raw: bytes = b""

    def fill(self, shape: Any, dtype: Any, fortran: Any, raw: Any) -> "_PendingArray":
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise NotCifarPickle("a numpy array with an invalid shape")
        if not isinstance(dtype, _PendingDtype):
            raise NotCifarPickle("a numpy array without a numeric dtype")
        if not isinstance(fortran, bool):
            raise NotCifarPickle("a numpy array with an invalid memory order")
        if not isinstance(raw, (bytes, bytearray)):
            raise NotCifarPickle("a numpy array whose items are Python objects (only arrays of numbers are read)")
        if len(raw) != math.prod(shape) * dtype.resolve().itemsize:
            raise NotCifarPickle(f"a numpy array of shape {shape} with {len(raw)} bytes of data, which do not fill it")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, bytes(raw)
        return self

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw data); very old numpy omits the version
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise NotCifarPickle("a numpy array with an unexpected state")
        self.fill(*state)

    def resolve(self) -> np.ndarray:
        if self.dtype is None or self.shape is None:
            raise NotCifarPickle("a numpy array that was never filled")
        flat = np.frombuffer(self.raw, dtype=self.dtype.resolve())
        return flat.reshape(self.shape, order="F" if self.fortran else "C").copy()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    if subtype is not _NDARRAY:
        raise NotCifarPickle("an array of a type other than numpy.ndarray")
    return _PendingArray()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _PendingArray:
    if order not in ("C", "F"):
        raise NotCifarPickle("a numpy array with an invalid memory order")
    return _PendingArray().fill(shape, dtype, order == "F", buffer)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NotCifarPickle("a call of _codecs.encode other than text to latin-1 bytes")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise NotCifarPickle("a call of bytes() with arguments")
    return b""


_ADMITTED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _PendingDtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR's files: the names a CIFAR pickle uses, nothing else.

    Anything else the file names (``os.system``, ``builtins.eval``, any class) raises
    :class:`NotCifarPickle` before it is imported. ``load`` may return inert array
    records; :func:`read_cifar_pickle` turns them into numpy arrays.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = _ADMITTED.get((module, name))
        if found is None:
            raise NotCifarPickle(f"the Python name '{module}.{name}', which the CIFAR format never uses")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise NotCifarPickle("a persistent reference")


def _finish(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every array record made a numpy array; only plain values are kept."""
    if depth > _MAX_DEPTH:
        raise NotCifarPickle("containers nested deeper than in any CIFAR pickle")
    if isinstance(obj, _PendingArray):
        return obj.resolve()
    if isinstance(obj, dict):
        return {_finish(k, depth + 1): _finish(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray)):
        return obj
    raise NotCifarPickle(f"a value of type {type(obj).__name__}")


def read_cifar_pickle(path: str | Path) -> Any:
    """The object in the CIFAR pickle ``path``, read without running code from it.

    Byte strings stay bytes (the python-2 files' keys, such as ``b"data"``). Raises
    :class:`DataError` naming the file when it asks for anything but what the CIFAR
    format holds (it is not a CIFAR pickle and may be malicious) or cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="bytes").load()
        return _finish(obj)
    except NotCifarPickle as exc:
        raise DataError(
            f"CIFAR file '{path}' is not a CIFAR pickle and may be malicious: it asks for {exc}. It was not loaded, "
            f"and nothing in it ran; replace it with the file from the CIFAR 'python version' archive"
        ) from None
    except RecursionError:
        raise DataError(
            f"CIFAR file '{path}' nests containers deeper than a CIFAR pickle does: it is not a CIFAR pickle; replace "
            f"it with the file from the CIFAR 'python version' archive"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(
            f"cannot read CIFAR file '{path}' ({type(exc).__name__}: {exc}); replace it with the file "
            f"from a fresh copy of the CIFAR 'python version' archive"
        ) from None
