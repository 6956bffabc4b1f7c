"""Pre-train the small demo CLIP from scratch on the procedural demo world (CPU, bf16 autocast).

``python -m weclip_infer.demo.pretrain_clip --minutes 35 --out weclip_infer/assets/demo_clip``

The model is an open_clip ``CLIP`` built from a config dict through :func:`weclip_infer.backbone.load_clip`
(``clip_weights="random"``, ``patch_stem="conv"``), i.e. the same code path that later loads the
shipped weights. The image tower pools by **averaging the patch tokens after ``ln_post``**
(open_clip ``pool_type="avg"``), which is exactly WeCLIP's ``FrozenCLIP.pooled_embedding``,
so the GradCAM of WeCLIP differentiates the very embedding that was trained.

Training data are generated on the fly (:func:`weclip_infer.demo.world.generate_sample` on the
``pretrain`` index range), one random caption per image drawn from the sample's caption forms
(objects + background, objects only, WeCLIP's origami template, background only). Images are
normalised like WeCLIP feeds them (ImageNet mean/std on 0..255).

Loss: symmetric InfoNCE with **multi-positive targets**: caption ``j`` counts as a positive for
image ``i`` whenever it is a correct description of image ``i`` (same visible class set when the
caption names objects, same background when it names one). Identical captions in a batch (e.g.
two "grass." captions) are therefore positives of each other's images instead of false negatives.

Every ``--eval-every`` seconds (and at the end) the script logs to ``pretrain_log.csv`` and
stdout: loss, images/s, zero-shot top-1 on held-out single-object val images, and the mIoU of
WeCLIP's initial GradCAM, of the static-refined CAM and of the pseudo label (static refinement +
PAR) on held-out val images, computed through :func:`weclip_infer.model.build_model`. It also
checkpoints ``clip.safetensors`` (token table pruned to the world's vocabulary) and
``provenance.json``.

Determinism: samples, captions and initialisation are functions of ``--seed``; with ``--steps``
the run is deterministic up to floating-point thread effects. With ``--minutes`` the cosine
schedule follows elapsed time, so the exact number of steps depends on the machine's speed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weclip_infer.backbone import load_clip, save_clip
from weclip_infer.config import BackboneConfig
from weclip_infer.demo.world import BACKGROUND_NAMES, CLASS_NAMES, CLASS_PROMPTS, OBJECT_STYLES, WorldConfig
from weclip_infer.text import tokenize

# the pieces of pre-training, re-exported here as the module's public API
from .pretrain_data import (
    PretrainStream,
    label_prompts,
    normalize_batch,
    positive_matrix,
    presence_matrix,
    world_token_ids,
)
from .pretrain_eval import DEFAULT_WECLIP_REFINE, EvalSet, evaluate, weclip_config
from .pretrain_losses import (
    attention_affinity_loss,
    head_mean_attention,
    mil_bce,
    multi_positive_clip_loss,
    prompt_vs_background_loss,
    token_mil_loss,
    token_prompt_probs,
    value_tokens,
)

__all__ = [
    "BACKGROUND_NAMES",
    "CLASS_NAMES",
    "CLASS_PROMPTS",
    "normalize_batch",
    "DEFAULT_MODEL_CFG",
    "TINY_MODEL_CFG",
    "DEFAULT_WECLIP_REFINE",
    "world_token_ids",
    "weclip_config",
    "build_clip",
    "positive_matrix",
    "multi_positive_clip_loss",
    "prompt_vs_background_loss",
    "presence_matrix",
    "label_prompts",
    "token_prompt_probs",
    "mil_bce",
    "token_mil_loss",
    "value_tokens",
    "head_mean_attention",
    "attention_affinity_loss",
    "evaluate",
    "main",
]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo_clip"

#: The shipped demo CLIP: 128 px input (8×8 grid at patch 16), 6 vision blocks, conv stem. Sized for
#: 2 shared AVX2 cores without bf16 support (~15 images/s in fp32).
DEFAULT_MODEL_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "layers": 6, "width": 128, "head_width": 32, "patch_size": 16,
                   "mlp_ratio": 4.0, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}

#: A tiny model for tests.
TINY_MODEL_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16,
                   "mlp_ratio": 2.0, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ------------------------------------------------------------------------------------------------
# Model / config
# ------------------------------------------------------------------------------------------------
def build_clip(model_cfg: dict, seed: int) -> nn.Module:
    """Random-init open_clip CLIP with the conv stem, through the same loader as the shipped file."""
    clip = load_clip(BackboneConfig(clip_weights="random", model_cfg=model_cfg, patch_stem="conv", seed=seed))
    return clip


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_outputs(clip: nn.Module, out: Path, model_cfg: dict, token_ids: list[int], dtype: str, prov: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    c = copy.deepcopy(clip).float()
    if dtype == "fp16":
        c = c.half()
    path = out / "clip.safetensors"
    save_clip(c, path, model_cfg, patch_stem="conv", text_token_ids=token_ids)
    size = path.stat().st_size
    prov = dict(prov, file_bytes=size, weights_dtype=dtype)
    from weclip_infer.io_utils import write_json_atomic

    write_json_atomic(out / "provenance.json", prov)  # files get the user's umask mode
    return size


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _param_groups(clip: nn.Module, lr: float, wd: float, scale_lr: float):
    decay, no_decay, scale = [], [], []
    for n, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        if n == "logit_scale":
            scale.append(p)
        elif p.ndim < 2 or "embedding" in n or n.endswith(".bias") or "ln_" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd, "lr": lr, "base_lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr},
            {"params": scale, "weight_decay": 0.0, "lr": scale_lr, "base_lr": scale_lr}]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=35.0, help="training time budget (excluding the final eval)")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (schedule by steps; deterministic)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=1e-2, help="own lr of the learnable log temperature")
    ap.add_argument("--init-scale", type=float, default=25.0, help="initial exp(logit_scale)")
    ap.add_argument("--max-scale", type=float, default=100.0)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=40, help="warm-up steps")
    ap.add_argument("--eval-every", type=float, default=240.0, help="seconds between evaluations (0: only at the end)")
    ap.add_argument("--eval-zs", type=int, default=200)
    ap.add_argument("--eval-cam", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--token-loss", type=float, default=0.0,
                    help="weight of the token-level MIL loss (image-level labels; keeps token features local)")
    ap.add_argument("--token-feature", choices=("value", "final"), default="value",
                    help="tokens the MIL loss reads: the last block's value path (what GradCAM sees) "
                         "or the final tokens")
    ap.add_argument("--attn-loss", type=float, default=0.0,
                    help="weight of the attention-affinity loss (needs --token-loss, value tokens): the last "
                         "--attn-blocks blocks' attention is pulled towards the affinity of the tokens' "
                         "prompt predictions")
    ap.add_argument("--prompt-loss", type=float, default=0.0,
                    help="weight of the present-class-vs-background-prompts loss (needs --token-loss > 0)")
    ap.add_argument("--attn-blocks", type=int, default=4, help="how many last blocks the attention loss reads")
    ap.add_argument("--object-style", choices=OBJECT_STYLES, default="flat",
                    help="demo-world object style (WorldConfig.object_style) to train and evaluate on")
    ap.add_argument("--badge-scale", type=float, nargs=2, metavar=("LO", "HI"), default=list(WorldConfig.badge_scale),
                    help="badge style: badge radius range as a fraction of the object radius "
                         f"(default {' '.join(map(str, WorldConfig.badge_scale))})")
    ap.add_argument("--init", type=Path, default=None, help="start from this clip.safetensors (fine-tuning)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only faster on CPUs with native bf16)")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored weight dtype")
    ap.add_argument("--tiny", action="store_true", help="tiny model and 64 px world (tests)")
    ap.add_argument("--model-cfg", type=str, default=None, help="JSON open_clip model config (overrides the default)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate OUT/clip.safetensors and print JSON")
    ap.add_argument("--eval-size", type=int, default=None, help="--eval-only: world image size (default: the model's)")
    ap.add_argument("--static-blocks", type=int, default=None, help="--eval-only: refine.static_blocks override")
    ap.add_argument("--cam-logit-scale", type=float, default=None, help="--eval-only: refine.cam_logit_scale override")
    return ap.parse_args(argv)


def eval_only(args: argparse.Namespace) -> dict:
    """Evaluate a written ``clip.safetensors`` (optionally at another image size / static_blocks)."""
    from safetensors import safe_open

    path = args.out / "clip.safetensors"
    with safe_open(str(path), "pt") as f:
        model_cfg = json.loads(f.metadata()["open_clip_cfg"])
    model_cfg.pop("patch_stem", None)
    clip = load_clip(BackboneConfig(clip_weights=str(path)))
    size = args.eval_size or int(model_cfg["vision_cfg"]["image_size"])
    ev = EvalSet(args.seed, WorldConfig(size=size, object_style=args.object_style, badge_scale=tuple(args.badge_scale)),
                 args.eval_zs, args.eval_cam)
    refine = DEFAULT_WECLIP_REFINE(int(model_cfg["vision_cfg"]["layers"]))
    if args.static_blocks:
        refine["static_blocks"] = args.static_blocks
    if args.cam_logit_scale:
        refine["cam_logit_scale"] = args.cam_logit_scale
    r = dict(evaluate(clip, ev, model_cfg, refine), eval_size=size, refine=refine)
    print(json.dumps(r), flush=True)
    return r


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return eval_only(args)
    torch.manual_seed(args.seed)
    model_cfg = (json.loads(args.model_cfg) if args.model_cfg
                 else copy.deepcopy(TINY_MODEL_CFG if args.tiny else DEFAULT_MODEL_CFG))
    img_size = int(model_cfg["vision_cfg"]["image_size"])
    world = WorldConfig(size=img_size, object_style=args.object_style, badge_scale=tuple(args.badge_scale))
    ctx = int(model_cfg["text_cfg"]["context_length"])
    token_ids = world_token_ids(ctx)
    clip: Any  # open_clip's CLIP (untyped; nn.Module types its submodules as Tensor | Module)
    if args.init is not None:

        from safetensors import safe_open

        clip = load_clip(BackboneConfig(clip_weights=str(args.init))).float()
        with safe_open(str(args.init), "pt") as f:
            model_cfg = json.loads(f.metadata()["open_clip_cfg"])
        model_cfg.pop("patch_stem", None)
    else:
        clip = build_clip(model_cfg, args.seed)
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(args.init_scale))
    clip.train()
    n_params = sum(p.numel() for n, p in clip.named_parameters() if n != "token_embedding.weight")
    opt = torch.optim.AdamW(_param_groups(clip, args.lr, args.wd, args.scale_lr), betas=(0.9, 0.98), eps=1e-6)
    ev = EvalSet(args.seed, world, args.eval_zs, args.eval_cam)
    refine = DEFAULT_WECLIP_REFINE(int(model_cfg["vision_cfg"]["layers"]))
    stream = PretrainStream(args.seed, args.batch_size, world, ctx)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         prefetch_factor=4 if args.workers else None)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "pretrain_log.csv"
    fields = ["step", "images", "elapsed_s", "lr", "loss", "images_per_s", "logit_scale", "zs_top1", "cam_miou",
              "static_cam_miou", "pseudo_miou", "bg_miou", "eval_s"]
    with open(log_path, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()
    budget = args.minutes * 60.0
    prov_base = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "weclip_infer.demo.pretrain_clip"]
                            + list(sys.argv[1:] if argv is None else argv)),
        "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "scale_lr": args.scale_lr,
        "init_logit_scale": args.init_scale, "weight_decay": args.wd, "warmup_steps": args.warmup,
        "bf16_autocast": args.bf16,
        "loss": "symmetric InfoNCE, multi-positive targets (caption j positive for image i if it correctly "
                "describes it)"
                + (f" + {args.token_loss} x token-level MIL loss (per-token softmax over the WeCLIP "
                   "class/background prompts, max over tokens, BCE vs image-level presence)"
                   if args.token_loss > 0 else "")
                + (f" + {args.attn_loss} x attention-affinity loss (KL from the affinity of the tokens' detached prompt"
                   f" predictions to the head-averaged attention of the last {args.attn_blocks} blocks)"
                   if args.attn_loss > 0 else "")
                + (f" + {args.prompt_loss} x present-class-vs-background-prompts CE on the pooled embedding"
                   if args.prompt_loss > 0 else ""),
        "prompt_loss": args.prompt_loss, "token_loss": args.token_loss, "token_feature": args.token_feature,
        "attn_loss": args.attn_loss, "attn_blocks": args.attn_blocks,
        "init": str(args.init) if args.init is not None else None,
        "pool": "avg of patch tokens after ln_post (= FrozenCLIP.pooled_embedding)",
        "normalize": "imagenet (mean/std on 0..255)",
        "model_cfg": model_cfg, "patch_stem": "conv", "params_excluding_token_table": n_params,
        "kept_token_ids": len(token_ids), "world": world.to_dict(), "world_split": "pretrain (train), val (eval)",
        "weclip_eval_config": {"refine": refine, "text": weclip_config(model_cfg)["text"], "use_rfm": False,
                               "n_val_cam_images": args.eval_cam, "n_val_zero_shot_images": args.eval_zs},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": __import__("open_clip").__version__, "numpy": np.__version__},
        "threads": args.threads,
    }
    print(f"[pretrain] params (w/o token table) {n_params/1e6:.2f} M, kept tokens {len(token_ids)}, "
          f"all-background mIoU {ev.bg_miou:.4f}", flush=True)

    step, images, loss_acc, n_acc = 0, 0, 0.0, 0
    t0 = time.time()
    last_eval, t_win, img_win = t0, t0, 0
    lr_now = 0.0
    last: dict = {}

    def progress() -> float:
        if args.steps is not None:
            return step / max(1, args.steps)
        return (time.time() - t0) / budget

    def do_eval(final: bool = False) -> dict:
        nonlocal t_win, img_win, loss_acc, n_acc
        te = time.time()
        r = evaluate(clip, ev, model_cfg, refine)
        clip.train()
        ips = img_win / max(1e-9, te - t_win)
        row = {"step": step, "images": images, "elapsed_s": round(te - t0, 1), "lr": f"{lr_now:.3g}",
               "loss": round(loss_acc / max(1, n_acc), 4), "images_per_s": round(ips, 1),
               "logit_scale": round(r["logit_scale"], 2), "zs_top1": round(r["zs_top1"], 4),
               "cam_miou": round(r["cam_miou"], 4),
               "static_cam_miou": round(r["static_cam_miou"], 4), "pseudo_miou": round(r["pseudo_miou"], 4),
               "bg_miou": round(r["bg_miou"], 4), "eval_s": round(time.time() - te, 1)}
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        print("[pretrain] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        prov = dict(prov_base, steps=step, images_seen=images, train_wall_s=round(te - t0, 1),
                    total_wall_s=round(time.time() - t_start, 1), final=final,
                    zero_shot_top1=r["zs_top1"], cam_miou=r["cam_miou"], static_cam_miou=r["static_cam_miou"],
                    pseudo_label_miou=r["pseudo_miou"], all_background_miou=r["bg_miou"],
                    learned_logit_scale=r["logit_scale"])
        save_outputs(clip, args.out, model_cfg, token_ids, args.dtype, prov)
        loss_acc, n_acc, img_win = 0.0, 0, 0
        t_win = time.time()
        return r

    label_tok = tokenize(label_prompts(), ctx)
    last_in: list = [None]
    if args.token_loss > 0 and args.token_feature == "value":
        def _keep_input(_m, inp):
            last_in[0] = inp[0]
        clip.visual.transformer.resblocks[-1].register_forward_pre_hook(_keep_input)
    if args.prompt_loss > 0 and not args.token_loss > 0:
        raise SystemExit("--prompt-loss needs --token-loss > 0 (it reads the same prompt embeddings)")
    if args.attn_loss > 0 and not (args.token_loss > 0 and args.token_feature == "value"):
        raise SystemExit("--attn-loss needs --token-loss > 0 with --token-feature value")
    attn_in: dict = {}
    if args.attn_loss > 0:
        blocks = clip.visual.transformer.resblocks
        for bi in range(max(0, len(blocks) - args.attn_blocks), len(blocks)):
            def _keep(_m, inp, bi=bi):
                attn_in[bi] = inp[0]
            blocks[bi].register_forward_pre_hook(_keep)
    clip.visual.output_tokens = args.token_loss > 0
    tok_acc = 0.0
    it = iter(loader)
    while progress() < 1.0:
        x, tok, pos, y = next(it)
        p = progress()
        lr_fac = min(1.0, (step + 1) / max(1, args.warmup)) * (0.5 * (1 + math.cos(math.pi * min(1.0, p))))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_fac
        lr_now = args.lr * lr_fac
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            if args.token_loss > 0:
                pooled, tokens = clip.visual(x)
                img = F.normalize(pooled.float(), dim=-1)
                txt_all = clip.encode_text(torch.cat([tok, label_tok]))
                txt = F.normalize(txt_all[: tok.shape[0]].float(), dim=-1)
                tokens = value_tokens(clip, last_in[0]) if args.token_feature == "value" else tokens @ clip.visual.proj
            else:
                img = F.normalize(clip.encode_image(x).float(), dim=-1)
                txt = F.normalize(clip.encode_text(tok).float(), dim=-1)
        loss = multi_positive_clip_loss(img, txt, clip.logit_scale.exp(), pos)
        if args.token_loss > 0:
            qp = token_prompt_probs(tokens, txt_all[tok.shape[0]:])  # B×N×K
            loss_tok = mil_bce(qp, y)
            tok_acc += loss_tok.item()
            loss = loss + args.token_loss * loss_tok
        if args.prompt_loss > 0:
            loss = loss + args.prompt_loss * prompt_vs_background_loss(img, txt_all[tok.shape[0]:], y,
                                                                       clip.logit_scale.exp())
        if args.attn_loss > 0:  # qp is detached inside the loss
            blocks = clip.visual.transformer.resblocks
            loss_attn = sum(attention_affinity_loss(head_mean_attention(blocks[bi], xin), qp)
                            for bi, xin in attn_in.items()) / len(attn_in)
            loss = loss + args.attn_loss * loss_attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(args.max_scale))
        step += 1
        images += x.shape[0]
        img_win += x.shape[0]
        loss_acc += loss.item()
        n_acc += 1
        if step % 10 == 0:
            print(f"[pretrain] step {step} loss {loss_acc / n_acc:.4f} (token {tok_acc / max(1, step):.4f}) "
                  f"lr {lr_now:.2e} {img_win / max(1e-9, time.time() - t_win):.1f} img/s "
                  f"scale {float(clip.logit_scale.exp()):.1f}", flush=True)
        if args.eval_every > 0 and time.time() - last_eval >= args.eval_every and progress() < 1.0:
            last = do_eval()
            last_eval = time.time()
    last = do_eval(final=True)
    clip.visual.output_tokens = False
    del it, loader
    return dict(last, clip=clip.eval(), model_cfg=model_cfg, token_ids=token_ids, steps=step, images=images)


if __name__ == "__main__":
    main()
