"""One device rule for every entry point."""
from __future__ import annotations

import pytest
import torch

from weclip_infer import model as model_module
from weclip_infer.device import select_device


def test_auto_and_explicit(monkeypatch):
    assert model_module.select_device is select_device  # the model module re-exports the owner
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device(None) == torch.device("cpu")
    assert select_device("AUTO") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert select_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert select_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit index wins
    assert select_device("cpu", local_rank=3) == torch.device("cpu")
