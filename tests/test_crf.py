"""DenseCRF post-processing: the pydensecrf reference and the torch backend."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from weclip_infer import crf
from weclip_infer.crf import CRFUnavailableError, crf_available, dense_crf

needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf not installed (pip install 'weclip-infer[crf]')")
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba not installed (pip install 'weclip-infer[crf]')")


@pytest.fixture
def torch_construction(monkeypatch):
    """Lattices built with torch operations on CPU too (as on a GPU), not with the compiled loops."""
    from weclip_infer.crf import permutohedral as P

    monkeypatch.setattr(P, "_compiled_construction", lambda: None)


def _two_region_problem(seed: int = 0, h: int = 40, w: int = 56):
    """Image with a flat red left part and a flat blue right part (wavy boundary), true labels,
    and noisy probabilities whose argmax is wrong on roughly a third of the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    boundary = w // 2 + (3 * np.sin(yy / 5.0)).astype(int)
    labels = (xx >= boundary).astype(np.int64)
    image = np.zeros((h, w, 3), np.uint8)
    image[labels == 0] = (200, 30, 30)
    image[labels == 1] = (30, 30, 200)
    logits = np.stack([(labels == 0), (labels == 1)]).astype(np.float32) * 0.8
    logits += rng.normal(0.0, 1.0, size=logits.shape).astype(np.float32)
    probs = np.exp(logits - logits.max(0, keepdims=True))
    probs /= probs.sum(0, keepdims=True)
    return image, probs.astype(np.float32), labels


