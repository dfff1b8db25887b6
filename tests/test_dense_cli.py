"""The dense tasks through the project's CLI: configs, links, fast_dev_run, bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from lavit.cli import DenseCLI, main, names_task_classes
from lavit.dense import RetinaNetModule, SemanticFPNModule
from lavit.dense.demo import build_dense_demo, dense_demo_dir

DEMO = str(REPO / "experiments" / "dense_demo.yaml")
SEMFPN = str(REPO / "experiments" / "ade20k" / "semfpn_lavit_small.yaml")
TINY = json.dumps(
    {
        "embed_dims": [16, 32, 32, 64],
        "depths": [1, 1, 2, 2],
        "num_heads": [1, 2, 2, 4],
        "mlp_ratios": [2, 2, 2, 2],
        "sr_ratios": [4, 2, 1, 1],
        "num_va_layers": [1, 1, 1, 1],
    }
)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    build_dense_demo(dense_demo_dir(cache), sizes={"train": 8, "val": 4})
    return cache


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lavit"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dense_configs_choose_the_dense_cli_and_classification_ones_do_not():
    for config in (DEMO, SEMFPN, *(REPO / "experiments" / "coco").glob("*.yaml")):
        assert names_task_classes(["fit", "--config", str(config)])
    assert not names_task_classes(["fit", "--config", str(REPO / "experiments" / "base.yaml")])
    assert names_task_classes(["fit", "--model=lavit.dense.RetinaNetModule"])


def test_demo_config_links_classes_and_input_size_and_monitors_ap(tmp_path, demo_cache):
    cli = DenseCLI(
        args=[
            "--config", DEMO,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            f"--data.init_args.cache_dir={demo_cache}",
        ],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model, RetinaNetModule)
    assert cli.model.hparams.num_classes == 2  # vehicle, animal
    assert cli.model.hparams.img_size == (128, 128)  # the canvas
    assert cli.model.hparams.backbone_kwargs["num_va_layers"] == [1, 1, 1, 1]
    assert cli.trainer.checkpoint_callback.monitor == "val/AP"
    assert cli.trainer.checkpoint_callback.dirpath == os.path.join(tmp_path, "checkpoints")


@pytest.mark.slow
def test_demo_config_fast_dev_run_through_python_m_lavit(tmp_path, demo_cache):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "lavit", "fit", "--config", DEMO,
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.cache_dir={demo_cache}",
            "--data.init_args.val_batch_size=4",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/AP" in result.stdout + result.stderr


def test_semantic_fpn_config_runs_on_the_demo_masks(tmp_path, demo_cache, capsys):
    """The ADE20K config itself, pointed at the demo set, small enough for a CPU step."""
    main(
            [
                "fit", "--config", SEMFPN,
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.strategy=auto", "--trainer.precision=32-true", "--wandb.mode=disabled",
                f"--model.init_args.backbone_kwargs={TINY}",
                "--model.init_args.pyramid_channels=32", "--model.init_args.segmentation_channels=32",
                "--model.init_args.slide_stride=[32, 32]",
                "--data.init_args.source=demo", f"--data.init_args.cache_dir={demo_cache}",
                "--data.init_args.train_split=train", "--data.init_args.val_split=val",
                "--data.init_args.num_classes=3", "--data.init_args.reduce_zero_label=false",
                "--data.init_args.scale=64", "--data.init_args.crop_size=[64, 64]",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
            ]
        )  # fmt: skip
    out = capsys.readouterr()
    assert "val/mIoU" in out.out + out.err


def test_bad_dense_data_is_one_error_line_and_exit_code_2(tmp_path, demo_cache, capsys):
    bad = tmp_path / "coco"
    (bad / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (bad / split).mkdir()
        document = {
            "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 30, 5]}],
            "categories": [{"id": 1, "name": "thing"}],
        }
        (bad / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    common = ["fit", "--config", DEMO, f"--trainer.default_root_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, f"--data.init_args.source={bad}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error: ") and "lies outside the 32×32 image" in err[0]
    )

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                *common,
                f"--data.init_args.cache_dir={demo_cache}",
                f"--model.init_args.backbone_checkpoint={tmp_path / 'missing.ckpt'}",
            ]
        )
    assert exit_info.value.code == 2
    assert "missing.ckpt: no such checkpoint file" in capsys.readouterr().err


def test_a_detector_checkpoint_is_refused_where_a_classifier_is_expected(tmp_path, demo_cache):
    """A dense run's own checkpoint resumes through --ckpt_path, not --model.backbone_checkpoint."""
    module = SemanticFPNModule(
        num_classes=3, backbone="lavit_tiny", backbone_kwargs=json.loads(TINY), img_size=(64, 64),
        pyramid_channels=32, segmentation_channels=32,
    )  # fmt: skip
    path = tmp_path / "seg.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    with pytest.raises(ValueError, match="does not fit backbone arch='lavit_tiny'"):
        SemanticFPNModule(
            num_classes=3, backbone="lavit_tiny", img_size=(64, 64), backbone_checkpoint=str(path)
        )


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_lavit_analyze_reads_a_dense_checkpoint(tmp_path, task, capsys):
    """`lavit analyze --model <dense run>.ckpt` measures the saturation of its LaViT backbone."""
    from lavit.tools.analyze import main as analyze

    kwargs = dict(backbone="lavit_tiny", backbone_kwargs=json.loads(TINY), img_size=(64, 96))
    if task == "detection":
        module = RetinaNetModule(num_classes=2, fpn_channels=32, **kwargs)
    else:
        module = SemanticFPNModule(
            num_classes=3, pyramid_channels=32, segmentation_channels=32, **kwargs
        )
    path = tmp_path / "dense.ckpt"
    import lightning

    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,  # as Lightning writes it
    }
    torch.save(checkpoint, path)
    argv = ["--model", str(path), "--random", "--num-images", "2", "--out", str(tmp_path / "out")]
    assert analyze(argv) == 0
    out = capsys.readouterr().out
    assert f"lavit_tiny backbone of {type(module).__name__}" in out and "64²" in out
    assert (tmp_path / "out" / "saturation.csv").is_file()


def test_coco_config_runs_on_the_demo_boxes(tmp_path, demo_cache, capsys):
    """The COCO LaViT config itself (pooled Ψ/Θ, any input size), pointed at the demo set."""
    tiny = {**json.loads(TINY), "la_mixing": "pooled", "dynamic_img_size": True}
    main(
        [
            "fit", "--config", str(REPO / "experiments" / "coco" / "retinanet_lavit_tiny.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.precision=32-true", "--wandb.mode=disabled",
            f"--model.init_args.backbone_kwargs={json.dumps(tiny)}",
            "--model.init_args.fpn_channels=32",
            "--data.init_args.source=demo", f"--data.init_args.cache_dir={demo_cache}",
            "--data.init_args.train_split=train", "--data.init_args.val_split=val",
            "--data.init_args.scale=[160, 96]",  # 128² canvases → 96×96, padded to 96×96
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        ]
    )  # fmt: skip
    out = capsys.readouterr()
    assert "val/AP" in out.out + out.err
