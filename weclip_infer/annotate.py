"""Masks from image tags or from any class name, with no decoder training: ``Annotator``.

WeCLIP's training labels its own images: frozen-CLIP GradCAM for each class present, box masks
and refinement by attention (the static CLIP average, or the trained decoder's affinity),
pixel-adaptive refinement (PAR) and an argmax against a background channel. ``Annotator`` runs
exactly that path (``WeCLIP.label_cams`` → ``upsample_cams`` → ``WeCLIP.par_labels``, the same
calls training makes) on one image at a time, at the image's own resolution, in three modes:

* ``"tags"``: the classes in the image are given (names or 1-based ids from the model's class
  list); the model's prompts and background prompts explain them. Labels use the model's ids.
* ``"open"``: any class names (``"a red kite"``): their text embeddings are computed on the fly
  with the CLIP text tower (loaded lazily from the CLIP weights when the checkpoint dropped it)
  and cached per name. Label ``i`` is the ``i``-th name.
* ``labels="auto"``: zero-shot tagging first. Each known class is scored against the background
  prompts alone, ``p_c = exp(s_c) / (exp(s_c) + Σ_bg exp(s_bg))`` from the pooled last-block
  embedding (the same scoring GradCAM differentiates); classes with ``p_c`` at or above
  ``tag_threshold`` are kept (the best class is kept when none passes), then the tags path runs.

Cost is bounded by ``AnnotateLimits`` (names per request, characters per name, image pixels):
PAR runs at full image resolution, so its time grows with the pixel count and the class count.
"""
from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import run_block
from .cam import minmax_normalize
from .imageio import ImageSource, load_image
from .par import upsample_cams
from .predictor import resize_long_side

__all__ = ["AnnotateLimits", "AnnotationError", "AnnotationResult", "Annotator", "DEFAULT_TAG_THRESHOLD",
           "TextEmbedder"]

log = logging.getLogger(__name__)

#: Auto-tagging threshold on the one-vs-background score: the value with the best tag F1 on the
#: demo world's training split (a 0.05 grid; see docs/annotate.md). Calibrate it again for
#: another CLIP or domain.
DEFAULT_TAG_THRESHOLD = 0.9

MODES = ("tags", "open")
REFINEMENTS = ("auto", "rfm", "static", "none")


class AnnotationError(ValueError):
    """Bad annotation input (class names, limits, options); the message says which and why."""


