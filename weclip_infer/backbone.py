"""Frozen CLIP backbone through open_clip.

Weight loading (``load_clip``) is separate from the forward code (``FrozenCLIP``). The forward
does not call open_clip's ``VisionTransformer.forward``: it re-uses the tower's modules and
computes attention by hand, because WeCLIP needs

* positional embeddings bilinearly resized (``align_corners=False``) to any ``h×w`` grid,
* every block's output tokens and its head-averaged softmax attention map (CLS included),
* the last block run separately, with autograd, for GradCAM.

The manual attention is numerically the same as ``nn.MultiheadAttention`` with the same
``in_proj_weight``/``out_proj`` and keeps height/width dynamic in TorchScript/ONNX export.

Input size rule: the patch grid is ``(H // p, W // p)`` (``p`` = 16 for ViT-B/16); pixels beyond
the last full patch are ignored, as the stride-16 conv of the reference does.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import zipfile
from pathlib import Path
from typing import Any, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BackboneConfig, ConfigError
from .packed_linear import PackedLinears
from .tensor_ops import attention

__all__ = [
    "WeightsUnavailableError",
    "ConvStem",
    "FrozenCLIP",
    "load_clip",
    "save_clip",
    "resize_pos_embed",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "BUILTIN_WEIGHTS",
]

# Normalisation constants, owned by weclip_infer.normalization (re-exported here for compatibility).
from .normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# Typing note: open_clip ships no type information, and ``nn.Module.__getattr__`` types every
# submodule as ``Tensor | Module``. The code below that walks open_clip's towers and blocks binds
# them to ``Any``-typed names instead (their structure is checked once, in ``FrozenCLIP``).

# Named CLIP weights that ship with the package: ``clip_weights: demo`` is the small CLIP
# pre-trained on the procedural demo world (see weclip_infer/assets/demo_clip/provenance.json).
BUILTIN_WEIGHTS = {
    # the small CLIP of the default (flat-object) demo world
    "demo": Path(__file__).resolve().parent / "assets" / "demo_clip" / "clip.safetensors",
    # the same CLIP fine-tuned on the "badge" demo world (WorldConfig(object_style="badge")), where
    # CAMs cover objects only partly; used for the refinement ablation
    "demo-badge": Path(__file__).resolve().parent / "assets" / "demo_clip_badge" / "clip.safetensors",
}


class WeightsUnavailableError(RuntimeError):
    """CLIP weights could not be obtained (offline, missing or unreadable file)."""


class ConvStem(nn.Module):
    """A small convolutional patch stem: ``log2(patch)`` 3×3 stride-2 convs (BN + ReLU) and a
    1×1 projection to ``width``. Same output grid as the linear stride-``patch`` stem.

    Input ``B×3×H×W`` → ``B×width×(H//patch)×(W//patch)``.
    """

    def __init__(self, width: int, patch_size: int = 16):
        super().__init__()
        n = int(round(math.log2(patch_size)))
        if 2 ** n != patch_size:
            raise ConfigError(f"backbone.patch_stem: conv stem needs a power-of-two patch size, got {patch_size}")
        self.patch_size = patch_size
        chans = [3] + [max(16, width // 2 ** (n - i)) for i in range(1, n + 1)]
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chans[-1], width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]  # floor, like the linear stem
        return self.proj(self.body(x))


def resize_pos_embed(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a ``(1+g*g)×D`` positional table to ``(1+h*w)×D``: grid rows
    bilinearly interpolated with ``align_corners=False``, CLS row unchanged, row-major order."""
    cls, grid = pos[:1], pos[1:]
    g = int(math.isqrt(grid.shape[0]))
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([cls, grid], dim=0)


def _block_attention(blk: nn.Module, x: Optional[torch.Tensor], need_attn: bool, qkv: Optional[torch.Tensor] = None,
                     packed: Optional[PackedLinears] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head self-attention of one open_clip block on already-normalised tokens.

    ``x``: ``B×L×D`` (output of ``ln_1``). Returns ``(out B×L×D, attn B×L×L or None)`` where
    ``attn`` is the softmax(q·kᵀ/√d) averaged over heads. ``qkv`` (``B×L×3D``)
    replaces ``x`` when the caller already has its input projection (GradCAM differentiates
    w.r.t. it). ``packed``: the projections' pre-packed bf16 weights (see :func:`run_block`).
    """
    linear = packed.linear if packed is not None else F.linear
    mha = cast(nn.MultiheadAttention, blk.attn)  # plain multi-head attention (checked by FrozenCLIP)
    if qkv is None:
        assert x is not None, "_block_attention needs x or qkv"
        qkv = linear(x, mha.in_proj_weight, mha.in_proj_bias)
    B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    nh = mha.num_heads
    hd = D // nh
    q, k, v = qkv.reshape(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each B×nh×L×hd
    out, attn_avg = attention(q, k, v, need_map=need_attn)
    out = out.transpose(1, 2).reshape(B, L, D)
    out = linear(out, mha.out_proj.weight, mha.out_proj.bias)
    return out, attn_avg


def _mlp(mlp: nn.Module, x: torch.Tensor, packed: Optional[PackedLinears]) -> torch.Tensor:
    """The block's MLP (open_clip's ``c_fc`` → activation → ``c_proj`` sequence), its linear
    layers through ``packed`` when given."""
    if packed is None:
        return mlp(x)
    for m in mlp.children():
        x = packed.linear(x, m.weight, m.bias) if isinstance(m, nn.Linear) else m(x)
    return x


def run_block(blk: nn.Module, x: torch.Tensor, need_attn: bool = False,
              ln1_out: Optional[torch.Tensor] = None, qkv: Optional[torch.Tensor] = None,
              packed: Optional[PackedLinears] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One pre-LN residual block: ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(·))``.

    GradCAM substitutes a gradient-tracked ``ln_1`` activation (``ln1_out``) or its
    input projection ``qkv = ln_1(x)·W_inᵀ + b_in`` (``B×L×3D``). ``packed``
    (:meth:`FrozenCLIP.packed_linears`): the block's linear layers multiply with pre-packed bf16
    weights where that applies (bf16 on a CPU with native bf16), with the same results.
    """
    b: Any = blk  # an open_clip block (see the typing note at the top)
    if qkv is None:
        out, attn = _block_attention(blk, b.ln_1(x) if ln1_out is None else ln1_out, need_attn, packed=packed)
    else:
        out, attn = _block_attention(blk, None, need_attn, qkv=qkv, packed=packed)
    x = x + b.ls_1(out)
    x = x + b.ls_2(_mlp(b.mlp, b.ln_2(x), packed))
    return x, attn


class FrozenCLIP(nn.Module):
    """The frozen CLIP image tower (and, until dropped, the text tower) of WeCLIP.

    All parameters have ``requires_grad=False`` and the module stays in eval mode whatever
    ``train()`` is called with.
    """

    logit_scale_exp: torch.Tensor  # buffer: exp(CLIP's logit scale), 100 when the model has none

    def __init__(self, clip: nn.Module):
        super().__init__()
        visual: Any = clip.visual  # open_clip's VisionTransformer
        for blk in visual.transformer.resblocks:
            if (not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention)
                    or hasattr(blk, "ln_attn") and not isinstance(blk.ln_attn, nn.Identity)):
                raise ConfigError(
                    "backbone: only standard open_clip ViT towers (plain multi-head attention) are supported")
        self.clip = clip
        self.patch_size = int(visual.conv1.patch_size if isinstance(visual.conv1, ConvStem)
                              else visual.conv1.kernel_size[0])
        self.width = int(visual.class_embedding.shape[0])
        self.num_blocks = len(visual.transformer.resblocks)
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        ls = getattr(clip, "logit_scale", None)
        self.register_buffer("logit_scale_exp", torch.tensor(float(ls.detach().exp()) if ls is not None else 100.0),
                             persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        self._packed = PackedLinears()  # built on first bf16 use on a CPU (packed_linears)

    def train(self, mode: bool = True) -> "FrozenCLIP":  # noqa: D401 - always eval
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), .cuda() ... replace the weights: drop the packed copies with them
        self._packed.clear()
        return super()._apply(fn, recurse)

    def packed_linears(self, precision: str, device_type: str) -> Optional[PackedLinears]:
        """The cache of ready bf16 weights for running the blocks at ``precision`` on
        ``device_type``, or ``None`` where it does not apply (fp32; CPUs without native bf16):
        :mod:`weclip_infer.packed_linear`."""
        if precision == "bf16" and PackedLinears.supported(device_type):
            return self._packed
        return None

    @property
    def visual(self) -> nn.Module:
        return self._tower()

    @property
    def blocks(self) -> nn.ModuleList:
        return self._tower().transformer.resblocks

    def _tower(self) -> Any:
        """The image tower, open_clip's ``VisionTransformer`` (untyped: see the typing note at the top)."""
        return self.clip.visual

    def has_text_tower(self) -> bool:
        return getattr(self.clip, "token_embedding", None) is not None

    def drop_text_tower(self) -> None:
        """Free the text tower once text embeddings are cached (serving never needs it)."""
        for name in ("transformer", "token_embedding", "ln_final", "text"):
            if hasattr(self.clip, name):
                setattr(self.clip, name, None)
        for name in ("positional_embedding", "text_projection"):
            if hasattr(self.clip, name):
                try:
                    delattr(self.clip, name)
                except AttributeError:
                    pass
                setattr(self.clip, name, None)

    # ---- image side -------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``B×3×H×W`` normalised images → ``B×L×D`` tokens after ``ln_pre``."""
        v = self._tower()
        x = v.conv1(x.to(v.class_embedding.dtype))  # B×D×h×w
        h, w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # B×hw×D, row-major
        cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(v.positional_embedding, h, w).to(x.dtype)
        return v.ln_pre(x)

    def forward_features(self, x: torch.Tensor, num_blocks: Optional[int] = None, need_attn: bool = True
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int]]:
        """Run blocks ``1..num_blocks`` (default ``N-1``).

        Returns ``(features, attn, (h, w))``: ``features`` a list of ``B×L×D`` block outputs
        (CLS first), ``attn`` a list of ``B×L×L`` head-averaged maps (empty if not
        ``need_attn``).
        """
        n = self.num_blocks - 1 if num_blocks is None else num_blocks
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        t = self.embed(x)
        feats, attns = [], []
        for blk in self.blocks[:n]:
            t, a = run_block(blk, t, need_attn)
            feats.append(t)
            if a is not None:
                attns.append(a)
        return feats, attns, (h, w)

    def pooled_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled image embedding: ``ln_post`` on all tokens, mean over patch tokens (CLS excluded),
        ``@ proj``, L2-normalised. ``B×L×D`` → ``B×E``."""
        v = self._tower()
        t = v.ln_post(tokens)[:, 1:].mean(dim=1)
        if v.proj is not None:
            t = t @ v.proj
        return F.normalize(t, dim=-1)

    # ---- text side ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``T×ctx`` → raw (unnormalised) text embeddings ``T×E``."""
        if not self.has_text_tower():
            raise RuntimeError("the text tower was dropped; text embeddings must come from the checkpoint")
        clip: Any = self.clip  # open_clip's CLIP (untyped)
        return clip.encode_text(tokens, normalize=False)

    @property
    def context_length(self) -> int:
        return int(getattr(self.clip, "context_length", 77))


