"""A restricted unpickler for the official CIFAR python-format files.

CIFAR ships as Python pickles, and ``pickle.load`` on an arbitrary file can run arbitrary
code.  The official archives only ever contain dicts, lists, bytes, numbers and numpy
arrays, so this unpickler resolves exactly the globals needed to rebuild a numpy array and
refuses everything else (``os.system``, ``builtins.eval``, ...) with a :class:`DataError`.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from typing import Any

import numpy as np

from eigendamage.errors import DataError

try:  # numpy >= 2 moved the implementation; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 pickles of bytes at protocol <= 2 rebuild them with _codecs.encode(str, enc).
    ("_codecs", "encode"): _codecs.encode,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def load_pickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` (read from ``where``) with bytes keys, as the CIFAR site prescribes."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to unpickle {where}: it references {exc}, but a dataset pickle may only "
            "hold numpy arrays, lists, dicts and numbers. Use the official file."
        ) from None
    except Exception as exc:  # corrupt pickles fail with many exception types
        raise DataError(
            f"corrupt or truncated pickle file {where} ({type(exc).__name__}: {exc}). "
            "Download the dataset again."
        ) from None
