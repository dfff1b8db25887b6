"""lavit: LaViT (CVPR 2024) in PyTorch Lightning. Importing it registers the models with timm."""

from . import models  # noqa: F401  (registers lavit_* with timm)

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)
