"""Tests of LaViTModule: learning, exact resume with EMA, baselines, precision, optimiser set-up."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import SMALL_DATA, TINY_LAVIT
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to other processes on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(**kwargs) -> LaViTModule:
    defaults = dict(
        num_classes=10,
        img_size=32,
        model_kwargs=TINY_LAVIT,
        lr=3e-3,
        scale_lr_by_batch=False,
        warmup_epochs=0,
        drop_path_rate=0.1,
    )
    return LaViTModule(**{**defaults, **kwargs})


def cpu_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(
            isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", [])
        ),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class StopAfterEpochs(Callback):
    """Interrupts a run (as a pre-emption would) without changing its schedule."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_loss_decreases_on_embedded_data():
    L.seed_everything(0)
    record = RecordLosses()
    module = tiny_module(drop_path_rate=0.0, label_smoothing=0.0)
    data = ImageDataModule(**{**SMALL_DATA, "batch_size": 32})
    cpu_trainer(max_steps=60, limit_val_batches=0, callbacks=[record]).fit(module, data)
    assert len(record.losses) == 60
    first, last = sum(record.losses[:8]) / 8, sum(record.losses[-8:]) / 8
    assert last < first - 0.1, (first, last)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, small_data):
    # Everything that draws random numbers is on: shuffling, crops/flips, Mixup/CutMix, drop
    # path; plus the DP loss and an EMA that must travel in the checkpoint.
    recipe = dict(ema_decay=0.9, mixup_alpha=0.8, cutmix_alpha=1.0, dp_loss_weight=0.1)
    fit = dict(max_epochs=2, limit_train_batches=4, limit_val_batches=1, deterministic=True)

    L.seed_everything(0, workers=True)
    straight = tiny_module(**recipe)
    cpu_trainer(**fit).fit(straight, small_data)

    L.seed_everything(0, workers=True)
    first_half = tiny_module(**recipe)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(**fit, callbacks=[checkpoint, StopAfterEpochs(1)]).fit(first_half, small_data)
    assert first_half.current_epoch == 1 and first_half.global_step == 4

    L.seed_everything(0, workers=True)  # a new process seeds again before building the model
    resumed = tiny_module(**recipe)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = cpu_trainer(**fit, callbacks=[checkpoint])
    trainer.fit(resumed, small_data, ckpt_path=str(tmp_path / "last.ckpt"))

    assert resumed.global_step == straight.global_step == 8
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert any(key.startswith("ema.module.") for key in actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_ema_weights_are_in_the_checkpoint_and_optional_on_load(tmp_path, small_data):
    L.seed_everything(0)
    module = tiny_module(ema_decay=0.5)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, small_data)
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    ema = {k[len("ema.module.") :]: v for k, v in state.items() if k.startswith("ema.module.")}
    raw = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # an average, not a copy
    # The EMA weights are what evaluation uses.
    torch.testing.assert_close(module.eval_model.head.weight, ema["head.weight"])

    without = LaViTModule.load_from_checkpoint(path, ema_decay=None)
    assert without.ema is None
    torch.testing.assert_close(without.model.head.weight, raw["head.weight"])


def test_timm_baseline_trains_a_step(small_data):
    module = LaViTModule(arch="pvt_v2_b0", num_classes=10, img_size=32, drop_path_rate=0.1)
    assert not module.is_lavit
    trainer = cpu_trainer(fast_dev_run=True)
    trainer.fit(module, small_data)
    assert trainer.global_step == 1
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    with pytest.raises(ValueError, match="pvt_v2_b0.*la_init"):
        LaViTModule(arch="pvt_v2_b0", la_init="random")
    with pytest.raises(ValueError, match="dp_loss_weight"):
        LaViTModule(arch="pvt_v2_b0", dp_loss_weight=0.1)


def test_mixed_precision_clipping_mixup_and_predict(small_data):
    module = tiny_module(mixup_alpha=0.8, cutmix_alpha=1.0, dp_loss_weight=0.1, ema_decay=0.9)
    trainer = cpu_trainer(fast_dev_run=True, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(module, small_data)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/ce", "train/dp", "val/top1", "val/top5"} <= metrics.keys()
    assert "train/top1" not in metrics  # no train accuracy on mixed targets
    out = trainer.predict(module, small_data)[0]
    assert out["probs"].shape == (16, 10) and out["pred"].shape == (16,)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(16))


