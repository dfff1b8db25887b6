"""Dense prediction on LaViT features: RetinaNet detection and Semantic FPN segmentation.

Run by the same CLI as classification, with the task classes named in the config::

    python -m lavit fit --config experiments/dense_demo.yaml
    python -m lavit fit --config experiments/coco/retinanet_lavit_tiny.yaml
"""

from .backbone import DenseBackbone
from .data import DetectionDataModule, SegmentationDataModule
from .detection import RetinaNetModule
from .segmentation import SemanticFPNModule

__all__ = [
    "DenseBackbone",
    "DetectionDataModule",
    "RetinaNetModule",
    "SegmentationDataModule",
    "SemanticFPNModule",
]
