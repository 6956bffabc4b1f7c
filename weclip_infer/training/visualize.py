"""Pictures of a training run: curves of loss / mIoU and per-image panels.

* :func:`plot_curves` writes ``loss.png`` and ``miou.png``. With matplotlib installed it is used;
  otherwise a small built-in PIL plotter draws the same curves (plain, but no extra dependency).
* :func:`make_panels` renders, for a few val images, one row each of
  image | GT | initial CAM | refined CAM | online pseudo label | prediction, using
  ``WeCLIP.intermediates`` (the exact training-forward intermediates) and the predictor's labels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from weclip_infer.data.transforms import denormalize
from weclip_infer.io_utils import atomic_path
from weclip_infer.palette import colorize

__all__ = ["plot_curves", "make_panels", "heatmap", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _moving_average(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < 3 or k <= 1:
        return y
    k = min(k, len(y))
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


# ------------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------------

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _pil_plot(series: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str, path: Path,
              size=(720, 420)) -> None:
    """Minimal line plot with PIL (fallback when matplotlib is missing)."""
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = np.concatenate([s[1] for s in series if len(s[1])]) if any(len(s[1]) for s in series) else np.array([0.0, 1.0])
    ys = np.concatenate([s[2] for s in series if len(s[2])]) if any(len(s[2]) for s in series) else np.array([0.0, 1.0])
    ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.array([0.0, 1.0])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 <= x0:
        x1 = x0 + 1.0
    if y1 <= y0:
        y1 = y0 + (abs(y0) * 0.1 or 1.0)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def tx(x):
        return left + (x - x0) / (x1 - x0) * (W - left - right)

    def ty(y):
        return H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.line([left - 4, ty(yv), left, ty(yv)], fill=(0, 0, 0))
        d.text((4, ty(yv) - 6), f"{yv:.4g}", fill=(0, 0, 0))
        xv = x0 + (x1 - x0) * i / 4
        d.line([tx(xv), H - bottom, tx(xv), H - bottom + 4], fill=(0, 0, 0))
        d.text((tx(xv) - 12, H - bottom + 6), f"{xv:.0f}", fill=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    d.text((W // 2 - 20, H - 16), xlabel, fill=(0, 0, 0))
    for k, (name, x, y) in enumerate(series):
        col = _COLORS[k % len(_COLORS)]
        pts = [(tx(a), ty(b)) for a, b in zip(x, y) if math.isfinite(b)]
        if len(pts) == 1:
            px, py = pts[0]
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        elif pts:
            d.line(pts, fill=col, width=2)
        d.text((W - right - 170, top + 6 + 14 * k), f"- {name}", fill=col)
    _save_png(img, path)


def _mpl_plot(series, title, xlabel, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
    for name, x, y in series:
        if len(x) == 1:
            ax.plot(x, y, "o", label=name)
        else:
            ax.plot(x, y, label=name, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_curves(out_dir: Path, log_rows: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]],
                use_matplotlib: Optional[bool] = None) -> list[Path]:
    """``loss.png`` (total / seg / aff loss, moving averages) and ``miou.png`` (val mIoU and
    the pseudo-label mIoU on training crops) under ``out_dir``. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = _mpl_plot if (have_matplotlib() if use_matplotlib is None else use_matplotlib) else _pil_plot
    written = []
    if log_rows:
        it = np.array([float(r["iter"]) for r in log_rows])
        k = max(1, len(it) // 50)
        series = []
        for key in ("loss", "loss_seg", "loss_aff"):
            y = np.array([float(r[key]) for r in log_rows])
            series.append((key + (f" (avg {k})" if k > 1 else ""), it, _moving_average(y, k)))
        plot(series, "training loss", "iteration", out_dir / "loss.png")
        written.append(out_dir / "loss.png")
    series = []
    ev = [e for e in evals if e.get("miou") is not None]
    if ev:
        series.append(("val mIoU", np.array([float(e["iter"]) for e in ev]),
                       np.array([100 * float(e["miou"]) for e in ev])))
    pl = [e for e in evals if e.get("pseudo_miou") is not None]
    if pl:
        series.append(("pseudo-label mIoU (train crops)", np.array([float(e["iter"]) for e in pl]),
                       np.array([100 * float(e["pseudo_miou"]) for e in pl])))
    if series:
        plot(series, "mIoU (%)", "iteration", out_dir / "miou.png")
        written.append(out_dir / "miou.png")
    return written


# ------------------------------------------------------------------------------------------------
# panels
# ------------------------------------------------------------------------------------------------

def heatmap(cam: np.ndarray) -> np.ndarray:
    """``H×W`` values in [0, 1] → ``H×W×3`` uint8 (jet-like colours)."""
    x = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def _cam_image(cams: torch.Tensor, size: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """Max over classes of a ``K×h×w`` CAM stack (each min-max normalised), upsampled, as a heat
    map over the image."""
    if cams is None or cams.numel() == 0:
        m = np.zeros(size, np.float32)
    else:
        c = cams.detach().float().cpu()
        lo = c.flatten(1).min(1).values[:, None, None]
        hi = c.flatten(1).max(1).values[:, None, None]
        c = (c - lo) / (hi - lo).clamp_min(1e-12)  # per-class min-max, as the model does
        up = F.interpolate(c[None], size=size, mode="bilinear", align_corners=False)[0]
        m = up.max(0).values.numpy()
    return (0.45 * base.astype(np.float32) + 0.55 * heatmap(m).astype(np.float32)).astype(np.uint8)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if labels.shape == size:
        return labels
    img = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(img.resize((size[1], size[0]), resample=Image.Resampling.NEAREST)).astype(np.int64)


def _panel_input(image: torch.Tensor, mask: Optional[torch.Tensor], long_side: int, patch: int):
    """Resize a normalised ``3×H×W`` image so its long side is about ``long_side`` and both
    sides are multiples of the patch size (for ``intermediates``)."""
    _, h, w = image.shape
    s = long_side / max(h, w)
    nh, nw = max(patch, int(round(h * s / patch)) * patch), max(patch, int(round(w * s / patch)) * patch)
    img = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    m = None
    if mask is not None:
        m = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    return img, m


_COLUMNS = ["image", "GT", "initial CAM", "refined CAM", "pseudo label", "prediction"]


@torch.no_grad()
def _intermediates(model, x: torch.Tensor, cls: torch.Tensor) -> dict:
    with torch.enable_grad():  # GradCAM needs autograd inside intermediates
        return model.intermediates(x, cls)


def make_panels(model, dataset, indices: Sequence[int], predictions: Mapping[int, np.ndarray], path: Path,
                long_side: int = 320, normalize: str = "imagenet", title: str = "") -> Optional[Path]:
    """Write a PNG with one row per val image (see module docstring). Images whose intermediates fail
    (e.g. no foreground class) show only what is available. Returns the path, or None."""
    if not indices:
        return None
    patch = int(model.backbone.patch_size)
    dev = next(model.decoder.parameters()).device
    rows = []
    was_training = model.training
    model.eval()
    try:
        for i in indices:
            item = dataset[int(i)]
            img, mask = _panel_input(item["image"], item["mask"] if item.get("has_mask") else None, long_side, patch)
            H, W = img.shape[-2:]
            base = denormalize(img, normalize)
            blank = np.full((H, W, 3), 255, np.uint8)
            tiles = [base, colorize(mask.numpy()) if mask is not None else blank]
            cls = item["cls_label"][None].to(dev)
            if bool(cls.any()) and not model.cfg.decoder.fully_supervised:
                tr = _intermediates(model, img[None].to(dev), cls)
                tiles.append(_cam_image(tr["cam_init"][0], (H, W), base))
                tiles.append(_cam_image(tr["cam_refined"][0], (H, W), base))
                tiles.append(colorize(tr["pseudo_label"][0].cpu().numpy()))
            else:
                tiles += [blank, blank, blank]
            pred = predictions.get(int(i))
            tiles.append(colorize(_resize_labels(np.asarray(pred), (H, W))) if pred is not None else blank)
            rows.append([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles])
    finally:
        model.train(was_training)
    ch = max(t.shape[0] for r in rows for t in r)
    cw = max(t.shape[1] for r in rows for t in r)
    strips = [np.concatenate([np.pad(t, ((0, ch - t.shape[0]), (0, cw - t.shape[1]), (0, 0)), constant_values=255)
                              for t in r], 1) for r in rows]
    width = strips[0].shape[1]
    header = 16 + (16 if title else 0)
    grid = np.concatenate([np.full((header, width, 3), 255, np.uint8)] + strips, 0)
    im = Image.fromarray(grid)
    d = ImageDraw.Draw(im)
    tile_w = strips[0].shape[1] // len(_COLUMNS)
    y = 2
    if title:
        d.text((4, y), title, fill=(0, 0, 0))
        y += 16
    for k, name in enumerate(_COLUMNS):
        d.text((k * tile_w + 4, y), name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(im, path)
    return path