# ---------------------------------------------------------------------------------------------
# Weight loading
# ---------------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _install_stem(clip: nn.Module, cfg: BackboneConfig) -> None:
    if cfg.patch_stem == "conv":
        v: Any = clip.visual  # open_clip's VisionTransformer

        patch = int(v.conv1.kernel_size[0]) if isinstance(v.conv1, nn.Conv2d) else 16
        v.conv1 = ConvStem(int(v.class_embedding.shape[0]), patch)


def _create(cfg: BackboneConfig, model_cfg: Optional[dict] = None) -> nn.Module:
    import open_clip
    from open_clip.model import CLIP

    mcfg = model_cfg or cfg.model_cfg
    if mcfg is not None:
        mcfg = dict(mcfg)
        quick_gelu = bool(mcfg.pop("quick_gelu", False))
        mcfg.pop("patch_stem", None)
        clip = CLIP(**mcfg, quick_gelu=quick_gelu)
    else:
        clip = open_clip.create_model(cfg.model_name, pretrained=None)
    _install_stem(clip, cfg)
    return clip


def _from_openai_state_dict(sd: dict) -> nn.Module:
    from open_clip.model import build_model_from_openai_state_dict

    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    sd = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in sd.items()}
    # build_model_from_openai_state_dict casts to fp16 by default; keep fp32.
    return build_model_from_openai_state_dict(sd, quick_gelu=True, cast_dtype=torch.float32).float()


