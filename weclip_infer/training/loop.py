"""The WeCLIP training loop: ``train(config, overrides, resume, out_dir) -> summary``.

One iteration: a batch of augmented crops → ``WeCLIP.forward(images, cls_labels)``
(frozen CLIP, decoder, GradCAM, static refinement or RFM, PAR, online pseudo labels, losses) →
backward into the decoder → AdamW step at ``lr_at(step)``. Training is iteration-based; when
the loader is exhausted a new epoch starts (``dataset.set_epoch``; shuffled with a generator
seeded by ``seed + epoch``; ``drop_last``).

Run folder ``<out>``::

    config.yaml                 the resolved config (model + train + data)
    log.csv                     every iteration: iter, epoch, loss, loss_seg, loss_aff (mean over
                                processes), lr, time (s), pseudo_miou (running mIoU of the online
                                pseudo labels vs the crops' GT since the last evaluation), rfm
                                (1 when that forward used RFM, 0 for the static refinement)
    train.log                   the console log lines
    eval.jsonl                  one JSON line per evaluation (val mIoU, per-class IoU, pseudo-label mIoU)
    eval/iter_<N>.md            per-class IoU tables
    panels/iter_<N>.png         image | GT | initial CAM | refined CAM | pseudo label | prediction
    plots/loss.png, miou.png    curves
    tb/                         TensorBoard scalars (when tensorboard is installed)
    checkpoints/iter_<N>/       model (our format) + train_state.pt + train_config.json
    checkpoints/latest          name of the newest complete checkpoint
    summary.json                what ``train`` returns

Exact resume: ``resume=<checkpoint or run folder>`` restores weights, optimiser, RNG states,
iteration, epoch and position inside the epoch, and the RFM forward counter, so on CPU the loss
sequence after resuming equals the uninterrupted run's. A run folder resumes from its newest
checkpoint that loads (a damaged newest one is skipped with a warning).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from weclip_infer.config import ConfigError
from weclip_infer.hardware import fast_fp32_matmul_available, fp32_matmul
from weclip_infer.io_utils import atomic_path, write_json_atomic
from weclip_infer.memory import reuse_freed_memory

from .config import FullConfig, dump_yaml, full_config_to_dict, load_train_config
from .distributed import (
    DistInfo,
    ResumableSampler,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from .evaluation import PseudoLabelMeter, evaluate_segmentation
from .runlog import LOG_COLUMNS, CsvLog, append_eval, logger, open_tensorboard, read_evals, run_log_file
from .schedule import build_optimizer, lr_at, set_lr
from .state import (
    capture_rng,
    clean_stale_temporaries,
    find_resumable,
    has_checkpoints,
    latest_checkpoint,
    load_checkpoint_config,
    prune_checkpoints,
    resolve_resume,
    restore_rng,
    save_training_checkpoint,
)

__all__ = ["train", "build_datasets", "seed_everything", "LOG_COLUMNS"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = True) -> None:
    """python / numpy / torch / CUDA seeds; cudnn deterministic."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def _fmt(v: Optional[float]) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _none_nan(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def build_datasets(cfg: FullConfig, class_names: Sequence[str], *, need_val: bool):
    """(train dataset with the training augmentation, val dataset at original size or None).

    Errors (missing listed files, unknown classes, empty label sets, class lists that do not
    match the model's) are ``ConfigError``/``DatasetError`` raised here, before training starts.
    A custom folder without a validation label file trains without evaluation.
    """
    from weclip_infer.data import TrainTransform, build_dataset, load_class_names

    d = cfg.data
    root = Path(d.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: not a folder: {root}")
    names_file = d.class_names_file
    if names_file is None and d.kind == "demo" and (root / "classes.json").is_file():
        names_file = str(root / "classes.json")
    if names_file is not None:
        file_names = load_class_names(names_file)
        if list(file_names) != list(class_names):
            raise ConfigError(f"data.class_names_file: {names_file} lists classes {file_names}, but the model "
                              f"(model.text) has {list(class_names)}; they must match in order")
    kind = "voc" if d.kind == "demo" else d.kind
    norm = cfg.model.backbone.normalize
    common: dict[str, Any] = {"class_names": list(class_names)}
    if kind == "custom":
        if d.masks_dir is not None:
            common["masks"] = d.masks_dir
        train_kw = dict(common, labels=d.labels_file) if d.labels_file else dict(common)
    else:
        if d.labels_file is not None:
            common["labels_file"] = d.labels_file
        train_kw = dict(common)
    tt = TrainTransform(crop_size=d.crop_size, scale_range=tuple(d.scale_range), flip=d.flip, normalize=norm)
    train_ds = build_dataset(kind, root, d.train_split, transform=tt, rng_seed=cfg.train.seed, **train_kw)
    val_ds = None
    if need_val and d.val_split:
        if kind == "custom" and not any((root / f"{d.val_split}{ext}").is_file() for ext in (".csv", ".json")):
            logger.info("data.val_split: no %s.csv / %s.json in %s; training without evaluation",
                        d.val_split, d.val_split, root)
        else:
            val_ds = build_dataset(kind, root, d.val_split, augment=False, normalize=norm, require_labels=False,
                                   **common)
    return train_ds, val_ds


@dataclass
class _Progress:
    """Where the run is: iteration, epoch, position inside the epoch, time spent before a resume."""

    iteration: int = 0
    epoch: int = 0
    epoch_pos: int = 0
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

def train(config: Union[FullConfig, dict, str, os.PathLike, None] = None, overrides: Sequence[str] = (),
          resume: Union[str, os.PathLike, None] = None, out_dir: Union[str, os.PathLike, None] = None) -> dict:
    """Train WeCLIP's decoder; returns a summary dict (also written to ``<out>/summary.json``).

    ``config``: a training YAML path, dict or ``FullConfig`` (``model``/``train``/``data``
    sections); may be None when resuming (the checkpoint's own config is used).
    ``overrides``: ``section.key=value`` strings. ``resume``: a checkpoint directory, a run folder
    (its newest checkpoint that loads) or ``"auto"`` (resume ``out_dir`` if it holds a checkpoint,
    else start fresh). ``out_dir``: run folder (default: the run folder of the checkpoint resumed,
    else ``train.out_dir``).
    Multi-process: run under ``torchrun``; every process calls ``train`` with the same arguments.
    """
    ckpt: Optional[Path] = None
    state: Optional[dict] = None
    if resume is not None and str(resume) != "auto":
        ckpt, state = resolve_resume(resume)
        if config is None:
            config = load_checkpoint_config(ckpt)
        if out_dir is None and ckpt.parent.name == "checkpoints":
            out_dir = ckpt.parent.parent  # continue the run where its checkpoint lives (even if moved)
    if config is None:
        raise ConfigError("a training config is required (--config)")
    cfg = load_train_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir)
    cfg.train.out_dir = str(out)
    if resume is not None and str(resume) == "auto":
        found = find_resumable(out)
        if found is not None:
            ckpt, state = found
    elif ckpt is None and has_checkpoints(out):
        raise ConfigError(f"{out} already holds a training run (checkpoints/); resume it with "
                          f"--resume {out} (or --resume auto), or choose another --out")

    info = init_distributed(cfg.train.device, cfg.train.dist_backend)
    finished = False
    try:
        result = _train(cfg, out, ckpt, state, info)
        finished = True
        return result
    finally:
        cleanup_distributed(info, finished=finished)


