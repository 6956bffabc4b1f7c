"""The demo world's vocabulary and settings: classes, prompts, colours, backgrounds, caption
templates, split offsets, :class:`WorldConfig` and the sample records (see :mod:`.world`)."""
from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["GENERATOR_VERSION", "CLASS_NAMES", "CLASS_PROMPTS", "CLASS_COLORS", "BACKGROUND_NAMES", "ORIGAMI_TEMPLATE",
           "SPLIT_OFFSETS", "OBJECT_STYLES", "WorldConfig", "PlacedObject", "Sample"]

#: Bumped whenever the pixels/masks/captions produced for a given (seed, index, cfg) change.
GENERATOR_VERSION = "1"

#: Foreground class names; class ``i`` has mask label ``i + 1``.
CLASS_NAMES: list[str] = ["circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond"]
#: Text put into CLIP prompts for each class (same order as :data:`CLASS_NAMES`).
CLASS_PROMPTS: list[str] = [
    "red circle",
    "blue square",
    "yellow triangle",
    "purple star",
    "orange ring",
    "cyan cross",
    "pink heart",
    "black diamond",
]
#: Background "stuff" textures (index = ``Sample.background``); also WeCLIP's background prompts.
BACKGROUND_NAMES: list[str] = ["grass", "sand", "snow", "road", "dirt"]

#: WeCLIP's prompt template; one caption form uses it so the prompt is in distribution.
ORIGAMI_TEMPLATE = "a clean origami {}."

#: Object rendering styles of :class:`WorldConfig` (``object_style``).
OBJECT_STYLES: tuple[str, ...] = ("flat", "badge")

#: Index offset of each split (``index = offset + k`` for the ``k``-th, 1-based, item).
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 10_000_000, "test": 20_000_000, "pretrain": 100_000_000}

# Per-class colour family in HSV: (hue centre in degrees, hue jitter ±deg, (s_lo, s_hi), (v_lo, v_hi)).
# Hues avoid the backgrounds: grass is green (~95°), sand/dirt are low-saturation browns, snow is
# near-white and road is grey; "black" is kept darker than any background.
_CLASS_HSV: list[tuple[float, float, tuple[float, float], tuple[float, float]]] = [
    (0.0, 6.0, (0.80, 0.95), (0.75, 0.95)),  # red circle
    (225.0, 8.0, (0.75, 0.90), (0.70, 0.90)),  # blue square
    (52.0, 5.0, (0.80, 0.95), (0.90, 1.00)),  # yellow triangle
    (280.0, 8.0, (0.60, 0.80), (0.60, 0.80)),  # purple star
    (28.0, 4.0, (0.90, 1.00), (0.90, 1.00)),  # orange ring
    (185.0, 6.0, (0.75, 0.95), (0.80, 0.95)),  # cyan cross
    (330.0, 8.0, (0.45, 0.65), (0.90, 1.00)),  # pink heart
    (0.0, 180.0, (0.00, 0.10), (0.08, 0.20)),  # black diamond
]


def _hsv_centre_rgb(h: float, s: tuple[float, float], v: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, sum(s) / 2, sum(v) / 2)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


#: Typical (centre-of-family) RGB colour of each class, for documentation and previews.
CLASS_COLORS: list[tuple[int, int, int]] = [_hsv_centre_rgb(h, s, v) for h, _, s, v in _CLASS_HSV]

# Caption templates. ``{objs}`` is a list with articles ("a red circle and an orange ring"),
# ``{bare}`` the same without articles ("red circle and orange ring"), ``{bg}`` a background name.
_OBJ_BG_TEMPLATES = ["{objs} on {bg}.", "a photo of {objs} on {bg}.", "a picture of {objs} on {bg}.",
                     "{objs} lying on {bg}."]
_OBJ_TEMPLATES = ["{objs}.", "a photo of {objs}.", "a picture of {objs}."]
_ORIGAMI_TEMPLATES = [ORIGAMI_TEMPLATE.replace("{}", "{bare}")]
_BG_TEMPLATES = ["{bg}.", "a photo of {bg}.", ORIGAMI_TEMPLATE.replace("{}", "{bg}")]
_FORMS = ("objects_background", "objects", "origami", "background")
_FORM_TEMPLATES = {
    "objects_background": _OBJ_BG_TEMPLATES,
    "objects": _OBJ_TEMPLATES,
    "origami": _ORIGAMI_TEMPLATES,
    "background": _BG_TEMPLATES,
}


