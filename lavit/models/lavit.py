"""LaViT: a PVT-style pyramid whose stages end in Less-Attention layers (SPEC §3).

Blocks → stage → model, as in timm's ``pvt_v2.py``. Each stage m: patch embedding (stride-s
stem, then conv k=2 s=2), a learnable position embedding, ``num_va_layers[m]`` Vanilla Attention
blocks, then ``depths[m] − num_va_layers[m]`` Less-Attention blocks that re-use the attention
handed down the stage. Optionally the first attention of stage m ≥ 2 adds the downsampled last
attention of stage m−1 (residual attention downsampling).

Variants are registered with timm: ``timm.create_model("lavit_tiny", num_classes=10)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.layers import Mlp as TimmMlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from .attention import AttentionDownsample, Grid, LessAttention, LessAttentionInit, VanillaAttention
from .losses import DP_LOSS_VARIANTS, DPLossVariant, attention_dp_loss

__all__ = ["LaViT", "LaViTOutput", "AttentionRecord", "checkpoint_filter_fn"]

AttnState = Literal["scores", "probs"]
DPLossLayers = Literal["la", "all"]


@dataclass
class AttentionRecord:
    """One layer's attention from a forward pass (for the DP loss, logging and analysis)."""

    stage: int
    layer: int
    kind: Literal["va", "la"]
    probs: torch.Tensor  # (B, H, N, N'), post-softmax
    query_grid: Grid
    key_grid: Grid


@dataclass
class LaViTOutput:
    logits: torch.Tensor
    dp_loss: torch.Tensor | None = None  # unweighted mean over the covered layers
    attentions: list[AttentionRecord] = field(default_factory=list)