def _build_model(cfg: FullConfig, ckpt: Optional[Path], device: torch.device):
    """The model to train: decoder and text embeddings from ``ckpt`` when resuming (read and
    checked by :mod:`weclip_infer.checkpoint`), else a fresh decoder from the global RNG."""
    from weclip_infer.backbone import load_clip
    from weclip_infer.checkpoint import load_decoder_state, read_checkpoint_tensors
    from weclip_infer.model import build_model

    mcfg = cfg.model
    tensors: dict = {}
    if ckpt is not None:
        tensors = read_checkpoint_tensors(ckpt)
    with torch.random.fork_rng(devices=[]):  # loading CLIP ("random" re-seeds) must not touch the training RNG
        clip = load_clip(mcfg.backbone, device="cpu")
    model = build_model(mcfg, device="cpu", text_fg=tensors.pop("text_fg", None), text_bg=tensors.pop("text_bg", None),
                        clip=clip)
    if ckpt is not None:
        dec = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
        load_decoder_state(model, dec, str(ckpt / "model.safetensors"))
    model.to(device)
    model.train()
    return model


def _restore_state(state: Optional[dict], model, optimizer, scaler, meter: PseudoLabelMeter,
                   info: DistInfo) -> _Progress:
    """Optimiser, AMP scaler, RFM counter, pseudo-label matrix and RNG states of a checkpoint."""
    if not state:
        return _Progress()
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    model.iter_num = int(state["iter_num"])
    if info.is_main:  # the saved matrix is the sum over processes
        meter.load(state.get("pseudo_hist"))
    rngs = state.get("rng") or []
    if len(rngs) == info.world_size:
        restore_rng(rngs[info.rank])
    elif rngs:
        logger.warning("resuming with %d processes from a %d-process checkpoint: RNG states are re-seeded, the run "
                       "will not match the uninterrupted one exactly", info.world_size, len(rngs))
        if info.is_main:
            restore_rng(rngs[0])
    return _Progress(iteration=int(state["iteration"]), epoch=int(state["epoch"]), epoch_pos=int(state["epoch_pos"]),
                     elapsed_before=float(state.get("elapsed", 0.0)))