def configured(module: LaViTModule, **trainer):
    """``configure_optimizers`` with what it reads from a Trainer: 20 batches an epoch,
    accumulation 2 (10 updates), 4 devices × 32, 100 updates in all."""
    module.trainer = SimpleNamespace(
        **{
            "estimated_stepping_batches": 100,
            "num_training_batches": 20,
            "accumulate_grad_batches": 2,
            "world_size": 4,
            "max_epochs": 10,
            "datamodule": SimpleNamespace(batch_size=32),
            **trainer,
        }
    )
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def lrs(optimizer, scheduler, steps) -> list[float]:
    """The lr of the first group at each update in ``steps`` (as Lightning steps it)."""
    out = []
    for step in steps:
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_optimizer_groups_lr_scaling_and_schedule():
    module = tiny_module(lr=5e-4, scale_lr_by_batch=True, warmup_epochs=2, min_lr=1e-5)
    optimizer, scheduler = configured(module)
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["betas"] == (0.9, 0.999)
    groups = {g["name"]: g for g in optimizer.param_groups}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    names = dict(module.model.named_parameters())
    for name in module.model.no_weight_decay():  # pos embeds and Ψ/Θ
        assert id(names[name]) in no_decay
    assert id(names["head.bias"]) in no_decay and id(names["stages.0.norm.weight"]) in no_decay
    assert id(names["head.weight"]) not in no_decay
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    peak = 5e-4 * (32 * 4 * 2) / 512  # lr × global batch / 512
    assert groups["decay"]["initial_lr"] == pytest.approx(peak)

    # What the hand-written schedule before timm's gave: linear warm-up from warmup_lr over
    # 2 epochs × 10 updates, then cosine to min_lr at update 100.
    def before(step, warmup=20, total=100, low=1e-6, end=1e-5):
        if step < warmup:
            return low + (peak - low) * step / warmup
        progress = (step - warmup) / (total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # the first update's
    steps = [0, 1, 10, 20, 60, 99, 100]
    assert lrs(optimizer, scheduler, steps) == pytest.approx([before(s) for s in steps])
    assert lrs(optimizer, scheduler, [100])[0] == pytest.approx(1e-5)  # the end lr


def test_any_timm_optimizer_layer_decay_and_schedule():
    from timm.optim import param_groups_layer_decay

    module = tiny_module(opt="sgd", momentum=0.8, layer_decay=0.75, sched="step", warmup_epochs=0)
    module.hparams.decay_epochs, module.hparams.decay_rate = 3, 0.5
    optimizer, scheduler = configured(module, world_size=1, accumulate_grad_batches=1)
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["momentum"] == 0.8
    expected = param_groups_layer_decay(
        module.model, 0.05, module.model.no_weight_decay(), layer_decay=0.75
    )
    strip = lambda g: {k: v for k, v in g.items() if k in ("lr_scale", "weight_decay")}  # noqa: E731
    assert [strip(g) for g in optimizer.param_groups] == [strip(g) for g in expected]
    for group, want in zip(optimizer.param_groups, expected, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in want["params"]]
    assert len({g["lr_scale"] for g in expected}) > 2  # stem, blocks, head: decayed lrs
    peak = 3e-3  # step: × 0.5 every 3 epochs of 20 updates; each group at its lr_scale
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    for step, factor in ((0, 1.0), (59, 1.0), (60, 0.5), (125, 0.25)):
        scheduler.step_update(step)
        got = [g["lr"] for g in optimizer.param_groups]
        assert got == pytest.approx([peak * factor * s for s in scales])


def test_a_linear_probe_trains_only_the_classifier(small_data):
    L.seed_everything(0)
    module = tiny_module(freeze="backbone", ema_decay=0.9)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    cpu_trainer(max_steps=3, limit_val_batches=0).fit(module, small_data)
    for name, param in module.model.named_parameters():
        if name.startswith("head."):
            assert param.requires_grad and not torch.equal(param, before[name]), name
        else:
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(param, before[name]), name
    with pytest.raises(ValueError, match="freeze=.*stages"):
        tiny_module(freeze=["no_such_part"])