def load_clip(cfg: BackboneConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the open_clip model and load the weights named by ``cfg.clip_weights``.

    * ``"random"``: random init (seeded by ``cfg.seed``, without touching the global torch RNG), for tests.
    * ``"demo"``: the small CLIP shipped with the package (pre-trained on the demo world);
      ``"demo-badge"``: the same fine-tuned on the badge demo world (see ``BUILTIN_WEIGHTS``).
    * ``"openai"`` (or another open_clip pretrained tag): open_clip's registry. Only the local
      cache is used when the network is unreachable; then a ``WeightsUnavailableError`` says how
      to pass a local file instead. Never hangs: reachability is probed with a 3 s timeout.
    * a path: an OpenAI ``ViT-B-16.pt`` (TorchScript archive or plain state dict), an open_clip
      checkpoint (``.pt``/``.bin``/``.safetensors`` state dict), or a ``.safetensors`` file
      written by ``save_clip`` (model config in its metadata). Never touches the network.
    """
    src = cfg.clip_weights
    if src in BUILTIN_WEIGHTS:  # weights shipped inside the package (registry as data)
        src = str(BUILTIN_WEIGHTS[src])
    if src == "random":
        # seeded, but on a forked generator: the caller's global torch RNG state is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            clip = _create(cfg)
    elif os.sep in src or src.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(src).exists():
        clip = _load_local(Path(src), cfg)
    else:
        clip = _load_registry(src, cfg)
    return clip.float().to(device).eval()


def _load_registry(tag: str, cfg: BackboneConfig) -> nn.Module:
    import open_clip

    if cfg.model_cfg is not None:
        raise ConfigError("backbone.clip_weights: a pretrained tag needs an open_clip model_name, not model_cfg")
    hint = ("pass a local file instead, e.g. clip_weights=/path/to/ViT-B-16.pt (OpenAI's release) "
            "or an open_clip checkpoint")
    old = os.environ.get("HF_HUB_OFFLINE")  # the user's setting, read now (not at import time)
    user_offline = old not in (None, "0", "", "false", "False")
    try:
        with _hub_offline():  # first: local cache only, no network
            clip = open_clip.create_model(cfg.model_name, pretrained=tag, require_pretrained=True)
        _install_stem(clip, cfg)
        return clip
    except Exception as cache_err:  # noqa: BLE001
        if user_offline or not _network_reachable():
            raise WeightsUnavailableError(
                f"CLIP weights '{cfg.model_name}' / '{tag}' are not in the local cache and the network "
                f"is unreachable (offline). {hint}. ({type(cache_err).__name__}: {cache_err})") from None
    try:
        clip = open_clip.create_model(cfg.model_name, pretrained=tag, require_pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(
            f"downloading CLIP weights '{cfg.model_name}' / '{tag}' failed: {e}. {hint}") from None
    _install_stem(clip, cfg)
    return clip


@contextlib.contextmanager
def _hub_offline():
    """Cache-only Hugging Face Hub access for the duration of the block. The hub reads
    ``HF_HUB_OFFLINE`` once, when it is first imported, so the environment variable alone has no
    effect afterwards: its module-level switch is set too, and both are restored on exit."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants as hub_constants
    except ImportError:  # pragma: no cover - open_clip without the hub
        hub_constants = None
    old_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _load_local(path: Path, cfg: BackboneConfig) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(f"CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
        if "token_embedding.pruned_rows" in sd:  # see save_clip
            rows, ids = sd.pop("token_embedding.pruned_rows"), sd.pop("token_embedding.pruned_ids")
            vocab = json.loads(meta.get("token_embedding", "{}")).get("vocab_size", 49408)
            table = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)
            table[ids] = rows
            sd["token_embedding.weight"] = table
        model_cfg = json.loads(meta["open_clip_cfg"]) if "open_clip_cfg" in meta else None
        if model_cfg is not None and model_cfg.get("patch_stem") and cfg.patch_stem != model_cfg["patch_stem"]:
            cfg = BackboneConfig(**{**cfg.__dict__, "patch_stem": model_cfg["patch_stem"]})
        clip = _create(cfg, model_cfg)
        _load_state(clip, sd, path, allow_missing_text=meta.get("text_tower") == "absent")
        return clip
    try:
        if _is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(f"cannot read CLIP weights from {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise WeightsUnavailableError(f"{path}: not a CLIP state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    openai_like = any(k in sd for k in OPENAI_EXTRA_KEYS) or (
        cfg.model_cfg is None and cfg.model_name.startswith("ViT-B-16") and cfg.patch_stem == "linear")

    if openai_like and "visual.conv1.weight" in sd:
        try:
            clip = _from_openai_state_dict(sd)
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailableError(f"{path}: not a valid OpenAI CLIP state dict: {e}") from None
        _install_stem(clip, cfg)
        return clip
    clip = _create(cfg)
    _load_state(clip, sd, path)
    return clip


def _load_state(clip: nn.Module, sd: dict, path: Path, allow_missing_text: bool = False) -> None:
    own = clip.state_dict()
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if allow_missing_text:
        missing = [k for k in missing if k.startswith("visual.")]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise WeightsUnavailableError(
            f"{path}: weights do not match the model config (missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, shape mismatch {bad[:5]})")
    clip.load_state_dict({k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}, strict=False)


def save_clip(clip: nn.Module, path: str | os.PathLike, model_cfg: dict, patch_stem: str = "linear",
              text_token_ids: Optional[list[int]] = None) -> None:
    """Write a CLIP to one ``.safetensors`` file with its open_clip config in the metadata.

    ``text_token_ids``: when given, the token-embedding table is pruned to these rows (others
    are zero on load) — the demo CLIP only ever sees a small vocabulary; this keeps it small.
    """
    from safetensors.torch import save_file

    from .io_utils import atomic_path

    sd = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    meta = {"open_clip_cfg": json.dumps({**model_cfg, "patch_stem": patch_stem}), "format": "weclip_infer.clip/1"}
    if not any(k.startswith("transformer.") for k in sd):
        meta["text_tower"] = "absent"  # image tower only (text embeddings live in the WeCLIP checkpoint)
    if text_token_ids is not None and "token_embedding.weight" in sd:
        ids = torch.tensor(sorted(set(int(i) for i in text_token_ids)), dtype=torch.long)
        table = sd.pop("token_embedding.weight")
        sd["token_embedding.pruned_rows"] = table[ids].contiguous()
        sd["token_embedding.pruned_ids"] = ids
        meta["token_embedding"] = json.dumps({"pruned": True, "vocab_size": int(table.shape[0])})
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
