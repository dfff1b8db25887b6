"""Tests of the data module: every source, the errors, the bad-image policy and the val split.

Everything runs offline on data made here or shipped in the package: the socket layer is
disabled for every test, and the Hub is mocked where a test needs it to answer.
"""

import io
import json
import os
import socket
import time
from pathlib import Path

import datasets
import huggingface_hub
import jsonargparse
import lightning as L
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lavit.training import sources
from lavit.training.data import ImageDataModule, guess_source_type

# Small, fast settings: 32x32 inputs, no resize margin, the default augmentation recipe.
# The per-image path (test_batch_transforms.py tests the in-memory one, in_memory="auto").
FAST = {"img_size": 32, "crop_pct": 1.0, "batch_size": 4, "num_workers": 0, "in_memory": False}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
# Bounds of ImageNet-normalised pixels: (0 - max mean) / min std, (1 - min mean) / min std.
NORMALISED_RANGE = (-2.2, 2.7)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make any connection attempt fail at once, as on a machine with no network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf-cache")


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    if mode == "P":
        return image.convert("P", palette=PIL.Image.Palette.ADAPTIVE)
    return image.convert(mode)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image("RGB", (8, 8), seed).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image_folder(root: Path, per_class: int = 6) -> Path:
    """``root/{cat,dog}/`` with RGB, greyscale, RGBA and palette images of several sizes."""
    variants = [
        ("RGB", (40, 30), "png"),
        ("L", (17, 23), "jpg"),
        ("RGBA", (32, 32), "png"),
        ("P", (50, 64), "gif"),
        ("RGB", (64, 48), "jpeg"),
        ("LA", (20, 20), "png"),
    ]
    for class_index, class_name in enumerate(["cat", "dog"]):
        folder = root / class_name
        folder.mkdir(parents=True)
        for i in range(per_class):
            mode, size, extension = variants[i % len(variants)]
            random_image(mode, size, seed=10 * class_index + i).save(folder / f"{i}.{extension}")
    (root / "README.txt").write_text("not an image, and outside the class folders")
    (root / "cat" / "notes.txt").write_text("ignored: no image extension")
    return root


