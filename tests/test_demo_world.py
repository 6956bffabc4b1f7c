"""Tests for the procedural demo world (weclip_infer.demo.world / make_world)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from weclip_infer.demo import world as W
from weclip_infer.demo.make_world import main as make_world_main
from weclip_infer.demo.shapes import _BODY_DARK, _BODY_LIGHT

CFG = W.WorldConfig(size=96)  # small images keep the tests fast; geometry is relative to size


def test_class_tables():
    assert len(W.CLASS_NAMES) >= 6
    assert len(W.CLASS_PROMPTS) == len(W.CLASS_NAMES) == len(W.CLASS_COLORS)
    assert len(set(W.CLASS_NAMES)) == len(W.CLASS_NAMES)
    assert len(set(W.CLASS_PROMPTS)) == len(W.CLASS_PROMPTS)
    assert 4 <= len(W.BACKGROUND_NAMES) <= 5
    # no prompt is contained in another one (captions are checked by substring)
    names = W.CLASS_PROMPTS + W.BACKGROUND_NAMES
    for a in names:
        for b in names:
            assert a == b or a not in b


def test_determinism_and_independence():
    a = W.generate_sample(7, 5, CFG)
    b = W.generate_sample(7, 5, CFG)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.classes == b.classes and a.background == b.background and a.captions == b.captions
    # independent of which other samples were generated (via iter_samples, in another order)
    c = list(W.iter_samples(7, 3, CFG, stop=6))[2]
    assert c.index == 5
    np.testing.assert_array_equal(a.image, c.image)
    np.testing.assert_array_equal(a.mask, c.mask)
    d = W.generate_sample(7, 6, CFG)
    assert not np.array_equal(a.image, d.image)
    e = W.generate_sample(8, 5, CFG)
    assert not np.array_equal(a.image, e.image)


def test_masks_exact_and_classes():
    n_multi = 0
    seen = set()
    for i in range(40):
        s = W.generate_sample(1, i, CFG)
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (96, 96) and s.mask.dtype == np.uint8
        assert 255 not in s.mask
        assert s.mask.max() <= CFG.n_classes
        uniq = sorted(int(v) - 1 for v in np.unique(s.mask) if v > 0)
        assert s.classes == uniq
        assert 1 <= len(s.classes) <= CFG.max_objects
        assert 0 <= s.background < len(W.BACKGROUND_NAMES)
        # mask == class of the visible instance, pixel by pixel
        lut = np.zeros(256, np.uint8)
        for k, o in enumerate(s.objects):
            lut[k + 1] = o.class_id + 1
        np.testing.assert_array_equal(s.mask, lut[s.instances])
        # every pixel whose centre is inside the topmost object covering it carries its label:
        # re-rasterise each object and check the visible part
        covered = np.zeros_like(s.mask, dtype=bool)
        for k in range(len(s.objects) - 1, -1, -1):
            inst = s.instances == k + 1
            assert inst.any(), "every placed object keeps visible pixels"
            assert not (inst & covered).any()
            covered |= inst
        assert (covered == (s.mask > 0)).all()
        n_multi += len(s.objects) > 1
        seen.update(s.classes)
    assert 5 <= n_multi <= 35  # about half multi-object
    assert len(seen) >= 6


def test_every_object_pixel_labelled():
    """Re-rasterise every object: its pixels not covered by a later object are exactly its visible
    instance region and carry its class label (exact masks, no ignore band)."""
    cfg = W.WorldConfig(size=128)
    for i in range(15):
        s = W.generate_sample(2, i, cfg)
        above = np.zeros((128, 128), dtype=bool)
        for k in range(len(s.objects) - 1, -1, -1):
            o = s.objects[k]
            full = W.rasterize_object(o, 128)
            vis = full & ~above
            np.testing.assert_array_equal(vis, s.instances == k + 1)
            assert (s.mask[vis] == o.class_id + 1).all()
            assert vis.sum() >= cfg.min_visible_frac * full.sum()
            above |= full
        assert ((s.mask > 0) == above).all()


def test_captions_mention_exactly_present_classes():
    rng = np.random.default_rng(0)
    for i in range(25):
        s = W.generate_sample(3, i, CFG)
        present = {W.CLASS_PROMPTS[c] for c in s.classes}
        forms = W.caption_forms(s.classes, s.background)
        assert set(forms) == {"objects_background", "objects", "origami", "background"}
        for form, caps in forms.items():
            assert caps
            for cap in caps:
                mentioned = {p for p in W.CLASS_PROMPTS if p in cap}
                if form == "background":
                    assert mentioned == set() and W.BACKGROUND_NAMES[s.background] in cap
                else:
                    assert mentioned == present, (cap, present)
                if form == "origami":
                    assert cap.startswith("a clean origami ")
                if form == "objects_background":
                    assert cap.endswith(f" on {W.BACKGROUND_NAMES[s.background]}.")
        allc = W.all_captions(s)
        assert allc == W.all_captions(s.classes, s.background)
        assert len(allc) == len(set(allc))
        for cap in s.captions + [W.caption_for(s, rng) for _ in range(5)]:
            assert cap in allc
    single = W.all_captions([0], 0)
    assert "a clean origami red circle." in single
    assert "grass." in single and "a photo of grass." in single
    assert "a red circle and a blue square on grass." in W.all_captions([1, 0], 0)
    assert "an orange ring." in W.all_captions([4], 2)


def test_config_validation():
    with pytest.raises(ValueError):
        W.WorldConfig(n_classes=0)
    with pytest.raises(ValueError):
        W.WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        W.WorldConfig(min_scale=0.5, max_scale=0.2)
    s = W.generate_sample(0, 1, W.WorldConfig(size=64, n_classes=6))
    assert max(s.classes) < 6


def _read_mask(p):
    with Image.open(p) as im:
        assert im.mode == "P"
        return np.asarray(im)


def test_write_voc_layout(tmp_path):
    out = tmp_path / "world"
    meta = W.write_voc_layout(out, n_train=8, n_val=3, seed=5, cfg=CFG, n_test=1)
    assert meta["status"] == "complete"
    for f in ["train.txt", "val.txt", "test.txt", "cls_labels_onehot.npy", "cls_labels.json", "captions.jsonl",
              "classes.json", "meta.json"]:
        assert (out / f).is_file(), f
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    test = (out / "test.txt").read_text().split()
    assert len(train) == 8 and len(val) == 3 and len(test) == 1
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert train[0] == "demo_train_000001" and val[0] == "demo_val_000001"
    assert all(re.fullmatch(r"demo_(train|val|test)_\d{6}", n) for n in train + val + test)

    onehot = np.load(out / "cls_labels_onehot.npy", allow_pickle=True).item()
    plain = json.loads((out / "cls_labels.json").read_text())
    caps = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["class_names"] == W.CLASS_NAMES[: CFG.n_classes]
    assert classes["class_prompts"] == W.CLASS_PROMPTS[: CFG.n_classes]
    assert classes["bg_prompts"] == W.BACKGROUND_NAMES
    assert sorted(onehot) == sorted(train + val + test) == sorted(plain) == sorted(r["name"] for r in caps)
    by_name = {r["name"]: r for r in caps}
    for split, names, off in (("train", train, 0), ("val", val, W.SPLIT_OFFSETS["val"])):
        for k, name in enumerate(names, start=1):
            s = W.generate_sample(5, off + k, CFG)
            m = _read_mask(out / "SegmentationClassAug" / f"{name}.png")
            np.testing.assert_array_equal(m, s.mask)
            with Image.open(out / "JPEGImages" / f"{name}.jpg") as im:
                img = np.asarray(im.convert("RGB"))
            assert img.shape == s.image.shape
            assert np.abs(img.astype(int) - s.image.astype(int)).mean() < 4  # JPEG q95
            v = onehot[name]
            assert v.dtype == np.float32 and v.shape == (CFG.n_classes,)
            assert list(np.flatnonzero(v)) == s.classes
            assert plain[name] == [int(x) for x in v]
            assert by_name[name]["classes"] == s.classes and by_name[name]["captions"] == s.captions
            assert by_name[name]["split"] == split

    # re-running (resume) and overwriting both give byte-identical masks
    masks = {p.name: p.read_bytes() for p in (out / "SegmentationClassAug").iterdir()}
    W.write_voc_layout(out, n_train=8, n_val=3, seed=5, cfg=CFG, n_test=1)
    W.write_voc_layout(out, n_train=8, n_val=3, seed=5, cfg=CFG, n_test=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in (out / "SegmentationClassAug").iterdir()} == masks
    assert not [p for p in out.rglob("*.tmp")]
    # a folder made with other settings is refused
    with pytest.raises(ValueError):
        W.write_voc_layout(out, n_train=8, n_val=3, seed=6, cfg=CFG)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = make_world_main(["--out", str(out), "--n-train", "2", "--n-val", "1", "--seed", "1", "--size", "64",
                          "--quiet"])
    assert rc == 0
    assert (out / "train.txt").read_text().split() == ["demo_train_000001", "demo_train_000002"]
    assert not (out / "test.txt").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["size"] == 64 and meta["seed"] == 1
    with Image.open(out / "JPEGImages" / "demo_val_000001.jpg") as im:
        assert im.size == (64, 64)


def test_badge_style_layout_matches_flat_and_colours_only_the_badge():
    """``object_style="badge"``: same layout, masks and captions as the flat world; the class colour
    is confined to the badge disk inside each object and the rest of the object is the shared body."""
    flat_cfg = W.WorldConfig(size=128)
    badge_cfg = W.WorldConfig(size=128, object_style="badge")
    n_checked = 0
    for i in range(12):
        f = W.generate_sample(3, i, flat_cfg)
        b = W.generate_sample(3, i, badge_cfg)
        # layout draws come before the badge draws, so masks, classes and captions coincide
        np.testing.assert_array_equal(f.mask, b.mask)
        assert f.classes == b.classes and f.captions == b.captions
        assert not np.array_equal(f.image, b.image)
        for k, obj in enumerate(b.objects):
            visible = b.instances == k + 1
            bx, by = obj.params["badge_center"]
            rad = obj.params["badge_radius"]
            lo, hi = badge_cfg.badge_scale
            assert lo * obj.radius <= rad <= hi * obj.radius
            # the badge centre lies inside the object
            assert W.rasterize_object(obj, 128)[int(by), int(bx)]
            ys, xs = np.mgrid[0:128, 0:128]
            dist = np.hypot(xs - bx, ys - by)
            badge = visible & (dist <= rad - 1.5)
            body = visible & (dist >= rad + 1.5)
            # erode by a pixel so anti-aliased outlines don't count
            inner = (visible & np.roll(visible, 1, 0) & np.roll(visible, -1, 0)
                     & np.roll(visible, 1, 1) & np.roll(visible, -1, 1))
            badge, body = badge & inner, body & inner
            if badge.sum() < 10 or body.sum() < 10 or W.CLASS_NAMES[obj.class_id] == "diamond":
                continue  # black diamonds look like the dark stripes
            img = b.image.astype(np.float32)
            colour = np.asarray(obj.color, np.float32)
            badge_err = np.abs(img[badge] - colour).mean()
            body_err = np.abs(img[body] - colour).mean()
            assert badge_err < 40 < body_err, (i, k, badge_err, body_err)
            # the body is the same for every class: its pixels lie between the two stripe colours
            floor = np.minimum(_BODY_DARK, _BODY_LIGHT) * 0.75 - 8
            ceil = np.maximum(_BODY_DARK, _BODY_LIGHT) * 1.25 + 8
            assert ((img[body] >= floor) & (img[body] <= ceil)).all(axis=1).mean() > 0.97
            n_checked += 1
    assert n_checked >= 8
    with pytest.raises(ValueError, match="object_style"):
        W.WorldConfig(object_style="shiny")
    with pytest.raises(ValueError, match="badge_scale"):
        W.WorldConfig(badge_scale=(0.5, 0.2))


def test_make_world_cli_badge_style(tmp_path):
    out = tmp_path / "w"
    assert make_world_main(["--out", str(out), "--n-train", "3", "--n-val", "2", "--size", "64",
                            "--object-style", "badge", "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["object_style"] == "badge"
