"""The LightningModule: a LaViT (or any timm classifier) trained with the DeiT/PVT recipe.

``loss = CE + λ·DP`` (λ: the model's ``dp_loss_weight``), top-1/top-5 accuracy per split, timm's
optimizers, schedules, Mixup/CutMix and EMA (what is evaluated, and saved), and fine-tuning from
weights with parts frozen. LaViT's own arguments (``num_va_layers``, ``la_init``, ...) arrive as
keyword arguments; the CLI reads their types from LaViT's signature.
"""

from __future__ import annotations

import os
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import list_optimizers
from timm.utils import ModelEmaV3, freeze
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lavit.models.factory import LAVIT_SWITCHES, create_model
from lavit.training.optim import Schedule, optimizer_and_schedule, step_schedule, steps_per_epoch
from lavit.training.options import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    Probability,
    UnitIntervalLeftOpen,
    UnitIntervalRightOpen,
    check_arguments,
)
from lavit.training.pretrained import pretrained_kwargs
from lavit.training.resumable import mid_epoch, rng_states, set_rng_states

__all__ = ["LaViTModule", "add_model_arguments"]

RNG_KEY = "lavit_rng_states"  # the global RNG states of a mid-epoch checkpoint


def add_model_arguments(parser, group: str = "model") -> None:
    """LaViT's constructor arguments as ``--model.<name>`` options (``null``: the variant's
    default), with the types of its signature; LaViT itself checks the values."""
    for name, hint in LAVIT_SWITCHES.items():
        text = f"LaViT's {name} (see lavit.models.LaViT; null: the variant's default)"
        parser.add_argument(f"--{group}.{name}", type=hint | None, default=None, help=text)


