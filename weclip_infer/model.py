"""The WeCLIP model: frozen CLIP + decoder + online pseudo labels (docs/method.md §1).

One module serves training (``forward`` with labels → losses), inference (``segment`` →
logits; also what export traces), inspection (``intermediates`` → every named intermediate)
and the pseudo-label path that training and ``weclip_infer.annotate`` share (``label_cams`` →
``upsample_cams`` → ``par_labels``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .backbone import FrozenCLIP, load_clip, run_block
from .cam import box_masks_batch, class_keys, initial_cam
from .config import PRECISIONS, WeCLIPConfig, load_config
from .decoder import WeCLIPDecoder, count_parameters
from .device import select_device  # re-exported: the owner is weclip_infer.device
from .hardware import fp32_matmul, frozen_clip_arithmetic
from .losses import affinity_labels, affinity_loss, segmentation_loss
from .memory import trim_heap
from .normalization import mean_std
from .par import cam_stack, pixel_adaptive_refine, pseudo_labels_from_cams, upsample_cams
from .refine import apply_transition, patch_attention, refine_affinity, sinkhorn_transition, static_refine_map
from .text import ClassSpec, resolve_classes, text_embeddings

__all__ = ["WeCLIP", "build_model", "select_device"]


@contextmanager
def _stage(owner: "WeCLIP", name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``owner.timings[name]`` when ``owner.timings``
    is a dict (benchmarks); a no-op otherwise. The time is recorded also when the body raises."""
    t = owner.timings
    if t is None:
        yield
        return
    sync = bool(t.get("_sync")) and torch.cuda.is_available()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize()
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0


