"""Generating demo-world samples: :func:`generate_sample` and :func:`iter_samples` (the
determinism rules are in :mod:`weclip_infer.demo.world`)."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np

from .captions import _random_caption
from .shapes import _SHAPES, _badge_body, _local_sd, _object_color, _shape_params
from .textures import _background
from .world_config import BACKGROUND_NAMES, CLASS_NAMES, PlacedObject, Sample, WorldConfig

__all__ = ["generate_sample", "iter_samples"]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def generate_sample(seed: int, index: int, cfg: Optional[WorldConfig] = None) -> Sample:
    """Generate sample ``index`` of the world ``seed`` (deterministic; independent of other samples)."""
    cfg = cfg or WorldConfig()
    f32 = np.float32
    S = cfg.size
    ss = np.random.SeedSequence([int(seed), int(index)])
    # a fourth stream for badge placement, so the badge style keeps the flat world's layout (its
    # stripes are drawn from r_tex after the background, so only object shading differs)
    r_layout, r_tex, r_cap, r_badge = (np.random.default_rng(s) for s in ss.spawn(4))

    # ---- layout
    background = int(r_layout.integers(len(BACKGROUND_NAMES)))
    if cfg.max_objects == 1 or r_layout.random() < cfg.single_object_prob:
        n_obj = max(1, cfg.min_objects)
    else:
        n_obj = int(r_layout.integers(max(2, cfg.min_objects), cfg.max_objects + 1))
    n_obj = min(n_obj, cfg.n_classes)
    obj_classes = [int(c) for c in r_layout.choice(cfg.n_classes, size=n_obj, replace=False)]

    inst = np.zeros((S, S), dtype=np.uint8)
    areas: list[int] = []
    visible: list[int] = []
    placed: list[tuple[int, tuple, np.ndarray, np.ndarray, np.ndarray, PlacedObject]] = []
    for cls in obj_classes:
        lo, hi = cfg.min_scale, cfg.max_scale
        if n_obj == 1:
            lo = lo + (hi - lo) / 3  # single objects lean large
        angle, params = _shape_params(cls, r_layout)
        color = _object_color(cls, r_layout)
        accepted = None
        for _ in range(cfg.max_place_tries):
            r = 0.5 * S * r_layout.uniform(lo, hi)
            m = 0.9 * r
            cx = r_layout.uniform(m, S - m)
            cy = r_layout.uniform(m, S - m)
            win, d, u, v = _local_sd(S, cx, cy, r, angle, _SHAPES[cls], params)
            inside = d <= 0
            area = int(inside.sum())
            if area < 16:
                continue
            if placed:
                covered = np.bincount(inst[win][inside], minlength=len(placed) + 1)[1:]
                ok = all(visible[j] - int(covered[j]) >= cfg.min_visible_frac * areas[j]
                         and visible[j] - int(covered[j]) > 0 for j in range(len(placed)))
                if not ok:
                    continue
                for j in range(len(placed)):
                    visible[j] -= int(covered[j])
            accepted = (win, d, u, v, inside, area, r, cx, cy)
            break
        if accepted is None:
            continue
        win, d, u, v, inside, area, r, cx, cy = accepted
        if cfg.object_style == "badge":
            # badge centre: a pixel from the deeper half of the object (so a ring's badge sits on
            # the band, not in the hole); radius relative to the object's
            depth = -d[inside]
            ys_in, xs_in = np.nonzero(inside)
            deep = np.flatnonzero(depth >= 0.5 * depth.max())
            j = int(deep[r_badge.integers(len(deep))])
            params = dict(params, badge_center=(float(win[1].start + xs_in[j]), float(win[0].start + ys_in[j])),
                          badge_radius=float(r * r_badge.uniform(*cfg.badge_scale)))
        k = len(placed) + 1
        inst[win][inside] = k
        areas.append(area)
        visible.append(area)
        red, green, blue = (int(round(float(c))) for c in np.clip(color, 0, 255))  # color is RGB
        obj = PlacedObject(cls, (float(cx), float(cy)), float(r), float(angle), (red, green, blue), dict(params))
        placed.append((cls, win, d, u, v, obj))

    # ---- rendering
    fine = r_tex.random((S, S), dtype=f32)  # uniform, zero mean, unit variance
    fine -= f32(0.5)
    fine *= f32(math.sqrt(12.0))
    img = _background(background, r_tex, S, fine)
    for cls, win, d, u, v, obj in placed:
        color = np.asarray(obj.color, dtype=f32)
        la = r_tex.uniform(0, 2 * math.pi)
        shade = 1.0 + f32(r_tex.uniform(0.08, 0.18)) * (u * f32(math.cos(la)) + v * f32(math.sin(la)))
        if CLASS_NAMES[cls] == "circle":  # a little ball-like highlight
            shade = shade + f32(0.12) * np.exp(-((u + 0.35) ** 2 + (v - 0.35) ** 2) * f32(4.0))
        shade = shade + f32(0.03) * fine[win]
        col = color[:, None, None] * shade[None]
        if CLASS_NAMES[cls] == "diamond":
            col = col + f32(8.0) * shade[None]  # keep some visible shading on black
        if cfg.object_style == "badge":
            col = _badge_body(col, shade, u, v, win, obj, r_tex)
        if cfg.antialias:
            a = np.clip(f32(0.5) - d, 0.0, 1.0)
        else:
            a = (d <= 0).astype(f32)
        region = img[(slice(None),) + win]
        region += (col - region) * a[None]
    img += f32(0.5)
    np.clip(img, 0, 255, out=img)
    chw = img.astype(np.uint8)
    image = np.empty((S, S, 3), dtype=np.uint8)
    for c in range(3):
        image[..., c] = chw[c]

    lut = np.zeros(256, dtype=np.uint8)
    objects: list[PlacedObject] = []
    for k, (cls, *_rest, placed_obj) in enumerate(placed):
        lut[k + 1] = cls + 1
        objects.append(placed_obj)
    mask = lut[inst]
    # every kept object has visible pixels (placement guarantees it), so this equals unique(mask) - 1
    classes = sorted(int(p[0]) for p, vis in zip(placed, visible) if vis > 0)
    captions: list[str] = []
    for _ in range(cfg.n_captions):
        for _try in range(8):  # prefer distinct captions
            cap = _random_caption(classes, background, r_cap, cfg.caption_form_weights)
            if cap not in captions:
                break
        captions.append(cap)

    return Sample(image=image, mask=mask, classes=classes, background=background, captions=captions,
                  instances=inst, objects=objects, seed=int(seed), index=int(index))


def iter_samples(seed: int, start: int = 0, cfg: Optional[WorldConfig] = None,
                 stop: Optional[int] = None) -> Iterator[Sample]:

    """Yield ``generate_sample(seed, i, cfg)`` for ``i = start, start + 1, ...`` (up to ``stop``).

    For CLIP pre-training use ``start=SPLIT_OFFSETS["pretrain"]`` (disjoint from val/test) or the
    train range (``start=1``).
    """
    cfg = cfg or WorldConfig()
    i = int(start)
    while stop is None or i < stop:
        yield generate_sample(seed, i, cfg)
        i += 1
