"""Outputs that appear whole or not at all: written beside the ones they replace, swapped in when complete.

A stage that fails half-way (a full disk, a killed process, a bad trial) must leave its previous
outputs exactly as they were and no partial file. Each output is written to a sibling
`<name>.partial-<pid>` (same filesystem, so the swap is a rename); when everything of one
`staged()` block is written, each old output is renamed to `<name>.old-<pid>`, the new one into its
place, and the old ones removed. On failure the partials are removed and any swap already done is
undone. Leftovers of a process that died (its pid is gone) are cleared by the next write of the same
output; an `.old-` one whose output is missing (a swap cut short) is renamed back first.

Any OSError while writing becomes a `WriteError` naming the output path (not its partial sibling)
and the OS reason: "could not write models/brats2023/mic-seed0/model.pt: [Errno 28] No space left
on device". Data is written with os.write and fsync'd, so a full disk is reported as such (torch's
own zip writer reports it as "unexpected pos ...").
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL, OLD = "partial", "old"


class WriteError(OSError):
    """An output that could not be written: its path and the OS reason (errno kept, e.g. ENOSPC)."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        super().__init__(error.errno, error.strerror or str(error), os.fspath(path))

    def __str__(self) -> str:
        reason = f"[Errno {self.errno}] {self.strerror}" if self.errno is not None else self.strerror
        return f"could not write {self.filename}: {reason}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in any OSError of the block that names no file itself (a failed write() names none)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(error.filename or path, error) from error


class Staging:
    """The partial siblings of one `staged()` block, each mapped to the output it replaces."""

    def __init__(self) -> None:
        self.targets: dict[Path, Path] = {}

    def directory(self, target: str | os.PathLike) -> Path:
        """A fresh empty folder to write `target`'s new content into."""
        partial = self._add(Path(target))
        with writing(partial):
            partial.mkdir()
        return partial

    def file(self, target: str | os.PathLike, data: bytes | memoryview | str) -> None:
        """Write `target`'s new content (text as UTF-8)."""
        write_new(self._add(Path(target)), data)

    def _add(self, target: Path) -> Path:
        with writing(target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale(target)
        partial = _sibling(target, PARTIAL)
        self.targets[partial] = target
        return partial

    def swap_in(self) -> None:
        """Put every new output in place of its old one; on failure undo the swaps done so far."""
        done: list[tuple[Path, Path | None]] = []
        try:
            for partial, target in self.targets.items():
                done.append((target, _swap(partial, target)))
        except BaseException:
            for target, old in reversed(done):
                _remove(target)
                if old is not None:
                    os.rename(old, target)
            raise
        for _, old in done:
            if old is not None:
                _remove(old)

    def discard(self) -> None:
        for partial in self.targets:
            _remove(partial)

    def named(self, error: OSError) -> OSError:
        """The error as a WriteError naming the output, when it names one of this block's partials."""
        if error.filename is None:
            return error
        path = Path(os.fsdecode(error.filename))
        for partial, target in self.targets.items():
            if path.is_relative_to(partial):
                return WriteError(target / path.relative_to(partial), error)
        return error


@contextmanager
def staged() -> Iterator[Staging]:
    """Outputs (`.directory(path)`, `.file(path, data)`) swapped in together when the block completes.

    Raising inside the block (or a failing swap) removes every partial and leaves the old outputs
    as they were; an OSError writing into a partial names the output's own path.
    """
    staging = Staging()
    try:
        yield staging
        staging.swap_in()
    except OSError as error:
        staging.discard()
        named = staging.named(error)
        if named is error:
            raise
        raise named from error
    except BaseException:
        staging.discard()
        raise


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh sibling folder to write into; it replaces `target` (as a whole) when the block completes."""
    with staged() as staging:
        yield staging.directory(target)


def write_file(path: str | os.PathLike, data: bytes | memoryview | str) -> None:
    """Replace the file at `path` with `data`, atomically."""
    with staged() as staging:
        staging.file(path, data)


def write_new(path: str | os.PathLike, data: bytes | memoryview | str) -> None:
    """Create the file `path` (text as UTF-8), e.g. inside a staged folder; an OSError names `path`.

    Written with os.write, whose errors carry errno, and fsync'd, so the data is on disk before any swap.
    """
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)


def _sibling(target: Path, kind: str) -> Path:
    """This process's partial (or old) sibling of `target` (a leftover of it is cleared by `_clear_stale`)."""
    return target.with_name(f"{target.name}.{kind}-{os.getpid()}")


def _swap(partial: Path, target: Path) -> Path | None:
    """Rename `partial` onto `target`; returns where the old `target` went (None when there was none)."""
    if not os.path.lexists(target):
        os.rename(partial, target)
        return None
    old = _sibling(target, OLD)
    os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _clear_stale(target: Path) -> None:
    """Remove the partial and old siblings of `target` that processes no longer running left behind;
    an old one whose target is missing was cut short mid-swap and becomes `target` again."""
    prefix = target.name + "."
    for path in sorted(target.parent.glob(f"{glob.escape(prefix)}*-*")):
        kind, _, pid = path.name[len(prefix):].partition("-")
        if kind not in (PARTIAL, OLD) or not pid.isdigit() or _running(int(pid)):
            continue
        if kind == OLD and not os.path.lexists(target):
            os.rename(path, target)
        else:
            _remove(path)


def _running(pid: int) -> bool:
    """Whether another live process has this pid (this process's own leftovers are stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _remove(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
