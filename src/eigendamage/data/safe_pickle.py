"""A restricted unpickler for the official CIFAR python-format files.

CIFAR ships as Python pickles, and ``pickle.load`` on an arbitrary file can run arbitrary
code.  The official archives only ever contain dicts, lists, bytes, numbers and numpy
arrays, so this unpickler resolves exactly the globals needed to rebuild a numpy array and
refuses everything else (``os.system``, ``builtins.eval``, ...) with a :class:`DataError`.

Refusing code is not enough: a tiny file can still *declare* huge things.  So, before
anything is built, every length and memo index in the opcode stream is checked against the
bytes actually present (CPython allocates a declared ``BINBYTES``/``BYTEARRAY8`` length, and
zero-fills a memo up to twice a declared ``LONG_BINPUT`` index, before reading any data), and
the numpy globals are replaced by checked stand-ins: ``numpy.ndarray`` cannot be called (it
would make an uninitialised array of any declared shape), ``_reconstruct`` only makes the
empty placeholder real pickles start from, and an array's state must carry exactly
``prod(shape) * itemsize`` bytes of a plain numeric dtype (no object arrays).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
from typing import Any

import numpy as np

from eigendamage.errors import DataError

#: Deepest nesting of containers accepted (the CIFAR files nest 2 deep); deeper structures
#: would make any recursive consumer (repr, numpy conversion) fail with RecursionError.
MAX_DEPTH = 32
#: numpy's own limit on array dimensions is 64 (32 in numpy 1.x).
_MAX_NDIM = 32
_DTYPE_CODE = re.compile(r"[biufc][0-9]{1,2}")
_BYTE_ORDERS = ("<", ">", "|", "=")


class _Refused(pickle.UnpicklingError):
    """A well-formed pickle asks for something a dataset file has no business asking for."""


class _ForbiddenGlobal(_Refused):
    pass


class _Corrupt(ValueError):
    """The opcode stream is damaged, or declares more than the file holds."""


def _clip(text: str, limit: int = 200) -> str:
    """One short line: file contents quoted in a message must not flood the terminal."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _brief(value: Any) -> str:
    """A short description of a value from the file (never a huge repr or int conversion)."""
    if isinstance(value, (str, bytes)):
        return _clip(repr(value[:40]), 60)
    if type(value) is int and value.bit_length() <= 64:
        return str(value)
    return f"a {type(value).__name__}"


def _describe(exc: BaseException) -> str:
    """An exception's text for a message, clipped; never a second exception."""
    try:
        return _clip(str(exc))
    except Exception:  # str() of an exception holding e.g. a huge int can itself fail
        return "no details"


# --------------------------------------------------------------------------- opcode scan

_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
# How many length bytes precede a counted argument, and whether that length is signed.
_COUNTED = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _scan(data: bytes) -> None:
    """Walk the opcodes without executing them; refuse lengths and memo indices that lie.

    Every counted argument must fit in the bytes that follow it, and a memo index may not
    exceed the number of opcodes seen so far (picklers number the memo 0, 1, 2, ...), so
    what the unpickler allocates stays proportional to the file's size.
    """
    pos, end, ops = 0, len(data), 0
    while True:
        if pos >= end:
            raise _Corrupt("it ends before its STOP opcode")
        op = _OPCODES.get(data[pos : pos + 1])
        if op is None:
            raise _Corrupt(f"unknown opcode {data[pos : pos + 1]!r} at byte {pos}")
        start = pos = pos + 1
        ops += 1
        arg = op.arg
        if arg is None:
            pass
        elif arg.n == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if arg.name == "stringnl_noescape_pair" else 1):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    raise _Corrupt(f"the {op.name} argument at byte {start} has no end of line")
                pos = newline + 1
        elif arg.n >= 0:
            pos += arg.n
        else:
            width, signed = _COUNTED[arg.n]
            length = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            pos += width
            if length < 0 or length > end - pos:
                raise _Corrupt(
                    f"the {op.name} at byte {start - 1} declares {length} bytes, but only "
                    f"{max(end - pos, 0)} follow"
                )
            pos += length
        if pos > end:
            raise _Corrupt(f"it ends inside the {op.name} at byte {start - 1}")
        if op.name == "FRAME" and int.from_bytes(data[start:pos], "little") > end - pos:
            raise _Corrupt(f"the FRAME at byte {start - 1} is longer than the rest of the file")
        if op.name in _MEMO_PUTS:
            raw = data[start:pos]
            index = int(raw) if op.name == "PUT" else int.from_bytes(raw, "little")
            if not 0 <= index <= ops:
                raise _Corrupt(
                    f"the {op.name} at byte {start - 1} uses memo index {index} after only "
                    f"{ops} opcodes"
                )
        elif op.name == "STOP":
            return


# --------------------------------------------------------------------------- checked globals


