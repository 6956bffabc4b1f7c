"""Evaluation during and after training.

* :func:`evaluate_segmentation`: mIoU of the segmentation branch on the val split through the
  inference predictor (``weclip_infer.predictor.Segmenter``): single scale without flip during
  training, the model's inference scales + flip at the end. Images are sharded
  over processes and the confusion matrices summed.
* :class:`PseudoLabelMeter`: confusion matrix of the online pseudo labels against the GT of the
  training crops (where the crop has a GT mask), so the effect of the refinement/RFM is visible
  while training. Accumulated on the device with ``bincount``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from weclip_infer.metrics import ConfusionMatrix, format_iou_table

from .distributed import all_reduce_sum

__all__ = ["PseudoLabelMeter", "evaluate_segmentation", "make_segmenter"]


class PseudoLabelMeter:
    """``hist[gt, pred]`` (C×C int64 on ``device``) of pseudo labels vs crop GT; 255 ignored."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = int(num_classes)
        self.hist = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pseudo: torch.Tensor, mask: torch.Tensor, has_mask: torch.Tensor) -> None:
        sel = has_mask.to(pseudo.device).bool()
        if not bool(sel.any()):
            return
        gt = mask.to(pseudo.device)[sel].reshape(-1).long()
        pr = pseudo[sel].reshape(-1).long()
        C = self.num_classes
        valid = (gt >= 0) & (gt < C) & (pr >= 0) & (pr < C)
        idx = gt[valid] * C + pr[valid]
        self.hist += torch.bincount(idx, minlength=C * C).reshape(C, C)

    def reset(self) -> None:
        self.hist.zero_()

    def load(self, hist: Optional[torch.Tensor]) -> None:
        if hist is not None and tuple(hist.shape) == tuple(self.hist.shape):
            self.hist.copy_(hist.to(self.hist.device))

    def compute(self, reduce: bool = False) -> dict:
        h = self.hist.clone()
        if reduce:
            all_reduce_sum(h)
        return ConfusionMatrix.from_hist(h.cpu().numpy()).compute()

    def miou(self) -> float:
        """mIoU of this process's counts (NaN before any labelled pixel)."""
        return float(self.compute()["miou"])


def make_segmenter(model, multiscale: bool):
    """The inference predictor: single scale, no flip (``multiscale=False``) or the model's
    ``inference`` scales and flip. Never CRF during training evaluation."""
    from weclip_infer.predictor import Segmenter

    inf = model.cfg.inference
    if multiscale:
        return Segmenter(model, scales=tuple(float(s) for s in inf.scales), flip=bool(inf.flip),
                         long_side=int(inf.long_side), crf=False)
    return Segmenter(model, scales=(1.0,), flip=False, long_side=int(inf.long_side), crf=False)


@torch.no_grad()
def evaluate_segmentation(model, dataset, class_names: Sequence[str], *, multiscale: bool = False,
                          max_images: int = 0, rank: int = 0, world_size: int = 1,
                          predictions: Optional[dict] = None, keep: Sequence[int] = ()) -> dict:
    """mIoU of ``model`` on ``dataset`` (a ``SegmentationDataset``; its images are read from disk
    and fed to the predictor at original size; the GT comes from ``dataset.load_mask``).

    Images without GT are skipped. ``class_names``: C names including background. Returns
    ``{miou, iou, pixel_acc, mean_class_acc, num_images, table, multiscale}`` (summed over
    processes). ``predictions``/``keep``: store ``labels`` of the dataset indices in ``keep``
    (this process only) into the ``predictions`` dict, e.g. for the panels.
    """
    n = len(dataset) if max_images <= 0 else min(len(dataset), int(max_images))
    C = len(class_names)
    cm = ConfusionMatrix(C)
    count = 0
    keep_set = {int(k) for k in keep}
    was_training = model.training  # the Segmenter puts the model in eval mode
    try:
        seg = make_segmenter(model, multiscale)
        model.eval()
        for i in range(rank, n, world_size):
            sample = dataset.samples[i]
            if sample.mask is None:
                continue
            res = seg.predict(str(sample.image))
            labels = np.asarray(res.labels)
            gt = dataset.load_mask(sample, labels.shape[:2])
            cm.update(gt, labels)
            count += 1
            if predictions is not None and i in keep_set:
                predictions[i] = labels
    finally:
        model.train(was_training)
    dev = next(model.decoder.parameters()).device
    hist = torch.as_tensor(cm.hist, dtype=torch.int64, device=dev)
    cnt = torch.tensor([count], dtype=torch.int64, device=dev)
    all_reduce_sum(hist)
    all_reduce_sum(cnt)
    res = ConfusionMatrix.from_hist(hist.cpu().numpy()).compute()
    out = {k: res[k] for k in ("miou", "iou", "pixel_acc", "mean_class_acc", "present")}
    out["num_images"] = int(cnt.item())
    out["multiscale"] = bool(multiscale)
    out["table"] = format_iou_table(res, list(class_names))
    return out
