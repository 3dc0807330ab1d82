"""Data: raw-layout readers, synthetic generators, preprocessing and patch sampling.

Layout-specific modules (``brats``, ``amos``, ``nnunet``, ``landmarks``, ``adni``, the
``synthetic*`` generators) produce :class:`CaseFiles` (``ClassifiedCase`` for image-level
labels); layout-agnostic modules (``fingerprint``, ``plan``, ``preprocess``, ``sampling``;
``whole_volume`` for classification) consume them. Import the
submodules directly; this package only re-exports the two types every layer shares,
so importing it stays cheap (no torchio import).
"""

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError

__all__ = ["CaseFiles", "DataError"]
