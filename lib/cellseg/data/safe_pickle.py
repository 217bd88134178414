"""Reading ``.npy`` label dicts without trusting pickle.

HoVer-Net / CellViT style label files are ``np.save(path, {"inst_map": ..., "type_map": ...})``: a 0-d object array
whose payload is a pickle, and ``np.load(..., allow_pickle=True)`` would run any callable a crafted file names. The
restricted unpickler here resolves only the globals NumPy needs to rebuild arrays, dtypes and scalars (both the NumPy 1
``numpy.core`` and the NumPy 2 ``numpy._core`` spellings) plus plain containers, and refuses everything else with an
error naming the file and the forbidden global. This follows the "restricting globals" recipe of the Python ``pickle``
documentation.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # protocol-2 pickles (NumPy under Python 2, old HoVer-Net data) encode raw bytes this way
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("__builtin__", "complex"),
    }
)


class UnsafePickleError(ValueError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle the forbidden global '{module}.{name}'. Label files may hold only "
            f"NumPy arrays, dtypes, scalars and plain containers; re-save the labels with "
            f"np.save(path, {{'inst_map': ..., 'type_map': ...}}) from trusted code."
        )


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only NumPy arrays, dtypes, scalars and plain containers.

    Raises:
        UnsafePickleError: naming ``source`` and the forbidden global.
    """
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


def load_npy(path: str | Path) -> Any:
    """Load a ``.npy`` file; object arrays (pickled payloads) go through the restricted unpickler.

    Returns the array, or for a 0-d object array (a saved dict) the object itself.

    Raises:
        ValueError: the file is not a valid ``.npy`` (names the file).
        UnsafePickleError: the pickle names a forbidden global (names the file and the global).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a valid .npy file ({e}); re-save it with numpy.save") from e
        if not dtype.hasobject:
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        payload = fh.read()
    try:
        array = restricted_loads(payload, str(path))
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or garbled pickle streams raise many types
        raise ValueError(f"{path}: corrupt pickled .npy payload ({type(e).__name__}: {e})") from e
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: the pickled payload is a {type(array).__name__}, not a NumPy array")
    if array.shape != tuple(shape):
        raise ValueError(
            f"{path}: header shape {tuple(shape)} does not match the payload shape {array.shape}"
        )
    if array.ndim == 0:
        return array.item()
    return array


def load_label_dict(path: str | Path) -> dict[str, Any]:
    """Load a label dict (``inst_map``, ``type_map``, optional ``ignore_mask``/``meta``) saved with ``np.save``.

    Raises:
        ValueError: not a dict, or ``inst_map`` missing (names the file and the keys found).
    """
    obj = load_npy(path)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a dict saved with np.save(path, {{'inst_map': ..., 'type_map': ...}}), "
            f"got {type(obj).__name__}"
        )
    if "inst_map" not in obj:
        raise ValueError(
            f"{path}: the label dict has no 'inst_map' (keys: {sorted(obj)}); add the instance map"
        )
    return obj
