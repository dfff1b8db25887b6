"""Dense data: the demo set, COCO / Hugging Face / mask-folder readers, paired transforms, and
clear errors for bad boxes, empty images and masks of another size."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import tv_tensors

from lavit.dense.data import DetectionDataModule, SegmentationDataModule, keep_ratio_resize
from lavit.dense.demo import CIFAR10_CLASSES, DEMO_CLASSES, build_dense_demo, dense_demo_dir


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A small demo set where the data modules look for it (``cache_dir``)."""
    cache = tmp_path_factory.mktemp("cache")
    build_dense_demo(dense_demo_dir(cache), sizes={"train": 12, "val": 6})
    return cache


def test_demo_boxes_and_masks_are_exact(demo_cache):
    root = dense_demo_dir(demo_cache)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(DEMO_CLASSES)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(by_image) == 12 and 12 <= len(coco["annotations"]) <= 36
    for image_id, anns in by_image.items():
        mask = np.asarray(PIL.Image.open(root / "annotations" / "train" / f"{image_id:06d}.png"))
        assert mask.shape == (128, 128)
        assert set(np.unique(mask)) == {0} | {a["category_id"] for a in anns}
        for ann in anns:
            x, y, w, h = ann["bbox"]
            region = mask == ann["category_id"]
            inside = region[y : y + h, x : x + w]
            # the ellipse touches all four sides of its box; the box holds its whole mask
            # (no two objects overlap, but two objects may share a class: count inside only)
            assert (
                inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            )
            assert inside.sum() == ann["area"]
            vehicle = ann["cifar10_class"] in ("airplane", "automobile", "ship", "truck")
            assert ann["category_id"] == (1 if vehicle else 2)
            assert ann["cifar10_class"] in CIFAR10_CLASSES


def test_demo_build_is_deterministic(tmp_path, demo_cache):
    again = build_dense_demo(tmp_path / "again", sizes={"train": 12, "val": 6})
    first = dense_demo_dir(demo_cache)
    for name in (
        "annotations/instances_train.json",
        "train/000003.png",
        "annotations/val/000005.png",
    ):
        assert (again / name).read_bytes() == (first / name).read_bytes()


def test_detection_demo_batches_with_flipped_boxes(demo_cache):
    data = DetectionDataModule(
        cache_dir=str(demo_cache), scale=None, canvas=(128, 128), hflip=1.0, num_workers=0,
        batch_size=3,
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    assert data.num_classes == 2 and data.input_size == (128, 128)
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == 3 and images[0].shape == (3, 128, 128) and images[0].max() <= 1
    record = next(
        r for r in data.datasets["train"].split.records if r["image_id"] == targets[0]["image_id"]
    )
    x0, y0, x1, y1 = record["boxes"][0]
    flipped = torch.tensor([128 - x1, y0, 128 - x0, y1], dtype=torch.float32)
    assert torch.allclose(targets[0]["boxes"][0], flipped)
    val_images, val_targets = next(iter(data.val_dataloader()))
    assert val_targets[0]["orig_size"] == (128, 128)


def test_keep_ratio_resize_is_mmdetections_1333x800_or_fits_a_canvas():
    def size(height, width, scale, canvas):
        image = tv_tensors.Image(torch.zeros(3, height, width))
        return tuple(keep_ratio_resize(scale, canvas)(image).shape[-2:])

    assert size(480, 640, (1333, 800), None) == (800, 1066)  # torchvision floors the long side
    assert size(640, 480, (1333, 800), None) == (1066, 800)
    assert size(400, 2000, (1333, 800), None) == (266, 1333)
    assert size(640, 480, None, (800, 1344)) == (800, 600)
    assert size(480, 640, None, (800, 1344)) == (800, 1067)


def test_detection_resize_moves_boxes_with_the_image(tmp_path):
    root = _coco(tmp_path, boxes=[[10, 20, 30, 40]], size=(100, 200))
    data = _prepare(root, scale=(400, 200), hflip=0.0, batch_size=1)
    image, target = data.datasets["train"][0]
    assert image.shape == (3, 200, 400)
    assert target["boxes"].tolist() == [[20.0, 40.0, 80.0, 120.0]]
    assert target["orig_size"] == (100, 200) and target["size"] == (200, 400)


def test_segmentation_demo_crops_pad_with_the_ignore_index(demo_cache):
    data = SegmentationDataModule(
        cache_dir=str(demo_cache), scale=64, ratio_range=(1.0, 1.0), crop_size=(96, 96),
        num_workers=0, batch_size=2,
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    assert data.num_classes == 3 and data.class_names == ["background", "vehicle", "animal"]
    images, masks = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 96, 96) and masks.shape == (2, 96, 96)
    assert (masks == 255).any()  # 64² resized canvases padded to the 96² crop
    assert set(masks.unique().tolist()) <= {0, 1, 2, 255}
    val_images, val_masks = next(iter(data.val_dataloader()))
    assert val_images[0].shape == (3, 64, 64) and val_masks[0].shape == (128, 128)


def test_segmentation_from_a_hugging_face_dataset_with_reduce_zero_label(tmp_path):
    image = PIL.Image.new("RGB", (8, 6), (10, 20, 30))
    mask = PIL.Image.fromarray(np.array([[0, 1, 2, 3] * 2] * 6, dtype=np.uint8))
    rows = datasets.Dataset.from_dict(
        {"image": [image], "annotation": [mask]},
        features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}),
    )
    rows.to_parquet(str(tmp_path / "validation-00000.parquet"))
    rows.to_parquet(str(tmp_path / "train-00000.parquet"))
    data = SegmentationDataModule(
        str(tmp_path), val_split="validation", num_classes=3, reduce_zero_label=True, scale=6,
        crop_size=(32, 32), num_workers=0,
    )  # fmt: skip
    data.setup()
    _, labels = data.datasets["validation"][0]
    assert labels[0, :4].tolist() == [255, 0, 1, 2]


