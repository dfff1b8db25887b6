"""LaViT (docs/spec.md §3): blocks → stage → model, as in timm's ``pvt_v2.py``.

Variants are registered with timm: ``timm.create_model("lavit_tiny", num_classes=10)``.
One model family per file, as timm keeps it (hence over 400 lines): the stage's attention
hand-on, the standard timm API (intermediates, resizing, classifier reset) and the variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.fx
from timm.layers import DropPath, Mlp, register_notrace_function, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from .attention import AttentionDownsample, LessAttention, VanillaAttention
from .losses import DPLossVariant, attention_dp_loss
from .resize import Grid, infer_grid, resize_pos_embed
from .token_mixing import LAMixing, LessAttentionInit, TokenMixing, make_token_mixing
from .validation import check_choice, checked_input, input_size_problem, validate_config


# timm's feature_take_indices lives in a private module (timm.models._features): the same rule here.
def take_indices(
    num_features: int, indices: int | list[int] | None = None
) -> tuple[list[int], int]:
    """Absolute stage indices (None: all, n: the last n, a list: negatives from the end), max."""
    indices = num_features if indices is None else indices
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = [num_features + i if i < 0 else i for i in indices]
        if any(not 0 <= i < num_features for i in taken):
            raise ValueError(f"indices {list(indices)} out of range ({num_features} stages)")
    return taken, max(taken)


__all__ = ["AttentionRecord", "LaViT", "LaViTOutput", "checkpoint_filter_fn"]

AttnState = Literal["scores", "probs"]
DPLossLayers = Literal["la", "all"]
BlockKind = Literal["va", "la"]
HandOn = Literal["scores", "probs"] | None


@dataclass
class AttentionRecord:
    """One layer's attention from a forward pass (for the DP loss, logging and analysis)."""

    stage: int
    layer: int
    kind: BlockKind
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
        padding = (kernel - stride + 1) // 2 if overlapping else 0
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, h, w)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over C


class LaViTBlock(nn.Module):
    """Pre-norm block, ``x + Attn(Norm(x))`` then ``x + MLP(Norm(x))``; the attention is VA or LA.

    Vanilla Attention, which computes ``Q Kᵀ``, or (given a ``token_mixing``) Less-Attention,
    which transforms the attention handed to it. ``hand_on`` is what the block passes to the
    layer after it: its pre-softmax ``"scores"``, its ``"probs"``, or nothing (``None``); a VA
    block that hands nothing on runs the fused attention kernel. Both are fixed at construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path: float,
        qkv_bias: bool,
        hand_on: HandOn,
        token_mixing: TokenMixing | None = None,
    ) -> None:
        super().__init__()
        self.kind: BlockKind = "va" if token_mixing is None else "la"
        self.hand_on = hand_on
        self.norm1 = nn.LayerNorm(dim)
        if token_mixing is None:
            self.attn = VanillaAttention(dim, num_heads, sr_ratio, qkv_bias)
        else:
            self.attn = LessAttention(dim, num_heads, token_mixing, sr_ratio, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid,
        handed: torch.Tensor | None = None,
        return_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x`` (B, N, C) → ``(x, state handed on | None, probs (B, H, N, N') | None)``.

        ``handed``: for VA a residual added to its scores, for LA the attention it transforms.
        """
        explicit = return_probs or self.hand_on is not None
        out, scores, probs = self.attn(self.norm1(x), grid, handed, explicit)
        x = x + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        handed_on = probs if self.hand_on == "probs" else scores if self.hand_on else None
        return x, handed_on, probs