@dataclass
class WorldConfig:
    """Parameters of the demo world. All sizes are relative to ``size`` (the image side, pixels).

    Attributes:
        size: square image side in pixels.
        n_classes: number of foreground classes used (the first ``n_classes`` of
            :data:`CLASS_NAMES`), 1..8.
        min_objects / max_objects: object count range for multi-object images.
        single_object_prob: probability that an image has exactly one object.
        min_scale / max_scale: object extent (≈ diameter of its bounding circle) as a fraction
            of ``size``.
        min_visible_frac: an object may be placed over earlier ones only if each earlier object
            keeps at least this fraction of its own pixels visible; otherwise another position is
            tried (``max_place_tries`` times) and, failing that, the object is dropped.
        max_place_tries: placement attempts per object.
        antialias: anti-alias object edges in the image (the mask is always hard).
        n_captions: captions stored in ``Sample.captions``.
        caption_form_weights: relative probabilities of the caption forms
            ``objects_background``, ``objects``, ``origami`` and ``background``.
        object_style: ``"flat"`` (the default world: each object is filled with its class colour)
            or ``"badge"``: each object's body is a striped texture shared by all classes and only
            a disk-shaped *badge* inside it (radius ``badge_scale`` × the object radius) carries
            the class colour. The mask still covers the whole object, so a classifier can name the
            class from the badge alone and its CAM covers only part of the object — the situation
            that CAM refinement exists for. See :data:`OBJECT_STYLES`.
        badge_scale: (lo, hi) range of the badge radius as a fraction of the object radius
            (``"badge"`` style only).
    """

    size: int = 256
    n_classes: int = len(CLASS_NAMES)
    min_objects: int = 1
    max_objects: int = 3
    single_object_prob: float = 0.5
    min_scale: float = 0.18
    max_scale: float = 0.45
    min_visible_frac: float = 0.5
    max_place_tries: int = 20
    antialias: bool = True
    n_captions: int = 4
    caption_form_weights: tuple = (0.35, 0.25, 0.3, 0.1)
    object_style: str = "flat"
    badge_scale: tuple = (0.55, 0.65)

    def __post_init__(self) -> None:
        self.caption_form_weights = tuple(float(w) for w in self.caption_form_weights)
        self.badge_scale = tuple(float(b) for b in self.badge_scale)
        if self.object_style not in OBJECT_STYLES:
            raise ValueError(f"object_style must be one of {OBJECT_STYLES}, got {self.object_style!r}")
        if len(self.badge_scale) != 2 or not 0.0 < self.badge_scale[0] <= self.badge_scale[1] <= 1.0:
            raise ValueError(f"badge_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.badge_scale}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        if not 1 <= self.n_classes <= len(CLASS_NAMES):
            raise ValueError(f"n_classes must be in 1..{len(CLASS_NAMES)}, got {self.n_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if self.max_objects > self.n_classes:
            raise ValueError("max_objects cannot exceed n_classes (classes in an image are distinct)")
        if not 0.0 <= self.single_object_prob <= 1.0:
            raise ValueError("single_object_prob must be in [0, 1]")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError("need 0 < min_scale <= max_scale <= 1")
        if not 0.0 <= self.min_visible_frac <= 1.0:
            raise ValueError("min_visible_frac must be in [0, 1]")
        if self.max_place_tries < 1:
            raise ValueError("max_place_tries must be >= 1")
        if self.n_captions < 0:
            raise ValueError("n_captions must be >= 0")
        weights = self.caption_form_weights
        if len(weights) != len(_FORMS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"caption_form_weights must be {len(_FORMS)} non-negative numbers with a positive sum")

    @property
    def class_names(self) -> list[str]:
        """The foreground class names in use."""
        return CLASS_NAMES[: self.n_classes]

    @property
    def class_prompts(self) -> list[str]:
        """The foreground prompt names in use."""
        return CLASS_PROMPTS[: self.n_classes]

    def to_dict(self) -> dict:
        """JSON-serialisable view of the config."""
        d = asdict(self)
        d["caption_form_weights"] = list(self.caption_form_weights)
        d["badge_scale"] = list(self.badge_scale)
        return d


@dataclass
class PlacedObject:
    """One drawn object: class id (0-based), centre (x, y) in pixels, radius in pixels, angle
    (radians, counter-clockwise), base RGB colour and shape parameters (e.g. a ring's inner radius)."""

    class_id: int
    center: tuple[float, float]
    radius: float
    angle: float
    color: tuple[int, int, int]
    params: dict = field(default_factory=dict)


@dataclass
class Sample:
    """A generated image with exact labels.

    Attributes:
        image: H×W×3 uint8 RGB.
        mask: H×W uint8; 0 background, ``i + 1`` for class ``i`` (visible pixels only).
        classes: sorted 0-based ids of the classes visible in ``mask``.
        background: index into :data:`BACKGROUND_NAMES`.
        captions: ``cfg.n_captions`` captions drawn from the caption forms.
        instances: H×W uint8; 0 background, ``k + 1`` for ``objects[k]`` (visible pixels only).
        objects: the placed objects in drawing order (later ones are on top).
        seed / index: what generated it.
    """

    image: np.ndarray
    mask: np.ndarray
    classes: list[int]
    background: int
    captions: list[str]
    instances: np.ndarray
    objects: list[PlacedObject] = field(default_factory=list)
    seed: int = 0
    index: int = 0

    @property
    def background_name(self) -> str:
        return BACKGROUND_NAMES[self.background]
