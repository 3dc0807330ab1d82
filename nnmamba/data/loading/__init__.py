"""Training batches from prepared cases: patch draws, augmentation, worker batching, shared buffers.

``sampling`` is the entry point (``make_patch_loader``); ``unpacked`` keeps memory-mapped copies
of prepared cases, ``array_patches`` cuts and augments patches from them, ``heatmap_sampling``
makes the landmark targets.
"""
