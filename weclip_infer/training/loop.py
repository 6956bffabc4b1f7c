"""The WeCLIP training loop (spec §7): ``train(config, overrides, resume, out_dir) -> summary``.

One iteration (spec §0): a batch of augmented crops → ``WeCLIP.forward(images, cls_labels)``
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
sequence after resuming equals the uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from weclip_infer.config import ConfigError
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
from .schedule import build_optimizer, lr_at, set_lr
from .state import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint_config,
    load_decoder_weights,
    load_train_state,
    prune_checkpoints,
    resolve_checkpoint,
    restore_rng,
    save_training_checkpoint,
)

__all__ = ["train", "build_datasets", "seed_everything", "LOG_COLUMNS"]

LOG_COLUMNS = ["iter", "epoch", "loss", "loss_seg", "loss_aff", "lr", "time", "pseudo_miou", "rfm"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = True) -> None:
    """python / numpy / torch / CUDA seeds (spec §7.5); cudnn deterministic."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


class _Log:
    """Console + ``train.log`` lines (rank 0 only); plays well with the tqdm bar."""

    def __init__(self, path: Optional[Path], enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.f = open(path, "a", encoding="utf-8") if (enabled and path is not None) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        if self.f is not None:
            self.f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def build_datasets(cfg: FullConfig, class_names: Sequence[str], *, need_val: bool):
    """(train dataset with the spec §7.2 augmentation, val dataset at original size or None).

    Errors (missing listed files, unknown classes, empty label sets, class lists that do not
    match the model's) are ``ConfigError``/``DatasetError`` raised here, before training starts.
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
        val_ds = build_dataset(kind, root, d.val_split, augment=False, normalize=norm, require_labels=False,
                               **common)
    return train_ds, val_ds


class _CsvLog:
    def __init__(self, path: Path, start_iter: int, enabled: bool):
        self.path = path
        self.rows: list[dict] = []
        self.f = None
        if not enabled:
            return
        if path.is_file():  # resuming in the same folder: keep rows up to the checkpoint
            with open(path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit() and int(r["iter"]) <= start_iter]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS, extrasaction="ignore")

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        self.rows.append(row)
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _read_evals(path: Path, start_iter: int) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if int(rec.get("iter", 0)) <= start_iter:
            out.append(rec)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return out


def _jsonable(x: Any) -> Any:
    from weclip_infer.metrics import to_jsonable

    return to_jsonable(x)


def _tensorboard(out: Path, enabled: bool, log: _Log):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log("note: TensorBoard not installed (pip install tensorboard); skipping TensorBoard scalars")
        return None
    return SummaryWriter(str(out / "tb"))


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

def train(config: Union[FullConfig, dict, str, os.PathLike, None] = None, overrides: Sequence[str] = (),
          resume: Union[str, os.PathLike, None] = None, out_dir: Union[str, os.PathLike, None] = None) -> dict:
    """Train WeCLIP's decoder; returns a summary dict (also written to ``<out>/summary.json``).

    ``config``: a training YAML path, dict or ``FullConfig`` (``model``/``train``/``data``
    sections); may be None when resuming (the checkpoint's own config is used).
    ``overrides``: ``section.key=value`` strings. ``resume``: a checkpoint directory, a run folder
    (its ``checkpoints/latest``) or ``"auto"`` (resume ``out_dir`` if it holds a checkpoint, else
    start fresh). ``out_dir``: run folder (default ``train.out_dir``).
    Multi-process: run under ``torchrun``; every process calls ``train`` with the same arguments.
    """
    ckpt: Optional[Path] = None
    if resume is not None and str(resume) != "auto":
        ckpt = resolve_checkpoint(resume)
        if config is None:
            config = load_checkpoint_config(ckpt)
    if config is None:
        raise ConfigError("a training config is required (--config)")
    cfg = load_train_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir)
    cfg.train.out_dir = str(out)
    if resume is not None and str(resume) == "auto":
        ckpt = latest_checkpoint(out)
    elif ckpt is None and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a training run (checkpoints/latest); resume it with "
                          f"--resume {out} (or --resume auto), or choose another --out")

    info = init_distributed(cfg.train.device, cfg.train.dist_backend)
    try:
        return _train(cfg, out, ckpt, info)
    finally:
        cleanup_distributed(info)


def _train(cfg: FullConfig, out: Path, ckpt: Optional[Path], info: DistInfo) -> dict:
    from weclip_infer.model import build_model
    from weclip_infer.text import resolve_classes

    tcfg, mcfg = cfg.train, cfg.model
    main = info.is_main
    dev = info.device
    fully = bool(mcfg.decoder.fully_supervised)
    class_names = resolve_classes(mcfg.text).names
    all_names = ["background"] + list(class_names)
    need_val = tcfg.eval_every > 0 or tcfg.eval_at_end

    # ---- data first: a broken dataset fails before anything is built or written ----------------
    train_ds, val_ds = build_datasets(cfg, class_names, need_val=need_val)
    if fully:
        nomask = [s.name for s in train_ds.samples if s.mask is None]
        if nomask:
            raise ConfigError(f"model.decoder.fully_supervised: needs a GT mask for every training image; "
                              f"{len(nomask)} have none (e.g. {nomask[:3]})")
    sampler = ResumableSampler(len(train_ds), seed=tcfg.seed, rank=info.rank, world_size=info.world_size)
    batches_per_epoch = sampler.per_rank // tcfg.batch_size
    if batches_per_epoch < 1:
        raise ConfigError(f"train.batch_size: the training split has {len(train_ds)} images, fewer than "
                          f"batch_size ({tcfg.batch_size}) x processes ({info.world_size})")

    # ---- state to resume from ---------------------------------------------------------------------
    state = load_train_state(ckpt) if ckpt is not None else None
    start_iter = int(state["iteration"]) if state else 0
    if state and start_iter > tcfg.max_iters:
        raise ConfigError(f"train.max_iters={tcfg.max_iters} is below the checkpoint's iteration {start_iter}")

    seed_everything(tcfg.seed + info.rank, tcfg.deterministic)

    # ---- model + optimiser ------------------------------------------------------------------------
    text = None
    if ckpt is not None:
        tensors = load_decoder_weights(ckpt)
        text = (tensors.pop("text_fg"), tensors.pop("text_bg"))
    from weclip_infer.backbone import load_clip

    with torch.random.fork_rng(devices=[]):  # loading CLIP ("random" re-seeds) must not touch the training RNG
        clip = load_clip(mcfg.backbone, device="cpu")
    model = build_model(mcfg, device="cpu", text_fg=text[0] if text else None, text_bg=text[1] if text else None,
                        clip=clip)
    if ckpt is not None:
        dec = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
        try:
            model.decoder.load_state_dict(dec)
        except RuntimeError as e:
            raise ConfigError(f"{ckpt}: decoder weights do not match the model config: {e}") from None
    model.to(dev)
    model.train()
    optimizer = build_optimizer(model.decoder.parameters(), tcfg)
    use_amp = bool(tcfg.amp)
    amp_dtype = torch.bfloat16 if tcfg.amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if (use_amp and amp_dtype == torch.float16 and dev.type == "cuda") else None

    epoch, epoch_pos, elapsed_before = 0, 0, 0.0
    meter = PseudoLabelMeter(model.num_classes, dev)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, epoch_pos = int(state["epoch"]), int(state["epoch_pos"])
        model.iter_num = int(state["iter_num"])
        elapsed_before = float(state.get("elapsed", 0.0))
        if info.is_main:  # the saved matrix is the sum over processes
            meter.load(state.get("pseudo_hist"))
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng(rngs[info.rank])
        elif rngs:
            warnings.warn(f"resuming with {info.world_size} processes from a {len(rngs)}-process checkpoint: "
                          "RNG states are re-seeded, the run will not match the uninterrupted one exactly")
            if info.is_main:
                restore_rng(rngs[0])

    net: torch.nn.Module = model
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=tcfg.find_unused_parameters)

    loader = DataLoader(
        train_ds, batch_size=tcfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.data.workers,
        collate_fn=_collate(), pin_memory=dev.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers > 0 else None,
        # own generator: creating an epoch iterator must not draw from the global torch RNG
        generator=torch.Generator().manual_seed(tcfg.seed), persistent_workers=False)

    # ---- run folder (rank 0) --------------------------------------------------------------------------
    full_dict = full_config_to_dict(cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    log = _Log(out / "train.log" if main else None, main)
    csv_log = _CsvLog(out / "log.csv", start_iter, main)
    evals = _read_evals(out / "eval.jsonl", start_iter) if main else []
    tb = _tensorboard(out, main and tcfg.tensorboard, log)
    if main and tcfg.plots and not _have_mpl():
        log("note: matplotlib not installed; curves are drawn with the built-in PIL plotter")

    n_dec = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    log(f"WeCLIP training: {len(train_ds)} train images ({batches_per_epoch} batches/epoch/process), "
        f"{len(val_ds) if val_ds is not None else 0} val images, {model.num_classes} classes, "
        f"{n_dec:,} trainable parameters; device {dev}, {info.world_size} process(es), "
        f"batch {tcfg.batch_size}/process, lr {tcfg.lr:g}, {tcfg.max_iters} iterations"
        + (f"; resuming from {ckpt} at iteration {start_iter}" if ckpt else "")
        + ("; fully supervised" if fully else f"; RFM switch after forward {mcfg.refine.rfm_switch_iter}"
           if mcfg.refine.use_rfm else "; static refinement only"))

    bar = None
    if main and tcfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.max_iters, initial=start_iter, desc="train", dynamic_ncols=True, unit="it",
                   file=sys.stderr)
        log.bar = bar

    t_start = time.perf_counter()
    last_ckpt: Optional[Path] = None
    final_eval: Optional[dict] = None
    it = start_iter
    loader_iter = None
    last_vals = [math.nan, math.nan, math.nan]
    window: list[list[float]] = []
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=amp_dtype)) if use_amp else contextlib.nullcontext

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    # On CPU, freed step temporaries stay in the heap for the next step instead of being unmapped
    # and page-faulted in again (weclip_infer.memory; ~0.4 s of a ViT-B/16 step, issue 9).
    reuse_freed_memory(device=dev)
    try:
        while it < tcfg.max_iters:
            if loader_iter is None:
                train_ds.set_epoch(epoch)
                sampler.set_epoch(epoch, start=epoch_pos * tcfg.batch_size)
                loader_iter = iter(loader)
            try:
                batch = next(loader_iter)
            except StopIteration:
                epoch, epoch_pos, loader_iter = epoch + 1, 0, None
                continue
            epoch_pos += 1

            images = batch["image"].to(dev, non_blocking=True)
            cls = batch["cls_label"].to(dev, non_blocking=True)
            masks = batch["mask"].to(dev, non_blocking=True)
            lr = lr_at(it, tcfg)
            set_lr(optimizer, lr)
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
            it += 1

            vals = torch.stack([outd["loss"].detach(), outd["loss_seg"].detach(), outd["loss_aff"].detach()]).float()
            vals = all_reduce_mean(vals).tolist()
            last_vals = vals
            if not fully:
                meter.update(outd["pseudo_label"].detach(), masks, batch["has_mask"])
            pm = meter.miou() if not fully else math.nan
            rfm = int(not fully and mcfg.refine.use_rfm and mcfg.refine.use_refinement
                      and model.iter_num > mcfg.refine.rfm_switch_iter)
            if main:
                row = {"iter": it, "epoch": epoch, "loss": repr(vals[0]), "loss_seg": repr(vals[1]),
                       "loss_aff": repr(vals[2]), "lr": repr(lr), "time": f"{elapsed():.3f}",
                       "pseudo_miou": "" if math.isnan(pm) else f"{pm:.6f}", "rfm": rfm}
                csv_log.write(row)
                if tb is not None:
                    tb.add_scalar("train/loss", vals[0], it)
                    tb.add_scalar("train/loss_seg", vals[1], it)
                    tb.add_scalar("train/loss_aff", vals[2], it)
                    tb.add_scalar("train/lr", lr, it)
                    if not math.isnan(pm):
                        tb.add_scalar("train/pseudo_miou_running", pm, it)
                if tcfg.log_every:
                    window.append(vals)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{lr:.2e}", plm=_fmt(pm), refresh=False)
                if tcfg.log_every and (it % tcfg.log_every == 0 or it == tcfg.max_iters):
                    m = np.mean(np.asarray(window), 0)
                    window = []
                    rate = (it - start_iter) / max(time.perf_counter() - t_start, 1e-9)
                    eta = (tcfg.max_iters - it) / max(rate, 1e-9)
                    log(f"iter {it}/{tcfg.max_iters} epoch {epoch} loss {m[0]:.4f} (seg {m[1]:.4f}, aff {m[2]:.4f}) "
                        f"lr {lr:.3e} pseudo-label mIoU {_fmt(pm)} {'RFM' if rfm else 'static'} "
                        f"{rate:.2f} it/s ETA {eta / 60:.1f} min")

            is_last = it == tcfg.max_iters
            do_eval = val_ds is not None and ((is_last and tcfg.eval_at_end) or
                                              (tcfg.eval_every and it % tcfg.eval_every == 0))
            if do_eval:
                rec = _evaluate(model, val_ds, all_names, cfg, info, meter, it, multiscale=is_last and tcfg.eval_at_end,
                                out=out, log=log, fully=fully)
                if main:
                    evals.append(rec)
                    with open(out / "eval.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(_jsonable({k: v for k, v in rec.items() if k != "table"})) + "\n")
                    if tb is not None:
                        if rec.get("miou") is not None:
                            tb.add_scalar("eval/miou", rec["miou"], it)
                        if rec.get("pseudo_miou") is not None:
                            tb.add_scalar("eval/pseudo_miou", rec["pseudo_miou"], it)
                if is_last:
                    final_eval = rec
            if do_eval and main and tcfg.plots:
                _plots(out, csv_log.rows, evals, log)
            if is_last or (tcfg.checkpoint_every and it % tcfg.checkpoint_every == 0):
                rng_states = all_gather_objects(capture_rng())
                hist = all_reduce_sum(meter.hist.clone())
                if main:
                    last_ckpt = save_training_checkpoint(
                        out, model, optimizer, iteration=it, epoch=epoch, epoch_pos=epoch_pos, full_config=full_dict,
                        rng_states=rng_states, pseudo_hist=hist, elapsed=elapsed(),
                        scaler_state=scaler.state_dict() if scaler is not None else None,
                        world_size=info.world_size, extra_meta={"loss": last_vals[0]})
                    prune_checkpoints(out, tcfg.keep_checkpoints)
                    log(f"checkpoint: {last_ckpt}")
                barrier()
    finally:
        if bar is not None:
            bar.close()
            log.bar = None
        csv_log.close()
        if tb is not None:
            tb.close()

    if main and tcfg.plots and csv_log.rows:
        _plots(out, csv_log.rows, evals, log)
    if last_ckpt is None and main:
        last_ckpt = latest_checkpoint(out)
    final_pseudo = None
    if not fully:
        final_pseudo = (final_eval or {}).get("pseudo_miou") if final_eval else _none_nan(meter.miou())
    summary = {
        "out_dir": str(out),
        "iterations": it,
        "start_iteration": start_iter,
        "epoch": epoch,
        "final_loss": last_vals[0],
        "final_loss_seg": last_vals[1],
        "final_loss_aff": last_vals[2],
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "eval": {k: v for k, v in final_eval.items() if k != "table"} if final_eval else None,
        "pseudo_miou": final_pseudo,
        "rfm_forward_counter": int(model.iter_num),
        "elapsed_s": elapsed(),
        "world_size": info.world_size,
        "rank": info.rank,
        "device": str(dev),
        "log_csv": str(out / "log.csv"),
    }
    summary = _jsonable(summary)
    if main:
        write_json_atomic(out / "summary.json", summary)
        msg = f"done: {it} iterations in {summary['elapsed_s'] / 60:.1f} min"
        if final_eval and final_eval.get("miou") is not None:
            msg += f"; val mIoU {_fmt(final_eval['miou'])}%"
        log(msg + f"; checkpoint {summary['checkpoint']}")
    log.close()
    return summary


def _none_nan(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _collate():
    from weclip_infer.data import collate

    return collate


def _have_mpl() -> bool:
    from .visualize import have_matplotlib

    return have_matplotlib()


def _plots(out: Path, rows, evals, log) -> None:
    from .visualize import plot_curves

    try:
        plot_curves(out / "plots", rows, evals)
    except Exception as e:  # noqa: BLE001 - pictures must never stop training
        log(f"warning: could not draw plots: {e}")


def _evaluate(model, val_ds, all_names, cfg: FullConfig, info: DistInfo, meter: PseudoLabelMeter, it: int, *,
              multiscale: bool, out: Path, log: _Log, fully: bool) -> dict:
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
                log(f"warning: could not draw panels: {e}")
    if cfg.model.refine.count_eval_forwards:
        model.iter_num += int(res["num_images"])  # the reference counts validation forwards (§11.2 item 1)
    rec: dict = {"iter": it, "miou": _none_nan(res["miou"]), "iou": res["iou"], "pixel_acc": _none_nan(res["pixel_acc"]),
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
            log(f"eval @ {it}: no val image has a GT mask; val mIoU not computed")
        else:
            log(f"eval @ {it} ({kind}, {res['num_images']} images): val mIoU {_fmt(res['miou'])}%"
                + ("" if fully else f"; pseudo-label mIoU on training crops {_fmt(rec.get('pseudo_miou') or math.nan)}%"))
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
