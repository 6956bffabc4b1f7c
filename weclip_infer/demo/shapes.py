"""Object shapes of the demo world: signed-distance shapes, class colours, the "badge" body and
:func:`rasterize_object`."""
from __future__ import annotations

import colorsys
import math

import numpy as np

from .world_config import _CLASS_HSV, CLASS_NAMES, PlacedObject

__all__ = ["rasterize_object"]

# --------------------------------------------------------------------------------------------
# Shapes: signed distance (in units of the object radius, negative inside) in local coordinates
# u (right) and v (up), the shape fitting in the unit disk.
# --------------------------------------------------------------------------------------------
_C36, _S36 = math.cos(math.radians(36)), math.sin(math.radians(36))


def _sd_circle(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _sd_square(u, v, p):
    return np.maximum(np.abs(u), np.abs(v)) - 0.72


def _sd_triangle(u, v, p):
    # equilateral, apex up, circumradius 1 (inradius 0.5), centred at its centroid
    d = -v  # bottom edge normal (0, -1)
    d = np.maximum(d, 0.8660254 * u + 0.5 * v)
    d = np.maximum(d, -0.8660254 * u + 0.5 * v)
    return d - 0.5


def _sd_star(u, v, p):
    r_in = p["inner"]
    theta = np.arctan2(u, v)  # 0 = straight up, so one point faces up
    sector = 2 * math.pi / 5
    psi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # 0 at outer vertices, 36° at inner
    rho = np.sqrt(u * u + v * v)
    qx, qy = rho * np.cos(psi), rho * np.sin(psi)
    ax, ay = 1.0, 0.0
    bx, by = r_in * _C36, r_in * _S36
    nx, ny = by - ay, -(bx - ax)  # perpendicular to AB, pointing away from the origin
    nn = math.hypot(nx, ny)
    nx, ny = nx / nn, ny / nn
    return (qx - ax) * nx + (qy - ay) * ny


def _sd_ring(u, v, p):
    rho = np.sqrt(u * u + v * v)
    return np.maximum(rho - 1.0, p["inner"] - rho)


def _sd_cross(u, v, p):
    w = p["arm"]
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.95, av - w), np.maximum(au - w, av - 0.95))


_HEART_H = 0.8
_HEART_C0 = -0.083


def _sd_heart(u, v, p):
    h, c0 = _HEART_H, _HEART_C0
    au = np.abs(u)
    dv = v - c0
    d = (au + np.abs(dv) - h) * 0.70710678  # rotated square (diamond)
    circ = np.sqrt((au - h / 2) ** 2 + (dv - h / 2) ** 2) - h * 0.70710678
    return np.minimum(d, circ)


def _sd_diamond(u, v, p):
    a = p["aspect"]
    return (np.abs(u) / a + np.abs(v) - 1.0) / math.sqrt(1.0 / (a * a) + 1.0)


_SHAPES = [_sd_circle, _sd_square, _sd_triangle, _sd_star, _sd_ring, _sd_cross, _sd_heart, _sd_diamond]


def _shape_params(cls: int, rng: np.random.Generator) -> tuple[float, dict]:
    """Random rotation (radians, counter-clockwise) and shape parameters for class ``cls``."""
    name = CLASS_NAMES[cls]
    if name == "heart":
        angle = rng.uniform(-0.4, 0.4)
    elif name == "diamond":
        angle = rng.uniform(-0.5, 0.5)
    else:
        angle = rng.uniform(0.0, 2 * math.pi)
    params: dict = {}
    if name == "star":
        params["inner"] = float(rng.uniform(0.40, 0.50))
    elif name == "ring":
        params["inner"] = float(rng.uniform(0.45, 0.60))
    elif name == "cross":
        params["arm"] = float(rng.uniform(0.28, 0.36))
    elif name == "diamond":
        params["aspect"] = float(rng.uniform(0.55, 0.68))
    return float(angle), params


def _object_color(cls: int, rng: np.random.Generator) -> np.ndarray:
    h, dh, (s0, s1), (v0, v1) = _CLASS_HSV[cls]
    hue = (h + rng.uniform(-dh, dh)) % 360.0
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return np.array([r, g, b], dtype=np.float32) * np.float32(255.0)


#: The class-independent body of ``"badge"`` objects: stripes between these two RGB colours
#: (charcoal and a light warm grey: no background is striped, and none is this dark).
_BODY_DARK = np.array([38.0, 36.0, 42.0], dtype=np.float32)
_BODY_LIGHT = np.array([182.0, 176.0, 168.0], dtype=np.float32)


def _badge_body(col: np.ndarray, shade: np.ndarray, u: np.ndarray, v: np.ndarray, win: tuple,
                obj: "PlacedObject", rng: np.random.Generator) -> np.ndarray:
    """3×h×w colour of a ``"badge"`` object: stripes (period 0.30–0.40 object radii, random
    direction) everywhere, the class colour ``col`` inside the badge disk."""
    f32 = np.float32
    th = rng.uniform(0, math.pi)
    period = rng.uniform(0.30, 0.40)
    phase = (u * f32(math.cos(th)) + v * f32(math.sin(th))) * f32(2 * math.pi / period)
    t = f32(0.5) + f32(0.5) * np.tanh(f32(4.0) * np.sin(phase + f32(rng.uniform(0, 2 * math.pi))))
    body = (_BODY_DARK[:, None, None] + (_BODY_LIGHT - _BODY_DARK)[:, None, None] * t[None]) * shade[None]
    bx, by = obj.params["badge_center"]
    ys = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] - f32(by)
    xs = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] - f32(bx)
    # anti-aliased disk edge (1 px), as the object outline
    a = np.clip(f32(obj.params["badge_radius"] + 0.5) - np.sqrt(xs * xs + ys * ys), 0.0, 1.0)
    return body + (col - body) * a[None]


def _local_sd(size: int, cx: float, cy: float, r: float, angle: float, sd, params
              ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (pixels) of one object over its bounding window, plus local coords."""
    x0 = max(int(math.floor(cx - r - 1)), 0)
    x1 = min(int(math.ceil(cx + r + 2)), size)
    y0 = max(int(math.floor(cy - r - 1)), 0)
    y1 = min(int(math.ceil(cy + r + 2)), size)
    xs = np.arange(x0, x1, dtype=np.float32) - np.float32(cx)
    ys = np.arange(y0, y1, dtype=np.float32) - np.float32(cy)
    ca, sa = np.float32(math.cos(angle) / r), np.float32(math.sin(angle) / r)
    # u right, v up (image y points down), rotated by ``angle`` counter-clockwise
    u = xs[None, :] * ca - ys[:, None] * sa
    v = -(xs[None, :] * sa + ys[:, None] * ca)
    d = sd(u, v, params) * np.float32(r)
    return (slice(y0, y1), slice(x0, x1)), d.astype(np.float32, copy=False), u, v


def rasterize_object(obj: PlacedObject, size: int) -> np.ndarray:
    """Full (unoccluded) size×size boolean mask of ``obj``: pixels whose centre lies inside it.

    Uses exactly the rasterisation of :func:`generate_sample`, so for a sample the visible region
    of object ``k`` (``Sample.instances == k + 1``) is this mask minus those of later objects.
    """
    win, d, _, _ = _local_sd(size, obj.center[0], obj.center[1], obj.radius, obj.angle,
                             _SHAPES[obj.class_id], obj.params)
    out = np.zeros((size, size), dtype=bool)
    out[win] = d <= 0
    return out
