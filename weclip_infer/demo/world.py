"""A procedural "demo world" for training a small CLIP and then WeCLIP with exact ground truth.

Real CLIP weights and PASCAL VOC are not available everywhere, so the project can train end to end
on this synthetic world instead. Every image is a smooth "stuff" background (grass, sand, snow,
road, dirt) with 1–3 foreground objects drawn on it. Each foreground class is made deliberately
easy for a small CLIP trained from scratch: it has a distinct **shape and** a distinct **colour
family** (no object colour coincides with a background colour), with random variation in hue,
saturation, brightness, size, rotation and lighting. Objects are big (15–45 % of the image side);
later objects are drawn over earlier ones, and the label mask records what is visible.

``WorldConfig(object_style="badge")`` is a variant with the same layouts, masks and captions in
which every object has a striped body shared by all classes and carries its class colour only on
a disk-shaped badge, so class evidence covers part of each object (partial CAMs, as in real WSSS).

Determinism
-----------
A sample is a pure function of ``(seed, index, cfg)``: :func:`generate_sample` builds a
``numpy.random.SeedSequence([seed, index])`` (the same entropy that
``np.random.default_rng([seed, index])`` uses) and spawns four independent child streams from it
— layout, texture noise, captions and (``"badge"`` style) badges — so a sample never depends on which other samples were
generated, and changing e.g. ``n_captions`` does not change the pixels.

Splits use disjoint index ranges (see :data:`SPLIT_OFFSETS`): the ``k``-th (1-based) image of a
split has index ``SPLIT_OFFSETS[split] + k`` and name ``demo_<split>_<k:06d>``; val starts at
10 000 000 and test at 20 000 000, so train/val/test never share a random stream for any
``n < 10**7``. On-the-fly CLIP pre-training should use :func:`iter_samples` with
``start=SPLIT_OFFSETS["pretrain"]`` (10**8) or the train range, never the val/test ranges.

Label conventions (VOC-like): mask value 0 is background, ``i + 1`` is foreground class ``i``
(``CLASS_NAMES[i]``); masks are exact — no 255 ignore band.
"""
from __future__ import annotations

from .captions import all_captions, caption_for, caption_forms
from .generate import generate_sample, iter_samples
from .preview import preview_grid
from .shapes import rasterize_object
from .voc_writer import sample_name, write_voc_layout
from .world_config import (
    BACKGROUND_NAMES,
    CLASS_COLORS,
    CLASS_NAMES,
    CLASS_PROMPTS,
    GENERATOR_VERSION,
    OBJECT_STYLES,
    ORIGAMI_TEMPLATE,
    SPLIT_OFFSETS,
    PlacedObject,
    Sample,
    WorldConfig,
)

__all__ = [
    "GENERATOR_VERSION",
    "CLASS_NAMES",
    "CLASS_PROMPTS",
    "CLASS_COLORS",
    "BACKGROUND_NAMES",
    "ORIGAMI_TEMPLATE",
    "SPLIT_OFFSETS",
    "OBJECT_STYLES",
    "WorldConfig",
    "PlacedObject",
    "Sample",
    "generate_sample",
    "rasterize_object",
    "iter_samples",
    "caption_for",
    "all_captions",
    "caption_forms",
    "sample_name",
    "write_voc_layout",
    "preview_grid",
]
