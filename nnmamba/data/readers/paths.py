"""The one containment rule of every reader: a dataset's files lie inside its root.

A dataset.json folder, an ADNI manifest or a landmarks folder could otherwise name, through a
``../`` path, an absolute path or a symlink, any file the user can read (another patient's scan,
a file of another project), and preprocessing would copy it into the prepared dataset. Resolving
both sides (symlinks included) before comparing closes all three routes at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nnmamba.data.errors import DataError


def check_inside_root(paths: Iterable[Path], root: Path, where: str) -> None:
    """Raise DataError unless every path resolves (symlinks followed) to a place inside ``root``.

    ``where`` says who named the files (a case, a manifest line), so the one-line error names
    that, the file, where it resolves to and the root.
    """
    base = Path(root).resolve()
    for path in paths:
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(base):
            raise DataError(f"{where}: {path} resolves to {resolved}, outside the dataset root {base}")