class LaViTModule(L.LightningModule):
    """Image classification with a LaViT or a timm baseline (the recipe of docs/spec.md §5).

    Args:
        arch: a name of :mod:`lavit.models.factory` (``lavit_tiny``, ``lavit_cifar/all-va``) or
            any timm classifier as a baseline (``pvt_v2_b1``).
        num_classes: classifier outputs (set from the data by the CLI).
        img_size: input side; ``None``: the variant's default (set from the data by the CLI).
        drop_path_rate: stochastic depth rate (linear over blocks).
        drop_rate: dropout before the classifier.
        model_kwargs: other model arguments, for any arch (``embed_dims``, ``depths``, ...).
        pretrained: start from timm's published weights of ``arch`` (Hugging Face cache, else
            the Hub); the data's preprocessing then follows the weights' config.
        pretrained_file: start from a state dict (``lavit export``'s ``model.safetensors``) or a
            ``lavit fit`` checkpoint (its EMA weights if kept); position embeddings and Ψ/Θ are
            resampled, a classifier of another size starts afresh.
        freeze: submodules that do not train (``stages.0``, ...), or ``backbone``: all but the
            classifier (a linear probe).
        opt: a timm optimizer (``adamw``, ``sgd``, ``lamb``, ...; ``timm.optim.list_optimizers()``).
        lr: peak learning rate, for a global batch of 512 when ``scale_lr_by_batch``.
        scale_lr_by_batch: use ``lr × global batch / 512`` (batch × devices × accumulation).
        weight_decay: weight decay (none on norms, biases, position embeddings and Ψ/Θ).
        momentum: momentum, for the optimizers that have one (SGD).
        betas: Adam-family betas; ``None``: the optimizer's default.
        eps: the optimizer's epsilon; ``None``: its default.
        layer_decay: layer-wise lr decay, ``lr × layer_decay^(block groups from the head)``.
        sched: timm schedule, per update: ``cosine`` (to ``min_lr``), ``step`` (× ``decay_rate``
            every ``decay_epochs``), ``multistep`` (at ``decay_milestones``), ``poly`` (power
            ``decay_rate``), ``tanh`` or ``constant``.
        warmup_epochs: linear warm-up in epochs (fractions allowed); the decay starts after it.
        warmup_lr: learning rate at the start of the warm-up.
        min_lr: learning rate at the end of the schedule (cosine, poly, tanh).
        decay_epochs: ``step``: epochs between two decays.
        decay_milestones: ``multistep``: the epochs at which the lr decays.
        decay_rate: ``step``/``multistep``: the factor at each decay; ``poly``: the power.
        label_smoothing: label smoothing of the cross-entropy (also inside Mixup targets).
        mixup_alpha: Mixup Beta(α, α); 0 disables Mixup.
        cutmix_alpha: CutMix Beta(α, α); 0 disables CutMix.
        mixup_prob: probability of applying Mixup or CutMix to a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: mix per ``batch``, per ``pair`` or per ``elem``ent.
        ema_decay: an EMA of the weights, validated and tested instead of them and saved in
            checkpoints; ``None`` disables it.
        channels_last: run the model in channels-last memory format.
        compile: ``torch.compile`` the training forward.
        reseed_every_epoch: reseed the RNGs from (seed, epoch, rank) each epoch, so that a resumed
            run draws what an uninterrupted one would (exactly with ``num_workers=0``).
        **model_args: the model's own arguments (LaViT's ``num_va_layers``, ``dp_loss_weight``...).
    """

    def __init__(
        self,
        arch: str = "lavit_cifar",
        num_classes: int = 10,
        img_size: int | None = None,
        drop_path_rate: UnitIntervalRightOpen = 0.1,
        drop_rate: UnitIntervalRightOpen = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        freeze: str | list[str] | None = None,
        opt: str = "adamw",
        lr: PositiveFloat = 5e-4,
        scale_lr_by_batch: bool = True,
        weight_decay: NonNegativeFloat = 0.05,
        momentum: UnitIntervalRightOpen = 0.9,
        betas: tuple[UnitIntervalRightOpen, UnitIntervalRightOpen] | None = None,
        eps: NonNegativeFloat | None = None,
        layer_decay: UnitIntervalLeftOpen | None = None,
        sched: Schedule = "cosine",
        warmup_epochs: NonNegativeFloat = 5.0,
        warmup_lr: NonNegativeFloat = 1e-6,
        min_lr: NonNegativeFloat = 1e-5,
        decay_epochs: PositiveFloat = 30.0,
        decay_milestones: list[NonNegativeFloat] | None = None,
        decay_rate: PositiveFloat = 0.1,
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
        **model_args: Any,
    ) -> None:
        super().__init__()
        check_arguments(LaViTModule.__init__, locals())
        if opt.lower().split("_")[-1] not in list_optimizers():  # as timm reads lookahead_adamw
            raise ValueError(f"opt={opt!r}: not a timm optimizer (timm.optim.list_optimizers())")
        self.save_hyperparameters()
        weights = pretrained_kwargs(arch, pretrained, pretrained_file)  # checked before building
        kwargs = {**(model_kwargs or {}), **weights}
        self.model = create_model(
            arch, num_classes, img_size, drop_rate, drop_path_rate, model_args, kwargs
        )
        getattr(self.model, "pretrained_cfg", {}).pop("state_dict", None)  # loaded: no second copy
        if freeze:
            self._freeze([freeze] if isinstance(freeze, str) else list(freeze))
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

        self.mixup = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, mode=mixup_mode,
                               label_smoothing=label_smoothing, num_classes=num_classes)  # fmt: skip
        # Mixup already smooths its soft targets; without it, CE smooths the hard ones.
        smoothed = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_criterion = smoothed if self.mixup is None else SoftTargetCrossEntropy()
        # One collection per split, their states must not mix; in training top-1 only, and none
        # under Mixup, whose targets are not classes.
        top = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for k in (1, 5)
            if k <= num_classes
        }
        accuracy = MetricCollection(top, compute_groups=False)
        self.train_metrics = MetricCollection({"top1": top["top1"].clone()}, prefix="train/")
        self.val_metrics, self.test_metrics = (accuracy.clone(prefix=p) for p in ("val/", "test/"))

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
        train_forward = self._forward_with_dp
        self._train_forward = torch.compile(train_forward) if compile else train_forward

    def _freeze(self, names: list[str]) -> None:
        if "backbone" in names:  # a linear probe
            classifier = self.model.get_classifier()
            names = [n for n, m in self.model.named_children() if m is not classifier]
        try:
            freeze(self.model, names)  # timm's: no grad, and BatchNorm statistics frozen
        except AttributeError as err:  # a name the model has no submodule for
            children = ", ".join(n for n, _ in self.model.named_children())
            raise ValueError(f"freeze={names}: {err} (the model's parts: {children})") from None

    @property
    def is_lavit(self) -> bool:
        """Whether the model is a LaViT (which has a DP loss)."""
        return hasattr(self.model, "forward_with_aux")

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

    def _attached_trainer(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer (a module loaded on its own)
            return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._attached_trainer()
        # The class names travel with the weights (`lavit export` writes them as label names).
        names = getattr(trainer and trainer.datamodule, "class_names", None)
        if names:
            checkpoint["class_names"] = list(names)
        # Mid-epoch, the RNG states too: resuming continues the epoch's draws exactly.
        if mid_epoch(trainer):
            checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Accept checkpoints with or without EMA weights whatever ``ema_decay`` is now."""
        # A resumed fit creates its first DataLoader iterator before on_train_epoch_start (in
        # configure_optimizers' estimated_stepping_batches): seed the coming epoch now. An
        # end-of-epoch checkpoint stores the finished epoch, so the next one is epoch + 1.
        trainer = self._attached_trainer()
        if trainer is not None and trainer.state.fn == "fit":
            self._resumed_rng = checkpoint.get(RNG_KEY)  # a mid-epoch checkpoint
            if self._resumed_rng is None:
                self._reseed(checkpoint.get("epoch", -1) + 1)
            # timm's schedule is a function of the update count: a resumed run follows the one
            # it is configured with now (e.g. more epochs), not the saved one.
            checkpoint["lr_schedulers"] = []
        state = checkpoint["state_dict"]
        ema_keys = [k for k in state if k.startswith("ema.")]
        if self.ema is not None and not ema_keys:  # turning EMA on: start from the weights
            state.update(
                {f"ema.module.{k[6:]}": v for k, v in list(state.items()) if k.startswith("model.")}
            )
        elif self.ema is None:
            for key in ema_keys:
                del state[key]

    def configure_optimizers(self):
        hp, trainer = self.hparams, self.trainer
        lr = hp.lr
        if hp.scale_lr_by_batch:
            batch = getattr(trainer.datamodule, "batch_size", None) or getattr(
                trainer.train_dataloader, "batch_size", None
            )
            if batch is None:
                raise ValueError(
                    "scale_lr_by_batch needs the batch size (a `batch_size` on the datamodule or "
                    "the train DataLoader); set scale_lr_by_batch=False to use lr as given"
                )
            lr *= batch * trainer.world_size * trainer.accumulate_grad_batches / 512
        per_epoch = steps_per_epoch(trainer)
        return optimizer_and_schedule(
            self.model,
            trainer,
            opt=hp.opt,
            lr=lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
            betas=hp.betas and tuple(hp.betas),
            eps=hp.eps,
            layer_decay=hp.layer_decay,
            sched=hp.sched,
            warmup_steps=round(hp.warmup_epochs * per_epoch),
            warmup_lr=hp.warmup_lr,
            min_lr=hp.min_lr,
            decay_steps=hp.decay_epochs * per_epoch,
            milestone_steps=[round(e * per_epoch) for e in hp.decay_milestones or ()],
            decay_rate=hp.decay_rate,
        )

    lr_scheduler_step = step_schedule  # a timm scheduler, stepped per update