@dataclass(frozen=True)
class AnnotateLimits:
    """Bounds on the cost of one request, checked before any work.

    ``max_names``: class names (or tags) per image; ``max_name_length``: characters per name;
    ``max_pixels``: decoded image size (PAR runs at full resolution: time grows with pixels ×
    classes); ``text_cache_size``: free-text embeddings kept in memory.
    """

    max_names: int = 20
    max_name_length: int = 80
    max_pixels: int = 4_000_000
    text_cache_size: int = 1024

    def __post_init__(self) -> None:
        for k in ("max_names", "max_name_length", "max_pixels", "text_cache_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AnnotationError(f"limits.{k}: a positive integer expected, got {v!r}")


@dataclass
class AnnotationResult:
    """One annotated image.

    ``labels``: ``H×W`` int64 at the image's resolution, index into ``class_names``
    (``"background"`` first); ``scores``: per entry of ``class_names`` the CLIP probability of
    that class in its GradCAM forward (softmax over the requested classes and the background
    prompts; background: 1 − the largest; 0 for classes not requested); ``classes``: the names
    that were explained (given or auto-tagged); ``cams``: ``K×H×W`` float32 refined CAMs in
    [0, 1] at full resolution, one per entry of ``classes`` (before PAR; None unless asked);
    ``tag_scores``: with ``labels="auto"``, every known class's one-vs-background score;
    ``mode``, ``refinement``: what ran; ``timings``: seconds per stage.
    """

    labels: np.ndarray
    scores: np.ndarray
    class_names: list
    classes: list
    mode: str
    refinement: str
    cams: Optional[np.ndarray] = None
    tag_scores: Optional[dict] = None
    timings: dict = field(default_factory=dict)

    def areas(self) -> dict:
        """Pixel count per class name present in ``labels``."""
        ids, counts = np.unique(self.labels, return_counts=True)
        return {self.class_names[i]: int(c) for i, c in zip(ids, counts)}


def _clean_name(name: Any, limits: AnnotateLimits) -> str:
    if not isinstance(name, str):
        raise AnnotationError(f"class names must be strings, got {type(name).__name__} {name!r}")
    s = " ".join(name.split())
    if not s:
        raise AnnotationError("empty class name")
    if len(s) > limits.max_name_length:
        raise AnnotationError(f"class name {s[:20]!r}… is {len(s)} characters long (at most "
                              f"{limits.max_name_length})")
    if any(unicodedata.category(ch).startswith("C") for ch in s):
        raise AnnotationError(f"class name {s!r} contains control characters")
    return s


class TextEmbedder:
    """Text embeddings of free-text class names with the model's prompt templates, cached per name.

    Uses the model's CLIP text tower when it still has one; otherwise loads the CLIP weights the
    model was built from (``clip_weights`` overrides the source) on first use and keeps only the
    text tower. Names with words the tower has no embedding for (a pruned vocabulary, as in the
    small demo CLIP) are refused instead of silently embedded as padding.
    """

    def __init__(self, model, clip_weights: Optional[str] = None, cache_size: int = 1024):
        self.model = model
        self.clip_weights = clip_weights
        self.cache_size = int(cache_size)
        self._tower = None
        self._cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()  # server threads share one embedder

    def _text_tower(self):
        if self._tower is not None:
            return self._tower
        bb = self.model.backbone
        if bb.has_text_tower():
            self._tower = bb
            return bb
        from dataclasses import replace

        from .backbone import FrozenCLIP, WeightsUnavailableError, load_clip

        cfg = self.model.cfg.backbone
        if self.clip_weights is not None:
            cfg = replace(cfg, clip_weights=self.clip_weights)
        log.info("loading the CLIP text tower from %s for free-text class names", cfg.clip_weights)
        try:
            clip = load_clip(cfg, device="cpu")
        except WeightsUnavailableError as e:
            raise AnnotationError(f"free-text class names need the CLIP text tower: {e}") from None
        if getattr(clip, "token_embedding", None) is None or getattr(clip, "transformer", None) is None:
            raise AnnotationError(f"free-text class names need the CLIP text tower, and the weights "
                                  f"{cfg.clip_weights!r} have none (pass text weights with a text tower)")
        tower = FrozenCLIP(clip)
        tower.clip.visual = torch.nn.Identity()  # only the text side is kept (memory)
        self._tower = tower.to(self.model.text_fg.device)
        return self._tower

    def _check_vocabulary(self, tower, prompt: str, name: str) -> None:
        from .text import tokenize

        emb = getattr(tower.clip, "token_embedding", None)
        if emb is None:
            return
        toks = tokenize([prompt], tower.context_length)[0]
        ids = toks[1: int(toks.argmax())]  # between <sot> and <eot> (the largest id)
        rows = emb.weight[ids.to(emb.weight.device)]
        if bool((rows.abs().sum(dim=-1) == 0).any()):
            raise AnnotationError(f"class name {name!r} has words outside the vocabulary of this CLIP's text tower")

    def embed(self, names: Sequence[str]) -> torch.Tensor:
        """``K×E`` L2-normalised embeddings (one row per name, templates averaged as for the
        model's own classes)."""
        from .text import text_embeddings

        with self._lock:
            missing = [n for n in names if n not in self._cache]
            if missing:
                tower = self._text_tower()
                templates = self.model.classes.templates
                for n in missing:
                    for t in templates:
                        self._check_vocabulary(tower, t.format(n), n)
                emb = text_embeddings(tower, missing, templates).to(self.model.text_fg.device)
                for n, e in zip(missing, emb):
                    self._cache[n] = e
            for n in names:
                self._cache.move_to_end(n)
            out = torch.stack([self._cache[n] for n in names])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out


class Annotator:
    """Pixel masks from image tags or free-text class names with a WeCLIP model (no decoder
    training needed; the decoder's affinity is used for the RFM refinement when present).

    ``Annotator(model)`` wraps a ``WeCLIP`` (it is not moved or switched: the annotator runs it
    under ``eval`` semantics itself, see ``annotate``); ``Annotator.from_pretrained(path)`` loads
    a checkpoint directory. Options: ``refinement`` (``auto``: RFM with the decoder affinity when
    the config enables RFM, else static; or ``rfm``, ``static``, ``none``), ``long_side`` (the
    network input's long side, default the model's inference setting; 0 keeps the image size),
    ``scales`` (multi-scale CAMs averaged at full resolution), ``crf`` (DenseCRF on the PAR
    output), ``tag_threshold`` and ``limits``.
    """

    def __init__(self, model, *, refinement: str = "auto", long_side: Optional[int] = None,
                 scales: Sequence[float] = (1.0,), crf: bool = False, tag_threshold: float = DEFAULT_TAG_THRESHOLD,
                 limits: Optional[AnnotateLimits] = None, clip_weights: Optional[str] = None):
        from .config import validate_scales

        if refinement not in REFINEMENTS:
            raise AnnotationError(f"refinement must be one of {list(REFINEMENTS)}, got {refinement!r}")
        try:
            self.scales = validate_scales(list(scales), "scales")
        except ValueError as e:
            raise AnnotationError(str(e)) from None
        if not isinstance(crf, bool):
            raise AnnotationError(f"crf must be a boolean, got {crf!r}")
        if isinstance(tag_threshold, bool) or not isinstance(tag_threshold, (int, float)) or not 0 < tag_threshold < 1:
            raise AnnotationError(f"tag_threshold must be a number in (0, 1), got {tag_threshold!r}")
        ls = model.cfg.inference.long_side if long_side is None else long_side
        if isinstance(ls, bool) or not isinstance(ls, int) or ls < 0:
            raise AnnotationError(f"long_side must be a non-negative integer (0: image size), got {ls!r}")
        self.model = model
        self.refinement = refinement
        self.long_side = int(ls)
        self.crf = crf
        self.tag_threshold = float(tag_threshold)
        self.limits = limits or AnnotateLimits()
        self.text = TextEmbedder(model, clip_weights, self.limits.text_cache_size)
        self.class_names = ["background", *model.classes.names]
        self._index = {n: i for i, n in enumerate(model.classes.names)}

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, **options) -> "Annotator":
        """Load a checkpoint directory (``config.json`` + ``model.safetensors``)."""
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(path, device=device), **options)

    @property
    def device(self) -> torch.device:
        return self.model.text_fg.device

    # ---- inputs -----------------------------------------------------------------------------
    def resolve(self, labels: Union[str, Sequence[Union[str, int]]], mode: Optional[str] = None) -> tuple[str, list]:
        """Validate ``labels`` → ``(mode, names)``. ``mode`` None: ``"tags"`` when every entry is
        one of the model's classes (name or 1-based id), else ``"open"``."""
        if isinstance(labels, str):
            if labels != "auto":
                raise AnnotationError(f"labels: a list of class names or 'auto', got the string {labels!r}")
            if mode not in (None, "tags"):
                raise AnnotationError("labels='auto' tags the model's own classes; it cannot be combined with "
                                      f"mode={mode!r}")
            return "auto", []
        if mode is not None and mode not in MODES:
            raise AnnotationError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if labels is None or not isinstance(labels, (list, tuple)):
            raise AnnotationError(f"labels: a list of class names or 'auto', got {labels!r}")
        if not labels:
            raise AnnotationError("labels: empty (give at least one class name, or 'auto')")
        if len(labels) > self.limits.max_names:
            raise AnnotationError(f"labels: {len(labels)} names given, at most {self.limits.max_names} allowed")
        names = []
        for item in labels:
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if mode == "open":
                    raise AnnotationError(f"labels: class id {item} given with mode='open' (give names)")
                if not 1 <= int(item) < len(self.class_names):
                    raise AnnotationError(f"labels: class id {int(item)} out of range 1..{len(self.class_names) - 1}")
                names.append(self.class_names[int(item)])
            else:
                names.append(_clean_name(item, self.limits))
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise AnnotationError(f"labels: duplicate class names {dups}")
        known = all(n in self._index for n in names)
        if mode is None:
            mode = "tags" if known else "open"
        if mode == "tags" and not known:
            unknown = [n for n in names if n not in self._index]
            raise AnnotationError(f"labels: {unknown} not in the model's classes {self.model.classes.names} "
                                  "(use mode='open' for free-text names)")
        return mode, names

    def _refinement_for(self, mode: str) -> str:
        if self.refinement != "auto":
            return self.refinement
        r = self.model.cfg.refine
        if not r.use_refinement:
            return "none"
        return "rfm" if mode != "open" and r.use_rfm else "static"

    # ---- the path ---------------------------------------------------------------------------
    def _normalized(self, img: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(img)
        if not arr.flags.writeable:
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.device)
        return self.model.normalize(x)

    def _scaled_inputs(self, x0: torch.Tensor) -> list[torch.Tensor]:
        p = self.model.backbone.patch_size
        x = resize_long_side(x0, self.long_side)
        out = []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            if xs.shape[-2] < p or xs.shape[-1] < p:
                raise AnnotationError(f"image too small at scale {s:g}: {tuple(xs.shape[-2:])} "
                                      f"(needs at least {p}×{p})")
            out.append(xs)
        return out

    @torch.no_grad()
    def _affinity(self, feats: Sequence[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        """The decoder's patch affinity with dropout off (the caller's train/eval mode is restored)."""
        m = self.model
        was = m.decoder.training
        m.decoder.eval()
        try:
            return m.decoder.affinity(m.decoder.fuse_features(feats[: m.feature_blocks], hw))
        finally:
            m.decoder.train(was)

    @torch.no_grad()
    def tag_scores(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """One-vs-background score of every known class, ``(C−1,)``, from the features of one
        image (block outputs of ``WeCLIP._features``)."""
        m = self.model
        bb = m.backbone
        out, _ = run_block(bb.blocks[bb.num_blocks - 1], feats[bb.num_blocks - 2], need_attn=False)
        emb = bb.pooled_embedding(out)[0]
        ls = m.cfg.refine.cam_logit_scale
        scale = float(bb.logit_scale_exp) if ls is None else float(ls)
        s_fg = scale * (emb @ F.normalize(m.text_fg, dim=-1).t())
        s_bg = scale * (emb @ F.normalize(m.text_bg, dim=-1).t())
        return torch.sigmoid(s_fg - torch.logsumexp(s_bg, dim=0))

    def tag(self, image: ImageSource) -> dict[str, float]:
        """Zero-shot tag scores of ``image``: every known class's one-vs-background score (the
        classes ``labels="auto"`` keeps are those at or above ``tag_threshold``)."""
        img = load_image(image, max_pixels=self.limits.max_pixels)
        xs = self._scaled_inputs(self._normalized(img))[0]
        with torch.no_grad():
            feats, _, _ = self.model._features(xs, attn_blocks=0)
        return dict(zip(self.model.classes.names, self.tag_scores(feats).cpu().tolist()))

    def annotate(self, image: ImageSource, labels: Union[str, Sequence[Union[str, int]]] = "auto", *,
                 mode: Optional[str] = None, keep_cams: bool = False, crf: Optional[bool] = None) -> AnnotationResult:
        """Label map for ``image`` (path, bytes, PIL image or ``H×W×3`` uint8 array).

        ``labels``: the classes in the image: names or 1-based ids of the model's classes
        (``mode="tags"``), any free-text names (``mode="open"``), or ``"auto"`` (zero-shot tags
        from the model's classes). ``mode`` None picks ``tags`` when every name is a known class.
        Classes not given never appear in the output. Raises ``AnnotationError`` for bad labels
        or options and ``ImageDecodeError`` for unreadable or oversized images.
        """
        crf = self.crf if crf is None else crf
        if not isinstance(crf, bool):
            raise AnnotationError(f"crf must be a boolean, got {crf!r}")
        kind, names = self.resolve(labels, mode)
        timings: dict = {}
        t0 = time.perf_counter()
        img = load_image(image, max_pixels=self.limits.max_pixels)
        timings["decode"] = time.perf_counter() - t0
        return self._annotate_array(img, kind, names, keep_cams, crf, timings, t0)

    def _annotate_array(self, img: np.ndarray, kind: str, names: list, keep_cams: bool, crf: bool, timings: dict,
                        t0: float) -> AnnotationResult:
        m = self.model
        n = m.backbone.num_blocks
        H0, W0 = img.shape[:2]
        x0 = self._normalized(img)
        inputs = self._scaled_inputs(x0)
        refinement = self._refinement_for("open" if kind == "open" else "tags")
        t = time.perf_counter()
        with torch.no_grad():
            feats_all = [m._features(xs, attn_blocks=m._attn_blocks) for xs in inputs]
        timings["clip"] = time.perf_counter() - t
        tag_scores = None
        if kind == "auto":
            t = time.perf_counter()
            scores_t = self.tag_scores(feats_all[0][0]).cpu()
            keep = [i for i, s in enumerate(scores_t.tolist()) if s >= self.tag_threshold]
            if not keep:
                keep = [int(scores_t.argmax())]
            names = [m.classes.names[i] for i in keep]
            tag_scores = {nm: float(s) for nm, s in zip(m.classes.names, scores_t.tolist())}
            timings["tagging"] = time.perf_counter() - t
        if kind == "open":
            t = time.perf_counter()
            text_fg = self.text.embed(names)
            timings["text"] = time.perf_counter() - t
            keys = [list(range(len(names)))]
            class_names = ["background", *names]
        else:
            text_fg = None
            keys = [sorted(self._index[nm] for nm in names)]
            class_names = list(self.class_names)
        t = time.perf_counter()
        hr_sum: Optional[list[torch.Tensor]] = None
        probs: Optional[torch.Tensor] = None
        for feats, attns, hw in feats_all:
            aff = None
            if refinement == "rfm":
                aff = self._affinity(feats, hw)
            rec: dict = {}
            refined = m.label_cams(feats[n - 2], attns, hw, keys, refinement=refinement, aff=aff, text_fg=text_fg,
                                   record=rec if probs is None else None)
            if probs is None:
                probs = rec["clip_probs"][0]
            hr = upsample_cams(refined, (H0, W0))
            hr_sum = hr if hr_sum is None else [a + b for a, b in zip(hr_sum, hr)]
        timings["cam"] = time.perf_counter() - t
        assert hr_sum is not None and probs is not None  # at least one scale ran
        cams_hr = hr_sum if len(inputs) == 1 else [minmax_normalize(c / len(inputs)) for c in hr_sum]
        rec = {}
        t = time.perf_counter()
        labels_t = m.par_labels(x0, cams_hr, keys, record=rec if crf else None)[0]
        timings["par"] = time.perf_counter() - t
        lut_keys = keys[0]
        if crf:
            from .crf import crf_labels

            stack = rec["cam_par"][0, : 1 + len(lut_keys)].clamp_min(1e-5)
            p = (stack / stack.sum(dim=0, keepdim=True)).cpu().numpy()
            idx, timings["crf"] = crf_labels(img, p)
            lut = np.array([0] + [k + 1 for k in lut_keys], dtype=np.int64)
            labels = lut[idx]
        else:
            labels = labels_t.cpu().numpy().astype(np.int64)
        scores = np.zeros(len(class_names), dtype=np.float32)
        diag = [float(probs[j, j]) for j in range(len(lut_keys))] if len(lut_keys) else []
        for j, k in enumerate(lut_keys):
            scores[k + 1] = diag[j]
        scores[0] = 1.0 - max(diag) if diag else 1.0
        explained = [class_names[k + 1] for k in lut_keys]
        cams = cams_hr[0].float().cpu().numpy() if keep_cams else None
        timings["total"] = time.perf_counter() - t0
        return AnnotationResult(labels=labels, scores=scores, class_names=class_names, classes=explained,
                                mode=kind, refinement=refinement, cams=cams,
                                tag_scores=tag_scores, timings=timings)
