"""Atomic writes (checkpoints, cached reference statistics): all or nothing."""

import pytest

from act_lightning.atomic import atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    with atomic_write(path) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
