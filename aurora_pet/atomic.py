"""Atomic writes: a file or a directory appears whole at its final name, or not at all.

Everything is first written under a hidden temporary name beside the destination (same file system, so
the final `os.replace` is one rename), flushed to disk, then renamed over the destination; on any error
the temporary is removed and the destination is what it was. Temporaries are named `.<name>.tmp-*` so
`remove_temporaries` can clean up after a killed process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "atomic_files", "atomic_text", "remove_temporaries"]

TMP_MARK = ".tmp-"


def _temporary_name(destination: Path) -> str:
    return f".{destination.name}{TMP_MARK}"


@contextmanager
def atomic_files(destinations: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Yield one temporary path per destination; after the block, rename them all into place.

    The renames happen only once every file has been written, so a failure while writing any of them
    leaves every destination as it was (a group of files, such as an adapter's weights and config,
    never ends up half old and half new through a failed write)."""
    destinations = [Path(d) for d in destinations]
    temporaries: list[Path] = []
    try:
        for destination in destinations:
            fd, name = tempfile.mkstemp(prefix=_temporary_name(destination), dir=destination.parent)
            os.close(fd)
            temporaries.append(Path(name))
        yield temporaries
        for temporary in temporaries:
            _fsync_file(temporary)
        for temporary, destination in zip(temporaries, destinations):
            os.replace(temporary, destination)
        for parent in {d.parent for d in destinations}:
            _fsync_directory(parent)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def atomic_file(destination: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)`, then rename the written file to `destination`."""
    destination = Path(destination)
    with atomic_files([destination]) as (temporary,):
        write(temporary)
    return destination


def atomic_text(destination: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `destination` atomically."""
    return atomic_file(destination, lambda path: path.write_text(text, encoding="utf-8"))


def atomic_directory(destination: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_directory)`, then swap the directory in for `destination` (replacing a
    previous one: it is moved aside, the new one renamed in, then the old one deleted)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=_temporary_name(destination), dir=destination.parent))
    old = None
    try:
        write(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_directory(temporary)
        if destination.exists():
            old = destination.with_name(f"{_temporary_name(destination)}old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
        os.replace(temporary, destination)
        _fsync_directory(destination.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not destination.exists():
            os.replace(old, destination)  # the swap failed half-way: put the previous directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return destination


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes left in `directory` (never a finished file); returns them."""
    directory = Path(directory)
    leftovers = sorted(p for p in directory.glob(f".*{TMP_MARK}*") if p.name.startswith("."))
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return leftovers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a rename durable; some file systems refuse to open or fsync a directory, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
