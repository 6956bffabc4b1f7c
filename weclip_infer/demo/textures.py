"""Background textures of the demo world ("stuff": grass, sand, snow, road, dirt) from smooth value noise."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np

from .world_config import BACKGROUND_NAMES


# --------------------------------------------------------------------------------------------
# Smooth noise
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _interp_index(n_out: int, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Left grid index and smoothstep weight of each of ``n_out`` samples over an ``n_grid`` grid."""
    t = (np.arange(n_out, dtype=np.float64) + 0.5) / n_out * (n_grid - 1)
    i0 = np.minimum(np.floor(t).astype(np.intp), n_grid - 2)
    f = t - i0
    f = (f * f * (3.0 - 2.0 * f)).astype(np.float32)
    i0.setflags(write=False)
    f.setflags(write=False)
    return i0, f


def _value_noise(rng: np.random.Generator, size: int, gy: int, gx: Optional[int] = None) -> np.ndarray:
    """Smooth noise (size×size float32, roughly unit variance) from a (gy+1)×(gx+1) random grid.

    Separable smoothstep interpolation done with gathers (no BLAS: fast under CPU contention and
    bit-identical across machines and thread counts).
    """
    gx = gy if gx is None else gx
    g = rng.standard_normal((gy + 1, gx + 1), dtype=np.float32)
    ix, fx = _interp_index(size, gx + 1)
    iy, fy = _interp_index(size, gy + 1)
    h0 = g[:, ix]
    h = h0 + (g[:, ix + 1] - h0) * fx  # (gy+1, size)
    v0 = h[iy]
    out = v0 + (h[iy + 1] - v0) * fy[:, None]
    out *= np.float32(1.6)  # smoothstep interpolation loses ~ 1/1.6 of the std
    return out


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


# --------------------------------------------------------------------------------------------
# Backgrounds (float32 H×W×3 in 0..255)
# --------------------------------------------------------------------------------------------
def _background(kind: int, rng: np.random.Generator, size: int, fine: np.ndarray) -> np.ndarray:
    """Background ``kind`` as float32 3×H×W (channels first: much faster here) in 0..255.

    Every texture is written as ``P[..., None] * A + Q[..., None] * B`` with 2-D fields ``P``, ``Q``
    and colours ``A``, ``B`` (i.e. a spatially varying mix of two colours with a luminance
    modulation), so that only two full-colour array operations are needed.
    """
    f32 = np.float32
    ys, xs = _grid(size)
    low = _value_noise(rng, size, 3)
    mid = _value_noise(rng, size, 8)
    bright = f32(rng.uniform(0.9, 1.08))
    # gentle global lighting gradient
    ang = rng.uniform(0, 2 * math.pi)
    lum = (xs * f32(math.cos(ang)) + ys * f32(math.sin(ang))) * f32(rng.uniform(0.0, 0.08) / size)
    lum += f32(1.0)
    name = BACKGROUND_NAMES[kind]
    if name == "grass":
        a = np.array([60, 125, 40], f32) * f32(rng.uniform(0.9, 1.1, 3))
        b = np.array([105, 150, 45], f32)
        blades = _value_noise(rng, size, 10, 64)  # vertical-ish streaks
        t = np.clip(0.5 + 0.3 * low + 0.15 * mid, 0, 1)
        lum *= 1.0 + 0.08 * blades + 0.06 * fine
    elif name == "sand":
        a = np.array([220, 195, 145], f32) + f32(rng.uniform(-10, 10))
        b = np.array([195, 165, 115], f32)
        lam = rng.uniform(18, 36)
        th = rng.uniform(0, math.pi)
        phase = (xs * f32(math.cos(th)) + ys * f32(math.sin(th))) * f32(2 * math.pi / lam) + f32(2.5) * low
        t = np.clip(0.35 + 0.2 * mid + 0.15 * np.sin(phase), 0, 1)
        lum *= 1.0 + 0.07 * fine
    elif name == "snow":
        a = np.array([244, 246, 250], f32)
        b = np.array([196, 208, 226], f32)
        grad = ys * f32(rng.uniform(-0.3, 0.3) / size)
        t = np.clip(0.25 + 0.25 * low + 0.1 * mid + grad, 0, 1)
        lum *= 1.0 + 0.012 * fine
    elif name == "road":
        g = f32(rng.uniform(105, 135))
        a = (np.array([1.0, 1.0, 1.0], f32) + f32(rng.uniform(-0.04, 0.04)) * np.array([1, 0, -1], f32)) * g
        b = np.zeros(3, f32)
        t = np.zeros((size, size), f32)
        lum *= 1.0 + 0.07 * mid + 0.05 * low + 0.12 * fine
    else:  # dirt
        a = np.array([130, 95, 62], f32) * f32(rng.uniform(0.9, 1.1))
        b = np.array([92, 66, 44], f32)
        clumps = _value_noise(rng, size, 20)
        t = np.clip(0.4 + 0.2 * low + 0.2 * mid + 0.15 * clumps, 0, 1)
        lum *= 1.0 + 0.08 * fine
    lum *= bright
    img = np.multiply(lum[None], a.astype(f32)[:, None, None])
    img += (t * lum)[None] * (b - a).astype(f32)[:, None, None]
    return img