class _RunOutputs:
    """Rank 0's run-folder outputs: config.yaml, log.csv, eval.jsonl, TensorBoard, plots."""

    def __init__(self, cfg: FullConfig, out: Path, start_iter: int, main: bool):
        self.cfg, self.out, self.main = cfg, out, main
        self.bar: Any = None
        self.window: list[list[float]] = []
        if main:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / "config.yaml") as tmp:
                tmp.write_text(dump_yaml(cfg), encoding="utf-8")
        self.csv = CsvLog(out / "log.csv", start_iter, main)
        self.evals = read_evals(out / "eval.jsonl", start_iter) if main else []
        self.tb = open_tensorboard(out, main and cfg.train.tensorboard)
        if main and cfg.train.plots and not _have_mpl():
            logger.info("note: matplotlib not installed; curves are drawn with the built-in PIL plotter")

    def start_progress(self, start_iter: int) -> None:
        """The tqdm bar (rank 0, ``train.progress``)."""
        if self.main and self.cfg.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.train.max_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                            unit="it", file=sys.stderr)

    def stop_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_step(self, progress: _Progress, start_iter: int, vals: list, lr: float, pm: float, rfm: int) -> None:
        """log.csv row, TensorBoard scalars, the bar, and every ``train.log_every`` a log line."""
        if not self.main:
            return
        it = progress.iteration
        self.csv.write({"iter": it, "epoch": progress.epoch, "loss": repr(vals[0]), "loss_seg": repr(vals[1]),
                        "loss_aff": repr(vals[2]), "lr": repr(lr), "time": f"{progress.elapsed():.3f}",
                        "pseudo_miou": "" if math.isnan(pm) else f"{pm:.6f}", "rfm": rfm})
        if self.tb is not None:
            for k, v in zip(("loss", "loss_seg", "loss_aff"), vals):
                self.tb.add_scalar(f"train/{k}", v, it)
            self.tb.add_scalar("train/lr", lr, it)
            if not math.isnan(pm):
                self.tb.add_scalar("train/pseudo_miou_running", pm, it)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{lr:.2e}", plm=_fmt(pm), refresh=False)
        log_every, max_iters = self.cfg.train.log_every, self.cfg.train.max_iters
        if log_every:
            self.window.append(vals)
            if it % log_every == 0 or it == max_iters:
                _log_window(self.window, progress, start_iter, max_iters, lr, pm, rfm)
                self.window = []

    def evaluation(self, rec: dict, it: int) -> None:
        """eval.jsonl, TensorBoard and the curves after an evaluation (rank 0)."""
        if not self.main:
            return
        self.evals.append(rec)
        append_eval(self.out / "eval.jsonl", rec)
        if self.tb is not None:
            for key in ("miou", "pseudo_miou"):
                if rec.get(key) is not None:
                    self.tb.add_scalar(f"eval/{key}", rec[key], it)
        self.plots()

    def plots(self) -> None:
        if not (self.main and self.cfg.train.plots and self.csv.rows):
            return
        from .visualize import plot_curves

        try:
            plot_curves(self.out / "plots", self.csv.rows, self.evals)
        except Exception as e:  # noqa: BLE001 - pictures must never stop training
            logger.warning("could not draw plots: %s", e)

    def close(self) -> None:
        self.stop_progress()
        self.csv.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _train(cfg: FullConfig, out: Path, ckpt: Optional[Path], state: Optional[dict], info: DistInfo) -> dict:
    from weclip_infer.text import resolve_classes

    tcfg = cfg.train
    main = info.is_main
    class_names = resolve_classes(cfg.model.text).names
    need_val = tcfg.eval_every > 0 or tcfg.eval_at_end

    # data first: a broken dataset fails before anything is built or written
    train_ds, val_ds = build_datasets(cfg, class_names, need_val=need_val)
    fully = bool(cfg.model.decoder.fully_supervised)
    if fully:
        nomask = [s.name for s in train_ds.samples if s.mask is None]
        if nomask:
            raise ConfigError(f"model.decoder.fully_supervised: needs a GT mask for every training image; "
                              f"{len(nomask)} have none (e.g. {nomask[:3]})")
    sampler = ResumableSampler(len(train_ds), seed=tcfg.seed, rank=info.rank, world_size=info.world_size)
    if sampler.per_rank // tcfg.batch_size < 1:
        raise ConfigError(f"train.batch_size: the training split has {len(train_ds)} images, fewer than "
                          f"batch_size ({tcfg.batch_size}) x processes ({info.world_size})")
    if state and int(state["iteration"]) > tcfg.max_iters:
        raise ConfigError(f"train.max_iters={tcfg.max_iters} is below the checkpoint's iteration {state['iteration']}")

    seed_everything(tcfg.seed + info.rank, tcfg.deterministic)
    model = _build_model(cfg, ckpt, info.device)
    cfg.model = model.cfg  # the settings that follow the backbone, as resolved
    optimizer = build_optimizer(model.decoder.parameters(), tcfg)
    amp_dtype = torch.bfloat16 if tcfg.amp_dtype == "bfloat16" else torch.float16
    scaler = (torch.amp.GradScaler("cuda") if (tcfg.amp and amp_dtype == torch.float16 and info.device.type == "cuda")
              else None)
    meter = PseudoLabelMeter(model.num_classes, info.device)
    progress = _restore_state(state, model, optimizer, scaler, meter, info)

    if main:
        clean_stale_temporaries(out)
        out.mkdir(parents=True, exist_ok=True)
    with run_log_file(out / "train.log" if main else None):
        outputs = _RunOutputs(cfg, out, progress.iteration, main)
        try:
            return _run(cfg, out, ckpt, info, model, optimizer, scaler, meter, progress, train_ds, val_ds, sampler,
                        outputs, amp_dtype, class_names)
        finally:
            outputs.close()


