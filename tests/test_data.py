"""Tests for weclip_infer.data: transforms (spec §1.2, §7.2) and the VOC/COCO/custom datasets (§7.1)."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from weclip_infer.data import (
    CLIP_MEAN,
    CLIP_STD,
    COCO_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    COCODataset,
    CustomFolderDataset,
    DatasetError,
    EvalTransform,
    TrainTransform,
    VOCDataset,
    build_dataset,
    collate,
    denormalize,
    labels_from_mask,
    load_class_names,
    load_cls_labels,
    normalize,
)
from weclip_infer.imageio import ImageDecodeError

BLACK = np.array([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375], dtype=np.float32)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _rand_img(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=(h, w, 3), dtype=np.uint8)  # no pure black pixel


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([i % 256 for i in range(768)])
    img.save(path)


def _save_img(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    sizes = {"2007_000001": (60, 80), "2007_000002": (400, 360), "2007_000003": (90, 50)}
    labels = {}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        _save_img(root / "JPEGImages" / f"{name}.jpg", _rand_img(h, w, i), "JPEG")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 3 + i  # bird / boat / bottle
        mask[0, :] = 255
        if name != "2007_000003":  # one id without a GT mask → sentinel
            _save_mask(root / "SegmentationClassAug" / f"{name}.png", mask)
        vec = [0] * 20
        vec[2 + i] = 1
        vec[14] = 1  # person, to have two classes
        labels[name] = vec
    (root / "train.txt").write_text("\n".join(sizes))  # no trailing newline, like VOC test.txt
    (root / "cls_labels.json").write_text(json.dumps(labels))
    return root


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    names = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    for i, n in enumerate(names):
        img = _rand_img(50, 70, 10 + i)[..., 0]  # grayscale JPEG → replicated to 3 channels
        _save_img(root / "JPEGImages" / "train" / f"{n}.jpg", img, "JPEG")
        mask = np.zeros((50, 70), np.uint8)
        mask[10:20, 10:20] = 1  # person
        mask[30:40, 30:40] = 45 + i  # bowl / banana
        mask[-1] = 255
        _save_mask(root / "SegmentationClass" / "train" / f"{n[-12:]}.png", mask)
    (root / "train.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture()
def custom_root(tmp_path: Path) -> Path:
    root = tmp_path / "custom"
    _save_img(root / "a.jpg", _rand_img(40, 30, 1), "JPEG")
    _save_img(root / "sub" / "b.png", _rand_img(35, 45, 2))
    _save_img(root / "sub" / "deeper" / "c.webp", _rand_img(20, 20, 3), "WEBP")
    _save_img(root / "unlabelled.bmp", _rand_img(10, 10, 4), "BMP")
    (root / "classes.txt").write_text("background\ncat\ndog\n# a comment\nbig truck\n")
    return root


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------

def test_normalisation_constants_match_spec():
    # spec §1.2
    assert IMAGENET_MEAN == (123.675, 116.28, 103.53)
    assert IMAGENET_STD == (58.395, 57.12, 57.375)
    np.testing.assert_allclose(np.array(CLIP_MEAN) / 255, [0.48145466, 0.4578275, 0.40821073], rtol=1e-7)
    np.testing.assert_allclose(np.array(CLIP_STD) / 255, [0.26862954, 0.26130258, 0.27577711], rtol=1e-7)
    out = normalize(np.zeros((2, 3, 3), np.uint8))
    assert out.dtype == np.float32 and out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[:, 0, 0], [-2.1179, -2.0357, -1.8044], atol=1e-4)
    img = _rand_img(5, 6, 0)
    np.testing.assert_array_equal(denormalize(normalize(img)), img)
    clip = normalize(np.full((1, 1, 3), 255, np.uint8), "clip")[:, 0, 0]
    np.testing.assert_allclose(clip, (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                               / np.array([0.26862954, 0.26130258, 0.27577711]), rtol=1e-5)
    with pytest.raises(ValueError):
        normalize(img, "nope")


def test_small_image_is_zero_padded_black():
    img = _rand_img(100, 80, 0)
    mask = np.ones((100, 80), np.uint8)
    t = TrainTransform(crop_size=320, scale_range=None, flip=False)
    x, m, box = t(img, random.Random(3), mask)
    assert x.shape == (3, 320, 320) and x.dtype == torch.float32
    assert m.shape == (320, 320) and m.dtype == torch.int64
    h0, h1, w0, w1 = box
    assert (h1 - h0, w1 - w0) == (100, 80)
    valid = torch.zeros(320, 320, dtype=torch.bool)
    valid[h0:h1, w0:w1] = True
    # padded area: normalised black (spec §1.2 / §11.2 item 13) and mask 255
    pad = x[:, ~valid]
    np.testing.assert_allclose(pad.numpy(), np.broadcast_to(BLACK[:, None], pad.shape), atol=1e-6)
    assert (m[~valid] == 255).all() and (m[valid] == 1).all()
    # image content untouched, at the box
    np.testing.assert_allclose(x[:, h0:h1, w0:w1].numpy(), normalize(img), atol=1e-6)


def test_pad_offsets_are_random():
    img = _rand_img(100, 80, 0)
    t = TrainTransform(crop_size=320, scale_range=None, flip=False)
    boxes = {t(img, random.Random(s))[2] for s in range(10)}
    assert len(boxes) > 1


def test_large_image_crop_and_rescale_range():
    img = _rand_img(400, 500, 1)
    t = TrainTransform(crop_size=320, scale_range=None, flip=False)
    x, m, box = t(img, np.random.default_rng(0))  # numpy Generator accepted too
    assert x.shape == (3, 320, 320) and m is None and box == (0, 320, 0, 320)
    # the crop is a window of the image
    xn = normalize(img)
    found = any(np.allclose(xn[:, i:i + 320, j:j + 320], x.numpy()) for i in range(81) for j in range(181)
                if np.isclose(xn[0, i, j], x[0, 0, 0].item()))
    assert found
    # rescaled sizes: box extent = min(320, int(r·H)) with r in [0.5, 2]
    t2 = TrainTransform(crop_size=320)
    for s in range(5):
        _, _, (a, b, c, d) = t2(_rand_img(300, 200, s), random.Random(s))
        assert 150 <= b - a <= 320 and 100 <= d - c <= 320


def test_rescale_uses_python_random_uniform_and_int_size():
    img = _rand_img(60, 100, 2)
    t = TrainTransform(crop_size=None, scale_range=(0.5, 2.0), flip=False)
    x, _, box = t(img, random.Random(7))
    r = random.Random(7).uniform(0.5, 2.0)
    assert tuple(x.shape[1:]) == (int(r * 60), int(r * 100))
    expect = np.asarray(Image.fromarray(img).resize((int(r * 100), int(r * 60)), Image.BILINEAR))
    np.testing.assert_allclose(x.numpy(), normalize(expect), atol=1e-6)


def test_flip_is_consistent_between_image_and_mask():
    h, w = 16, 24
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    img = np.stack([cols * 10, cols * 10, cols * 10], -1).astype(np.uint8)
    mask = cols.copy()
    t = TrainTransform(crop_size=None, scale_range=None, flip=True)
    flipped = 0
    for s in range(20):
        x, m, _ = t(img, random.Random(s), mask)
        back = denormalize(x)[..., 0].astype(np.int64)
        np.testing.assert_array_equal(back, m.numpy() * 10)  # image and mask flipped together
        flipped += int(m[0, 0].item() == w - 1)
    assert 0 < flipped < 20
    # with rescaling + crop + padding the relation still holds on the valid region (nearest mask)
    big = TrainTransform(crop_size=32, scale_range=(0.5, 2.0))
    for s in range(10):
        x, m, (a, b, c, d) = big(img, random.Random(s), mask)
        assert set(np.unique(m[a:b, c:d].numpy())) <= set(range(w))
        assert (m[:a] == 255).all() and (m[b:] == 255).all()


def test_eval_transform_keeps_size():
    img = _rand_img(33, 47, 3)
    x, m, box = EvalTransform()(img, None, np.zeros((33, 47), np.uint8))
    assert x.shape == (3, 33, 47) and m.shape == (33, 47) and box == (0, 33, 0, 47)
    np.testing.assert_allclose(x.numpy(), normalize(img))


# ------------------------------------------------------------------------------------------
# VOC
# ------------------------------------------------------------------------------------------

def test_voc_dataset_items(voc_root: Path):
    ds = VOCDataset(voc_root, "train", transform=TrainTransform(), rng_seed=1)
    assert len(ds) == 3 and ds.num_classes == 21 and ds.class_names == list(VOC_CLASSES)
    item = ds[0]
    assert item["name"] == "2007_000001"
    assert item["image"].shape == (3, 320, 320) and item["image"].dtype == torch.float32
    assert item["cls_label"].dtype == torch.float32 and item["cls_label"].shape == (20,)
    assert torch.nonzero(item["cls_label"]).flatten().tolist() == [2, 14]
    assert item["mask"].shape == (320, 320) and item["mask"].dtype == torch.int64 and item["has_mask"]
    assert set(item) == {"name", "image", "cls_label", "mask", "has_mask"}
    assert set(item["mask"].unique().tolist()) <= {0, 3, 255}
    no_gt = ds[2]  # no mask file → sentinel of 255
    assert not no_gt["has_mask"] and (no_gt["mask"] == 255).all()
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 320, 320) and batch["cls_label"].shape == (3, 20)
    assert batch["mask"].shape == (3, 320, 320)
    assert batch["has_mask"].tolist() == [True, True, False] and len(batch["name"]) == 3


def test_voc_eval_transform_and_collate_size_mismatch(voc_root: Path):
    ds = build_dataset("voc", voc_root, "train")
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, 60, 80) and b["image"].shape == (3, 400, 360)
    assert a["mask"][0].eq(255).all()
    with pytest.raises(ValueError, match="different sizes"):
        collate([a, b])
    assert collate([a])["image"].shape == (1, 3, 60, 80)


def test_voc_npy_labels_and_split_locations(voc_root: Path, tmp_path: Path):
    table = {k: np.asarray(v, np.float32) for k, v in json.loads((voc_root / "cls_labels.json").read_text()).items()}
    (voc_root / "cls_labels.json").unlink()
    np.save(voc_root / "cls_labels_onehot.npy", table)  # reference format: pickled dict
    loaded = load_cls_labels(voc_root / "cls_labels_onehot.npy")
    assert set(loaded) == set(table) and all(np.array_equal(loaded[k], table[k]) for k in table)
    (voc_root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc_root / "train.txt").rename(voc_root / "ImageSets" / "Segmentation" / "val.txt")
    ds = VOCDataset(voc_root, "val")
    assert ds.labels_file.name == "cls_labels_onehot.npy"
    assert torch.nonzero(ds[1]["cls_label"]).flatten().tolist() == [3, 14]


def test_label_npy_refuses_arbitrary_pickles(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    p = tmp_path / "evil.npy"
    np.save(p, np.array({"x": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="refusing"):
        load_cls_labels(p)


def test_voc_labels_from_mask_when_no_label_file(voc_root: Path):
    (voc_root / "cls_labels.json").unlink()
    with pytest.raises(DatasetError, match="2007_000003"):  # no label, no mask
        VOCDataset(voc_root, "train")
    ds = VOCDataset(voc_root, "train", require_labels=False)
    assert torch.nonzero(ds[0]["cls_label"]).flatten().tolist() == [2]


def test_determinism_across_instances_and_workers(voc_root: Path):
    a = VOCDataset(voc_root, "train", transform=TrainTransform(), rng_seed=5)
    b = VOCDataset(voc_root, "train", transform=TrainTransform(), rng_seed=5)
    xb1 = b[1]  # access order does not matter
    xb0 = b[0]
    for i, other in ((0, xb0), (1, xb1)):
        xa = a[i]
        assert torch.equal(xa["image"], other["image"]) and torch.equal(xa["mask"], other["mask"])
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], xb1["image"])
    c = VOCDataset(voc_root, "train", transform=TrainTransform(), rng_seed=6)
    assert not torch.equal(c[1]["image"], xb1["image"])
    # worker count does not change the batches
    b.set_epoch(3)
    l0 = [x["image"] for x in DataLoader(b, batch_size=3, num_workers=0, collate_fn=collate)]
    l2 = [x["image"] for x in DataLoader(b, batch_size=1, num_workers=2, collate_fn=collate)]
    assert torch.equal(l0[0], torch.cat(l2))


def test_missing_listed_images_reported_together(voc_root: Path):
    (voc_root / "train.txt").write_text("2007_000001\nmissing_a\nmissing_b\n")
    with pytest.raises(DatasetError) as e:
        VOCDataset(voc_root, "train", require_labels=False)
    msg = str(e.value)
    assert "missing_a.jpg" in msg and "missing_b.jpg" in msg and "2 in total" in msg
    many = "\n".join(f"gone_{i}" for i in range(30))
    (voc_root / "train.txt").write_text(many)
    with pytest.raises(DatasetError, match=r"and 10 more"):
        VOCDataset(voc_root, "train", require_labels=False)
    with pytest.raises(DatasetError, match="split list"):
        VOCDataset(voc_root, "nosuchsplit")


def test_empty_label_set_is_an_error(voc_root: Path):
    labels = json.loads((voc_root / "cls_labels.json").read_text())
    labels["2007_000002"] = [0] * 20
    (voc_root / "cls_labels.json").write_text(json.dumps(labels))
    with pytest.raises(DatasetError, match="2007_000002.*|empty label set"):
        VOCDataset(voc_root, "train")
    ds = VOCDataset(voc_root, "train", require_labels=False)  # allowed for inference-only lists
    assert ds[1]["cls_label"].sum() == 0


def test_corrupt_jpeg_fails_at_getitem_naming_path(voc_root: Path):
    bad = voc_root / "JPEGImages" / "2007_000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    ds = VOCDataset(voc_root, "train")  # construction does not decode images
    assert ds[0]["image"].shape[0] == 3
    with pytest.raises(ImageDecodeError) as e:
        ds[1]
    assert str(bad) in str(e.value)


def test_bad_mask_values_rejected(voc_root: Path):
    _save_mask(voc_root / "SegmentationClassAug" / "2007_000001.png", np.full((60, 80), 30, np.uint8))
    ds = VOCDataset(voc_root, "train")
    with pytest.raises(DatasetError, match="2007_000001.png"):
        ds[0]


# ------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------

def test_coco_layout_and_mask_derived_labels(coco_root: Path):
    ds = COCODataset(coco_root, "train", transform=TrainTransform(), rng_seed=0)
    assert ds.num_classes == 81 and ds.class_names == list(COCO_CLASSES)
    assert ds.samples[0].mask.name == "000000000009.png"  # prefix stripped (spec §11.2 item 22)
    it = ds[1]
    assert it["name"] == "COCO_train2014_000000000025"
    assert it["image"].shape == (3, 320, 320)
    assert torch.nonzero(it["cls_label"]).flatten().tolist() == [0, 45]  # v−1, ascending
    assert labels_from_mask(np.array([[0, 255, 3, 1]]), 5).tolist() == [1, 0, 1, 0, 0]


def test_coco_background_only_mask_is_empty_label(coco_root: Path):
    _save_mask(coco_root / "SegmentationClass" / "train" / "000000000009.png", np.zeros((50, 70), np.uint8))
    ds = COCODataset(coco_root, "train")
    with pytest.raises(DatasetError, match="empty label set"):
        ds[0]


# ------------------------------------------------------------------------------------------
# custom folders
# ------------------------------------------------------------------------------------------

def test_custom_csv_list_format(custom_root: Path):
    (custom_root / "labels.csv").write_text("image,labels\na.jpg,cat;dog\nsub/b.png,big truck|cat\n"
                                            "sub\\deeper\\c.webp,dog\n")
    with pytest.warns(UserWarning, match="1 image"):
        ds = CustomFolderDataset(custom_root, class_names=custom_root / "classes.txt")
    assert ds.class_names == ["cat", "dog", "big truck"] and ds.num_classes == 4
    assert ds.num_unlabelled == 1
    assert ds.names == ["a", "sub/b", "sub/deeper/c"]
    assert ds[0]["cls_label"].tolist() == [1, 1, 0]
    assert ds[1]["cls_label"].tolist() == [1, 0, 1]
    it = ds[2]
    assert it["image"].shape == (3, 20, 20) and not it["has_mask"] and (it["mask"] == 255).all()


def test_custom_csv_columns_json_and_masks(custom_root: Path):
    (custom_root / "cols.csv").write_text("image,cat,dog\na.jpg,1,0\nsub/b.png,0,1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CustomFolderDataset(custom_root, custom_root / "cols.csv")  # classes from the header
    assert ds.class_names == ["cat", "dog"] and ds[1]["cls_label"].tolist() == [0, 1]
    masks = custom_root / "masks"
    _save_mask(masks / "sub" / "b.png", np.full((35, 45), 2, np.uint8))
    (custom_root / "l.json").write_text(json.dumps({"sub/b.png": ["dog"], "a.jpg": ["cat"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CustomFolderDataset(custom_root, custom_root / "l.json", ["cat", "dog", "big truck"], masks=masks,
                                 transform=TrainTransform(crop_size=64), rng_seed=3)
    assert ds.num_unlabelled == 2  # masks folder inside root is not scanned as images
    it = ds[0]
    assert it["has_mask"] and set(it["mask"].unique().tolist()) <= {2, 255} and it["image"].shape == (3, 64, 64)
    assert not ds[1]["has_mask"]


def test_custom_unknown_class_is_reported(custom_root: Path):
    (custom_root / "labels.json").write_text(json.dumps({"a.jpg": ["cat"], "sub/b.png": ["dgo"]}))
    with pytest.raises(DatasetError) as e:
        CustomFolderDataset(custom_root, class_names=["cat", "dog"])
    assert "sub/b.png" in str(e.value) and "'dgo'" in str(e.value) and "dog" in str(e.value)
    (custom_root / "cols.csv").write_text("image,cat,horse\na.jpg,1,0\n")
    with pytest.raises(DatasetError, match="horse"):
        CustomFolderDataset(custom_root, custom_root / "cols.csv", ["cat", "dog"])


def test_custom_missing_and_empty_and_traversal(custom_root: Path):
    (custom_root / "labels.csv").write_text("image,labels\na.jpg,cat\nnot/here.jpg,dog\n")
    with pytest.raises(DatasetError, match="not/here.jpg"):
        CustomFolderDataset(custom_root, class_names=["cat", "dog"])
    (custom_root / "labels.csv").write_text("image,labels\na.jpg,\n")
    with pytest.raises(DatasetError, match="empty label set"):
        CustomFolderDataset(custom_root, class_names=["cat", "dog"])
    (custom_root / "labels.csv").write_text("image,labels\n../outside.jpg,cat\n")
    with pytest.raises(DatasetError, match="relative"):
        CustomFolderDataset(custom_root, class_names=["cat", "dog"])


def test_class_names_loading(tmp_path: Path):
    assert load_class_names(["background", "a", "b"]) == ["a", "b"]
    (tmp_path / "c.json").write_text(json.dumps(["x", "y"]))
    assert load_class_names(tmp_path / "c.json") == ["x", "y"]
    with pytest.raises(DatasetError, match="duplicate"):
        load_class_names(["a", "a"])
    with pytest.raises(DatasetError):
        build_dataset("nope", tmp_path, None)
