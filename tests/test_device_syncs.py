"""The training step avoids operations that make the host wait for a GPU.

On a GPU the training step is bound by the host issuing kernels; every operation whose result
the host must read (``.item()``, ``nonzero``, boolean-mask indexing, ``if tensor.any()``) or a
copy from ordinary host memory stalls it until the device has caught up. These ops are visible
on the CPU too, so the count is checked here.
"""
from __future__ import annotations

import collections

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from weclip_infer import build_model
from weclip_infer.cam import box_mask, box_masks_batch
from weclip_infer.losses import affinity_labels
from weclip_infer.tensor_ops import to_device
from weclip_infer.testing import tiny_config

_WAITS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::masked_select", "aten::_unique2",
          "aten::unique_dim", "aten::unique_consecutive"}


class _CountWaits(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _WAITS:
            self.counts[name] += 1
        if name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None):
            self.counts[name + " (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_waiting_ops_beyond_the_class_list():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    x = torch.randn(4, 3, 64, 64)
    cls = torch.zeros(4, model.num_classes - 1)
    cls[0, 0] = cls[1, 1] = cls[1, 2] = cls[2, 0] = cls[3, 2] = 1
    model(x, cls, use_rfm=True)["loss"].backward()  # first call: one-off start-up checks
    with _CountWaits() as mode:
        model(x, cls, use_rfm=True)["loss"].backward()
    counts = dict(mode.counts)
    # the class list is read once per batch on the host (one copy, then nonzero per row on the CPU)
    assert counts.pop("aten::nonzero", 0) <= 4
    assert counts == {}, counts


def test_box_masks_batch_equals_box_mask_per_cam():
    g = torch.Generator().manual_seed(3)
    cams = [torch.rand(k, 12, 16, generator=g) for k in (2, 0, 3)]
    out = box_masks_batch(cams, 0.4)
    assert [o.shape for o in out] == [c.shape for c in cams]
    for c, o in zip(cams, out):
        for k in range(c.shape[0]):
            np.testing.assert_array_equal(o[k].numpy(), box_mask(c[k], 0.4))
    assert box_masks_batch([], 0.4) == []


def test_affinity_labels_marks_ignored_pixels_without_boolean_indexing():
    pseudo = torch.tensor([[[0, 1, 255, 1], [1, 1, 0, 0]]])  # 1×2×4, patch grid 2×4
    lab = affinity_labels(pseudo, (2, 4), radius=1)
    y = pseudo.flatten(1)[0]
    for i in range(8):
        for j in range(8):
            far = max(abs(i // 4 - j // 4), abs(i % 4 - j % 4)) > 1
            want = 255 if far or y[i] == 255 or y[j] == 255 else int(y[i] == y[j])
            assert int(lab[0, i, j]) == want, (i, j)


def test_to_device_on_cpu_is_a_plain_move():
    t = torch.arange(3)
    assert to_device(t, "cpu") is t
