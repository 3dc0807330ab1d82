"""Data: raw-layout readers, synthetic generators, preprocessing and training loaders.

Subpackages by concern: ``readers`` (one module per raw layout, producing :class:`CaseFiles`,
``ClassifiedCase`` for image-level labels), ``synthetic`` (a generator per layout, writing real
files), ``preprocessing`` (fingerprint, plan, per-task preprocessing) and ``loading`` (training
patches and batches). ``layouts`` names each layout's reader and generator. Import the submodules
directly; this package only re-exports the two types every layer shares, so importing it stays
cheap (no torchio import).
"""

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError

__all__ = ["CaseFiles", "DataError"]
