"""The LightningModule: a LaViT (or any timm classifier) trained with the DeiT/PVT recipe.

``loss = CE + λ·DP`` (λ = the model's ``dp_loss_weight``), top-1/top-5 accuracy per split,
AdamW without decay on norms, biases, position embeddings and Ψ/Θ, per-step linear warm-up then
cosine, Mixup/CutMix and label smoothing on the training batch, and an optional EMA of the weights
that is validated instead of the raw weights and travels in the checkpoint.
"""

from __future__ import annotations

import functools
import math
import os
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lavit.models.attention import LessAttentionInit
from lavit.models.factory import create_model, parse_model_name
from lavit.models.lavit import AttnState, DPLossLayers
from lavit.models.losses import DPLossVariant
from lavit.training.options import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    Probability,
    UnitIntervalRightOpen,
    check_arguments,
)
from lavit.training.pretrained import pretrained_kwargs
from lavit.training.resumable import mid_epoch, rng_states, set_rng_states

__all__ = ["LaViTModule", "warmup_cosine"]

RNG_KEY = "lavit_rng_states"  # the global RNG states of a mid-epoch checkpoint


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, start_factor: float, end_factor: float
) -> float:
    """LR factor at ``step``: linear ``start_factor → 1`` over the warm-up, then cosine to ``end_factor``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _accuracy(num_classes: int, prefix: str, top5: bool = True) -> MetricCollection:
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if top5 and num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class LaViTModule(L.LightningModule):
    """Image classification with a LaViT or a timm baseline (the recipe of docs/spec.md §5).

    Args:
        arch: a model name of :mod:`lavit.models.factory`: ``lavit_cifar``, ``lavit_tiny``,
            ``lavit_small``, ``lavit_base`` (``/all-va`` for the all-VA twin), or any timm
            classifier as a baseline (e.g. ``pvt_v2_b1``).
        num_classes: classifier outputs (linked from the data module by the CLI).
        img_size: input side; ``None``: the variant's default (linked from the data by the CLI).
        num_va_layers: LaViT: Vanilla Attention layers per stage (the rest are Less-Attention);
            a stage's depth means no LA layer there. ``None``: the variant's default.
        residual_attn_downsample: LaViT: add the previous stage's downsampled attention to each
            stage's first attention. ``None``: the variant's default.
        la_init: LaViT: Ψ/Θ initialisation. ``None``: the variant's default (identity).
        attn_state: LaViT: what VA hands to the first LA layer, pre-softmax scores or
            probabilities. ``None``: the variant's default (scores).
        dp_loss_variant: LaViT: diagonality-preserving loss variant. ``None``: default (corrected).
        dp_loss_layers: LaViT: attentions the DP loss covers. ``None``: default (la).
        dp_loss_weight: λ of ``CE + λ·DP``; 0 turns the DP loss off. LaViT only when > 0.
        drop_path_rate: stochastic depth rate (linear over blocks).
        drop_rate: dropout before the classifier.
        model_kwargs: other model arguments (``embed_dims``, ``depths``, ``num_heads``, ...).
        pretrained: start from timm's published weights of ``arch`` (a baseline to fine-tune):
            from the Hugging Face cache, else the Hub; the classifier is new when ``num_classes``
            differs. The CLI then takes the data's preprocessing from the weights' config.
        pretrained_file: start from this ``.safetensors`` / ``.pth`` state dict instead (any arch,
            e.g. the ``model.safetensors`` of ``lavit export``).
        lr: peak learning rate, for a global batch of 512 when ``scale_lr_by_batch``.
        scale_lr_by_batch: use ``lr × global batch / 512`` (batch × devices × accumulation).
        weight_decay: AdamW weight decay (not on norms, biases, position embeddings, Ψ/Θ).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_epochs: linear warm-up length in epochs (fractions allowed; stepped per batch).
        warmup_lr: learning rate at the start of the warm-up.
        min_lr: learning rate at the end of the cosine schedule.
        label_smoothing: label smoothing of the cross-entropy (also inside Mixup targets).
        mixup_alpha: Mixup Beta(α, α); 0 disables Mixup.
        cutmix_alpha: CutMix Beta(α, α); 0 disables CutMix.
        mixup_prob: probability of applying Mixup or CutMix to a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: mix per ``batch``, per ``pair`` or per ``elem``ent.
        ema_decay: decay of an exponential moving average of the weights, validated and tested
            instead of the raw weights and saved in checkpoints; ``None`` disables it.
        channels_last: run the model in channels-last memory format.
        compile: ``torch.compile`` the training forward.
        reseed_every_epoch: reseed the RNGs from (global seed, epoch, rank) at each epoch start,
            so that a resumed run draws the same data order and augmentations as an
            uninterrupted one (exactly so with ``num_workers=0``).
    """

    def __init__(
        self,
        arch: str = "lavit_cifar",
        num_classes: int = 10,
        img_size: int | None = None,
        num_va_layers: list[int] | None = None,
        residual_attn_downsample: bool | None = None,
        la_init: LessAttentionInit | None = None,
        attn_state: AttnState | None = None,
        dp_loss_variant: DPLossVariant | None = None,
        dp_loss_layers: DPLossLayers | None = None,
        dp_loss_weight: NonNegativeFloat = 0.0,
        drop_path_rate: UnitIntervalRightOpen = 0.1,
        drop_rate: UnitIntervalRightOpen = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        lr: PositiveFloat = 5e-4,
        scale_lr_by_batch: bool = True,
        weight_decay: NonNegativeFloat = 0.05,
        betas: tuple[UnitIntervalRightOpen, UnitIntervalRightOpen] = (0.9, 0.999),
        eps: NonNegativeFloat = 1e-8,
        warmup_epochs: NonNegativeFloat = 5.0,
        warmup_lr: NonNegativeFloat = 1e-6,
        min_lr: NonNegativeFloat = 1e-5,
        label_smoothing: UnitIntervalRightOpen = 0.1,
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        mixup_prob: Probability = 1.0,
        mixup_switch_prob: Probability = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        ema_decay: OpenUnitInterval | None = None,
        channels_last: bool = False,
        compile: bool = False,
        reseed_every_epoch: bool = True,
    ) -> None:
        super().__init__()
        check_arguments(LaViTModule.__init__, locals())
        self.save_hyperparameters()
        switches = dict(
            num_va_layers=num_va_layers,
            residual_attn_downsample=residual_attn_downsample,
            la_init=la_init,
            attn_state=attn_state,
            dp_loss_variant=dp_loss_variant,
            dp_loss_layers=dp_loss_layers,
            dp_loss_weight=dp_loss_weight,
        )
        weights = pretrained_kwargs(arch, pretrained, pretrained_file)  # checked before building
        self.model = create_model(
            arch,
            num_classes,
            img_size,
            drop_rate,
            drop_path_rate,
            switches,
            {**(model_kwargs or {}), **weights},
        )
        self.is_lavit = parse_model_name(arch).is_lavit
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

        self.mixup = (
            Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0
            else None
        )
        # Mixup already smooths its soft targets; without it, CE smooths the hard ones.
        self.train_criterion = (
            SoftTargetCrossEntropy()
            if self.mixup is not None
            else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )
        # Separate metric objects per split: their states must not mix. No train accuracy under
        # Mixup, whose targets are not classes.
        self.train_metrics = _accuracy(num_classes, "train/", top5=False)
        self.val_metrics = _accuracy(num_classes, "val/")
        self.test_metrics = _accuracy(num_classes, "test/")

        self.ema: ModelEmaV3 | None = None
        if ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=ema_decay)  # a submodule: in the state_dict
            self.ema.requires_grad_(False)
            # Follow the module's train/eval mode like every other submodule (Lightning switches
            # it for validation); timm leaves the copy in eval mode, which Lightning warns about.
            self.ema.train(self.training)
        self._last_ema_step = -1
        self._seeded_epoch: int | None = None
        self._resumed_rng: dict[str, Any] | None = None

        # Compiled functions, not modules, so the state_dict keeps its plain keys.
        self._train_forward = self._forward_with_dp
        if compile:
            self._train_forward = torch.compile(self._forward_with_dp)

    # --------------------------------------------------------------------------------- forward
    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation, test and prediction: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the evaluation weights."""
        return self.eval_model(self._prepare(x))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def _forward_with_dp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training forward: logits, and the (unweighted) DP loss when λ > 0."""
        if self.is_lavit and self.model.dp_loss_weight > 0:
            out = self.model.forward_with_aux(x)
            return out.logits, out.dp_loss
        return self.model(x), None

    # -------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        x, target = self._prepare(x), y
        if self.mixup is not None:
            x, target = self.mixup(x, y)  # needs an even batch size (drop_last in training)
        logits, dp = self._train_forward(x)
        ce = self.train_criterion(logits, target)
        loss = ce if dp is None else ce + self.model.dp_loss_weight * dp
        size = x.size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/ce", ce, batch_size=size)
        if dp is not None:
            self.log("train/dp", dp, batch_size=size)
        if self.mixup is None:
            self.train_metrics.update(logits.detach(), y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _reseed(self, epoch: int) -> None:
        """Seed python, numpy and torch from (global seed, epoch, rank) before ``epoch`` draws."""
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's too)
        if not self.hparams.reseed_every_epoch or seed is None or self._seeded_epoch == epoch:
            return
        epoch_seed = (int(seed) + epoch * self.trainer.world_size + self.global_rank) % 2**32
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        self._seeded_epoch = epoch

    def on_train_epoch_start(self) -> None:
        # Later epochs create their DataLoader iterator (shuffle seed, first batch) after this.
        self._reseed(self.current_epoch)

    def on_fit_end(self) -> None:
        self._seeded_epoch = None  # a later fit() of this module reseeds afresh

    def on_train_start(self) -> None:
        self._last_ema_step = self.global_step
        # Resuming mid-epoch: the RNGs as they were there. The last hook before the first batch
        # is fetched (a restarted epoch calls no on_train_epoch_start), after the loader's
        # iterator exists (creating one draws from the global RNG).
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng, self._seeded_epoch = None, self.current_epoch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Update the EMA once per optimizer step (not per batch under gradient accumulation).
        if self.ema is not None and self.global_step > self._last_ema_step:
            self.ema.update(self.model, step=self.global_step)
            self._last_ema_step = self.global_step

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch, metrics: MetricCollection, split: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        metrics.update(logits, y)
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=x.size(0))
        self.log_dict(metrics, prog_bar=split == "val", batch_size=x.size(0))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"probs": (B, num_classes) softmax, "pred": (B,) class index}``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).float().softmax(dim=-1)
        return {"probs": probs, "pred": probs.argmax(dim=-1)}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The class names travel with the weights (`lavit export` writes them as label names).
        names = getattr(self._trainer and self.trainer.datamodule, "class_names", None)
        if names:
            checkpoint["class_names"] = list(names)
        # Mid-epoch, the RNG states too: resuming continues the epoch's draws exactly.
        if mid_epoch(self._trainer):
            checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept checkpoints with or without EMA weights whatever ``ema_decay`` is now."""
        # A resumed fit creates its first DataLoader iterator before on_train_epoch_start (in
        # configure_optimizers' estimated_stepping_batches): seed the coming epoch now. An
        # end-of-epoch checkpoint stores the finished epoch, so the next one is epoch + 1.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._resumed_rng = checkpoint.get(RNG_KEY)  # a mid-epoch checkpoint
            if self._resumed_rng is None:
                self._reseed(checkpoint.get("epoch", -1) + 1)
        state = checkpoint["state_dict"]
        ema_keys = [k for k in state if k.startswith("ema.")]
        if self.ema is not None and not ema_keys:  # turning EMA on: start from the weights
            state.update(
                {f"ema.module.{k[6:]}": v for k, v in list(state.items()) if k.startswith("model.")}
            )
        elif self.ema is None:
            for key in ema_keys:
                del state[key]

    # ------------------------------------------------------------------------------ optimizer
    def _global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            per_device = getattr(trainer.train_dataloader, "batch_size", None)
        if per_device is None:
            raise ValueError(
                "scale_lr_by_batch needs the batch size (a `batch_size` on the datamodule or the "
                "train DataLoader); set scale_lr_by_batch=False to use lr as given"
            )
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))  # sets up the data
        lr = hp.lr * (self._global_batch_size() / 512 if hp.scale_lr_by_batch else 1.0)
        no_decay = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(
            self.model, hp.weight_decay, no_weight_decay_list=no_decay
        )
        for group in groups:  # LearningRateMonitor logs lr/decay and lr/no_decay
            group["name"] = "decay" if group["weight_decay"] else "no_decay"
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), eps=hp.eps)

        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / accumulate)
        else:  # iterable data of unknown length
            steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(round(hp.warmup_epochs * steps_per_epoch), total_steps - 1)
        # A partial, not a closure: LambdaLR then saves no schedule state, so a resumed run
        # follows the schedule of its own (possibly longer) configuration from the saved step.
        schedule = functools.partial(
            warmup_cosine,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            start_factor=min(1.0, hp.warmup_lr / lr),
            end_factor=min(1.0, hp.min_lr / lr),
        )
        scheduler = LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }
