"""Atomic writes (checkpoints, cached reference statistics): all or nothing, with the user's file mode; the
remains of a killed write are cleared, a live one is not."""

import os
import stat

import pytest

from act_lightning.atomic import (
    TEMPORARY,
    atomic_write,
    intended_name,
    remove_stale_temporaries,
    temporary_name,
)


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


def test_a_written_file_gets_the_mode_open_would_give_it(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.ckpt") as f:
            f.write(b"x")
        os.umask(0o007)
        with atomic_write(tmp_path / "b.ckpt") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644  # not mkstemp's 0o600
    assert stat.S_IMODE((tmp_path / "b.ckpt").stat().st_mode) == 0o660


def test_stale_temporaries_are_removed_but_not_a_live_write_nor_other_files(tmp_path):
    stale = [".last.ckpt.a1b2c3d4.tmp", ".iter_0000004.ckpt.x_9y8z7w.tmp", ".best.ckpt.abcdefgh.tmp"]
    others = ["notes.tmp", ".last.ckpt.tmp", ".last.ckpt.ABCDEFGH.tmp", "last.ckpt", "a.b.c1234567.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"remains")
    with atomic_write(tmp_path / "last.ckpt") as f:  # a save in progress: its temporary is locked
        f.write(b"new")
        live = [p.name for p in tmp_path.iterdir() if p.name not in stale + others]
        assert len(live) == 1 and TEMPORARY.fullmatch(live[0])
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(stale)
        assert (tmp_path / live[0]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert (tmp_path / "last.ckpt").read_bytes() == b"new"
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:  # Ctrl-C mid-save
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert path.read_bytes() == b"old"


def test_only_whole_names_of_temporaries_are_taken_for_stale_ones(tmp_path):
    names = [".last.ckpt.a1b2c3d4.tmp.bak", ".last.ckpt.a1b2c3d4.tmpx", ".last.ckpt.a1b2c3d4.tmp~"]
    for name in names:
        (tmp_path / name).write_bytes(b"a user's file")
    assert remove_stale_temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_a_file_written_to_a_temporary_name_for_later_is_taken_for_remains_once_left(tmp_path):
    """A checkpoint is written under `temporary_name` and renamed into place later: one a kill left
    unrenamed is cleared at the next start; messages name the file it was to become."""
    first, second = temporary_name(tmp_path / "last.ckpt"), temporary_name(tmp_path / "last.ckpt")
    assert first != second and first.parent == tmp_path and TEMPORARY.fullmatch(first.name)
    assert (
        intended_name(first) == tmp_path / "last.ckpt"
        and intended_name(tmp_path / "a.ckpt") == tmp_path / "a.ckpt"
    )
    with atomic_write(first) as f:
        f.write(b"state")
    (tmp_path / "last.ckpt").write_bytes(b"older")
    assert remove_stale_temporaries(tmp_path) == [first]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