def write_parquet_splits(folder: Path, sizes: dict[str, int]) -> Path:
    """Parquet files in the Hugging Face Image + ClassLabel layout, one per split."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        rows = {
            "image": [{"bytes": png_bytes(i), "path": None} for i in range(size)],
            "label": [i % 3 for i in range(size)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )
    return folder


def check_batch(loader, num_classes: int, batch_size: int = 4) -> None:
    images, labels = next(iter(loader))
    assert images.shape == (batch_size, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert 0 <= labels.min() and labels.max() < num_classes


# ----------------------------------------------------------------------------------- sources
def test_embedded_default_works_offline(cache_dir):
    dm = ImageDataModule(cache_dir=cache_dir, **FAST)
    assert dm.source_type == "embedded"
    # Known before setup (the module needs it when it is built) without loading the data.
    assert dm.num_classes == 10
    assert dm.class_names[:5] == CIFAR10_CLASSES
    assert dm._splits is None

    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3600, 400, 1000)
    check_batch(dm.train_dataloader(), num_classes=10)
    images, _ = next(iter(dm.val_dataloader()))
    assert NORMALISED_RANGE[0] <= images.min() < 0 < images.max() <= NORMALISED_RANGE[1]
    check_batch(dm.test_dataloader(), num_classes=10)
    check_batch(dm.predict_dataloader(), num_classes=10)


def test_image_folder_with_mixed_modes_and_sizes_decodes_in_workers(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "pets")
    dm = ImageDataModule(source=str(root), cache_dir=cache_dir, **{**FAST, "num_workers": 1})
    assert dm.source_type == "imagefolder"
    assert dm.class_names == ["cat", "dog"]

    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 12
    assert dm.num_skipped_images == 0
    for dataset in (dm.train_dataset, dm.val_dataset):
        for index in range(len(dataset)):
            image, _ = dataset[index]
            assert image.shape == (3, 32, 32)
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and loader.drop_last
    check_batch(loader, num_classes=2)


def test_image_folder_split_subfolders_are_used(tmp_path, cache_dir):
    make_image_folder(tmp_path / "data" / "train", per_class=4)
    make_image_folder(tmp_path / "data" / "val", per_class=2)
    dm = ImageDataModule(source=str(tmp_path / "data"), cache_dir=cache_dir, **FAST)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (8, 4)
    assert dm.val_dataset.split == "val"
    assert (dm.test_dataset.split, len(dm.test_dataset)) == ("val", 4)  # no test folder
    check_batch(dm.val_dataloader(), num_classes=2)


def test_parquet_folder_file_and_glob(tmp_path, cache_dir):
    folder = write_parquet_splits(tmp_path / "pq", {"train": 30, "test": 9})

    from_folder = ImageDataModule(source=str(folder), cache_dir=cache_dir, **FAST)
    assert from_folder.source_type == "parquet"
    assert from_folder.class_names == ["a", "b", "c"]
    from_folder.setup()
    assert (len(from_folder.train_dataset), len(from_folder.val_dataset)) == (27, 3)
    assert len(from_folder.test_dataset) == 9
    check_batch(from_folder.train_dataloader(), num_classes=3)

    for source in (str(folder / "train.parquet"), str(folder / "tr*.parquet")):
        dm = ImageDataModule(source=source, cache_dir=cache_dir, **FAST)
        dm.setup()
        assert len(dm.train_dataset) + len(dm.val_dataset) == 30
        check_batch(dm.val_dataloader(), num_classes=3, batch_size=3)


def test_parquet_without_hf_metadata_and_string_labels(tmp_path, cache_dir):
    table = pa.table(
        {
            "picture": [png_bytes(i) for i in range(20)],
            "species": ["owl", "cat"] * 10,
            "weight": list(range(20)),
        }
    )
    pq.write_table(table, tmp_path / "plain.parquet")
    dm = ImageDataModule(
        source=str(tmp_path / "plain.parquet"),
        image_column="picture",
        label_column="species",
        cache_dir=cache_dir,
        **FAST,
    )
    dm.setup()
    assert dm.class_names == ["cat", "owl"]
    check_batch(dm.train_dataloader(), num_classes=2)


def fake_hub_dataset() -> datasets.DatasetDict:
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=["x", "y"]),
        }
    )

    def split(size: int) -> datasets.Dataset:
        rows = {
            "id": list(range(size)),
            "img": [random_image("RGB", (24, 24), i) for i in range(size)],
            "fine_label": [i % 2 for i in range(size)],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict({"train": split(12), "validation": split(6), "test": split(4)})


def test_hub_dataset_with_the_network_mocked(monkeypatch, cache_dir):
    calls = []

    def fake_load_dataset(path, name=None, cache_dir=None, **kwargs):
        calls.append((path, name))
        return fake_hub_dataset()

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = ImageDataModule(
        source="someone/tiny-set", hub_config="default", cache_dir=cache_dir, **FAST
    )
    assert dm.source_type == "hub"
    dm.setup("fit")
    assert calls == [("someone/tiny-set", "default")]
    # Image and label columns found from their feature types; the validation split is used.
    assert dm.class_names == ["x", "y"]
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 6, 4)
    check_batch(dm.train_dataloader(), num_classes=2)


def test_hub_unreachable_fails_fast_with_a_clear_message(cache_dir):
    dm = ImageDataModule(source="someone/tiny-set", cache_dir=cache_dir, **FAST)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="Hub is unreachable") as error:
        dm.setup()
    assert time.monotonic() - started < 5
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "local" in str(error.value)
    with pytest.raises(ConnectionError, match="unreachable"):
        _ = dm.num_classes


def test_hub_connection_lost_during_load_is_reported_clearly(monkeypatch, cache_dir):
    def failing_load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/tiny-set' on the Hub (ReadTimeout)")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    dm = ImageDataModule(source="someone/tiny-set", cache_dir=cache_dir, **FAST)
    with pytest.raises(ConnectionError, match="unreachable.*HF_HUB_OFFLINE=1"):
        dm.setup()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set and .* not in the .* cache"):
        dm.setup()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("embedded", "embedded"),
        ("uoft-cs/cifar10", "hub"),
        ("ILSVRC/imagenet-1k", "hub"),
        ("some/where/*.parquet", "parquet"),
        ("missing.parquet", "parquet"),
    ],
)
def test_guess_source_type_from_strings(source, expected):
    assert guess_source_type(source) == expected


def test_guess_source_type_from_local_paths(tmp_path):
    assert guess_source_type(str(make_image_folder(tmp_path / "images"))) == "imagefolder"
    assert guess_source_type(str(write_parquet_splits(tmp_path / "pq", {"train": 3}))) == "parquet"


# ------------------------------------------------------------------------------------ errors
def test_missing_path_is_named(tmp_path, cache_dir):
    missing = str(tmp_path / "no" / "such" / "folder")
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        ImageDataModule(source=missing, cache_dir=cache_dir, **FAST)
    dm = ImageDataModule(source=missing, source_type="imagefolder", cache_dir=cache_dir, **FAST)
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        dm.setup()
    dm = ImageDataModule(source=str(tmp_path / "gone.parquet"), cache_dir=cache_dir, **FAST)
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        dm.setup()


def test_unknown_column_is_named_with_the_available_ones(tmp_path, cache_dir):
    folder = write_parquet_splits(tmp_path / "pq", {"train": 10})
    dm = ImageDataModule(source=str(folder), label_column="fine_label", cache_dir=cache_dir, **FAST)
    with pytest.raises(ValueError, match=r"'fine_label'.*available columns: \['image', 'label'\]"):
        dm.setup()


def test_unreadable_parquet_row_is_named_by_split_and_row(tmp_path, cache_dir):
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}
    )
    images = [{"bytes": png_bytes(i), "path": None} for i in range(10)]
    images[7] = {"bytes": b"definitely not an image", "path": None}
    rows = datasets.Dataset.from_dict({"image": images, "label": [0] * 10}, features=features)
    rows.to_parquet(str(tmp_path / "broken.parquet"))
    dm = ImageDataModule(
        source=str(tmp_path / "broken.parquet"), val_split="train", cache_dir=cache_dir, **FAST
    )
    dm.setup()
    with pytest.raises(ValueError, match="Cannot read image at row 7 of split 'train'"):
        dm.val_dataset[7]
    # Held in memory, the image is decoded (and named) before training.
    dm = ImageDataModule(
        source=str(tmp_path / "broken.parquet"),
        val_split="train",
        cache_dir=cache_dir,
        **{**FAST, "in_memory": "auto"},
    )
    with pytest.raises(ValueError, match="Cannot read image at row 7 of split 'train'"):
        dm.setup()


def test_unreadable_file_at_load_time_is_named(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "pets")
    dm = ImageDataModule(source=str(root), val_split="train", cache_dir=cache_dir, **FAST)
    dm.setup()
    # A file that goes bad after the scan (e.g. on a network file system) is still named.
    broken = Path(dm.val_dataset.rows[3]["image"]["path"])
    broken.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"Cannot read image '{broken}'"):
        dm.val_dataset[3]


def test_datasets_without_images_are_rejected(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageDataModule(source=str(tmp_path / "empty"), cache_dir=cache_dir, **FAST).setup()

    root = make_image_folder(tmp_path / "pets")
    (root / "fish").mkdir()
    (root / "fish" / "readme.md").write_text("no pictures yet")
    with pytest.raises(ValueError, match="no valid file for the classes fish"):
        ImageDataModule(source=str(root), cache_dir=cache_dir, **FAST).setup()

    folder = write_parquet_splits(tmp_path / "pq", {"train": 0})
    with pytest.raises(ValueError, match="has no images"):
        ImageDataModule(source=str(folder), cache_dir=cache_dir, **FAST).setup()


# -------------------------------------------------------------------------------- bad images
def make_folder_with_bad_images(root: Path) -> list[Path]:
    make_image_folder(root, per_class=8)
    truncated = root / "cat" / "truncated.jpg"
    buffer = io.BytesIO()
    random_image("RGB", (64, 64)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[:400])
    empty = root / "dog" / "empty.png"
    empty.touch()
    not_an_image = root / "dog" / "notes.jpg"
    not_an_image.write_text("this is text with an image extension")
    return [truncated, empty, not_an_image]


def test_bad_images_are_all_listed_in_one_error(tmp_path, cache_dir):
    bad_files = make_folder_with_bad_images(tmp_path / "pets")
    dm = ImageDataModule(source=str(tmp_path / "pets"), cache_dir=cache_dir, **FAST)
    with pytest.raises(ValueError, match="3 unreadable image file") as error:
        dm.setup()
    for path in bad_files:
        assert str(path) in str(error.value)
    assert "bad_images='skip'" in str(error.value)


class TinyClassifier(L.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * 32 * 32, num_classes)

    def training_step(self, batch, batch_index):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

    def validation_step(self, batch, batch_index):
        images, labels = batch
        self.log(
            "val_loss", torch.nn.functional.cross_entropy(self.head(images.flatten(1)), labels)
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_skip_mode_trains_on_the_rest(tmp_path, cache_dir):
    make_folder_with_bad_images(tmp_path / "pets")
    dm = ImageDataModule(
        source=str(tmp_path / "pets"), bad_images="skip", cache_dir=cache_dir, **FAST
    )
    with pytest.warns(UserWarning, match="Skipped 3 unreadable"):
        dm.setup("fit")
    assert dm.num_skipped_images == 3
    assert len(dm.train_dataset) + len(dm.val_dataset) == 16

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(dm.num_classes), datamodule=dm)
    assert trainer.global_step == len(dm.train_dataset) // FAST["batch_size"]


# ------------------------------------------------------------------------------------ splits
def test_carved_validation_is_disjoint_stratified_and_deterministic(cache_dir):
    def carve(seed: int) -> tuple[np.ndarray, np.ndarray]:
        dm = ImageDataModule(seed=seed, cache_dir=cache_dir, **FAST)
        dm.setup("fit")
        return np.asarray(dm.train_dataset.rows["row"]), np.asarray(dm.val_dataset.rows["row"])

    train_ids, val_ids = carve(seed=0)
    assert len(np.intersect1d(train_ids, val_ids)) == 0
    assert sorted(np.concatenate([train_ids, val_ids])) == list(range(4000))
    again_train, again_val = carve(seed=0)
    assert np.array_equal(again_val, val_ids) and np.array_equal(again_train, train_ids)
    assert not np.array_equal(carve(seed=1)[1], val_ids)

    labels = np.asarray(
        datasets.Dataset.from_parquet(
            str(sources.embedded_dataset_dir() / "train.parquet"), cache_dir=cache_dir
        )["label"]
    )
    assert np.bincount(labels[val_ids]).tolist() == [40] * 10


def test_a_fraction_that_holds_out_nothing_is_named(cache_dir):
    dm = ImageDataModule(val_fraction=1e-4, cache_dir=cache_dir, **FAST)
    with pytest.raises(ValueError, match=r"0.0001 of the 4000 training images holds out none"):
        dm.setup("fit")


def test_val_split_can_point_at_test(cache_dir):
    dm = ImageDataModule(val_split="test", cache_dir=cache_dir, **FAST)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (4000, 1000)
    with pytest.raises(ValueError, match=r"Split 'dev' not found.*\['test', 'train'\]"):
        ImageDataModule(val_split="dev", cache_dir=cache_dir, **FAST).setup()


# -------------------------------------------------------------------------- config and recipe
def test_lightning_cli_reads_and_validates_the_signature():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    config = parser.parse_args(["--data.img_size=32", "--data.auto_augment=null"])
    assert config.data.source == "embedded" and config.data.img_size == 32
    assert config.data.auto_augment is None and config.data.crop_pct == 0.875
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.source_type=ftp"])
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.bad_images=ignore"])
    assert "token" not in " ".join(config.data.keys())


def test_randaugment_top_magnitude_posterize_does_not_crash():
    dm = ImageDataModule(auto_augment="rand-m10-n1-inc1", **FAST)
    [rand_augment] = [t for t in dm.train_transform.transforms if hasattr(t, "ops")]
    [posterize] = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    posterize.prob = 1.0
    black = posterize(random_image("RGB", (32, 32)))  # magnitude 10 keeps 0 bits
    assert np.asarray(black).max() == 0


def test_the_bad_image_check_is_paid_once_per_file(tmp_path, cache_dir, monkeypatch):
    """The check decodes each file once: a second start reads its results from the cache
    (keyed by path, size and modification time); a changed file is decoded again."""
    from lavit.training import images

    bad_files = make_folder_with_bad_images(tmp_path / "pets")
    decoded: list[Path] = []
    real = images.image_problem
    monkeypatch.setattr(images, "image_problem", lambda path: decoded.append(path) or real(path))

    def start() -> ImageDataModule:
        dm = ImageDataModule(
            source=str(tmp_path / "pets"), bad_images="skip", cache_dir=cache_dir, **FAST
        )
        with pytest.warns(UserWarning, match="Skipped 3 unreadable"):
            dm.setup("fit")
        return dm

    assert start().num_skipped_images == 3
    files = len(decoded)
    assert files == 16 + 3
    cache = images.check_cache_file(str(tmp_path / "pets"), cache_dir)
    assert cache.is_file() and cache.parent.parent == Path(cache_dir)

    assert start().num_skipped_images == 3 and len(decoded) == files  # nothing decoded again

    changed = tmp_path / "pets" / "cat" / "0.png"
    random_image("RGB", (12, 12), seed=99).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert start().num_skipped_images == 3 and decoded[files:] == [str(changed)]
    assert {str(p) for p in bad_files} <= set(json.loads(cache.read_text()))
