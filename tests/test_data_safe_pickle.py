"""The restricted unpickler for .npy label dicts: NumPy data passes, anything that names another global is refused."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cellseg.data.safe_pickle import UnsafePickleError, load_label_dict, load_npy, restricted_loads


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - the classic pickle payload
        return (os.system, ("echo pwned > /dev/null",))


def _npy_with_object(path: Path, obj: object, protocol: int = 3) -> None:
    """Write an object .npy the way np.save does, with a chosen pickle protocol."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(
            np.array(obj, dtype=object) if not isinstance(obj, np.ndarray) else obj, fh, protocol=protocol
        )


def test_label_dict_round_trip(tmp_path: Path) -> None:
    labels = {
        "inst_map": np.arange(12, dtype=np.int32).reshape(3, 4),
        "type_map": np.ones((3, 4), dtype=np.uint8),
        "ignore_mask": np.zeros((3, 4), dtype=bool),
        "meta": {"name": "x", "boxes": [[1, 2, 3, 4, 1]], "fill": 0.5, "ok": True, "scalar": np.int64(3)},
    }
    np.save(tmp_path / "a.npy", labels, allow_pickle=True)
    loaded = load_label_dict(tmp_path / "a.npy")
    for key in ("inst_map", "type_map", "ignore_mask"):
        np.testing.assert_array_equal(loaded[key], labels[key])
        assert loaded[key].dtype == labels[key].dtype
    assert loaded["meta"]["boxes"] == [[1, 2, 3, 4, 1]] and loaded["meta"]["scalar"] == 3


def test_malicious_pickle_is_refused_with_file_and_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    _npy_with_object(path, {"inst_map": np.zeros((2, 2)), "payload": _Evil()})
    with pytest.raises(UnsafePickleError) as info:
        load_npy(path)
    message = str(info.value)
    assert str(path) in message
    assert "posix.system" in message or "os.system" in message
    assert "forbidden global" in message


@pytest.mark.parametrize("target", [b"builtins\neval", b"subprocess\nPopen", b"numpy\nload"])
def test_other_globals_are_refused(target: bytes) -> None:
    payload = b"c" + target + b"\n(S'1'\ntR."  # protocol 0: GLOBAL, MARK, arg, TUPLE, REDUCE
    with pytest.raises(UnsafePickleError, match=target.split(b"\n")[1].decode()):
        restricted_loads(payload, "payload.npy")


def test_numpy1_module_names_are_accepted(tmp_path: Path) -> None:
    # files written by NumPy 1 name numpy.core.multiarray; NumPy 2 writes numpy._core.multiarray
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    data = pickle.dumps({"inst_map": array}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data
    loaded = restricted_loads(legacy, "legacy.npy")
    np.testing.assert_array_equal(loaded["inst_map"], array)


def test_plain_numeric_npy_needs_no_pickle(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(load_npy(tmp_path / "plain.npy"), np.eye(3))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a numpy file at all", "not a valid .npy"),
        ("truncated", "corrupt pickled"),
        ("list", "not a NumPy array"),
        ("shape", "does not match"),
    ],
)
def test_broken_files_raise_naming_the_file(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "broken.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        np.save(path, {"inst_map": np.zeros((50, 50))}, allow_pickle=True)
        path.write_bytes(path.read_bytes()[:-300])
    elif content == "list":
        with open(path, "wb") as fh:  # a header that promises an object array, then a pickled list
            np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
            pickle.dump([1, 2], fh)
    else:
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": (3,)})
            pickle.dump(np.array({"a": 1}, dtype=object), fh)
    with pytest.raises(ValueError, match=match) as info:
        load_npy(path)
    assert str(path) in str(info.value)


def test_label_dict_must_be_a_dict_with_inst_map(tmp_path: Path) -> None:
    np.save(tmp_path / "arr.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="expected a dict"):
        load_label_dict(tmp_path / "arr.npy")
    np.save(tmp_path / "noinst.npy", {"type_map": np.zeros((2, 2))}, allow_pickle=True)
    with pytest.raises(ValueError, match="no 'inst_map'"):
        load_label_dict(tmp_path / "noinst.npy")


def test_version_2_header_is_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array({"inst_map": np.ones((2, 2))}, dtype=object), version=(2, 0))
    (tmp_path / "v2.npy").write_bytes(buf.getvalue())
    assert load_label_dict(tmp_path / "v2.npy")["inst_map"].sum() == 4