@needs_crf
def test_crf_cleans_noisy_probabilities():
    image, probs, labels = _two_region_problem()
    acc_in = (probs.argmax(0) == labels).mean()
    q = dense_crf(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    acc_out = (q.argmax(0) == labels).mean()
    assert acc_in < 0.85  # the input really is noisy
    assert acc_out > acc_in
    assert acc_out > 0.97


@needs_crf
def test_crf_accepts_torch_and_non_square_sizes():
    torch = pytest.importorskip("torch")
    image, probs, _ = _two_region_problem(h=17, w=31)
    q_np = dense_crf(image, probs, iters=3)
    q_t = dense_crf(torch.from_numpy(image), torch.from_numpy(probs), iters=3)
    assert q_np.shape == (2, 17, 31)
    np.testing.assert_allclose(q_np, q_t, atol=1e-6)
    # a non-contiguous (transposed) image view works too
    img_t = np.ascontiguousarray(image.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not img_t.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(dense_crf(img_t, probs, iters=3), q_np, atol=1e-6)


@needs_crf
def test_zero_iterations_returns_input_distribution():
    image, probs, _ = _two_region_problem(h=8, w=8)
    q = dense_crf(image, probs, iters=0)
    np.testing.assert_allclose(q, np.clip(probs, 1e-5, 1) / np.clip(probs, 1e-5, 1).sum(0), atol=1e-5)


def test_shape_validation():
    image, probs, _ = _two_region_problem(h=10, w=12)
    with pytest.raises(ValueError, match="10×12.*12×10|upsample"):
        dense_crf(image, probs.transpose(0, 2, 1).copy())
    with pytest.raises(ValueError, match="H×W×3"):
        dense_crf(image[..., 0], probs)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="C×H×W"):
        dense_crf(image, probs[0])
    with pytest.raises(ValueError, match="NaN"):
        bad = probs.copy()
        bad[0, 0, 0] = np.nan
        dense_crf(image, bad)
    with pytest.raises(ValueError, match="iters"):
        dense_crf(image, probs, iters=-1)


def test_missing_pydensecrf_raises_with_install_hint(monkeypatch):
    # None in sys.modules makes `import pydensecrf...` raise ImportError, as if not installed
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", None)
    assert crf_available() is False
    image, probs, _ = _two_region_problem(h=6, w=6)
    with pytest.raises(CRFUnavailableError) as ei:
        dense_crf(image, probs)
    msg = str(ei.value)
    assert 'pip install "weclip-infer[crf]"' in msg and "pydensecrf2==1.1" in msg
    assert isinstance(ei.value, ImportError) and isinstance(ei.value, RuntimeError)
    assert crf.INSTALL_HINT in msg


# ---- the torch backend -----------------------------------------------------------------------------

def _textured_problem(seed: int = 1, h: int = 30, w: int = 44, C: int = 3):
    """A colourful random image (many lattice vertices) and smooth random class probabilities."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    coarse = torch.from_numpy(rng.normal(0.0, 2.0, (1, C, h // 8 + 2, w // 8 + 2)).astype(np.float32))
    logits = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return image, torch.softmax(logits, 0).numpy()


@needs_crf
@pytest.mark.parametrize("problem", ["two_regions", "textured"])
def test_torch_backend_matches_pydensecrf(problem):
    image, probs = (_two_region_problem()[:2] if problem == "two_regions" else _textured_problem())
    ref = dense_crf(image, probs)
    got = crf.refine(image, probs, backend="torch")
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got.argmax(0) == ref.argmax(0)).mean() > 0.999


def test_torch_backend_cleans_noisy_probabilities():
    image, probs, labels = _two_region_problem()
    q = crf.refine(image, probs, backend="torch")
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    acc_in, acc_out = (probs.argmax(0) == labels).mean(), (q.argmax(0) == labels).mean()
    assert acc_in < 0.85 and acc_out > 0.97


def test_torch_backend_batch_equals_one_by_one():
    torch = pytest.importorskip("torch")
    from weclip_infer.crf.permutohedral import dense_crf_torch

    a_img, a_p, _ = _two_region_problem(seed=2, h=20, w=26)
    b_img, b_p = _textured_problem(seed=3, h=17, w=31, C=2)
    batch = dense_crf_torch([torch.from_numpy(a_img), torch.from_numpy(b_img)],
                            [torch.from_numpy(a_p), torch.from_numpy(b_p)])
    for img, p, q in ((a_img, a_p, batch[0]), (b_img, b_p, batch[1])):
        single = dense_crf_torch([torch.from_numpy(img)], [torch.from_numpy(p)])[0]
        torch.testing.assert_close(q, single, atol=1e-5, rtol=1e-5)


def test_torch_backend_zero_iterations_and_validation():
    torch = pytest.importorskip("torch")
    from weclip_infer.crf.permutohedral import dense_crf_torch

    image, probs, _ = _two_region_problem(h=8, w=8)
    q = dense_crf_torch([torch.from_numpy(image)], [torch.from_numpy(probs)], iters=0)[0].numpy()
    clipped = np.clip(probs, 1e-5, 1)
    np.testing.assert_allclose(q, clipped / clipped.sum(0), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf_torch([torch.from_numpy(image).float()], [torch.from_numpy(probs)])
    with pytest.raises(ValueError, match="upsample"):
        dense_crf_torch([torch.from_numpy(image)], [torch.from_numpy(probs[:, :4])])
    with pytest.raises(ValueError, match="NaN"):
        bad = probs.copy()
        bad[0, 0, 0] = np.nan
        dense_crf_torch([torch.from_numpy(image)], [torch.from_numpy(bad)])
    with pytest.raises(ValueError, match="iters"):
        dense_crf_torch([torch.from_numpy(image)], [torch.from_numpy(probs)], iters=-2)


def test_backend_choice(monkeypatch):
    assert crf.resolve_crf_backend("auto") == "torch"
    assert crf.resolve_crf_backend("torch") == "torch"
    with pytest.raises(ValueError, match="crf_backend"):
        crf.resolve_crf_backend("fast")
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.utils", None)
    with pytest.raises(CRFUnavailableError, match="pip install"):
        crf.resolve_crf_backend("densecrf")
    image, probs, _ = _two_region_problem(h=6, w=6)
    labels, seconds = crf.crf_labels(image, probs)  # auto: works without pydensecrf
    assert labels.shape == (6, 6) and seconds >= 0


# ---- the torch backend's label map and its layouts --------------------------------------------------

def test_torch_label_map_is_the_argmax_of_the_marginals():
    torch = pytest.importorskip("torch")
    from weclip_infer.crf.permutohedral import dense_crf_labels_torch, dense_crf_torch

    a_img, a_p, _ = _two_region_problem(seed=2, h=20, w=26)
    b_img, b_p = _textured_problem(seed=3, h=17, w=31, C=2)
    ims, ps = [torch.from_numpy(a_img), torch.from_numpy(b_img)], [torch.from_numpy(a_p), torch.from_numpy(b_p)]
    for q, lab in zip(dense_crf_torch(ims, ps), dense_crf_labels_torch(ims, ps)):
        assert lab.dtype == torch.int64 and lab.shape == q.shape[1:]
        assert torch.equal(lab, q.argmax(0))
    image, probs = _textured_problem(C=4)
    lab = crf.refine_labels(image, probs)  # numpy in: a CPU tensor out
    assert isinstance(lab, torch.Tensor) and lab.device.type == "cpu"
    np.testing.assert_array_equal(lab.numpy(), crf.refine(image, probs, backend="torch").argmax(0))
    labels, _ = crf.crf_labels(image, probs, "torch")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, lab.numpy())


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(),
                                                                                     reason="no CUDA"))])
def test_refine_labels_stay_on_the_device_of_the_probabilities(device):
    torch = pytest.importorskip("torch")
    image, probs = _textured_problem(seed=4, h=24, w=30, C=3)
    p = torch.from_numpy(probs).to(device)
    lab = crf.refine_labels(image, p)  # the numpy image follows the probabilities
    assert lab.device == p.device and lab.dtype == torch.int64 and tuple(lab.shape) == (24, 30)
    np.testing.assert_array_equal(lab.cpu().numpy(), crf.refine(image, p, backend="torch").argmax(0))


def test_torch_crf_layouts_give_identical_numbers():
    """CPU splats each lattice on its own, a GPU runs both lattices' splats as one call and ranks
    coordinates in one go: the same bags in the same order, so the same bits."""
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    image, probs = _textured_problem(seed=5, h=40, w=52, C=5)
    lat_g = P._grid_lattice([(40, 52)], 3.0, torch.device("cpu"))
    lat_b = P.PermutohedralLattice(P.pixel_features(40, 52, 64, torch.from_numpy(image), 5))
    parts = [(lat, lat.norm(), None) for lat in (lat_g, lat_b)]
    plan = P._FilterPlan(parts)
    assert len(plan.splat) == 2
    merged = P._FilterPlan(parts)
    merged.splat = [P._FilterPlan._merged(P._FilterPlan._stages(parts))]
    x = torch.from_numpy(probs).reshape(5, -1).t().contiguous()
    assert torch.equal(plan.apply(x, x), merged.apply(x, x))
    diff = torch.randn(500, 6)
    diff[::3, 4] = diff[::3, 1]  # ties: the earlier coordinate ranks first
    diff[::5, 0] = diff[::5, 5]
    assert torch.equal(P.PermutohedralLattice._ranks_by_pairs(diff), P.PermutohedralLattice._ranks_at_once(diff))


def test_torch_mean_field_never_waits_for_the_device(torch_construction):
    """Only the input check, the appearance lattice's sizes (torch construction, as on a GPU) and
    (on CPU) the softmax's message bound read device values; the mean-field steps add no
    operation that waits (nonzero, item and the like)."""
    torch = pytest.importorskip("torch")
    from weclip_infer.crf.permutohedral import dense_crf_torch

    image, probs = _textured_problem(seed=6, h=20, w=24, C=3)
    args = ([torch.from_numpy(image)], [torch.from_numpy(probs)])
    dense_crf_torch(*args)  # the smoothness lattice of this size is cached from here on
    waits = ("aten::nonzero", "aten::_local_scalar_dense", "aten::unique", "aten::_unique2", "aten::masked_select")

    def count(iters):
        with torch.profiler.profile() as prof:
            dense_crf_torch(*args, iters=iters)
        return sum(e.count for e in prof.key_averages() if e.key in waits)

    assert count(1) == count(8) <= 4


def _lattice_pair(monkeypatch, features, group=None):
    """The same lattice built by the compiled loops (checked to have run) and by torch operations."""
    from weclip_infer.crf import lattice_numba
    from weclip_infer.crf import permutohedral as P

    calls = []
    real = lattice_numba.build_lattice
    monkeypatch.setattr(lattice_numba, "build_lattice", lambda *a, **k: calls.append(1) or real(*a, **k))
    compiled = P.PermutohedralLattice(features, group)
    assert calls, "the compiled construction did not run"
    monkeypatch.setattr(P, "_compiled_construction", lambda: None)
    return compiled, P.PermutohedralLattice(features, group)


@needs_numba
@pytest.mark.parametrize("case", ["appearance", "batch", "smoothness"])
def test_compiled_lattice_is_the_torch_lattice(case, monkeypatch):
    """Same vertices (up to numbering), same barycentric weights bit for bit, same blur
    neighbours, and the same filtered values to float32 rounding."""
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    group = None
    if case == "smoothness":
        feats = P.pixel_features(37, 53, 3.0)
    else:
        image, _ = _textured_problem(seed=7, h=36, w=50)
        feats = P.pixel_features(36, 50, 64, torch.from_numpy(image), 5)
        if case == "batch":
            image2, _ = _two_region_problem(seed=8, h=21, w=30)[:2]
            feats = torch.cat([feats, P.pixel_features(21, 30, 64, torch.from_numpy(image2), 5)])
            group = torch.cat([torch.zeros(36 * 50, dtype=torch.int64), torch.ones(21 * 30, dtype=torch.int64)])
    a, b = _lattice_pair(monkeypatch, feats, group)
    assert a.M == b.M and torch.equal(a._slice_w, b._slice_w)
    # vertex numbering: one permutation maps every simplex corner of a onto the same corner of b
    ca, cb = a._slice_idx.long().reshape(-1), b._slice_idx.long().reshape(-1)
    perm = torch.full((a.M,), -1, dtype=torch.int64)
    perm[ca] = cb
    assert torch.equal(perm[ca], cb) and torch.equal(perm.sort().values, torch.arange(a.M))
    for (ia, oa, wa), (ib, ob, wb) in zip(a._blur, b._blur):  # the same bags along every axis
        def bags(idx, off, w, relabel):
            ends = torch.cat([off[1:].long(), torch.tensor([idx.numel()])])
            return sorted((int(relabel[v]), tuple(sorted((int(relabel[int(i)]), float(x))
                                                          for i, x in zip(idx[s:e], w[s:e]))))
                          for v, (s, e) in enumerate(zip(off.long().tolist(), ends.tolist())))
        assert bags(ia, oa, wa, perm) == bags(ib, ob, wb, torch.arange(b.M))
    values = torch.rand(feats.shape[0], 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.filter(values), b.filter(values), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(a.norm(), b.norm(), rtol=2e-6, atol=0.0)


@needs_numba
def test_compiled_and_torch_construction_give_the_same_crf(monkeypatch):
    torch = pytest.importorskip("torch")
    from weclip_infer.crf.permutohedral import dense_crf_torch

    image, probs = _textured_problem(seed=9, h=45, w=61, C=4)
    args = ([torch.from_numpy(image)], [torch.from_numpy(probs)])
    compiled = dense_crf_torch(*args)[0]
    from weclip_infer.crf import permutohedral as P

    monkeypatch.setattr(P, "_compiled_construction", lambda: None)
    monkeypatch.setattr(P, "_CACHE", type(P._CACHE)())  # the smoothness lattice rebuilt as well
    plain = dense_crf_torch(*args)[0]
    torch.testing.assert_close(compiled, plain, atol=1e-4, rtol=0.0)  # 10 steps amplify rounding
    assert (compiled.argmax(0) == plain.argmax(0)).float().mean() > 0.999


def test_compiled_construction_can_be_switched_off(monkeypatch):
    from weclip_infer.crf import permutohedral as P

    monkeypatch.setenv("WECLIP_CRF_COMPILED", "0")
    monkeypatch.setattr(P, "_compiled_checked", False)
    monkeypatch.setattr(P, "_compiled", None)
    assert P._compiled_construction() is None


@pytest.mark.parametrize("construction", ["default", "torch"])
def test_lattice_overflow_and_unresolvable_features_are_errors(construction, monkeypatch):
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    if construction == "torch":
        monkeypatch.setattr(P, "_compiled_construction", lambda: None)
    v = 2e3  # a coordinate range whose vertex codes need more than 64 bits
    with pytest.raises(OverflowError, match="64-bit vertex codes"):
        P.PermutohedralLattice(torch.tensor([[0.0] * 5, [v, -v, v, -v, v], [-v, v, -v, v, -v]]))
    with pytest.raises(ValueError, match="too large for float32"):  # and no index out of range first
        P.PermutohedralLattice(torch.tensor([[0.0] * 5, [3e8] * 5]))
    with pytest.raises(ValueError, match="N×d"):
        P.PermutohedralLattice(torch.zeros(0, 5))


@pytest.mark.parametrize("construction", ["default", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_are_one_clear_error(construction, bad, monkeypatch):
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    if construction == "torch":
        monkeypatch.setattr(P, "_compiled_construction", lambda: None)
    with pytest.raises(ValueError, match="NaN or inf"):
        P.PermutohedralLattice(torch.tensor([[0.0, 1.0], [bad, 2.0], [0.5, 0.5]]))


@needs_numba
def test_prepare_torch_crf_compiles_on_cpu_only():
    assert crf.prepare_torch_crf("cpu") is True
    assert crf.prepare_torch_crf("cuda") is False  # nothing to compile there (no CUDA needed to say so)


def test_unusable_numba_falls_back_to_the_torch_construction(monkeypatch, caplog):
    """numba installed but unusable (e.g. no writable cache location: it raises at import) is
    logged, and lattices are built with torch operations."""
    pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    def broken():
        raise RuntimeError("cannot cache function '_embed': no locator available")

    monkeypatch.delenv("WECLIP_CRF_COMPILED", raising=False)
    monkeypatch.setattr(P, "_load_compiled", broken)
    monkeypatch.setattr(P, "_compiled_checked", False)
    monkeypatch.setattr(P, "_compiled", None)
    with caplog.at_level("WARNING", logger=P.__name__):
        assert P._compiled_construction() is None
    assert "no locator available" in caplog.text
    assert P.PermutohedralLattice(P.pixel_features(6, 7, 3.0)).M > 0


@needs_numba
def test_a_failing_compiled_construction_falls_back_once(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import lattice_numba
    from weclip_infer.crf import permutohedral as P

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM could not compile")

    monkeypatch.setattr(P, "_compiled", P._compiled_construction())
    monkeypatch.setattr(lattice_numba, "build_lattice", broken)
    feats = P.pixel_features(6, 7, 3.0)
    with caplog.at_level("WARNING", logger=P.__name__):
        lat = P.PermutohedralLattice(feats)
    assert "LLVM could not compile" in caplog.text and P._compiled is None
    monkeypatch.setattr(P, "_compiled_construction", lambda: None)
    assert torch.equal(lat._slice_w, P.PermutohedralLattice(feats)._slice_w)


def test_blur_bags_of_fixed_size_give_the_same_bits(torch_construction, monkeypatch):
    """GPUs keep three entries per blur bag (an absent neighbour adds 0 with weight 0) to avoid a
    wait for the device; CPU lists only the neighbours that exist. Same filtered values, bit for bit."""
    torch = pytest.importorskip("torch")
    from weclip_infer.crf import permutohedral as P

    image, probs = _textured_problem(seed=10, h=33, w=47, C=3)
    feats = P.pixel_features(33, 47, 64, torch.from_numpy(image), 5)
    compact = P.PermutohedralLattice(feats)
    monkeypatch.setattr(P, "_COMPACT_BLUR_DEVICES", ())
    fixed = P.PermutohedralLattice(feats)
    assert all(i.numel() == 3 * fixed.M for i, _, _ in fixed._blur)
    assert sum(i.numel() for i, _, _ in compact._blur) < sum(i.numel() for i, _, _ in fixed._blur)
    x = torch.from_numpy(probs).reshape(3, -1).t().contiguous()
    assert torch.equal(compact.filter(x), fixed.filter(x))
