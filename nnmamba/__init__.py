"""nnMamba: 3D biomedical segmentation, classification and landmark detection with state space models.

`build_model(task, variant, in_channels, out_channels, **kwargs)` is the entry point; the
ablation variants of each task are listed by `available_variants(task)`.
"""

from nnmamba.models import available_variants, build_model, count_parameters

__version__ = "0.1.0"
__all__ = ["available_variants", "build_model", "count_parameters", "__version__"]
