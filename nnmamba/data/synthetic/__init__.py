"""Synthetic twins of the raw layouts, written as real files (NIfTI, NRRD, MHA, CSV, JSON).

They let the whole pipeline, and every reader, run without patient data: one generator per
layout, sharing the phantoms (``abdomen_phantom``) and the on-disk orientations (``orientation``).
"""
