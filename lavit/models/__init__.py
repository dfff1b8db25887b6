"""LaViT model code: attention operators, the DP loss, and the model (its variants are registered
with timm: ``timm.create_model("lavit_tiny")``)."""

from .attention import AttentionDownsample, LessAttention, VanillaAttention
from .lavit import LAVIT_CONFIGS, AttentionRecord, LaViT, LaViTOutput, checkpoint_filter_fn
from .losses import attention_dp_loss, diagonality_preserving_loss

__all__ = [
    "LAVIT_CONFIGS",
    "AttentionDownsample",
    "AttentionRecord",
    "LaViT",
    "LaViTOutput",
    "LessAttention",
    "VanillaAttention",
    "attention_dp_loss",
    "checkpoint_filter_fn",
    "diagonality_preserving_loss",
]