def test_detection_from_a_hugging_face_objects_column(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog"])),
            },
        }
    )
    rows = datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.new("RGB", (64, 32))] * 2,
            "width": [64, 64],
            "height": [32, 32],
            "objects": [
                {"bbox": [[1, 2, 10, 20]], "category": [1]},
                {"bbox": [], "category": []},  # an image without objects is a negative, fine
            ],
        },
        features=features,
    )
    rows.save_to_disk(str(tmp_path / "hf"))
    data = DetectionDataModule(
        str(tmp_path / "hf"), val_split="train", scale=None, hflip=0.0, num_workers=0
    )
    data.setup()
    assert data.class_names == ["cat", "dog"]
    _, target = data.datasets["train"][0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 22.0]] and target["labels"].tolist() == [1]
    _, empty = data.datasets["train"][1]
    assert empty["boxes"].shape == (0, 4)


# ------------------------------------------------------------------------------- bad inputs
def _coco(tmp_path, boxes, size=(32, 48), file_size=None, write_image=True, split="train"):
    """A one-image COCO folder: ``annotations/instances_<split>.json`` and ``<split>/a.png``."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    height, width = size
    if write_image:
        fh, fw = file_size or size
        PIL.Image.new("RGB", (fw, fh)).save(root / split / "a.png")
    document = {
        "images": [{"id": 7, "file_name": "a.png", "width": width, "height": height}],
        "annotations": [
            {"id": i, "image_id": 7, "category_id": 3, "bbox": b, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def _prepare(root, **kwargs):
    data = DetectionDataModule(str(root), val_split="train", num_workers=0, **kwargs)
    data.prepare_data()
    data.setup()
    return data


@pytest.mark.parametrize(
    "box, message",
    [
        ([40, 4, 20, 10], r"image 7 \(a.png\): box 1 \[40.0, 4.0, 20.0, 10.0\] lies outside the 48×32 image; fix the annotation"),
        ([4, 4, -3, 10], r"box 1 .* has a negative width or height; boxes are read as COCO's \[x, y, width, height\]"),
        ([4, 4, float("nan"), 10], r"box 1 .* is not finite"),
    ],
)  # fmt: skip
def test_bad_boxes_are_named_with_the_fix(tmp_path, box, message):
    with pytest.raises(ValueError, match=message):
        _prepare(_coco(tmp_path, [[1, 1, 5, 5], box]))


def test_boxes_a_pixel_outside_are_clipped_not_refused(tmp_path):
    data = _prepare(_coco(tmp_path, [[-0.5, 2, 49, 10]]), scale=None)
    assert data.datasets["train"].split.records[0]["boxes"].tolist() == [[0.0, 2.0, 48.0, 12.0]]


def test_empty_and_unreadable_images_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"the image is empty \(48×0 pixels\); remove it"):
        _prepare(_coco(tmp_path / "a", [], size=(0, 48), write_image=False))
    root = _coco(tmp_path / "b", [], write_image=False)
    (root / "train" / "a.png").write_bytes(b"")
    data = _prepare(root)
    with pytest.raises(ValueError, match=r"a.png: cannot be read as an image"):
        data.datasets["train"][0]
    root = _coco(tmp_path / "c", [[1, 1, 4, 4]], file_size=(20, 48))
    with pytest.raises(ValueError, match=r"the annotation says 48×32 but the image is 48×20"):
        _prepare(root).datasets["train"][0]


def test_missing_split_and_bad_source_are_named(tmp_path):
    root = _coco(tmp_path, [[1, 1, 4, 4]])
    with pytest.raises(
        ValueError,
        match=r"no annotations/instances_val.json for split 'val'.*set data.train_split / data.val_split",
    ):
        DetectionDataModule(str(root), num_workers=0).prepare_data()
    with pytest.raises(OSError, match="no such file or folder"):
        DetectionDataModule(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="canvas .* must be positive multiples of 32"):
        DetectionDataModule("demo", canvas=(100, 128))


def _mask_folder(
    tmp_path, image_size=(16, 24), mask_size=(16, 24), values=(0, 1), extra_image=False
):
    root = tmp_path / "seg"
    for sub in ("images/train", "annotations/train"):
        (root / sub).mkdir(parents=True)
    PIL.Image.new("RGB", image_size[::-1]).save(root / "images/train/x.jpg")
    mask = np.resize(np.array(values, dtype=np.uint8), mask_size)
    PIL.Image.fromarray(mask).save(root / "annotations/train/x.png")
    if extra_image:
        PIL.Image.new("RGB", (8, 8)).save(root / "images/train/y.jpg")
    return root


def _seg(root, **kwargs):
    data = SegmentationDataModule(
        str(root), val_split="train", num_classes=3, crop_size=(32, 32), num_workers=0, **kwargs
    )
    data.prepare_data()
    data.setup()
    return data


def test_masks_of_another_size_out_of_range_labels_and_unpaired_files_are_named(tmp_path):
    data = _seg(_mask_folder(tmp_path / "a", mask_size=(8, 24)))
    with pytest.raises(
        ValueError,
        match=r"x.png: the mask is 24×8 but its image is 24×16; masks must have their image's size",
    ):
        data.datasets["train"][0]
    data = _seg(_mask_folder(tmp_path / "b", values=(0, 7)))
    with pytest.raises(
        ValueError,
        match=r"label values \[7\] are outside 0..2 and not the ignore index 255; set data.num_classes",
    ):
        data.datasets["train"][0]
    with pytest.raises(
        ValueError, match=r"1 image/mask files have no partner \(e.g. y: no mask named y"
    ):
        _seg(_mask_folder(tmp_path / "c", extra_image=True))
    with pytest.raises(ValueError, match="num_classes must be given"):
        SegmentationDataModule(str(_mask_folder(tmp_path / "d")))


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (DetectionDataModule, {"hflip": 1.5}, r"hflip: invalid value 1.5 \(must be a probability"),
        (DetectionDataModule, {"batch_size": 0}, r"batch_size: invalid value 0 \(must be >= 1\)"),
        (DetectionDataModule, {"num_workers": -1}, r"num_workers: invalid value -1 \(must be >= 0"),
        (
            SegmentationDataModule,
            {"num_classes": 1},
            r"num_classes: invalid value 1 \(must be >= 2",
        ),
        (SegmentationDataModule, {"val_batch_size": 0}, r"val_batch_size: invalid value 0"),
        (SegmentationDataModule, {"hflip": -0.1}, r"hflip: invalid value -0.1"),
    ],
)
def test_value_ranges_are_the_annotations(module, kwargs, message):
    # declared once, as the argument types (training/options.py): the CLI parser and Python
    # construction check the same range and say it the same way
    with pytest.raises(ValueError, match=message):
        module(**kwargs)
