"""From raw cases to the prepared dataset: fingerprint, plan, and the per-task preprocessing.

``fingerprint`` and ``plan`` follow nnU-Net; ``preprocess`` (segmentation), ``landmarks`` and
``whole_volume`` (classification) write ``data/preprocessed/<study>/`` with its ``dataset.json``.
"""