class WeCLIP(nn.Module):
    """WeCLIP (docs/method.md §1). Build with ``build_model``.

    Attributes: ``backbone`` (``FrozenCLIP``), ``decoder`` (``WeCLIPDecoder``, the only trainable
    part), ``classes`` (``ClassSpec``), buffers ``text_fg`` ``(C−1)×E`` and ``text_bg`` ``n_bg×E``.
    """

    text_fg: torch.Tensor
    text_bg: torch.Tensor
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, cfg: WeCLIPConfig, backbone: FrozenCLIP, classes: ClassSpec, text_fg: torch.Tensor,
                 text_bg: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.classes = classes
        n = backbone.num_blocks
        self.feature_blocks = n - 1 if cfg.decoder.input_blocks == "code" else n  # docs/method.md §6.1, §12
        d = cfg.decoder
        self.decoder = WeCLIPDecoder(self.feature_blocks, backbone.width, classes.num_classes, d.dim, d.num_layers,
                                     d.num_heads, d.mlp_ratio, d.dropout)
        self.register_buffer("text_fg", text_fg.float().clone(), persistent=False)
        self.register_buffer("text_bg", text_bg.float().clone(), persistent=False)
        mean, std = mean_std(cfg.backbone.normalize)
        self.register_buffer("pixel_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.iter_num = 0  # forward counter of the RFM switch (docs/method.md §4.5)
        self.timings: Optional[dict] = None  # set to {} to collect per-stage seconds (benchmarks)
        r = cfg.refine
        self._attn_blocks = n if r.refine_map == "as" else min(n, max(r.static_blocks, r.candidate_blocks))
        if r.candidate_blocks > n or r.static_blocks > n:
            raise ValueError(f"refine.candidate_blocks/static_blocks exceed the backbone depth ({n})")

    # ---- basic pieces ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """``B×3×H×W`` 0..255 RGB → normalised input (docs/method.md §2.2)."""
        return (images_uint8.float() - self.pixel_mean) / self.pixel_std

    def _features(self, images: torch.Tensor, attn_blocks: int, pooled: bool = False,
                  precision: Optional[str] = None, keep_dtype: bool = False):
        """Frozen CLIP blocks without grad. Returns ``(feats, attn, hw)``; ``attn`` covers the
        last ``attn_blocks`` of blocks ``1..N−1`` (block N's map comes from GradCAM).

        ``precision``: ``fp32`` or ``bf16`` (default ``backbone.precision``); bf16 outputs are
        returned as fp32 unless ``keep_dtype`` (the bf16 inference forward keeps them).

        ``pooled`` (training): the kept outputs are written into two buffers allocated up front,
        so each block's temporaries reuse the same freed memory instead of fragmenting the heap
        around the kept tensors (peak RSS of a CPU training step). The inference and
        export path keeps plain per-block tensors (traceable with dynamic shapes).
        """
        bb = self.backbone
        n_run = max(self.feature_blocks, bb.num_blocks - 1)
        first_attn = bb.num_blocks - attn_blocks  # 0-based index of the first block whose map is needed
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if precision is None:
            precision = self.cfg.backbone.precision
        if tracing:
            precision = "fp32"  # exported graphs stay fp32
        packed = bb.packed_linears(precision, images.device.type) if not tracing else None
        with torch.no_grad(), frozen_clip_arithmetic(precision, images.device.type):
            p = bb.patch_size
            hw = (images.shape[-2] // p, images.shape[-1] // p)
            t = bb.embed(images)
            feats, attns = [], []
            if pooled:
                B, L, D = t.shape
                fbuf = t.new_empty(n_run, B, L, D, dtype=torch.float32)
                n_attn = max(0, n_run - max(first_attn, 0))
                abuf = t.new_empty(n_attn, B, L, L, dtype=torch.float32)
                feats, attns = list(fbuf.unbind(0)), list(abuf.unbind(0))
            for i, blk in enumerate(bb.blocks[:n_run]):
                t, a = run_block(blk, t, need_attn=i >= first_attn, packed=packed)
                if pooled:
                    t = feats[i].copy_(t)
                    if a is not None:
                        attns[i - max(first_attn, 0)].copy_(a)
                    continue
                feats.append(t)
                if a is not None:
                    attns.append(a)
        if precision == "bf16" and not pooled and not keep_dtype:  # the decoder and the label path take fp32
            feats, attns = [f.float() for f in feats], [a.float() for a in attns]
        return feats, attns, hw

    def segment(self, images: torch.Tensor, precision: Optional[str] = None) -> torch.Tensor:
        """Inference forward shared by the predictor, training eval and export.

        ``images`` ``B×3×H×W`` normalised → fp32 logits ``B×C×(H//p)×(W//p)``. ``precision``:
        ``fp32`` or ``bf16`` for the frozen CLIP and the decoder (default
        ``inference.precision``); traced or exported graphs are always fp32.
        """
        if precision is None:
            precision = self.cfg.inference.precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            precision = "fp32"
        feats, _, hw = self._features(images, attn_blocks=0, precision=precision, keep_dtype=True)
        if precision == "bf16":
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
                logits, _ = self.decoder(feats[: self.feature_blocks], hw)
            return logits.float()
        logits, _ = self.decoder(feats[: self.feature_blocks], hw)
        return logits

    # ---- pseudo labels ----------------------------------------------------------------------------
    def _use_rfm(self, use_rfm: Optional[bool]) -> bool:
        if use_rfm is not None:
            return bool(use_rfm)
        r = self.cfg.refine
        return r.use_rfm and self.iter_num > r.rfm_switch_iter

    def refinement_kind(self, use_rfm: Optional[bool] = None) -> str:
        """The refinement the training path applies: ``"none"`` (``refine.use_refinement`` off),
        ``"rfm"`` (the decoder-affinity refinement, once the forward counter has passed the switch
        or when ``use_rfm`` says so) or ``"static"`` (the CLIP attention average)."""
        if not self.cfg.refine.use_refinement:
            return "none"
        return "rfm" if self._use_rfm(use_rfm) else "static"

    def label_cams(self, tokens_prev: torch.Tensor, attns: Sequence[torch.Tensor], hw: tuple[int, int],
                   keys: Sequence[Sequence[int]], *, refinement: str = "static", aff: Optional[torch.Tensor] = None,
                   text_fg: Optional[torch.Tensor] = None, text_bg: Optional[torch.Tensor] = None,
                   record: Optional[dict] = None) -> list[torch.Tensor]:
        """GradCAM on the last CLIP block, box masks and refinement: per image ``K_i×h×w`` CAMs on
        the patch grid (the first half of the pseudo-label path; ``par_labels`` is the second).

        ``tokens_prev``: ``B×L×D`` output of block N−1; ``attns``: head-averaged ``B×L×L`` maps of
        the blocks before N that the refinement uses (block N's map comes from GradCAM);
        ``keys``: per image the 0-based rows of ``text_fg`` to explain (ascending);
        ``refinement``: ``"rfm"`` (needs ``aff``, the decoder's ``B×hw×hw`` affinity),
        ``"static"`` or ``"none"``; ``text_fg``/``text_bg``: text embeddings (default: the
        model's class prompts and background prompts). Training and the annotator both call this.
        """
        if refinement not in ("rfm", "static", "none"):
            raise ValueError(f"refinement must be 'rfm', 'static' or 'none', not {refinement!r}")
        r = self.cfg.refine
        fg = self.text_fg if text_fg is None else text_fg
        bg = self.text_bg if text_bg is None else text_bg
        # GradCAM keeps fp32 accuracy in every precision mode (its gradients are ill-conditioned in
        # half precision, docs/method.md §3.3); on CPUs with native bf16 that is oneDNN's split-bf16
        # fp32 kernels, checked against float64 at start-up.
        with _stage(self, "gradcam"), fp32_matmul(tokens_prev.device.type):
            cam = initial_cam(self.backbone, tokens_prev, hw, keys, fg, bg, r.cam_logit_scale)
        with _stage(self, "refine"):
            maps = patch_attention(list(attns) + [cam.attn_last])  # B×n×hw×hw, last block last
            boxes = box_masks_batch(cam.cams, r.box_threshold)
            refined, trans, rmap, scores, keep = cam.cams, None, None, None, None
            if refinement != "none":
                if refinement == "rfm":
                    if aff is None:
                        raise ValueError("refinement='rfm' needs the decoder affinity (aff)")
                    rmap, scores, keep = refine_affinity(maps, aff, r)
                else:
                    rmap = static_refine_map(maps, r.static_blocks)
                trans = sinkhorn_transition(rmap, r.sinkhorn_iters, r.power)
                refined = [apply_transition(trans[b], cam.cams[b], boxes[b]) for b in range(len(keys))]
            if record is not None:
                record.update(cam_keys=cam.keys, cam_init=cam.cams, clip_probs=cam.probs, attn_last=cam.attn_last,
                              box_mask=boxes, use_rfm=refinement == "rfm", transition=trans, cam_refined=refined)
                if refinement != "none":
                    record.update(refine_map=rmap, layer_scores=scores, layer_keep=keep)
                # the static refinement as well, for comparison (docs/method.md §4.1)
                st = sinkhorn_transition(static_refine_map(maps, r.static_blocks), r.sinkhorn_iters, r.power)
                record["cam_static"] = [apply_transition(st[b], cam.cams[b], boxes[b]) for b in range(len(keys))]
        return refined

    def par_labels(self, guide: torch.Tensor, cams_hr: Sequence[torch.Tensor], keys: Sequence[Sequence[int]],
                   record: Optional[dict] = None) -> torch.Tensor:
        """Background channel, PAR guided by ``guide`` (``B×3×H×W`` normalised image) and argmax:
        per image ``K_i×H×W`` CAMs in [0, 1] (``upsample_cams``) → ``B×H×W`` int64 labels in
        ``{0} ∪ {k + 1 for k in keys}`` (the second half of the pseudo-label path)."""
        r, p = self.cfg.refine, self.cfg.par
        with _stage(self, "par"):
            stack, valid = cam_stack(cams_hr, r.bg_power)
            par_out = pixel_adaptive_refine(guide, stack, p.dilations, p.num_iter, p.w1, p.w2)
            labels = pseudo_labels_from_cams(par_out, valid, keys)
        if record is not None:
            record.update(cam_refined_hr=list(cams_hr), par_in=stack, cam_par=par_out, par_valid=valid,
                          pseudo_label=labels)
        return labels

    def _pseudo_labels(self, images, feats, attns, hw, aff, keys, refinement: str, record: Optional[dict] = None):
        """The pseudo labels of docs/method.md §3–§5 for a batch. Returns ``B×H×W`` int64 pseudo labels.

        Always computed in fp32, also inside an AMP autocast region (``train.amp``): GradCAM,
        Sinkhorn and PAR are the label path, not the trained path, and stay exact.
        """
        with torch.autocast(device_type=images.device.type, enabled=False):
            n = self.backbone.num_blocks
            images = images.float()
            refined = self.label_cams(feats[n - 2].float(), [a.float() for a in attns], hw, keys,
                                      refinement=refinement, aff=aff.float(), record=record)
            return self.par_labels(images, upsample_cams(refined, images.shape[-2:]), keys, record)

    # ---- training forward --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, cls_labels: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None, use_rfm: Optional[bool] = None) -> dict[str, torch.Tensor]:
        """One training step's forward (inference is ``segment``; every named intermediate is
        ``intermediates``): ``images`` ``B×3×H×W`` normalised, ``cls_labels`` ``B×(C−1)``
        multi-hot → dict ``loss``, ``loss_seg``, ``loss_aff``, ``seg_logits``, ``pseudo_label``,
        ``affinity``. Fully supervised mode takes ``masks`` ``B×H×W`` instead of ``cls_labels``."""
        if cls_labels is None and masks is None:
            raise ValueError("forward is the training step and needs cls_labels (or masks in fully supervised "
                             "mode); use WeCLIP.segment for inference")
        return self._train_step(images, cls_labels, masks, use_rfm, record=None)

    def _train_step(self, images, cls_labels, masks, use_rfm, record: Optional[dict]) -> dict[str, torch.Tensor]:
        if self.training or self.cfg.refine.count_eval_forwards:
            self.iter_num += 1
        fully = self.cfg.decoder.fully_supervised
        attn_blocks = 0 if fully else self._attn_blocks
        with _stage(self, "clip"):
            feats, attns, hw = self._features(images, attn_blocks=max(attn_blocks, 0), pooled=True)
        with _stage(self, "decoder"):
            fu = self.decoder.fuse_features(feats[: self.feature_blocks], hw)
            logits, dec_attn = self.decoder.head(fu, need_weights=record is not None)
        out: dict = {"seg_logits": logits}
        if record is not None:
            record.update(features=[f[:, 1:].transpose(1, 2).reshape(f.shape[0], -1, *hw) for f in feats],
                          tokens=feats, attn=attns, fu=fu, decoder_attn=dec_attn, hw=hw,
                          text_fg=self.text_fg, text_bg=self.text_bg, seg_logits=logits)
        if fully:
            if masks is None:
                raise ValueError("fully supervised mode needs ground-truth masks")
            loss = segmentation_loss(logits, masks, kind="ce")
            out.update(loss=loss, loss_seg=loss, loss_aff=loss.new_zeros(()), pseudo_label=masks)
            return out
        if cls_labels is None:
            raise ValueError("weakly supervised training needs image-level labels (cls_labels)")
        keys = class_keys(cls_labels)
        aff = self.decoder.affinity(fu)
        pseudo = self._pseudo_labels(images, feats, attns, hw, aff, keys, self.refinement_kind(use_rfm), record)
        with _stage(self, "loss"):
            aff_target = affinity_labels(pseudo, hw, self.cfg.loss.aff_radius)
            loss_seg = segmentation_loss(logits, pseudo, self.cfg.loss.seg)
            loss_aff = affinity_loss(aff, aff_target, self.cfg.loss.aff)
            loss = loss_seg + self.cfg.loss.aff_weight * loss_aff
        out.update(loss=loss, loss_seg=loss_seg, loss_aff=loss_aff, pseudo_label=pseudo, affinity=aff)
        if record is not None:
            record.update(affinity=aff, affinity_target=aff_target, loss_seg=loss_seg, loss_aff=loss_aff, loss=loss)
        return out

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, cls_labels: torch.Tensor,
                      use_rfm: Optional[bool] = None) -> torch.Tensor:
        """Online pseudo labels ``B×H×W`` for normalised ``images`` and multi-hot ``cls_labels``."""
        feats, attns, hw = self._features(images, attn_blocks=self._attn_blocks, pooled=True)
        aff = self.decoder.affinity(self.decoder.fuse_features(feats[: self.feature_blocks], hw))
        return self._pseudo_labels(images, feats, attns, hw, aff, class_keys(cls_labels), self.refinement_kind(use_rfm))

    def intermediates(self, images: torch.Tensor, cls_labels: torch.Tensor, use_rfm: Optional[bool] = None) -> dict:
        """Every named intermediate of one training forward (no parameter update; the forward
        counter is not advanced). ``images`` ``B×3×H×W`` normalised (docs/method.md §2.2), ``cls_labels``
        ``B×(C−1)`` multi-hot. ``use_rfm``: None → regime implied by the counter.

        Keys (``h=H//p``, ``w=W//p``, ``hw=h·w``, ``L=1+hw``; per-image lists where ``K_i`` differs):

        * ``features``: list over decoder-input blocks of ``B×D×h×w`` (CLS removed);
          ``tokens``: same as ``B×L×D`` with CLS; ``attn``: list of ``B×L×L`` head-averaged maps
          for the blocks the refinement uses (all blocks 1..N−1 here), CLS included;
          ``attn_last``: ``B×L×L`` (block N, from GradCAM).
        * ``text_fg`` ``(C−1)×E``, ``text_bg`` ``n_bg×E``.
        * ``cam_keys``: per image the 0-based class ids; ``clip_probs``: per image ``K×(K+n_bg)``.
        * ``cam_init``: per image ``K×h×w`` GradCAM in [0,1]; ``box_mask``: per image ``K×h×w``.
        * ``cam_static``: per image ``K×h×w`` static-refined CAM; ``refine_map``: ``B×hw×hw`` (R or
          Â); ``layer_scores``/``layer_keep``: ``B×k`` (RFM only); ``transition``: ``B×hw×hw``;
          ``cam_refined``: per image ``K×h×w``; ``cam_refined_hr``: per image ``K×H×W``.
        * ``par_in``/``cam_par``: ``B×(1+Kmax)×H×W`` (bg first; padded channels invalid per
          ``par_valid``); ``pseudo_label``: ``B×H×W`` int64.
        * ``seg_logits`` ``B×C×h×w``; ``fu`` ``B×dim×h×w``; ``affinity`` ``B×hw×hw``;
          ``affinity_target`` ``B×hw×hw`` uint8 (1/0/255); ``loss_seg``, ``loss_aff``, ``loss``.
        """
        record: dict = {}
        saved = self.iter_num
        old_attn = self._attn_blocks
        self._attn_blocks = self.backbone.num_blocks
        try:
            self._train_step(images, cls_labels, None, use_rfm, record)
        finally:
            self.iter_num = saved
            self._attn_blocks = old_attn
        return record

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, decoder_params={count_parameters(self.decoder):,}"


def build_model(config: Union[WeCLIPConfig, Mapping, str, Path, None] = None, device=None,
                text_fg: Optional[torch.Tensor] = None, text_bg: Optional[torch.Tensor] = None,
                clip: Optional[nn.Module] = None, keep_text_tower: bool = False) -> WeCLIP:
    """Build a ``WeCLIP`` from a config (dataclass, dict or YAML path).

    Text embeddings are computed once with the CLIP text tower unless given (checkpoints carry
    them); the text tower is then dropped unless ``keep_text_tower``.
    """
    cfg = load_config(config)
    dev = select_device(device)
    classes = resolve_classes(cfg.text)
    if clip is None:
        clip = load_clip(cfg.backbone, device="cpu")
    backbone = FrozenCLIP(clip)
    if text_fg is None or text_bg is None:
        text_fg = text_embeddings(backbone, classes.prompts, classes.templates)
        text_bg = text_embeddings(backbone, classes.bg_prompts, classes.templates)
    if text_fg.shape[0] != len(classes.names):
        raise ValueError(f"text_fg has {text_fg.shape[0]} rows but there are {len(classes.names)} classes")
    if not keep_text_tower:
        backbone.drop_text_tower()
    model = WeCLIP(cfg, backbone, classes, text_fg, text_bg).to(dev)
    trim_heap()  # the dropped text tower and loading buffers
    return model
