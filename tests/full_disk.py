"""Test helper: a disk that is nearly full, for the fault-injection tests of atomic outputs.

`unshare_command()`: the command that runs a shell in a private mount namespace, where a test may
mount a small tmpfs (a real full disk); the test is skipped where that is not permitted.

`FullDisk(monkeypatch, root, free)`: os.write into any file under `root` writes what still fits
of `free` bytes and then fails with ENOSPC, as a full filesystem does (a short write, then the
error). Only os.write is replaced (nnmamba.atomic writes through it); the outputs, their partial
siblings and the swaps are real files. Linux only (it finds each descriptor's file in /proc).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest


class FullDisk:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, free: int):
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc/self/fd to tell which file a descriptor writes")
        self.root, self.free, self.real_write = Path(root).resolve(), free, os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data) -> int:
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return self.real_write(fd, data)
        if not target.is_relative_to(self.root):
            return self.real_write(fd, data)
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.real_write(fd, memoryview(data).cast("B")[:self.free])
        self.free -= written
        return written


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself, a file) by relative path, with its bytes."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def leftovers(root: Path) -> list[Path]:
    """Partial or old siblings (nnmamba.atomic's names) anywhere under `root`."""
    return [path for path in Path(root).rglob("*") if ".partial-" in path.name or ".old-" in path.name]


def unshare_command() -> list[str]:
    """`unshare` with a private mount namespace (and a user namespace when not root), or skip."""
    command = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a private tmpfs")
    probe = subprocess.run([*command, "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting a private tmpfs is not permitted here: {probe.stderr.decode().strip()}")
    return command