class _NdarrayName:
    """Stands in for ``numpy.ndarray``: real pickles only pass it to ``_reconstruct``."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(
            "it calls numpy.ndarray(...) directly, which makes an uninitialised array of "
            "whatever shape the file declares"
        )


_NDARRAY = _NdarrayName()


class _PickledDtype:
    """What ``numpy.dtype(code, align, copy)`` becomes: a plain numeric dtype, checked."""

    __slots__ = ("dtype",)

    def __init__(self, code: Any) -> None:
        if isinstance(code, bytes):  # Python 2 pickles read with encoding="bytes"
            code = code.decode("latin-1")
        dtype = None
        if isinstance(code, str) and _DTYPE_CODE.fullmatch(code):
            try:
                dtype = np.dtype(code)
            except TypeError:
                dtype = None
        if dtype is None or dtype.kind not in "biufc":
            raise _Refused(
                f"it declares an array of dtype {_brief(code)}; only plain numeric arrays "
                "(bool, int, uint, float, complex) may appear in a dataset file"
            )
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]):
        # a plain numeric dtype has no subarray, names, fields or metadata.
        ok = (
            isinstance(state, tuple)
            and 2 <= len(state) <= 9
            and all(v is None or type(v) is int for v in (state[0], *state[2:]))
        )
        order = state[1] if ok else None
        if isinstance(order, bytes):  # Python 2 pickles read with encoding="bytes"
            order = order.decode("latin-1")
        if not ok or order not in _BYTE_ORDERS:
            raise _Refused("it gives a dtype a structured or unknown state")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _PickledArray(np.ndarray):
    """The array ``_reconstruct`` hands out; its state is checked before numpy sees it."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("it gives a numpy array an unknown state")
        if len(state) == 5:
            if state[0] != 1:
                raise _Refused(f"it gives a numpy array state version {_brief(state[0])}")
            state = state[1:]
        shape, dtype, fortran, raw = state
        if (
            not isinstance(shape, tuple)
            or len(shape) > _MAX_NDIM
            or any(type(n) is not int or n < 0 for n in shape)
        ):
            raise _Refused("it gives a numpy array a malformed shape")
        if not isinstance(dtype, _PickledDtype):
            raise _Refused("it gives a numpy array something other than a numeric dtype")
        if not isinstance(fortran, (bool, int)) or not isinstance(raw, (bytes, bytearray)):
            raise _Refused("it gives a numpy array data that is not raw bytes")
        needed = math.prod(shape) * dtype.dtype.itemsize
        if len(raw) != needed:
            raise _Refused(
                f"it declares a {dtype.dtype} array of shape {shape} ({needed} bytes) but "
                f"holds {len(raw)} bytes of data for it"
            )
        super().__setstate__((shape, dtype.dtype, bool(fortran), raw))


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
    """``numpy.core.multiarray._reconstruct``: only the empty start every real pickle uses."""
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused("it asks numpy._reconstruct for something other than an empty ndarray")
    return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


def _dtype(code: Any, align: Any = False, copy: Any = False) -> _PickledDtype:
    """``numpy.dtype``; a function, so ``NEWOBJ`` cannot skip the checks in ``__init__``."""
    return _PickledDtype(code)


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol <= 2: ``(str, 'latin1')``.

    Any other codec is refused: chains of e.g. ``hex`` would double the size at every step.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("it calls _codecs.encode with something other than (str, 'latin1')")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3 pickles ``b''`` at protocol <= 2; ``bytes(n)`` is refused."""
    if args:
        raise _Refused("it calls bytes(...) with arguments")
    return b""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # find_class sees Python 2 names unmapped
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(_clip(f"{module}.{name}", 100)) from None


# --------------------------------------------------------------------------- structure


def _settle(obj: Any, budget: int) -> None:
    """Check the nesting and hand out plain ndarrays; without recursion.

    Containers are walked as a tree, so each visit is paid for by ``budget`` (the file's
    size, since every element costs at least one opcode byte): a file that reuses
    containers to fake a huge or cyclic structure runs out of it.
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Refused(f"it nests containers more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            for key, value in node.items():
                if type(value) is _PickledArray:
                    node[key] = value.view(np.ndarray)
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
            budget -= len(node)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if type(value) is _PickledArray:
                    node[i] = value.view(np.ndarray)
                stack.append((value, depth + 1))
            budget -= len(node)
        elif isinstance(node, (tuple, set, frozenset)):
            stack.extend((value, depth + 1) for value in node)
            budget -= len(node)
        else:
            continue
        if budget < 0:
            raise _Refused("it refers to the same containers over and over (or to themselves)")


def load_pickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` (read from ``where``) with bytes keys, as the CIFAR site prescribes.

    Arrays come back as plain ``numpy.ndarray`` where they sit in lists or dicts (inside a
    tuple, as a harmless subclass that differs only in its checked ``__setstate__``).
    """
    try:
        _scan(data)
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        _settle(obj, len(data))
        if type(obj) is _PickledArray:
            obj = obj.view(np.ndarray)
        return obj
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to unpickle {where}: it references {exc}, but a dataset pickle may only "
            "hold numpy arrays, lists, dicts and numbers. Use the official file."
        ) from None
    except _Corrupt as exc:
        raise DataError(
            f"corrupt or truncated pickle file {where} ({_describe(exc)}). "
            "Download the dataset again."
        ) from None
    except _Refused as exc:
        raise DataError(
            f"refusing to unpickle {where}: {_describe(exc)}. Use the official file."
        ) from None
    except Exception as exc:  # corrupt pickles fail with many exception types
        raise DataError(
            f"corrupt or truncated pickle file {where} ({type(exc).__name__}: "
            f"{_describe(exc)}). Download the dataset again."
        ) from None
