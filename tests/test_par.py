"""PAR's implementations (sliced views on CPU; gathered neighbours or sparse products elsewhere) agree."""
from __future__ import annotations

import pytest
import torch

from weclip_infer import par

DIL = (1, 2, 4, 8, 12, 24)


def _sliced_reference(image: torch.Tensor, cams: torch.Tensor, num_iter: int) -> torch.Tensor:
    """The CPU form, in the inputs' dtype (pixel_adaptive_refine itself computes in float32)."""
    kern = par.par_kernel(image, DIL)
    x = cams
    for _ in range(num_iter):
        nbs = par._neighbours(x, DIL)
        acc = nbs[0] * kern[:, 0:1]
        for i in range(1, len(nbs)):
            acc = acc + nbs[i] * kern[:, i : i + 1]
        x = acc
    return x


@pytest.mark.parametrize("hw", [(40, 56), (5, 30), (1, 1)])
def test_gathered_par_equals_sliced_in_float64(hw):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    cams = torch.rand(2, 4, *hw, generator=g, dtype=torch.float64)
    index = par._neighbour_index(hw[0], hw[1], DIL, img.device)
    torch.testing.assert_close(par._par_kernel_gathered(img, index, DIL, 0.3, 0.01), par.par_kernel(img, DIL),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(par._refine_gathered(img, cams, DIL, 20, 0.3, 0.01), _sliced_reference(img, cams, 20),
                               rtol=1e-12, atol=1e-14)


def test_gathered_par_chunks_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 3, 20, 24, generator=g, dtype=torch.float64)
    cams = torch.rand(1, 3, 20, 24, generator=g, dtype=torch.float64)
    whole = par._refine_gathered(img, cams, DIL, 5, 0.3, 0.01)
    sizes = []
    real = par._gather_chunks

    def spy(x, index):
        for a, nb in real(x, index):
            sizes.append(nb.numel() * nb.element_size())
            yield a, nb

    monkeypatch.setattr(par, "PAR_GATHER_BYTES", 3 * 3 * 20 * 24 * 8)  # three neighbours per block
    monkeypatch.setattr(par, "_gather_chunks", spy)
    chunked = par._refine_gathered(img, cams, DIL, 5, 0.3, 0.01)
    assert sizes and max(sizes) <= par.PAR_GATHER_BYTES
    assert len(sizes) > 5 * 16  # 48 neighbours in blocks of 3, every iteration
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_float32_par_paths_agree_closely():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(1, 3, 48, 64, generator=g)
    cams = torch.rand(1, 3, 48, 64, generator=g)
    a = par.pixel_adaptive_refine(img, cams)  # CPU: the sliced form
    b = par._refine_gathered(img, cams, DIL, 20, 0.3, 0.01)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_neighbour_index_is_the_clamped_offset():
    idx = par._neighbour_index(3, 4, (1, 2), torch.device("cpu"))
    assert idx.shape == (16, 12)
    # pixel (0, 0), neighbour (-1, -1) at dilation 1 clamps to itself; (+1, +1) at dilation 2 is (2, 2)
    assert idx[0, 0] == 0
    assert idx[8 + 7, 0] == 2 * 4 + 2


@pytest.mark.parametrize("hw", [(40, 56), (5, 30), (1, 1)])
def test_sparse_par_equals_sliced_in_float64(hw):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    cams = torch.rand(2, 4, *hw, generator=g, dtype=torch.float64)
    torch.testing.assert_close(par._refine_sparse(img, cams, DIL, 20, 0.3, 0.01), _sliced_reference(img, cams, 20),
                               rtol=1e-12, atol=1e-14)


def test_sparse_par_structure_is_valid_csr():
    """Ascending, duplicate-free column indices in every row (what cuSPARSE assumes), each
    pointing at the padded copy of the clamped neighbour."""
    h, w, batch = 7, 9, 2
    crow, col, perm, pad_index = par._sparse_structure(h, w, DIL, batch, torch.device("cpu"))
    n = 8 * len(DIL)
    rows = col.view(batch * h * w, n).long()
    assert (rows[:, 1:] > rows[:, :-1]).all()
    assert torch.equal(crow.long(), torch.arange(0, batch * h * w * n + 1, n))
    # padded column → source pixel equals the clamped neighbour index, in the sorted order
    index = par._neighbour_index(h, w, DIL, torch.device("cpu"))  # n×hw
    src = pad_index.long()[rows].view(batch, h * w, n)
    assert torch.equal(src[0], index[perm].t())
    assert torch.equal(src[1], index[perm].t() + h * w)
    with torch.sparse.check_sparse_tensor_invariants():
        torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), size=(batch * h * w, pad_index.numel()))


def test_sparse_par_keeps_its_matrix_within_the_block_bound(monkeypatch):
    """Images whose matrices together exceed PAR_GATHER_BYTES are taken in groups; an image
    whose matrix alone exceeds it is refined by the gathered blocks."""
    g = torch.Generator().manual_seed(4)
    img = torch.randn(3, 3, 10, 12, generator=g, dtype=torch.float64)
    cams = torch.rand(3, 2, 10, 12, generator=g, dtype=torch.float64)
    whole = par._refine_sparse(img, cams, DIL, 4, 0.3, 0.01)
    groups, gathered = [], []
    real_structure, real_gathered = par._sparse_structure, par._refine_gathered
    monkeypatch.setattr(par, "_sparse_structure",
                        lambda h, w, d, b, dev: groups.append(b) or real_structure(h, w, d, b, dev))
    monkeypatch.setattr(par, "_refine_gathered", lambda *a: gathered.append(1) or real_gathered(*a))
    monkeypatch.setattr(par, "PAR_GATHER_BYTES", 2 * 8 * 48 * 10 * 12)  # two images' matrices
    torch.testing.assert_close(par._refine_sparse(img, cams, DIL, 4, 0.3, 0.01), whole, rtol=1e-12, atol=1e-14)
    assert groups == [2, 1] and not gathered
    monkeypatch.setattr(par, "PAR_GATHER_BYTES", 8 * 48 * 10 * 12 - 1)
    torch.testing.assert_close(par._refine_sparse(img, cams, DIL, 4, 0.3, 0.01), whole, rtol=1e-12, atol=1e-14)
    assert gathered == [1]


def test_unknown_off_cpu_form_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(par, "PAR_OFF_CPU_FORM", "dense")
    img, cams = torch.empty(1, 3, 8, 8, device="meta"), torch.empty(1, 2, 8, 8, device="meta")
    with pytest.raises(ValueError, match="PAR_OFF_CPU_FORM must be one of gathered, sparse, got 'dense'"):
        par.pixel_adaptive_refine(img, cams)
