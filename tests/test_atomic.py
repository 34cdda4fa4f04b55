"""lib/utils/atomic.py: atomic writes through a temporary file in the target's folder."""
import os
import pickle
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.utils.atomic import TMP_MARK, atomic_path, atomic_pickle, atomic_write_bytes, is_temp_name

ROOT = Path(__file__).resolve().parents[1]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_success_writes_file_0644_and_leaves_no_temp(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.bin"        # parent folders do not exist yet
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists()  # made by mkstemp, same folder
        assert tmp.name.startswith(".") and TMP_MARK in tmp.name
        assert not target.exists()                           # nothing under the final name yet
        tmp.write_bytes(b"payload")
    assert target.read_bytes() == b"payload"
    assert _mode(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_exception_keeps_old_file_and_removes_temp(tmp_path, exc):
    target = tmp_path / "data.txt"
    target.write_text("old contents")
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written new contents")
            raise exc
    assert target.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_suffix_preserved_for_writers_that_infer_format(tmp_path):
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    for name, fmt in (("a.png", "PNG"), ("b.bmp", "BMP")):
        target = tmp_path / name
        with atomic_path(str(target)) as tmp:                # str paths are accepted too
            assert tmp.suffix == target.suffix
            Image.fromarray(img).save(tmp)                   # format chosen from the suffix
        with Image.open(target) as im:
            assert im.format == fmt
            assert np.array_equal(np.asarray(im), img)


def test_temp_names_unique_for_one_target(tmp_path):
    target = tmp_path / "same.npz"
    with atomic_path(target) as t1, atomic_path(target) as t2:   # one process, two writers
        assert t1 != t2
        t1.write_bytes(b"first")
        t2.write_bytes(b"second")
    assert target.read_bytes() == b"first"                   # the outer block finishes last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.npz"]


def test_bytes_and_pickle_helpers(tmp_path):
    atomic_write_bytes(tmp_path / "x.bin", b"\x00\x01\xff")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01\xff"
    obj = {"a": np.arange(3, dtype=np.float32), "b": [1, "two"]}
    atomic_pickle(tmp_path / "o.pkl", obj)
    raw = (tmp_path / "o.pkl").read_bytes()
    assert raw[:2] == b"\x80\x02"                            # protocol 2 by default
    back = pickle.loads(raw)
    assert np.array_equal(back["a"], obj["a"]) and back["b"] == obj["b"]
    atomic_pickle(tmp_path / "o4.pkl", obj, protocol=4)
    assert (tmp_path / "o4.pkl").read_bytes()[:2] == b"\x80\x04"
    assert _mode(tmp_path / "x.bin") == _mode(tmp_path / "o.pkl") == 0o644


def test_killed_writer_leaves_temp_recognised_by_marker(tmp_path):
    target = tmp_path / "scan" / "occupancy.npz"
    code = ("import os, signal, sys\n"
            "from lib.utils.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    left = list(target.parent.iterdir())
    assert len(left) == 1 and is_temp_name(left[0]) and left[0].read_bytes() == b"half"
    assert not is_temp_name(target) and not is_temp_name(tmp_path / "x.tmp-1.npz")

    from lib.dataset.preprocessing import remove_stray_temps  # the resume step deletes it
    (target.parent / "occupancy.npz").write_bytes(b"kept")
    remove_stray_temps(target.parent)
    assert [p.name for p in target.parent.iterdir()] == ["occupancy.npz"]
