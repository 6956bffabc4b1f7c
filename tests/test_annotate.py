"""Annotator: masks from tags, from free-text names and from zero-shot tags, on the tiny random
model and on the shipped demo model; the same labels as training's pseudo-label path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weclip_infer import Annotator, build_model
from weclip_infer.annotate import AnnotateLimits, AnnotationError
from weclip_infer.imageio import ImageDecodeError
from weclip_infer.testing import tiny_config

DEMO_MODEL = Path(__file__).resolve().parents[1] / "weclip_infer" / "assets" / "demo_model"


def _image(seed: int = 0, size=(64, 64)) -> np.ndarray:
    g = np.random.default_rng(seed)
    img = g.integers(0, 256, (*size, 3), dtype=np.uint8)
    img[size[0] // 4: size[0] // 2, size[1] // 4: size[1] // 2] = (220, 30, 30)
    return img


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_config(), device="cpu", keep_text_tower=True).eval()


@pytest.fixture(scope="module")
def demo():
    from weclip_infer import load_checkpoint

    return load_checkpoint(DEMO_MODEL, device="cpu").eval()


@pytest.fixture(scope="module")
def demo_images(demo):
    """Three demo-world val images with their masks and class names (generated, not read from disk)."""
    from weclip_infer.demo.world import SPLIT_OFFSETS, generate_sample

    out = []
    for k in (1, 2, 3):
        s = generate_sample(0, SPLIT_OFFSETS["val"] + k)
        out.append((s.image, s.mask, [demo.classes.names[i] for i in sorted(s.classes)]))
    return out


# ---- identity with training's pseudo-label path ------------------------------------------------
@pytest.mark.parametrize("refinement,use_rfm", [("rfm", True), ("static", False)])
def test_annotator_equals_training_pseudo_labels_tiny(tiny, refinement, use_rfm):
    img = _image(1)
    ann = Annotator(tiny, refinement=refinement, long_side=0)
    res = ann.annotate(img, ["red box", "blue box"])
    x = tiny.normalize(torch.from_numpy(img).permute(2, 0, 1)[None])
    cls = torch.tensor([[1.0, 0.0, 1.0]])
    rec = tiny.intermediates(x, cls, use_rfm=use_rfm)  # the training forward itself (eval: no dropout)
    np.testing.assert_array_equal(res.labels, rec["pseudo_label"][0].numpy())
    np.testing.assert_array_equal(res.labels, tiny.pseudo_labels(x, cls, use_rfm=use_rfm)[0].numpy())


def test_annotator_equals_training_pseudo_labels_demo(demo, demo_images):
    ann = Annotator(demo)  # auto: RFM with the trained decoder's affinity (the demo config enables RFM)
    for img, _, names in demo_images:
        res = ann.annotate(img, names)
        assert res.refinement == "rfm" and res.mode == "tags"
        x = demo.normalize(torch.from_numpy(img).permute(2, 0, 1)[None])
        cls = torch.zeros(1, demo.num_classes - 1)
        cls[0, [demo.classes.names.index(n) for n in names]] = 1
        np.testing.assert_array_equal(res.labels, demo.pseudo_labels(x, cls, use_rfm=True)[0].numpy())


# ---- modes ----------------------------------------------------------------------------------------
def test_tags_mode_tiny_only_given_classes(tiny):
    ann = Annotator(tiny, long_side=0)
    for names in (["green box"], ["red box", "blue box"], [1, 3]):
        res = ann.annotate(_image(2), names)
        assert res.mode == "tags" and res.labels.shape == (64, 64) and res.labels.dtype == np.int64
        given = {ann.class_names.index(n) if isinstance(n, str) else n for n in names}
        assert set(np.unique(res.labels).tolist()) <= {0} | given
        assert res.class_names == ["background", "red box", "green box", "blue box"]
        assert all(res.scores[i] == 0 for i in range(1, 4) if i not in given)


def test_open_vocabulary_tiny_names_not_in_class_list(tiny):
    ann = Annotator(tiny, long_side=0)
    names = ["a red kite", "purple umbrella"]
    res = ann.annotate(_image(3), names, keep_cams=True)
    assert res.mode == "open" and res.refinement == "static"
    assert res.class_names == ["background", *names] and res.classes == names
    assert set(np.unique(res.labels).tolist()) <= {0, 1, 2}
    assert res.cams.shape == (2, 64, 64) and float(res.cams.max()) <= 1.0 + 1e-6
    # embeddings are cached per name: a second call does not encode again
    cached = dict(ann.text._cache)
    ann.annotate(_image(3), names[::-1])
    assert all(ann.text._cache[n] is cached[n] for n in names)


def test_open_vocabulary_loads_dropped_text_tower(tiny):
    model = build_model(tiny_config(), device="cpu").eval()  # text tower dropped
    assert not model.backbone.has_text_tower()
    ann = Annotator(model, long_side=0)
    res = ann.annotate(_image(4), ["a red kite"])
    assert res.mode == "open" and set(np.unique(res.labels).tolist()) <= {0, 1}
    # the same embedding as the tower kept at build time (the same seeded weights)
    emb_kept = Annotator(tiny).text.embed(["a red kite"])
    torch.testing.assert_close(ann.text.embed(["a red kite"]), emb_kept, atol=1e-5, rtol=1e-5)


def test_auto_tags_tiny(tiny):
    ann = Annotator(tiny, long_side=0, tag_threshold=0.3)
    res = ann.annotate(_image(5), "auto")
    assert res.mode == "auto" and set(res.tag_scores) == {"red box", "green box", "blue box"}
    assert res.classes, "at least the best class is kept"
    kept = {n for n, s in res.tag_scores.items() if s >= 0.3} or {max(res.tag_scores, key=res.tag_scores.get)}
    assert set(res.classes) == kept
    allowed = {0} | {res.class_names.index(n) for n in res.classes}
    assert set(np.unique(res.labels).tolist()) <= allowed
    alone = ann.tag(_image(5))  # the scores alone, without the masks
    assert alone.keys() == res.tag_scores.keys()
    assert all(abs(alone[k] - res.tag_scores[k]) < 1e-4 for k in alone)


def test_multiscale_and_resize(tiny):
    ann = Annotator(tiny, long_side=96, scales=(1.0, 0.75))
    res = ann.annotate(_image(6, size=(80, 50)), ["red box"])
    assert res.labels.shape == (80, 50)  # labels at the image's own resolution
    assert set(np.unique(res.labels).tolist()) <= {0, 1}


# ---- the demo model ---------------------------------------------------------------------------------
def test_demo_tags_recover_objects(demo, demo_images):
    ann = Annotator(demo)
    for img, mask, names in demo_images:
        res = ann.annotate(img, names)
        ids = {demo.classes.names.index(n) + 1 for n in names}
        assert set(np.unique(res.labels).tolist()) <= {0} | ids
        assert float((res.labels == mask).mean()) > 0.9


def test_demo_absent_class_never_in_output(demo, demo_images):
    ann = Annotator(demo)
    img, mask, names = demo_images[0]
    absent = [n for n in demo.classes.names if n not in names][:2]
    res = ann.annotate(img, absent)  # wrong tags: only these may appear, never the true class
    true_ids = {demo.classes.names.index(n) + 1 for n in names}
    assert not (set(np.unique(res.labels).tolist()) & true_ids)


def test_demo_open_vocabulary_names(demo, demo_images):
    """Free-text names the class list does not contain (the demo CLIP's own words, re-phrased)."""
    ann = Annotator(demo)
    prompts = dict(zip(demo.classes.names, demo.cfg.text.class_prompts))
    for img, mask, names in demo_images:
        free = [prompts[n] for n in names]
        assert not set(free) & set(demo.classes.names)
        res = ann.annotate(img, free)
        assert res.mode == "open" and res.refinement == "static"
        lut = np.array([0] + [demo.classes.names.index(n) + 1 for n in names])
        assert float((lut[res.labels] == mask).mean()) > 0.9


def test_demo_auto_tags(demo, demo_images):
    ann = Annotator(demo)
    for img, mask, names in demo_images:
        res = ann.annotate(img, "auto")
        assert sorted(res.classes) == sorted(names)
        assert float((res.labels == mask).mean()) > 0.9


def test_demo_words_outside_vocabulary_are_refused(demo, demo_images):
    ann = Annotator(demo)
    with pytest.raises(AnnotationError, match="vocabulary"):
        ann.annotate(demo_images[0][0], ["xylophone zebra"])


# ---- limits and bad inputs -----------------------------------------------------------------------
def test_limits_and_bad_inputs(tiny):
    ann = Annotator(tiny, long_side=0, limits=AnnotateLimits(max_names=2, max_name_length=10, max_pixels=64 * 64))
    img = _image(7)
    cases = [
        ([], "empty"),
        (["a", "b", "c"], "at most 2"),
        (["x" * 11], "characters long"),
        ([""], "empty class name"),
        (["red box", "red box"], "duplicate"),
        ([0], "out of range"),
        ([4], "out of range"),
        ([1.5], "must be strings"),
        (["tab\x07"], "control characters"),
        ("everything", "'auto'"),
        (None, "list of class names"),
    ]
    for labels, msg in cases:
        with pytest.raises(AnnotationError, match=msg):
            ann.annotate(img, labels)
    with pytest.raises(AnnotationError, match="not in the model's classes"):
        ann.annotate(img, ["kite"], mode="tags")
    with pytest.raises(AnnotationError, match="mode must be"):
        ann.annotate(img, ["kite"], mode="decoder")
    with pytest.raises(AnnotationError, match="cannot be combined"):
        ann.annotate(img, "auto", mode="open")
    with pytest.raises(ImageDecodeError):
        ann.annotate(_image(7, size=(65, 64)), ["red box"])  # over max_pixels
    with pytest.raises(ImageDecodeError):
        ann.annotate(b"not an image", ["red box"])
    with pytest.raises(AnnotationError, match="too small"):
        ann.annotate(_image(8, size=(8, 40)), ["red box"])
    for bad in ({"refinement": "best"}, {"scales": [0.0]}, {"tag_threshold": 1.5}, {"long_side": -1}, {"crf": "yes"}):
        with pytest.raises(AnnotationError):
            Annotator(tiny, **bad)
    with pytest.raises(AnnotationError, match="limits.max_names"):
        AnnotateLimits(max_names=0)


def test_crf_option_keeps_only_given_classes(demo, demo_images):
    pytest.importorskip("pydensecrf")
    ann = Annotator(demo, crf=True)
    img, mask, names = demo_images[1]
    res = ann.annotate(img, names)
    ids = {demo.classes.names.index(n) + 1 for n in names}
    assert set(np.unique(res.labels).tolist()) <= {0} | ids and "crf" in res.timings
    assert float((res.labels == mask).mean()) > 0.9


# ---- the CLI ---------------------------------------------------------------------------------------
def _demo_folder(tmp_path: Path, demo, n: int = 4) -> tuple[Path, Path, dict]:
    """``imgs/`` with ``n`` demo-world val images (two in a sub-folder), a broken file and
    ``labels.csv``; returns (folder, label file, {name: (classes, mask)})."""
    from PIL import Image

    from weclip_infer.demo.world import SPLIT_OFFSETS, generate_sample

    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rows, truth = ["image,labels"], {}
    for k in range(1, n + 1):
        s = generate_sample(0, SPLIT_OFFSETS["val"] + k)
        rel = f"{'sub/' if k > n // 2 else ''}img{k}.png"
        Image.fromarray(s.image).save(src / rel)
        names = [demo.classes.names[i] for i in sorted(s.classes)]
        rows.append(f"{rel},{';'.join(names)}")
        truth[rel[:-4]] = (names, s.mask)
    (src / "broken.png").write_bytes(b"not an image")
    rows.append("broken.png,circle")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return src, labels, truth


def test_cli_masks_train_custom_without_conversion(tmp_path, demo):
    from PIL import Image

    from weclip_infer.annotate_cli import main
    from weclip_infer.data.label_files import load_cls_labels

    src, labels, truth = _demo_folder(tmp_path, demo)
    out = tmp_path / "masks"
    rc = main([str(src), "--out", str(out), "--labels", str(labels), "--workers", "0", "--quiet"])
    assert rc == 1  # the broken file failed, the rest are done
    assert (out / "classes.txt").read_text().split("\n")[:-1] == demo.classes.names
    for name, (names, mask) in truth.items():
        m = np.array(Image.open(out / "SegmentationClass" / f"{name}.png"))
        assert set(np.unique(m).tolist()) <= {0} | {demo.classes.names.index(c) + 1 for c in names}
        assert float((m == mask).mean()) > 0.9
    onehot = load_cls_labels(out / "cls_labels_onehot.npy")
    assert set(onehot) == set(truth)
    for name, (names, _) in truth.items():
        assert [demo.classes.names[i] for i in np.flatnonzero(onehot[name])] == names
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows == ["image,labels"] + [f"{n}.png,{';'.join(names)}" for n, (names, _) in sorted(truth.items())]
    # resume: nothing is redone
    before = {p: p.stat().st_mtime_ns for p in (out / "SegmentationClass").rglob("*.png")}
    assert main([str(src), "--out", str(out), "--labels", str(labels), "--workers", "0", "--quiet", "--resume"]) == 1
    assert before == {p: p.stat().st_mtime_ns for p in (out / "SegmentationClass").rglob("*.png")}

    # the outputs train --config custom as they are (fully supervised on the masks; a few iterations)
    from weclip_infer.train import main as train_main

    (src / "broken.png").unlink()  # not in labels.csv (it failed): the training set would warn about it

    run = tmp_path / "run"
    rc = train_main(["--config", "custom", f"data.root={src}", f"data.labels_file={out / 'labels.csv'}",
                     f"data.class_names_file={out / 'classes.txt'}", f"data.masks_dir={out / 'SegmentationClass'}",
                     "data.val_split=", "model.backbone.clip_weights=demo", "model.decoder.dim=32",
                     "model.decoder.num_heads=4", "model.decoder.fully_supervised=true", "train.max_iters=2",
                     "train.batch_size=2", "train.device=cpu", "data.workers=0", "data.crop_size=96",
                     f"train.out_dir={run}", "train.eval_every=0", "train.checkpoint_every=2"])
    assert rc == 0
    assert (run / "checkpoints" / "iter_2" / "model.safetensors").is_file()


def test_cli_open_vocabulary_classes_and_auto_tags(tmp_path, demo):
    from PIL import Image

    from weclip_infer.annotate_cli import main

    src, _, truth = _demo_folder(tmp_path, demo, n=2)
    (src / "broken.png").unlink()
    prompts = dict(zip(demo.classes.names, demo.cfg.text.class_prompts))
    classes = tmp_path / "classes.txt"
    free = [prompts[n] for n in demo.classes.names]
    classes.write_text("\n".join(free) + "\n")
    labels = tmp_path / "free.csv"
    labels.write_text("image,labels\n" + "".join(f"{n}.png,{';'.join(prompts[c] for c in names)}\n"
                                                 for n, (names, _) in truth.items()))
    out = tmp_path / "open"
    assert main([str(src), "--out", str(out), "--labels", str(labels), "--classes", str(classes),
                 "--workers", "0", "--quiet"]) == 0
    for name, (_, mask) in truth.items():
        m = np.array(Image.open(out / "SegmentationClass" / f"{name}.png"))
        assert float((m == mask).mean()) > 0.9  # ids follow classes.txt (same order as the model's here)
    out2 = tmp_path / "auto"
    assert main([str(src), "--out", str(out2), "--auto-tags", "--workers", "0", "--quiet"]) == 0
    text = (out2 / "labels.csv").read_text()
    for name, (names, _) in truth.items():
        assert f"{name}.png,{';'.join(names)}" in text


def test_cli_usage_errors(tmp_path, demo, capsys):
    from weclip_infer.annotate_cli import main

    src, labels, _ = _demo_folder(tmp_path, demo, n=2)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,labels\nimg1.png,kite\n")
    assert main([str(src), "--out", str(tmp_path / "o"), "--labels", str(bad), "--quiet"]) == 2
    assert "kite" in capsys.readouterr().err
    assert main([str(src), "--out", str(src / "inside"), "--labels", str(labels), "--quiet"]) == 2
    classes = tmp_path / "c.txt"
    classes.write_text("circle\n")
    assert main([str(src), "--out", str(tmp_path / "o2"), "--auto-tags", "--classes", str(classes), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("weclip-annotate: error:") and "Traceback" not in err