class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm. Stem: k=2s−1 (overlapping, padded); later: k=s=2."""

    def __init__(self, in_chans: int, dim: int, stride: int, overlapping: bool) -> None:
        super().__init__()
        kernel = 2 * stride - 1 if overlapping else stride
        self.proj = nn.Conv2d(
            in_chans,
            dim,
            kernel_size=kernel,
            stride=stride,
            padding=(kernel - stride + 1) // 2 if overlapping else 0,
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, h, w)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _no_backward(*tensors: torch.Tensor) -> bool:
    """Whether no backward will run through ``tensors`` (inference), so in-place ops are safe."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _residual_add(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + branch``; in inference added into the fresh branch output, saving a buffer.

    Not under autograd: an in-place add on a view (a Linear's output is one) costs the backward
    more copies than it saves.
    """
    return branch.add_(x) if _no_backward(branch, x) else x + branch


class Mlp(TimmMlp):
    """timm's MLP (fc1 → GELU → fc2, same parameters); without autograd the GELU runs in place.

    The fc1 output is the network's largest activation; a second buffer of that size for the
    GELU costs more than the GELU itself on CPU (fresh pages), and inference does not need it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if isinstance(self.act, nn.GELU) and _no_backward(x):
            x = torch._C._nn.gelu_(x, approximate=self.act.approximate)
        else:
            x = self.act(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class VABlock(nn.Module):
    """Vanilla Attention layer: ``x + MHSA(Norm(x))``, then ``x + MLP(Norm(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VanillaAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid,
        score_bias: torch.Tensor | None = None,
        return_scores: bool = False,
    ):
        attn_out, scores, probs = self.attn(self.norm1(x), grid, score_bias, return_scores)
        x = _residual_add(self.drop_path1(attn_out), x)
        x = _residual_add(self.drop_path2(self.mlp(self.norm2(x))), x)
        return x, scores, probs


class LABlock(nn.Module):
    """Less-Attention layer: the attention path is ``Softmax(Ψ S Θᵀ)·V``; the rest of the block stays."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path: float,
        qkv_bias: bool,
        num_queries: int,
        num_keys: int,
        init: LessAttentionInit,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LessAttention(dim, num_heads, num_queries, num_keys, sr_ratio, qkv_bias, init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid, attn: torch.Tensor):
        attn_out, scores, probs = self.attn(self.norm1(x), grid, attn)
        x = _residual_add(self.drop_path1(attn_out), x)
        x = _residual_add(self.drop_path2(self.mlp(self.norm2(x))), x)
        return x, scores, probs


class LaViTStage(nn.Module):
    """Patch embedding → + position embedding → VA blocks → LA blocks → LayerNorm."""

    def __init__(
        self,
        stage_index: int,
        in_dim: int,
        dim: int,
        depth: int,
        num_va_layers: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        stride: int,
        grid: Grid,
        drop_path: list[float],
        qkv_bias: bool,
        la_init: LessAttentionInit,
        attn_state: AttnState,
        prev_heads: int | None,
        hand_on_scores: bool,
    ) -> None:
        super().__init__()
        self.stage_index = stage_index
        self.grid = grid
        self.key_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
        self.num_va_layers = num_va_layers
        self.attn_state = attn_state
        self.hand_on_scores = hand_on_scores  # the next stage downsamples our last attention
        self.downsample = PatchEmbed(in_dim, dim, stride, overlapping=stage_index == 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.attn_downsample = (
            AttentionDownsample(prev_heads, num_heads) if prev_heads is not None else None
        )
        n_queries, n_keys = grid[0] * grid[1], self.key_grid[0] * self.key_grid[1]
        self.blocks = nn.ModuleList(
            VABlock(dim, num_heads, sr_ratio, mlp_ratio, drop_path[i], qkv_bias)
            if i < num_va_layers
            else LABlock(
                dim,
                num_heads,
                sr_ratio,
                mlp_ratio,
                drop_path[i],
                qkv_bias,
                n_queries,
                n_keys,
                la_init,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        prev_scores: torch.Tensor | None = None,
        prev_grids: tuple[Grid, Grid] | None = None,
        collect: Literal["none", "la", "all"] = "none",
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[AttentionRecord]]:
        """``x``: (B, C_in, 2h, 2w) → (B, C, h, w); returns also the last scores and records."""
        x = self.downsample(x)  # (B, C, h, w)
        B, C, h, w = x.shape
        if (h, w) != self.grid:
            raise ValueError(
                f"stage {self.stage_index + 1} expects a {self.grid[0]}×{self.grid[1]} token grid but got "
                f"{h}×{w}: the input size differs from the model's img_size; build the model with the new "
                "img_size or call model.set_input_size(...)"
            )
        x = _residual_add(x.flatten(2).transpose(1, 2), self.pos_embed)  # (B, N, C)

        score_bias = None
        if self.attn_downsample is not None and prev_scores is not None:
            prev_grid, prev_key_grid = prev_grids
            score_bias = self.attn_downsample(
                prev_scores, prev_grid, prev_key_grid, self.key_grid
            )  # (B, H, N, N')

        records: list[AttentionRecord] = []
        handed: torch.Tensor | None = None  # the attention state passed down the stage
        scores = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if isinstance(block, VABlock):
                next_is_la = i < last and i + 1 >= self.num_va_layers
                need = next_is_la or (i == last and self.hand_on_scores) or collect == "all"
                x, scores, probs = block(
                    x, self.grid, score_bias if i == 0 else None, return_scores=need
                )
                if next_is_la:
                    handed = probs if self.attn_state == "probs" else scores
                kind = "va"
            else:
                x, scores, probs = block(x, self.grid, handed)
                handed = scores  # LA layers hand on their transformed pre-softmax matrix
                kind = "la"
            if probs is not None and (collect == "all" or (collect == "la" and kind == "la")):
                records.append(
                    AttentionRecord(self.stage_index, i, kind, probs, self.grid, self.key_grid)
                )
        x = self.norm(x).transpose(1, 2).reshape(B, C, h, w)
        return x, (scores if self.hand_on_scores else None), records


def _validate_config(
    img_size: Grid,
    stem_stride: int,
    embed_dims,
    depths,
    num_heads,
    mlp_ratios,
    sr_ratios,
    num_va_layers,
    drop_rate: float,
    drop_path_rate: float,
    la_init: str,
    attn_state: str,
    dp_loss_variant: str,
    dp_loss_layers: str,
    dp_loss_weight: float,
) -> None:
    """Raise a ValueError naming the argument and what is allowed."""
    num_stages = len(depths)
    for name, value in (
        ("embed_dims", embed_dims),
        ("num_heads", num_heads),
        ("mlp_ratios", mlp_ratios),
        ("sr_ratios", sr_ratios),
        ("num_va_layers", num_va_layers),
    ):
        if len(value) != num_stages:
            raise ValueError(
                f"{name} must have one entry per stage ({num_stages}, as depths), got {list(value)}"
            )
    if any(d < 1 for d in depths):
        raise ValueError(f"depths must be ≥ 1 per stage, got {list(depths)}")
    for m, (va, depth) in enumerate(zip(num_va_layers, depths, strict=True)):
        if not 1 <= va <= depth:
            raise ValueError(
                f"num_va_layers[{m}] = {va} is not allowed: each stage needs 1 ≤ num_va_layers ≤ its depth "
                f"({depth}); num_va_layers = depth means no LA layer in that stage"
            )
    for m, (dim, heads) in enumerate(zip(embed_dims, num_heads, strict=True)):
        if heads < 1 or dim % heads != 0:
            raise ValueError(
                f"embed_dims[{m}] = {dim} must be divisible by num_heads[{m}] = {heads} (≥ 1)"
            )
    if any(r <= 0 for r in mlp_ratios):
        raise ValueError(f"mlp_ratios must be > 0, got {list(mlp_ratios)}")
    if any(r < 1 for r in sr_ratios):
        raise ValueError(f"sr_ratios must be ≥ 1, got {list(sr_ratios)}")
    if stem_stride < 1:
        raise ValueError(f"stem_stride must be ≥ 1, got {stem_stride}")
    total_stride = stem_stride * 2 ** (num_stages - 1)
    for side in img_size:
        if side < total_stride or side % total_stride != 0:
            raise ValueError(
                f"img_size {tuple(img_size)} is not allowed: each side must be a positive multiple of "
                f"{total_stride} (stem stride {stem_stride} × 2 per later stage), e.g. {total_stride * max(1, round(side / total_stride))}"
            )
    for m, sr in enumerate(sr_ratios):
        side = [s // (stem_stride * 2**m) for s in img_size]
        if any(s % sr for s in side):
            raise ValueError(
                f"img_size {tuple(img_size)} gives a {side[0]}×{side[1]} grid in stage {m + 1}, which sr_ratios[{m}] = {sr} "
                "does not divide; choose an img_size or sr_ratios that divide it"
            )
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if la_init not in ("identity", "random"):
        raise ValueError(f"la_init must be 'identity' or 'random', got {la_init!r}")
    if attn_state not in ("scores", "probs"):
        raise ValueError(f"attn_state must be 'scores' or 'probs', got {attn_state!r}")
    if dp_loss_variant not in DP_LOSS_VARIANTS:
        raise ValueError(
            f"dp_loss_variant must be one of {DP_LOSS_VARIANTS}, got {dp_loss_variant!r}"
        )
    if dp_loss_layers not in ("la", "all"):
        raise ValueError(f"dp_loss_layers must be 'la' or 'all', got {dp_loss_layers!r}")
    if not (dp_loss_weight >= 0.0 and math.isfinite(dp_loss_weight)):
        raise ValueError(
            f"dp_loss_weight must be a finite number ≥ 0 (0 turns the DP loss off), got {dp_loss_weight}"
        )


class LaViT(nn.Module):
    """LaViT backbone + classifier, with every open choice of the paper as a switch (SPEC §3).

    Args:
        img_size: input size (int or (H, W)); fixes the token grids, the position embeddings and Ψ.
        in_chans: input channels.
        num_classes: classifier outputs (0 for a feature extractor).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per-stage widths, layers, heads,
            MLP ratios and key/value spatial-reduction ratios.
        num_va_layers: Vanilla Attention layers per stage (the rest are LA); = depth → all VA.
        stem_stride: stride of the first patch embedding (4 at ImageNet scale).
        residual_attn_downsample: add the downsampled last attention of stage m−1 to stage m's
            first attention scores.
        la_init: Ψ/Θ initialisation, ``"identity"`` (exact reuse at start) or ``"random"``.
        attn_state: what a VA layer hands to the first LA layer: pre-softmax ``"scores"`` or the
            post-softmax ``"probs"`` (the paper's literal reading).
        dp_loss_variant: ``"corrected"`` or ``"paper"`` (see ``losses.py``).
        dp_loss_layers: which attentions the DP loss covers, ``"la"`` or ``"all"`` layers.
        dp_loss_weight: λ of ``CE + λ·DP``; 0 turns the DP loss off (and its computation).
        drop_rate, drop_path_rate: head dropout and stochastic depth (linear over blocks).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        num_va_layers: tuple[int, ...] = (2, 2, 1, 1),
        stem_stride: int = 4,
        qkv_bias: bool = True,
        residual_attn_downsample: bool = True,
        la_init: LessAttentionInit = "identity",
        attn_state: AttnState = "scores",
        dp_loss_variant: DPLossVariant = "corrected",
        dp_loss_layers: DPLossLayers = "la",
        dp_loss_weight: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        _validate_config(
            img_size, stem_stride, embed_dims, depths, num_heads, mlp_ratios, sr_ratios, num_va_layers,
            drop_rate, drop_path_rate, la_init, attn_state, dp_loss_variant, dp_loss_layers, dp_loss_weight,
        )  # fmt: skip
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stem_stride = stem_stride
        self.embed_dims = list(embed_dims)
        self.num_va_layers = list(num_va_layers)
        self.residual_attn_downsample = residual_attn_downsample
        self.la_init = la_init
        self.attn_state = attn_state
        self.dp_loss_variant = dp_loss_variant
        self.dp_loss_layers = dp_loss_layers
        self.dp_loss_weight = float(dp_loss_weight)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        total = sum(depths)
        drop_path = [
            drop_path_rate * i / max(1, total - 1) for i in range(total)
        ]  # linear decay rule
        self.stages = nn.ModuleList()
        self.feature_info = []
        in_dim, cursor = in_chans, 0
        for m in range(len(depths)):
            stride = stem_stride if m == 0 else 2
            reduction = stem_stride * 2**m
            grid = (img_size[0] // reduction, img_size[1] // reduction)
            self.stages.append(
                LaViTStage(
                    stage_index=m,
                    in_dim=in_dim,
                    dim=embed_dims[m],
                    depth=depths[m],
                    num_va_layers=num_va_layers[m],
                    num_heads=num_heads[m],
                    sr_ratio=sr_ratios[m],
                    mlp_ratio=mlp_ratios[m],
                    stride=stride,
                    grid=grid,
                    drop_path=drop_path[cursor : cursor + depths[m]],
                    qkv_bias=qkv_bias,
                    la_init=la_init,
                    attn_state=attn_state,
                    prev_heads=num_heads[m - 1] if (residual_attn_downsample and m > 0) else None,
                    hand_on_scores=residual_attn_downsample and m < len(depths) - 1,
                )
            )
            self.feature_info.append(
                dict(num_chs=embed_dims[m], reduction=reduction, module=f"stages.{m}")
            )
            in_dim, cursor = embed_dims[m], cursor + depths[m]

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for module in self.modules():  # re-apply the inits that _init_weights overwrote
            if isinstance(module, AttentionDownsample):
                module.reset_parameters()
            elif isinstance(module, LessAttention):
                module.reset_transforms(la_init)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and Ψ/Θ: decay would pull Ψ/Θ towards 0, away from reuse."""
        names = set()
        for name, _ in self.named_parameters():
            if name.endswith(("pos_embed", ".psi", ".theta", ".theta_bias", ".gamma")):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.downsample",
            blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)",
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("gradient checkpointing is not supported by LaViT yet")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _forward_stages(
        self, x: torch.Tensor, collect: Literal["none", "la", "all"] = "none", stages=None
    ) -> tuple[list[torch.Tensor], list[AttentionRecord]]:
        """Runs the stages; returns every stage's output map and the recorded attentions."""
        features, records = [], []
        prev_scores, prev_grids = None, None
        for stage in self.stages if stages is None else stages:
            x, prev_scores, stage_records = stage(x, prev_scores, prev_grids, collect)
            prev_grids = (stage.grid, stage.key_grid)
            features.append(x)
            records.extend(stage_records)
        return features, records

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → last stage map (B, C4, H/32, W/32)."""
        features, _ = self._forward_stages(x)
        return features[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs at strides stem·(1, 2, 4, 8) (4/8/16/32 by default), for dense tasks."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        features, _ = self._forward_stages(x, stages=stages)
        intermediates = [features[m] for m in take_indices]
        return intermediates if intermediates_only else (features[-1], intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if max_index < len(self.embed_dims) - 1:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.stages[-1].hand_on_scores = False
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    # --- LaViT extras ---------------------------------------------------------------------------
    def forward_with_aux(
        self, x: torch.Tensor, *, dp_loss: bool | None = None, collect_attn: bool = False
    ) -> LaViTOutput:
        """Logits plus the DP loss (when λ > 0, or asked for) and every layer's attention maps.

        ``collect_attn=True`` records every layer (VA ones computed explicitly instead of fused).
        """
        want_dp = self.dp_loss_weight > 0 if dp_loss is None else dp_loss
        collect = (
            "all"
            if (collect_attn or (want_dp and self.dp_loss_layers == "all"))
            else ("la" if want_dp else "none")
        )
        features, records = self._forward_stages(x, collect)
        logits = self.forward_head(features[-1])
        dp = None
        if want_dp:
            covered = [r for r in records if self.dp_loss_layers == "all" or r.kind == "la"]
            if covered:
                dp = torch.stack(
                    [
                        attention_dp_loss(r.probs, r.query_grid, r.key_grid, self.dp_loss_variant)
                        for r in covered
                    ]
                ).mean()
            else:  # no LA layer (all-VA model): the DP loss is 0 but stays in the graph
                dp = logits.new_zeros(())
        return LaViTOutput(logits, dp, records if collect_attn else [])

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Re-size the model for another input: resamples position embeddings and Ψ/Θ."""
        img_size = to_2tuple(img_size)
        sr_ratios = [self._sr_ratio(s) for s in self.stages]
        total_stride = self.stem_stride * 2 ** (len(self.stages) - 1)
        if any(side % total_stride or side < total_stride for side in img_size):
            raise ValueError(
                f"img_size {tuple(img_size)} is not allowed: each side must be a positive multiple of {total_stride}"
            )
        for m, sr in enumerate(sr_ratios):
            side = [s // (self.stem_stride * 2**m) for s in img_size]
            if any(s % sr for s in side):
                raise ValueError(
                    f"img_size {tuple(img_size)} gives a {side[0]}×{side[1]} grid in stage {m + 1}, which sr_ratios[{m}] = {sr} does not divide"
                )
        for m, stage in enumerate(self.stages):
            reduction = self.stem_stride * 2**m
            new_grid = (img_size[0] // reduction, img_size[1] // reduction)
            new_key_grid = (new_grid[0] // sr_ratios[m], new_grid[1] // sr_ratios[m])
            stage.pos_embed = nn.Parameter(
                resample_abs_pos_embed(
                    stage.pos_embed, list(new_grid), list(stage.grid), num_prefix_tokens=0
                )
            )
            for block in stage.blocks:
                if isinstance(block, LABlock):
                    la = block.attn
                    la.psi = nn.Parameter(resize_token_mixing(la.psi, stage.grid, new_grid))
                    la.theta = nn.Parameter(
                        resize_token_mixing(la.theta, stage.key_grid, new_key_grid)
                    )
                    la.theta_bias = nn.Parameter(
                        resize_token_vector(la.theta_bias, stage.key_grid, new_key_grid)
                    )
            stage.grid, stage.key_grid = new_grid, new_key_grid
        self.img_size = tuple(img_size)

    @staticmethod
    def _sr_ratio(stage: LaViTStage) -> int:
        return stage.grid[0] // stage.key_grid[0]


# --- resizing for other input sizes (dense tasks, fine-tuning at another resolution) --------------


def resize_token_mixing(weight: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    """Resample an N×N token-mixing matrix (Ψ or Θ) as a 4-D (h, w, h, w) kernel, bicubic.

    The input (column) axis is rescaled by N_old/N_new so each row keeps its sum, i.e. a mixing
    of a constant map stays the same constant.
    """
    if tuple(old_grid) == tuple(new_grid):
        return weight.clone()
    n_old, n_new = old_grid[0] * old_grid[1], new_grid[0] * new_grid[1]
    dtype = weight.dtype
    w = weight.float().reshape(n_old, 1, *old_grid)  # rows × (column grid)
    w = F.interpolate(w, size=new_grid, mode="bicubic", align_corners=False).reshape(
        n_old, n_new
    ) * (n_old / n_new)
    w = w.t().reshape(n_new, 1, *old_grid)  # new columns × (row grid)
    w = (
        F.interpolate(w, size=new_grid, mode="bicubic", align_corners=False)
        .reshape(n_new, n_new)
        .t()
    )
    return w.contiguous().to(dtype)


def resize_token_vector(vector: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    if tuple(old_grid) == tuple(new_grid):
        return vector.clone()
    v = vector.float().reshape(1, 1, *old_grid)
    return (
        F.interpolate(v, size=new_grid, mode="bicubic", align_corners=False)
        .flatten()
        .to(vector.dtype)
    )


def _infer_grid(num_tokens: int, like: Grid) -> Grid:
    """The grid a checkpoint's N tokens came from: square if possible, else the model's aspect."""
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return (side, side)
    h = round(math.sqrt(num_tokens * like[0] / like[1]))
    if h > 0 and num_tokens % h == 0:
        return (h, num_tokens // h)
    raise ValueError(f"cannot infer the token grid of a checkpoint tensor with {num_tokens} tokens")


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: LaViT
) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint trained at another input size: resample pos_embed and Ψ/Θ to ``model``."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key in target and value.shape != target[key].shape and value.ndim >= 1:
            m = int(key.split(".")[1]) if key.startswith("stages.") else None
            stage = model.stages[m] if m is not None else None
            if key.endswith("pos_embed"):
                old = _infer_grid(value.shape[1], stage.grid)
                value = resample_abs_pos_embed(
                    value, list(stage.grid), list(old), num_prefix_tokens=0
                )
            elif key.endswith(".psi"):
                value = resize_token_mixing(
                    value, _infer_grid(value.shape[0], stage.grid), stage.grid
                )
            elif key.endswith(".theta"):
                value = resize_token_mixing(
                    value, _infer_grid(value.shape[0], stage.key_grid), stage.key_grid
                )
            elif key.endswith(".theta_bias"):
                value = resize_token_vector(
                    value, _infer_grid(value.shape[0], stage.key_grid), stage.key_grid
                )
        out[key] = value
    return out


def load_checkpoint_resized(model: LaViT, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict`` after resampling size-dependent tensors to the model's input size."""
    return model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=strict)


# --- variants -----------------------------------------------------------------------------------


def _create_lavit(variant: str, pretrained: bool = False, **kwargs) -> LaViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        LaViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        **dict(
            url="",
            num_classes=1000,
            input_size=(3, 224, 224),
            pool_size=(7, 7),
            crop_pct=0.875,
            interpolation="bicubic",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            first_conv="stages.0.downsample.proj",
            classifier="head",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "lavit_tiny.untrained": _cfg(),
        "lavit_small.untrained": _cfg(),
        "lavit_base.untrained": _cfg(),
        "lavit_cifar.untrained": _cfg(
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(2, 2),
            crop_pct=1.0,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
        ),
    }
)

# Configs chosen to land on the published params/MACs at 224² and 1000 classes (README, tests).
LAVIT_CONFIGS: dict[str, dict] = {
    "lavit_tiny": dict(depths=(1, 2, 2, 2), mlp_ratios=(8, 8, 4, 3), num_va_layers=(1, 2, 1, 1)),
    "lavit_small": dict(depths=(3, 4, 6, 3), mlp_ratios=(8, 4, 4, 4), num_va_layers=(3, 4, 2, 1)),
    "lavit_base": dict(depths=(3, 4, 18, 3), mlp_ratios=(8, 4, 4, 4), num_va_layers=(3, 4, 3, 1)),
    # 32×32 inputs: stride-2 stem → 16/8/4/2 grids, so stages 3–4 keep LA layers on 16 and 4 tokens.
    "lavit_cifar": dict(
        img_size=32,
        stem_stride=2,
        embed_dims=(32, 64, 160, 256),
        depths=(1, 2, 3, 2),
        num_heads=(1, 2, 5, 8),
        mlp_ratios=(4, 4, 4, 4),
        sr_ratios=(4, 2, 1, 1),
        num_va_layers=(1, 2, 1, 1),
    ),
}


@register_model
def lavit_tiny(pretrained: bool = False, **kwargs) -> LaViT:
    return _create_lavit("lavit_tiny", pretrained, **{**LAVIT_CONFIGS["lavit_tiny"], **kwargs})


@register_model
def lavit_small(pretrained: bool = False, **kwargs) -> LaViT:
    return _create_lavit("lavit_small", pretrained, **{**LAVIT_CONFIGS["lavit_small"], **kwargs})


@register_model
def lavit_base(pretrained: bool = False, **kwargs) -> LaViT:
    return _create_lavit("lavit_base", pretrained, **{**LAVIT_CONFIGS["lavit_base"], **kwargs})


@register_model
def lavit_cifar(pretrained: bool = False, **kwargs) -> LaViT:
    return _create_lavit("lavit_cifar", pretrained, **{**LAVIT_CONFIGS["lavit_cifar"], **kwargs})
