"""Data: raw-layout readers, synthetic generators, preprocessing and patch sampling.

Layout-specific modules (``brats``, ``amos``, ``nnunet``, the ``synthetic*``
generators) produce :class:`CaseFiles`; layout-agnostic modules (``fingerprint``,
``plan``, ``preprocess``, ``sampling``) consume them. Import the
submodules directly; this package only re-exports the two types every layer shares,
so importing it stays cheap (no torchio import).
"""

from nnmamba.data.cases import CaseFiles
from nnmamba.data.errors import DataError

__all__ = ["CaseFiles", "DataError"]
