"""Draw the WeCLIP pipeline figure used by the README (``docs/pipeline.png``).

Run: ``python docs/draw_pipeline.py``. Pillow only; the figure is drawn from this script, not copied.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 1500, 640
FROZEN = (214, 232, 250)  # frozen (no gradients): blue
TRAINED = (255, 226, 196)  # trained: orange
ONLINE = (222, 242, 214)  # no parameters: green
INK = (30, 30, 30)


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def box(d: ImageDraw.ImageDraw, xy, title: str, lines: list[str], fill, f_title, f_body) -> tuple:
    x0, y0, x1, y1 = xy
    d.rounded_rectangle(xy, radius=12, fill=fill, outline=INK, width=2)
    d.text(((x0 + x1) / 2, y0 + 10), title, font=f_title, fill=INK, anchor="ma")
    for i, ln in enumerate(lines):
        d.text(((x0 + x1) / 2, y0 + 42 + 22 * i), ln, font=f_body, fill=INK, anchor="ma")
    return xy


def arrow(d: ImageDraw.ImageDraw, p0, p1, label: str = "", font=None, dashed: bool = False) -> None:
    (x0, y0), (x1, y1) = p0, p1
    if dashed:
        n = 14
        for k in range(0, n, 2):
            a, b = k / n, (k + 1) / n
            d.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                   fill=INK, width=3)
    else:
        d.line([p0, p1], fill=INK, width=3)
    import math

    ang = math.atan2(y1 - y0, x1 - x0)
    s = 12
    pts = [(x1, y1), (x1 - s * math.cos(ang - 0.4), y1 - s * math.sin(ang - 0.4)),
           (x1 - s * math.cos(ang + 0.4), y1 - s * math.sin(ang + 0.4))]
    d.polygon(pts, fill=INK)
    if label:
        d.text(((x0 + x1) / 2 + 4, (y0 + y1) / 2 - 22), label, font=font, fill=INK, anchor="ma")


def draw(out: Path) -> Path:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    ft, fb, fs = _font(20), _font(16), _font(14)
    d.text((20, 14), "WeCLIP: single-stage weakly supervised segmentation on a frozen CLIP", font=_font(24), fill=INK)

    box(d, (20, 90, 180, 200), "image", ["+ image-level", "labels"], (245, 245, 245), ft, fb)
    box(d, (240, 70, 520, 220), "frozen CLIP image encoder",
                   ["ViT-B/16", "block features F_1..F_11", "attention maps A_l"], FROZEN, ft, fb)
    box(d, (240, 300, 520, 410), "frozen CLIP text encoder",
                   ["class + background prompts", "(cached, stored in checkpoints)"], FROZEN, ft, fb)
    box(d, (600, 300, 860, 410), "initial CAM",
                  ["GradCAM on block 12", "absent classes: zero"], ONLINE, ft, fb)
    box(d, (600, 60, 900, 230), "decoder (trained)",
                  ["per-block MLP → fuse", "3 transformer layers", "→ segmentation logits S",
                   "→ affinity A_f = σ(FᵀF)"], TRAINED, ft, fb)
    box(d, (960, 240, 1240, 420), "RFM",
                  ["candidate blocks G by A_f", "R = Ā ⊙ A_f, Sinkhorn,", "symmetrise, power α = 2,",
                   "box mask → refined CAM"], ONLINE, ft, fb)
    box(d, (1280, 260, 1480, 400), "PAR", ["pixel-adaptive", "refinement", "→ pseudo labels"], ONLINE, ft,
        fb)
    box(d, (1000, 60, 1480, 180), "loss",
                   ["balanced CE(S, pseudo labels)", "+ 0.1 × affinity loss(A_f, pseudo labels)"], (250, 250, 210),
                   ft, fb)

    arrow(d, (180, 145), (240, 145))
    arrow(d, (520, 120), (600, 120), "features", fs)
    arrow(d, (400, 220), (680, 300), "", fs)
    d.text((470, 262), "block-12 features", font=fs, fill=INK, anchor="ra")
    arrow(d, (520, 355), (600, 355), "text emb.", fs)
    arrow(d, (860, 355), (960, 345), "CAM", fs)
    arrow(d, (470, 220), (960, 285), "", fs, dashed=True)
    d.text((800, 272), "attention maps", font=fs, fill=INK, anchor="ma")
    arrow(d, (900, 200), (1010, 240), "A_f", fs)
    arrow(d, (1240, 330), (1280, 330))
    arrow(d, (1380, 260), (1380, 180), "", fs)
    arrow(d, (900, 110), (1000, 110), "S", fs)
    arrow(d, (110, 200), (110, 560))
    d.line([(110, 560), (1380, 560)], fill=INK, width=3)
    arrow(d, (1380, 560), (1380, 400))
    d.text((700, 566), "image for PAR (colour affinity)", font=fs, fill=INK, anchor="ma")

    # legend
    lx, ly = 20, 600
    for fill, name in ((FROZEN, "frozen, no gradients"), (TRAINED, "trained"), (ONLINE, "no parameters (online)")):
        d.rectangle((lx, ly, lx + 22, ly + 22), fill=fill, outline=INK)
        d.text((lx + 30, ly + 2), name, font=fs, fill=INK)
        lx += 250
    d.text((W - 20, 600), "inference: image → CLIP → decoder → S (multi-scale + flip, optional DenseCRF)",
           font=fs, fill=INK, anchor="ra")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


if __name__ == "__main__":
    print(draw(Path(__file__).with_name("pipeline.png")))
