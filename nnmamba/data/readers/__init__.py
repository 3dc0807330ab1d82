"""Readers of the raw dataset layouts (BraTS 2023, AMOS 2022, nnU-Net v2 / MSD, landmarks, ADNI).

Each turns its folder convention into :class:`~nnmamba.data.cases.CaseFiles` (``ClassifiedCase``
for image-level labels) and validates what it lists, every file inside the dataset root
(``paths.check_inside_root``); ``nnmamba.data.layouts`` names them.
"""
