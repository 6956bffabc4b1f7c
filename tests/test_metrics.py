"""Confusion matrix / mIoU (spec §8.3) and the ``weclip-eval`` CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip_infer.evaluate import (
    VOC_SUBMISSION_SUBDIR,
    EvaluationError,
    MissingPredictionsError,
    evaluate_folders,
    evaluate_predictions,
    main,
)
from weclip_infer.metrics import ConfusionMatrix, format_iou_table, to_jsonable
from weclip_infer.palette import voc_palette

# 3 classes, 2×3, one ignored pixel. (gt, pred) pairs, row-major:
#   (0,0) (0,1) (1,1)
#   (1,2) (2,2) (255,0)  <- ignored
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
# hist[gt, pred] written out by hand from the pairs above
HIST = np.array([[1, 1, 0],
                 [0, 1, 1],
                 [0, 0, 1]])
# rows 2,2,1; cols 1,2,2; diag 1,1,1 → IoU = 1/(2+1-1), 1/(2+2-1), 1/(1+2-1)
IOU = [1 / 2, 1 / 3, 1 / 2]
MIOU = (1 / 2 + 1 / 3 + 1 / 2) / 3  # = 4/9
PIXEL_ACC = 3 / 5
MEAN_CLASS_ACC = (1 / 2 + 1 / 2 + 1 / 1) / 3  # = 2/3


def test_hand_computed_example():
    cm = ConfusionMatrix(3)
    cm.update(GT, PRED)
    np.testing.assert_array_equal(cm.hist, HIST)
    r = cm.compute()
    np.testing.assert_array_equal(r["hist"], HIST)
    assert r["iou"] == pytest.approx(IOU)
    assert r["miou"] == pytest.approx(4 / 9) == pytest.approx(MIOU)
    assert r["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert r["mean_class_acc"] == pytest.approx(MEAN_CLASS_ACC)
    assert r["num_pixels"] == 5
    assert r["present"] == [True, True, True]


def test_torch_input_and_batch_shape():
    torch = pytest.importorskip("torch")
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(GT.astype(np.int64))[None], torch.from_numpy(PRED.astype(np.int64))[None])
    np.testing.assert_array_equal(cm.hist, HIST)


def test_absent_classes_are_nan_and_dropped_from_mean():
    # 4 classes; class 2 appears nowhere, class 3 only in the prediction (a false positive)
    gt = np.array([[0, 1]])
    pred = np.array([[3, 1]])
    r = ConfusionMatrix(4).update(gt, pred).compute()
    assert r["iou"][0] == 0.0 and r["iou"][1] == 1.0
    assert math.isnan(r["iou"][2]) and math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx(0.5)  # mean over classes 0 and 1 only
    assert math.isnan(r["class_acc"][3])
    assert r["present"] == [True, True, False, False]


def test_empty_matrix_gives_nan_without_warnings(recwarn):
    r = ConfusionMatrix(3).update(np.full((2, 2), 255), np.zeros((2, 2), int)).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"]) and math.isnan(r["mean_class_acc"])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_gt_out_of_range_ignored_and_custom_ignore_index():
    gt = np.array([0, 1, -1, 7, 255, 2])
    pred = np.array([0, 1, 2, 2, 2, 2])
    r = ConfusionMatrix(3).update(gt, pred).compute()
    assert r["num_pixels"] == 3 and r["miou"] == 1.0
    # an in-range ignore index is skipped too
    r = ConfusionMatrix(3, ignore_index=0).update(gt, pred).compute()
    assert r["num_pixels"] == 2 and r["present"] == [False, True, True]


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(4, int), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(2, int), np.array([0, -1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(TypeError):
        cm.update(np.zeros(2, float), np.zeros(2, int))
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    assert cm.hist.sum() == 0  # failed updates changed nothing


def test_merge_equals_update_on_concatenation():
    rng = np.random.default_rng(0)
    C = 5
    gts = [rng.integers(0, C, size=(7, 9)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    preds = [rng.integers(0, C, size=(7, 9)) for _ in range(4)]
    a, b = ConfusionMatrix(C), ConfusionMatrix(C)
    for g, p in zip(gts[:2], preds[:2]):
        a.update(g, p)
    for g, p in zip(gts[2:], preds[2:]):
        b.update(g, p)
    a.merge(b)
    whole = ConfusionMatrix(C).update(np.concatenate(gts), np.concatenate(preds))
    np.testing.assert_array_equal(a.hist, whole.hist)
    assert a.compute()["miou"] == pytest.approx(whole.compute()["miou"])
    np.testing.assert_array_equal(ConfusionMatrix.from_hist(whole.hist).hist, whole.hist)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(C + 1))


def test_format_table_and_jsonable():
    r = ConfusionMatrix(4).update(np.array([0, 1]), np.array([0, 1])).compute()
    table = format_iou_table(r, ["bg", "a|b", "c", "d"])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| id | class | IoU (%) |")
    assert "| 0 | bg | 100.00 |" in table
    assert "a\\|b" in table  # pipes escaped
    assert "| 2 | c | n/a |" in table
    assert "**mIoU** | **100.00**" in table
    with pytest.raises(ValueError):
        format_iou_table(r, ["too", "few"])
    j = to_jsonable(r)
    json.dumps(j, allow_nan=False)
    assert j["iou"][2] is None and j["hist"][0][0] == 1


def test_evaluate_predictions_hook():
    r = evaluate_predictions(iter([(GT, PRED), (GT, PRED)]), 3)
    assert r["num_images"] == 2
    np.testing.assert_array_equal(r["hist"], 2 * HIST)
    assert r["miou"] == pytest.approx(MIOU)


# ---------------------------------------------------------------------------- CLI on PNG folders
def _save(path: Path, arr: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), mode=mode)
    if mode == "P":
        img.putpalette(voc_palette().reshape(-1).tolist())
    img.save(path)


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    # image "a": the hand example; image "sub/b": all correct for classes 0 and 2
    _save(gt / "a.png", GT, "P")           # palette GT with a 255 pixel
    _save(pred / "a.png", PRED, "L")        # grey-mode prediction
    b_gt = np.array([[0, 2], [2, 2]])
    _save(gt / "sub" / "b.png", b_gt, "P")
    _save(pred / "sub" / "b.png", b_gt, "P")
    return gt, pred


def _expected_two_images():
    cm = ConfusionMatrix(3).update(GT, PRED).update(np.array([[0, 2], [2, 2]]), np.array([[0, 2], [2, 2]]))
    return cm.compute()


def test_cli_evaluates_folders_and_writes_json(folders, tmp_path, capsys):
    gt, pred = folders
    out = tmp_path / "res" / "scores.json"
    rc = main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    exp = _expected_two_images()
    assert f"mIoU {100 * exp['miou']:.2f}" in printed
    assert "| 0 | class_0 |" in printed
    data = json.loads(out.read_text())
    assert data["miou"] == pytest.approx(exp["miou"])
    assert data["num_images"] == 2 and data["num_missing"] == 0
    assert data["hist"] == exp["hist"].tolist()
    # palette GT must be read as raw indices: 255 ignored, not colour-converted
    assert data["num_pixels"] == 5 + 4


def test_cli_class_names_and_list(folders, tmp_path, capsys):
    gt, pred = folders
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))  # foreground only → background prepended
    lst = tmp_path / "list.txt"
    lst.write_text("# only the hand example\na\n")
    out = tmp_path / "s.json"
    rc = main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3", "--class-names", str(names),
               "--list", str(lst), "--json", str(out)])
    assert rc == 0
    assert "| 2 | dog |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["miou"] == pytest.approx(MIOU)
    assert data["iou_per_class"]["background"] == pytest.approx(0.5)


def test_cli_missing_prediction_nonzero_exit(folders, capsys):
    gt, pred = folders
    (pred / "sub" / "b.png").unlink()
    rc = main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "1 prediction(s) missing" in cap.err and "sub/b" in cap.err
    assert f"mIoU {100 * MIOU:.2f}" in cap.out  # the rest is still evaluated
    assert main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3", "--allow-missing"]) == 0
    with pytest.raises(MissingPredictionsError) as ei:
        evaluate_folders(pred, gt, 3)
    assert ei.value.missing == ["sub/b"]


def test_cli_size_mismatch_names_file(folders, capsys):
    gt, pred = folders
    _save(pred / "sub" / "b.png", np.zeros((3, 2)), "L")
    rc = main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "b.png" in err and "2x3" in err and "2x2" in err
    with pytest.raises(EvaluationError, match="b.png"):
        evaluate_folders(pred, gt, 3)


def test_cli_rejects_rgb_and_out_of_range(folders, capsys):
    gt, pred = folders
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(pred / "a.png")
    assert main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]) == 2
    assert "RGB" in capsys.readouterr().err
    _save(pred / "a.png", np.full((2, 3), 5), "L")
    assert main(["--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_voc_submission_layout(folders, tmp_path, capsys):
    _, pred = folders
    out = tmp_path / "sub_out"
    rc = main(["--pred", str(pred), "--voc-submission", str(out)])
    assert rc == 0
    dest = out / "results" / "VOC2012" / "Segmentation" / "comp5_test_cls"
    assert dest == out / VOC_SUBMISSION_SUBDIR
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == ["a.png", "sub/b.png"]
    with Image.open(dest / "a.png") as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.asarray(img), PRED)
        pal = np.array(img.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal[:21], voc_palette()[:21])


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "weclip_infer.evaluate", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--voc-submission" in r.stdout and "--model" in r.stdout


def test_class_names_with_background_contract(tmp_path):
    from weclip_infer.evaluate import load_class_names_with_background

    f = tmp_path / "c.txt"
    f.write_text("background\ncat\ndog\n")
    assert load_class_names_with_background(f, 3) == ["background", "cat", "dog"]
    f.write_text("cat\ndog\n")
    assert load_class_names_with_background(f, 3) == ["background", "cat", "dog"]
    f.write_text("void\ncat\ndog\n")  # a full list keeps its own background name
    assert load_class_names_with_background(f, 3) == ["void", "cat", "dog"]
    f.write_text("cat\ndog\n")
    with pytest.raises(EvaluationError, match="2 class names for --num-classes 4"):
        load_class_names_with_background(f, 4)
    f.write_text("cat\ncat\n")
    with pytest.raises(EvaluationError, match="duplicate"):
        load_class_names_with_background(f, 3)
