"""`aurora_pet.atomic`: a destination is replaced whole or not at all, and nothing temporary stays behind."""

import os

import pytest

from aurora_pet.atomic import atomic_directory, atomic_file, atomic_files, atomic_text, remove_temporaries


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_text_and_file_replace_the_destination(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert atomic_text(target, "new ✓") == target
    assert target.read_text(encoding="utf-8") == "new ✓"
    atomic_file(tmp_path / "b.bin", lambda path: path.write_bytes(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert listing(tmp_path) == ["a.txt", "b.bin"]


def test_the_temporary_is_beside_the_destination_and_hidden(tmp_path):
    seen = []
    atomic_file(tmp_path / "a.txt", lambda path: (seen.append(path), path.write_text("x")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".a.txt.tmp-")
    assert not seen[0].exists()


def test_a_failed_write_leaves_the_destination_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def failing(path):
        path.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(target, failing)
    assert target.read_text() == "old" and listing(tmp_path) == ["a.txt"]
    with pytest.raises(OSError, match="disk full"):
        atomic_file(tmp_path / "new.txt", failing)  # no previous file: none appears
    assert listing(tmp_path) == ["a.txt"]


def test_a_group_is_renamed_only_once_every_file_is_written(tmp_path):
    first, second = tmp_path / "weights", tmp_path / "config"
    first.write_text("old weights")
    second.write_text("old config")
    with pytest.raises(RuntimeError, match="second write"):
        with atomic_files([first, second]) as (tmp_first, tmp_second):
            tmp_first.write_text("new weights")
            raise RuntimeError("second write")
    assert (first.read_text(), second.read_text()) == ("old weights", "old config")
    assert listing(tmp_path) == ["config", "weights"]
    with atomic_files([first, second]) as (tmp_first, tmp_second):
        tmp_first.write_text("new weights")
        tmp_second.write_text("new config")
    assert (first.read_text(), second.read_text()) == ("new weights", "new config")
    assert listing(tmp_path) == ["config", "weights"]


def test_atomic_directory_replaces_an_existing_directory(tmp_path):
    destination = tmp_path / "checkpoint"
    destination.mkdir()
    (destination / "stale.txt").write_text("from the previous save")

    def write(directory):
        (directory / "sub").mkdir()
        (directory / "sub" / "model.bin").write_bytes(b"new")

    assert atomic_directory(destination, write) == destination
    assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*")) == ["sub", "sub/model.bin"]
    assert listing(tmp_path) == ["checkpoint"]  # neither the new temporary nor the moved-aside old one stays


def test_a_failed_directory_write_leaves_the_destination_intact(tmp_path):
    destination = tmp_path / "checkpoint"
    destination.mkdir()
    (destination / "model.bin").write_bytes(b"old")

    def failing(directory):
        (directory / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # not only Exception: an interrupted save must clean up too

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(destination, failing)
    assert listing(destination) == ["model.bin"] and (destination / "model.bin").read_bytes() == b"old"
    assert listing(tmp_path) == ["checkpoint"]


def test_a_failed_swap_puts_the_previous_directory_back(tmp_path, monkeypatch):
    destination = tmp_path / "checkpoint"
    destination.mkdir()
    (destination / "model.bin").write_bytes(b"old")
    real_replace = os.replace

    def replace(source, target):
        if str(source).startswith(str(tmp_path / ".checkpoint.tmp-")) and str(target) == str(destination) \
                and "old-" not in str(source):
            raise OSError("rename failed")  # the new directory cannot be renamed in, after the old moved aside
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_directory(destination, lambda directory: (directory / "model.bin").write_bytes(b"new"))
    assert (destination / "model.bin").read_bytes() == b"old"
    assert listing(tmp_path) == ["checkpoint"]


def test_remove_temporaries_removes_what_a_killed_process_left_and_nothing_else(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"finished")
    (tmp_path / ".hidden").write_text("not ours")
    (tmp_path / "name.tmp-like.txt").write_text("not hidden: not a temporary")
    leftovers = [tmp_path / ".adapter_model.safetensors.tmp-abc123", tmp_path / ".checkpoint.tmp-xyz"]
    leftovers[0].write_bytes(b"partial")
    leftovers[1].mkdir()
    (leftovers[1] / "model.bin").write_bytes(b"partial")
    assert remove_temporaries(tmp_path) == sorted(leftovers)
    assert listing(tmp_path) == [".hidden", "adapter_model.safetensors", "name.tmp-like.txt"]
    assert remove_temporaries(tmp_path) == []