def _hand_on(i: int, depth: int, num_va: int, attn_state: AttnState, to_next: bool) -> HandOn:
    """What block i of a stage passes on: to an LA block after it, or (last) to the next stage."""
    if i + 1 < depth and i + 1 >= num_va:  # the next block is LA
        return attn_state if i < num_va else "scores"  # LA hands on its pre-softmax S'
    return "scores" if i == depth - 1 and to_next else None


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
        make_mixing: Callable[[Grid, Grid], TokenMixing],
        attn_state: AttnState,
        attn_downsample: AttentionDownsample | None,
        hand_on_scores: bool,
    ) -> None:
        super().__init__()
        self.stage_index = stage_index
        self.grid = tuple(grid)  # the native token grid: position embeddings and Ψ are made for it
        self.sr_ratio = sr_ratio
        self.attn_state = attn_state
        self.grad_checkpointing = False
        self.downsample = PatchEmbed(in_dim, dim, stride, overlapping=stage_index == 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.attn_downsample = attn_downsample  # stage m−1's last attention → this stage
        self.blocks = nn.ModuleList()
        for i in range(depth):
            la = i >= num_va_layers
            mixing = make_mixing(self.grid, self.key_grid) if la else None
            hand_on = _hand_on(i, depth, num_va_layers, attn_state, to_next=hand_on_scores)
            self.blocks.append(
                LaViTBlock(
                    dim, num_heads, sr_ratio, mlp_ratio, drop_path[i], qkv_bias, hand_on, mixing
                )
            )
        self.norm = nn.LayerNorm(dim)

    @property
    def key_grid(self) -> Grid:
        return (self.grid[0] // self.sr_ratio, self.grid[1] // self.sr_ratio)

    def stop_handing_on(self) -> None:
        """The next stage is gone (pruned): the last block keeps its attention to itself."""
        self.blocks[-1].hand_on = None

    def forward(
        self,
        x: torch.Tensor,
        prev_scores: torch.Tensor | None = None,
        collect: Literal["none", "la", "all"] = "none",
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[AttentionRecord]]:
        """``x`` (B, C_in, 2h, 2w) → (B, C, h, w), the scores for the next stage, the records."""
        x = self.downsample(x)  # (B, C, h, w)
        B, C, h, w = x.shape
        grid = (h, w)
        pos_embed = resize_pos_embed(self.pos_embed, self.grid, grid)  # (1, N, C) at this grid
        x = x.flatten(2).transpose(1, 2) + pos_embed  # (B, N, C)
        handed = None  # (B, H, N, N'): the attention state passed down the stage
        if self.attn_downsample is not None and prev_scores is not None:
            handed = self.attn_downsample(prev_scores, grid)  # a residual for the first VA
        records: list[AttentionRecord] = []
        for i, block in enumerate(self.blocks):
            run = partial(checkpoint, block) if self.grad_checkpointing else block
            x, handed, probs = run(x, grid, handed, collect == "all")
            if probs is not None and collect in ("all", block.kind):
                key_grid = (h // self.sr_ratio, w // self.sr_ratio)
                records.append(
                    AttentionRecord(self.stage_index, i, block.kind, probs, grid, key_grid)
                )
        x = self.norm(x).transpose(1, 2).reshape(B, C, h, w)  # (B, N, C) → (B, C, h, w)
        return x, handed, records


# Shape logic runs as opaque calls under torch.fx (the wrap names this module's globals).
for _fn in (checked_input, resize_pos_embed):
    register_notrace_function(_fn)
    torch.fx.wrap(_fn.__name__)


class LaViT(nn.Module):
    """LaViT backbone + classifier, with every open choice of the paper as a switch (spec §3).

    Args:
        img_size: input size (int or (H, W)); fixes the token grids, the position embeddings and
            Ψ/Θ (the native size when ``dynamic_img_size``).
        in_chans: input channels.
        num_classes: classifier outputs (0 for a feature extractor).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per-stage widths, layers, heads,
            MLP ratios and key/value spatial-reduction ratios.
        num_va_layers: Vanilla Attention layers per stage (the rest are LA); = depth → all VA.
        stem_stride: stride of the first patch embedding (4 at ImageNet scale).
        residual_attn_downsample: add the downsampled last attention of stage m−1 to stage m's
            first attention scores, scaled by a learnable γ.
        residual_attn_init: γ's starting value (0: the residual starts switched off).
        la_init: Ψ/Θ initialisation, ``"identity"`` (exact reuse at start) or ``"random"``.
        attn_state: what a VA layer hands to the first LA layer: pre-softmax ``"scores"`` or the
            post-softmax ``"probs"`` (the paper's literal reading).
        dp_loss_variant: ``"corrected"`` or ``"paper"`` (see ``losses.py``).
        dp_loss_layers: which attentions the DP loss covers, ``"la"`` or ``"all"`` layers.
        dp_loss_weight: λ of ``CE + λ·DP``; 0 turns the DP loss off (and its computation).
        drop_rate, drop_path_rate: head dropout and stochastic depth (linear over blocks).
        global_pool: ``"avg"``, or ``""`` for unpooled (B, C, h, w) maps (needs num_classes=0).
        dynamic_img_size: accept any input size the strides and SR ratios divide, resampling
            position embeddings and Ψ/Θ per size (spec §3.5).
        la_mixing: the form of Ψ/Θ, ``"dense"`` (the paper's), ``"separable"`` or ``"pooled"``
            (spec §3.5); a dense checkpoint loads into each.
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
        residual_attn_init: float = 1.0,
        dynamic_img_size: bool = False,
        la_mixing: LAMixing = "dense",
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        validate_config(
            img_size, stem_stride, embed_dims, depths, num_heads, mlp_ratios, sr_ratios, num_va_layers,
            drop_rate, drop_path_rate, dp_loss_weight, residual_attn_init,
        )  # fmt: skip
        for name, value, choices in (
            ("la_init", la_init, LessAttentionInit), ("la_mixing", la_mixing, LAMixing),
            ("attn_state", attn_state, AttnState), ("dp_loss_variant", dp_loss_variant, DPLossVariant),
            ("dp_loss_layers", dp_loss_layers, DPLossLayers),
        ):  # fmt: skip
            check_choice(name, value, choices)
        _check_pool(global_pool, num_classes)
        self.img_size = tuple(img_size)
        self.dynamic_img_size = bool(dynamic_img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stem_stride = stem_stride
        self.sr_ratios = tuple(sr_ratios)
        self.embed_dims = list(embed_dims)
        self.num_va_layers = list(num_va_layers)
        self.residual_attn_downsample = residual_attn_downsample
        self.la_init = la_init
        self.la_mixing = la_mixing
        self.attn_state = attn_state
        self.dp_loss_variant = dp_loss_variant
        self.dp_loss_layers = dp_loss_layers
        self.dp_loss_weight = float(dp_loss_weight)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        total = sum(depths)
        drop_path = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linear rule
        self.stages = nn.ModuleList()
        self.feature_info = []
        in_dim, cursor = in_chans, 0
        for m in range(len(depths)):
            reduction = stem_stride * 2**m
            attn_downsample = None
            if residual_attn_downsample and m > 0:
                attn_downsample = AttentionDownsample(
                    num_heads[m - 1],
                    num_heads[m],
                    sr_ratios[m - 1],
                    sr_ratios[m],
                    residual_attn_init,
                )
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
                    stride=stem_stride if m == 0 else 2,
                    grid=(img_size[0] // reduction, img_size[1] // reduction),
                    drop_path=drop_path[cursor : cursor + depths[m]],
                    qkv_bias=qkv_bias,
                    make_mixing=partial(make_token_mixing, la_mixing, init=la_init),
                    attn_state=attn_state,
                    attn_downsample=attn_downsample,
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

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "LaViT does not support TorchScript: its size logic is Python that torch.fx and "
            "torch.export handle but TorchScript cannot compile; use torch.export.export(model, "
            "(x,)) or torch.compile(model) instead"
        )

    # --- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings, Ψ/Θ and γ: decay would pull Ψ/Θ towards 0, away from reuse."""
        suffixes = ("pos_embed", ".psi", ".theta", ".theta_bias", ".gamma")
        suffixes += (".psi_h", ".psi_w", ".theta_h", ".theta_w")  # la_mixing="separable"
        return {name for name, _ in self.named_parameters() if name.endswith(suffixes)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: stem, then blocks in depth order, then head."""
        return dict(
            stem=r"^stages\.0\.(?:downsample|pos_embed)",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                # A stage's entry (patch embedding, position embedding, residual downsampling)
                # goes with its first block, its closing norm with its last.
                (r"^stages\.(\d+)\.(?:downsample|pos_embed|attn_downsample)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward (timm's ``checkpoint``)."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none), on the model's device and dtype."""
        pool = self.global_pool if global_pool is None else global_pool
        _check_pool(pool, num_classes)
        self.num_classes, self.global_pool = num_classes, pool
        if num_classes > 0:
            like = self.stages[-1].norm.weight  # the model's device and dtype
            self.head = nn.Linear(self.num_features, num_classes).to(like)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    def _forward_stages(
        self, x: torch.Tensor, collect: Literal["none", "la", "all"] = "none", stages=None
    ) -> tuple[list[torch.Tensor], list[AttentionRecord]]:
        """Runs the stages; returns every stage's output map and the recorded attentions."""
        x = checked_input(x, self.img_size, self.dynamic_img_size, self.stem_stride, self.sr_ratios)
        features, records = [], []
        scores = None  # the last attention of the previous stage
        for stage in self.stages if stages is None else stages:
            x, scores, stage_records = stage(x, scores, collect)
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
        """Stage outputs at strides stem·(1, 2, 4, 8) (4/8/16/32 by default), for dense tasks.

        Every stage ends in its own LayerNorm (as in pvt_v2), so ``norm`` changes nothing.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        taken, max_index = take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        features, _ = self._forward_stages(x, stages=stages)
        intermediates = [features[m] for m in taken]
        if output_fmt == "NHWC":
            intermediates = [f.permute(0, 2, 3, 1) for f in intermediates]  # (B, h, w, C)
        return intermediates if intermediates_only else (features[-1], intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices``; the head is removed or re-sized.

        ``prune_norm`` changes nothing (each stage's norm belongs to its output).
        """
        taken, max_index = take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[: max_index + 1]
            self.feature_info = self.feature_info[: max_index + 1]
            self.stages[-1].stop_handing_on()
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            if not prune_head:  # the old head took the last stage's width
                self.reset_classifier(self.num_classes)
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # --- LaViT extras ---------------------------------------------------------------------------
    def forward_with_aux(
        self, x: torch.Tensor, *, dp_loss: bool | None = None, collect_attn: bool = False
    ) -> LaViTOutput:
        """Logits plus the DP loss (when λ > 0, or asked for) and every layer's attention maps.

        ``collect_attn=True`` records every layer (VA ones computed explicitly instead of fused).
        """
        want_dp = self.dp_loss_weight > 0 if dp_loss is None else dp_loss
        every_layer = collect_attn or (want_dp and self.dp_loss_layers == "all")
        features, records = self._forward_stages(
            x, "all" if every_layer else ("la" if want_dp else "none")
        )
        logits = self.forward_head(features[-1])
        dp = None
        if want_dp:
            losses = [
                attention_dp_loss(r.probs, r.query_grid, r.key_grid, self.dp_loss_variant)
                for r in records
                if self.dp_loss_layers == "all" or r.kind == "la"
            ]
            dp = torch.stack(losses).mean() if losses else logits.new_zeros(())  # 0: no LA layer
        return LaViTOutput(logits, dp, records if collect_attn else [])

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Make ``img_size`` the native size: resamples position embeddings and Ψ/Θ in place."""
        img_size = tuple(to_2tuple(img_size))
        problem = input_size_problem(img_size, self.stem_stride, self.sr_ratios)
        if problem:
            raise ValueError(f"img_size {img_size} is not allowed: {problem}")
        for m, stage in enumerate(self.stages):
            reduction = self.stem_stride * 2**m
            grid = (img_size[0] // reduction, img_size[1] // reduction)
            stage.pos_embed = nn.Parameter(resize_pos_embed(stage.pos_embed, stage.grid, grid))
            stage.grid = grid
            for module in stage.modules():
                if isinstance(module, TokenMixing):
                    module.resize_(stage.grid, stage.key_grid)
        self.img_size = img_size
        cfg = getattr(self, "pretrained_cfg", None)
        if cfg:
            size = _size_cfg(img_size, cfg["input_size"][0], self.stem_stride, len(self.sr_ratios))
            self.pretrained_cfg = self.default_cfg = {**cfg, **size}


def _check_pool(global_pool: str, num_classes: int) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ValueError(
            "global_pool='' gives unpooled (B, C, h, w) maps, which a classifier cannot take: "
            "use num_classes=0 with it, or global_pool='avg'"
        )


# --- checkpoints at another input size ------------------------------------------------------------


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: LaViT
) -> dict[str, torch.Tensor]:
    """Adapt a state dict to ``model``: pos_embed and Ψ/Θ resampled to its size (and Ψ/Θ of the
    dense form converted to its ``la_mixing`` form). Ψ/Θ are resampled as deviations from the
    identity (``resize.py``), so identity stays exact."""
    state = dict(state_dict)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, TokenMixing):
            module.resize_state(state, prefix)
        elif isinstance(module, LaViTStage):
            value = state.get(prefix + "pos_embed")
            if value is not None and value.shape[1] != module.grid[0] * module.grid[1]:
                old = infer_grid(value.shape[1], module.grid)
                state[prefix + "pos_embed"] = resize_pos_embed(value, old, module.grid)
    return state


# --- variants -----------------------------------------------------------------------------------


def _create_lavit(variant: str, pretrained: bool = False, **kwargs) -> LaViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    # The pretrained config says what this instance accepts: timm's data-config resolvers (and
    # its tests) read input_size, and fixed_input_size tells them not to feed another size.
    overlay: dict = dict(fixed_input_size=not kwargs.get("dynamic_img_size", False))
    if "img_size" in kwargs:
        num_stages = len(kwargs.get("depths", (0,) * 4))
        in_chans, stem_stride = kwargs.get("in_chans", 3), kwargs.get("stem_stride", 4)
        overlay.update(_size_cfg(kwargs["img_size"], in_chans, stem_stride, num_stages))
    overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    return build_model_with_cfg(
        LaViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_cfg_overlay=overlay,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _size_cfg(img_size, in_chans: int, stem_stride: int, num_stages: int) -> dict:
    """The pretrained-cfg entries that timm's data-config resolvers read about the input size."""
    (h, w), stride = to_2tuple(img_size), stem_stride * 2 ** (num_stages - 1)
    return dict(input_size=(in_chans, h, w), pool_size=(h // stride, w // stride))


def _cfg(**kwargs) -> dict:
    return (
        dict(
            url="",
            num_classes=1000,
            input_size=(3, 224, 224),
            pool_size=(7, 7),
            fixed_input_size=True,  # unless dynamic_img_size=True (set per instance)
            crop_pct=0.875,
            interpolation="bicubic",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            first_conv="stages.0.downsample.proj",
            classifier="head",
        )
        | kwargs
    )


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