def _make_loader(cfg: FullConfig, train_ds, sampler: ResumableSampler, dev: torch.device) -> DataLoader:
    from weclip_infer.data import collate

    return DataLoader(
        train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.data.workers,
        collate_fn=collate, pin_memory=dev.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers > 0 else None,
        # own generator: creating an epoch iterator must not draw from the global torch RNG
        generator=torch.Generator().manual_seed(cfg.train.seed), persistent_workers=False)


def _batches(loader: DataLoader, train_ds, sampler: ResumableSampler, progress: _Progress,
             batch_size: int) -> Iterator[dict]:
    """Batches across epochs, from ``progress``'s epoch and position (an exact resume); keeps
    ``progress.epoch``/``epoch_pos`` up to date."""
    while True:
        train_ds.set_epoch(progress.epoch)
        sampler.set_epoch(progress.epoch, start=progress.epoch_pos * batch_size)
        for batch in loader:
            progress.epoch_pos += 1
            yield batch
        progress.epoch, progress.epoch_pos = progress.epoch + 1, 0


def _run(cfg: FullConfig, out: Path, ckpt: Optional[Path], info: DistInfo, model, optimizer, scaler,
         meter: PseudoLabelMeter, progress: _Progress, train_ds, val_ds, sampler: ResumableSampler,
         outputs: _RunOutputs, amp_dtype: torch.dtype, class_names: Sequence[str]) -> dict:
    """The iteration loop, then the summary."""
    tcfg, r = cfg.train, cfg.model.refine
    dev = info.device
    fully = bool(cfg.model.decoder.fully_supervised)
    all_names = ["background"] + list(class_names)
    start_iter = progress.iteration
    net: torch.nn.Module = model
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=tcfg.find_unused_parameters)
    loader = _make_loader(cfg, train_ds, sampler, dev)
    if info.is_main:
        _log_start(cfg, model, train_ds, val_ds, info, ckpt, start_iter, sampler.per_rank // tcfg.batch_size)
    outputs.start_progress(start_iter)
    progress.t_start = time.perf_counter()
    last_ckpt: Optional[Path] = None
    final_eval: Optional[dict] = None
    vals = [math.nan, math.nan, math.nan]
    autocast: Callable[[], Any] = ((lambda: torch.autocast(device_type=dev.type, dtype=amp_dtype)) if tcfg.amp
                                   else contextlib.nullcontext)
    # On CPU, freed step temporaries stay in the heap for the next step instead of being unmapped
    # and page-faulted in again (weclip_infer.memory).
    reuse_freed_memory(device=dev)
    batches = _batches(loader, train_ds, sampler, progress, tcfg.batch_size)
    while progress.iteration < tcfg.max_iters:
        batch = next(batches)
        lr = lr_at(progress.iteration, tcfg)
        outd, masks = _step(net, optimizer, scaler, batch, progress.iteration, lr, dev, autocast, fully)
        progress.iteration = it = progress.iteration + 1
        vals = all_reduce_mean(torch.stack([outd["loss"].detach(), outd["loss_seg"].detach(),
                                            outd["loss_aff"].detach()]).float()).tolist()
        if not fully:
            meter.update(outd["pseudo_label"].detach(), masks, batch["has_mask"])
        pm = meter.miou() if not fully else math.nan
        rfm = int(not fully and r.use_rfm and r.use_refinement and model.iter_num > r.rfm_switch_iter)
        outputs.after_step(progress, start_iter, vals, lr, pm, rfm)

        is_last = it == tcfg.max_iters
        if val_ds is not None and ((is_last and tcfg.eval_at_end) or (tcfg.eval_every and it % tcfg.eval_every == 0)):
            rec = _evaluate(model, val_ds, all_names, cfg, info, meter, it, multiscale=is_last and tcfg.eval_at_end,
                            out=out, fully=fully)
            outputs.evaluation(rec, it)
            final_eval = rec if is_last else final_eval
        if is_last or (tcfg.checkpoint_every and it % tcfg.checkpoint_every == 0):
            last_ckpt = _checkpoint(out, model, optimizer, scaler, meter, progress, cfg, info, vals) or last_ckpt
    outputs.stop_progress()
    outputs.plots()
    if last_ckpt is None and info.is_main:
        last_ckpt = latest_checkpoint(out)
    return _finish(out, model, info, progress, start_iter, vals, last_ckpt, final_eval, meter, fully)


def _step(net, optimizer, scaler, batch: dict, it: int, lr: float, dev: torch.device, autocast, fully: bool):
    """Optimiser step ``it`` (0-based) at learning rate ``lr``; returns the forward's outputs and
    the masks."""
    images = batch["image"].to(dev, non_blocking=True)
    cls = batch["cls_label"].to(dev, non_blocking=True)
    masks = batch["mask"].to(dev, non_blocking=True)
    set_lr(optimizer, lr)
    # fp32 products at fp32 accuracy, on oneDNN's faster split-bf16 kernels where the CPU has them
    with fp32_matmul(dev.type):
        with autocast():
            outd = net(images, cls_labels=cls, masks=masks if fully else None)
        loss = outd["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite loss at iteration {it + 1}: {float(loss):.4g}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return outd, masks


def _checkpoint(out: Path, model, optimizer, scaler, meter: PseudoLabelMeter, progress: _Progress, cfg: FullConfig,
                info: DistInfo, last_vals: list) -> Optional[Path]:
    """Write a checkpoint (rank 0) with every process's RNG state; prune old ones."""
    rng_states = all_gather_objects(capture_rng())
    hist = all_reduce_sum(meter.hist.clone())
    path = None
    if info.is_main:
        path = save_training_checkpoint(
            out, model, optimizer, iteration=progress.iteration, epoch=progress.epoch, epoch_pos=progress.epoch_pos,
            full_config=full_config_to_dict(cfg), rng_states=rng_states, pseudo_hist=hist,
            elapsed=progress.elapsed(), scaler_state=scaler.state_dict() if scaler is not None else None,
            world_size=info.world_size, extra_meta={"loss": last_vals[0]})
        prune_checkpoints(out, cfg.train.keep_checkpoints)
        logger.info("checkpoint: %s", path)
    barrier()
    return path


def _log_start(cfg: FullConfig, model, train_ds, val_ds, info: DistInfo, ckpt: Optional[Path], start_iter: int,
               batches_per_epoch: int) -> None:
    tcfg, r = cfg.train, cfg.model.refine
    n_dec = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    if cfg.model.decoder.fully_supervised:
        mode = "fully supervised"
    elif r.use_rfm:
        mode = f"RFM switch after forward {r.rfm_switch_iter}"
    else:
        mode = "static refinement only"
    logger.info("WeCLIP training: %d train images (%d batches/epoch/process), %d val images, %d classes, "
                "%s trainable parameters; device %s, %d process(es), batch %d/process, lr %g, %d iterations "
                "(warm-up %d)%s; %s", len(train_ds), batches_per_epoch, len(val_ds) if val_ds is not None else 0,
                model.num_classes, f"{n_dec:,}", info.device, info.world_size, tcfg.batch_size, tcfg.lr,
                tcfg.max_iters, tcfg.warmup_iters, f"; resuming from {ckpt} at iteration {start_iter}" if ckpt else "",
                mode)
    if info.device.type == "cpu":
        fast, why = fast_fp32_matmul_available()
        fp32_path = why if fast else f"default kernels: {why}"
    else:
        fp32_path = f"{info.device.type} defaults"
    logger.info("arithmetic: frozen CLIP %s; GradCAM, PAR and the decoder fp32 (%s)%s",
                cfg.model.backbone.precision, fp32_path,
                f"; train.amp autocast {tcfg.amp_dtype} for the trained path" if tcfg.amp else "")


def _log_window(window: list, progress: _Progress, start_iter: int, max_iters: int, lr: float, pm: float,
                rfm: int) -> None:
    m = np.mean(np.asarray(window), 0)
    it = progress.iteration
    rate = (it - start_iter) / max(time.perf_counter() - progress.t_start, 1e-9)
    eta = (max_iters - it) / max(rate, 1e-9)
    logger.info("iter %d/%d epoch %d loss %.4f (seg %.4f, aff %.4f) lr %.3e pseudo-label mIoU %s %s %.2f it/s "
                "ETA %.1f min", it, max_iters, progress.epoch, m[0], m[1], m[2], lr, _fmt(pm),
                "RFM" if rfm else "static", rate, eta / 60)


def _finish(out: Path, model, info: DistInfo, progress: _Progress, start_iter: int, last_vals: list,
            last_ckpt: Optional[Path], final_eval: Optional[dict], meter: PseudoLabelMeter, fully: bool) -> dict:
    """The run's summary (written to ``summary.json`` by rank 0)."""
    from weclip_infer.metrics import to_jsonable

    final_pseudo = None
    if not fully:
        final_pseudo = final_eval.get("pseudo_miou") if final_eval else _none_nan(meter.miou())
    summary = to_jsonable({
        "out_dir": str(out),
        "iterations": progress.iteration,
        "start_iteration": start_iter,
        "epoch": progress.epoch,
        "final_loss": last_vals[0],
        "final_loss_seg": last_vals[1],
        "final_loss_aff": last_vals[2],
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "eval": {k: v for k, v in final_eval.items() if k != "table"} if final_eval else None,
        "pseudo_miou": final_pseudo,
        "rfm_forward_counter": int(model.iter_num),
        "elapsed_s": progress.elapsed(),
        "world_size": info.world_size,
        "rank": info.rank,
        "device": str(info.device),
        "log_csv": str(out / "log.csv"),
    })
    if info.is_main:
        write_json_atomic(out / "summary.json", summary)
        msg = f"done: {progress.iteration} iterations in {summary['elapsed_s'] / 60:.1f} min"
        if final_eval and final_eval.get("miou") is not None:
            msg += f"; val mIoU {_fmt(final_eval['miou'])}%"
        logger.info("%s; checkpoint %s", msg, summary["checkpoint"])
    return summary


def _have_mpl() -> bool:
    from .visualize import have_matplotlib

    return have_matplotlib()


def _evaluate(model, val_ds, all_names, cfg: FullConfig, info: DistInfo, meter: PseudoLabelMeter, it: int, *,
              multiscale: bool, out: Path, fully: bool) -> dict:
    """Val mIoU via the predictor, pseudo-label mIoU since the last evaluation, panels. Runs
    under a forked RNG so evaluating never changes the training randomness."""
    tcfg = cfg.train
    dev = info.device
    n = len(val_ds) if tcfg.eval_max_images <= 0 else min(len(val_ds), tcfg.eval_max_images)
    mine = [i for i in range(info.rank, n, info.world_size) if val_ds.samples[i].mask is not None]
    panel_idx = mine[: tcfg.num_panels] if info.is_main else []
    preds: dict = {}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        res = evaluate_segmentation(model, val_ds, all_names, multiscale=multiscale, max_images=tcfg.eval_max_images,
                                    rank=info.rank, world_size=info.world_size, predictions=preds, keep=panel_idx)
        if info.is_main and panel_idx:
            try:
                from .visualize import make_panels

                make_panels(model, val_ds, panel_idx, preds, out / "panels" / f"iter_{it}.png",
                            long_side=cfg.data.crop_size, normalize=cfg.model.backbone.normalize,
                            title=f"iteration {it}")
            except Exception as e:  # noqa: BLE001 - pictures must never stop training
                logger.warning("could not draw panels: %s", e)
    if cfg.model.refine.count_eval_forwards:
        model.iter_num += int(res["num_images"])  # the reference counts validation forwards too
    rec: dict = {"iter": it, "miou": _none_nan(res["miou"]), "iou": res["iou"],
                 "pixel_acc": _none_nan(res["pixel_acc"]),
                 "num_images": res["num_images"], "multiscale": multiscale, "eval_s": time.perf_counter() - t0,
                 "table": res["table"]}
    if not fully:
        pl = meter.compute(reduce=True)
        rec["pseudo_miou"] = _none_nan(pl["miou"])
        rec["pseudo_iou"] = pl["iou"]
        rec["pseudo_table"] = None
        meter.reset()
        if info.is_main:
            from weclip_infer.metrics import format_iou_table

            rec["pseudo_table"] = format_iou_table(pl, all_names)
    if info.is_main:
        kind = "multi-scale + flip" if multiscale else "single scale"
        if res["num_images"] == 0:
            logger.info("eval @ %d: no val image has a GT mask; val mIoU not computed", it)
        else:
            logger.info("eval @ %d (%s, %d images): val mIoU %s%%%s", it, kind, res["num_images"], _fmt(res["miou"]),
                        "" if fully else f"; pseudo-label mIoU on training crops {_fmt(rec.get('pseudo_miou'))}%")
        md = io.StringIO()
        md.write(f"# Evaluation at iteration {it} ({kind}, {res['num_images']} val images)\n\n")
        md.write("## Segmentation (val)\n\n" + res["table"] + "\n")
        if rec.get("pseudo_table"):
            md.write("## Online pseudo labels vs GT on training crops (since the previous evaluation)\n\n"
                     + rec["pseudo_table"])
        (out / "eval").mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "eval" / f"iter_{it}.md") as tmp:
            tmp.write_text(md.getvalue(), encoding="utf-8")
    rec.pop("pseudo_table", None)
    return rec
