"""Configuration dataclasses for the WeCLIP model.

Every hyperparameter of the method is a field here, and its default is the published recipe,
which follows the authors' code where paper and code differ. Each such difference is its own
switch so that both versions can be run and compared (docs/method.md describes them).

Configs load from a dataclass, a plain dict or a YAML file; unknown keys and bad values are
rejected with a message that names the key (``ConfigError``). Config files are bounded in size
(``MAX_CONFIG_BYTES``) and nesting (``MAX_CONFIG_DEPTH``). Dataset-dependent defaults live in
one table, ``DATASET_PRESETS``; the settings that depend on the backbone (RFM block counts,
decoder width and heads) are derived from its depth and width when left at 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "BackboneConfig",
    "TextConfig",
    "DecoderConfig",
    "RefineConfig",
    "PARConfig",
    "LossConfig",
    "InferenceConfig",
    "WeCLIPConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
    "DATASET_PRESETS",
    "DatasetPreset",
    "validate_scales",
    "read_config_file",
    "parse_config_text",
    "check_config_depth",
    "apply_dataset_preset",
    "backbone_shape",
    "resolve_backbone_defaults",
    "model_config_from_dict",
    "PRECISIONS",
]

PRECISIONS = ("fp32", "bf16")  # backbone.precision, inference.precision


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


@dataclass(frozen=True)
class DatasetPreset:
    """Dataset-dependent model defaults: the one table they live in (the dataclass defaults below
    are the VOC row and the shipped YAMLs do not repeat them).

    ``candidate_fraction``/``static_fraction``: RFM candidate maps and static-refinement maps as
    fractions of the backbone depth (VOC 6 and 8 of ViT-B/16's 12 blocks, COCO 10 and 8).
    """

    box_threshold: float
    rfm_switch_iter: int
    candidate_fraction: float
    static_fraction: float


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "voc": DatasetPreset(box_threshold=0.4, rfm_switch_iter=15000, candidate_fraction=6 / 12, static_fraction=8 / 12),
    "coco": DatasetPreset(box_threshold=0.7, rfm_switch_iter=40000, candidate_fraction=10 / 12,
                          static_fraction=8 / 12),
}
DATASET_PRESETS["custom"] = DATASET_PRESETS["voc"]
_VOC = DATASET_PRESETS["voc"]


@dataclass
class BackboneConfig:
    """Frozen CLIP image/text towers.

    ``clip_weights``: ``"openai"`` (open_clip's pretrained tag; needs the network or a local
    cache), a path to a local file (OpenAI ``ViT-B-16.pt`` TorchScript archive or state dict, an
    open_clip checkpoint, or our own ``.safetensors`` + ``.json`` pair), or ``"random"``.
    ``model_name`` is an open_clip model name; ``model_cfg`` an open_clip model config dict
    (``embed_dim``/``vision_cfg``/``text_cfg``) that overrides it, so small CLIP-style models go
    through the same code. ``patch_stem``: ``"linear"`` (the stride-16 conv of ViT) or
    ``"conv"`` (a small convolutional stem with the same output grid, used by the demo CLIP).
    """

    model_name: str = "ViT-B-16-quickgelu"
    clip_weights: str = "openai"
    model_cfg: Optional[dict] = None
    patch_stem: str = "linear"
    # Normalisation of input images: the authors' code uses ImageNet statistics.
    normalize: str = "imagenet"  # "imagenet" (code) | "clip" (paper/CLIP-ES)
    seed: int = 0  # only used for clip_weights == "random"
    # Arithmetic of the frozen CLIP blocks in training and in the pseudo-label path (no gradient):
    # "fp32" (exact to fp32 rounding; on CPUs with native bf16 it may use oneDNN's split-bf16 fp32
    # kernels, checked to be as accurate at start-up) or "bf16" (bfloat16: about 2x faster on such
    # CPUs, ~1e-2 relative error). GradCAM and PAR stay fp32 either way. Inference has its own
    # key, inference.precision.
    precision: str = "fp32"


@dataclass
class TextConfig:
    """Classes and prompts. ``dataset`` picks the VOC/COCO lists; ``custom`` takes
    ``class_names`` (and optionally ``class_prompts``/``bg_prompts``)."""

    dataset: str = "voc"  # voc | coco | custom
    class_names: Optional[list] = None  # display names, foreground only, label i+1
    class_prompts: Optional[list] = None  # strings put into the template (default: class_names)
    bg_prompts: Optional[list] = None  # background "stuff" prompts
    templates: list = field(default_factory=lambda: ["a clean origami {}."])


@dataclass
class DecoderConfig:
    """The light decoder."""

    dim: int = 0  # 0 (or null): follows the backbone, min(256, CLIP width) (256 on ViT-B/16)
    num_layers: int = 3  # Table 5 ablation
    num_heads: int = 0  # 0: dim // 32 (8 at dim 256), rounded down to a divisor of dim
    mlp_ratio: int = 4
    dropout: float = 0.1  # Dropout2d after fusion (docs/method.md §6.2)
    # docs/method.md §12: the code feeds blocks 1..N-1 (11 for ViT-B/16); the paper says all N blocks.
    input_blocks: str = "code"  # "code" | "paper"
    # Fully supervised variant (paper §4.5, Table 7): no text, no RFM, no affinity loss.
    fully_supervised: bool = False


@dataclass
class RefineConfig:
    """Initial CAM, static CLIP-ES refinement and RFM (the refinement module)."""

    use_refinement: bool = True  # False: initial GradCAM straight into PAR (Table 4 "w/o RFM")
    use_rfm: bool = True  # False: static refinement for the whole run
    # Dataset-dependent values (rfm_switch_iter, candidate_blocks, box_threshold) come from
    # DATASET_PRESETS; the defaults below are the VOC ones taken from that table.
    rfm_switch_iter: int = _VOC.rfm_switch_iter  # docs/method.md §4.5, §12 (the reference VOC run switched at ~9,145)
    count_eval_forwards: bool = False  # docs/method.md §12: the reference counter also counts val forwards
    # Block counts follow the backbone depth unless set (0 or null = follow it): candidates are the last half of
    # the blocks on VOC (6 of 12), the last 5/6 on COCO (10 of 12); static refinement averages
    # the last two thirds (8 of 12). Paper: 7 candidates (blocks 6..12).
    candidate_blocks: int = 0
    static_blocks: int = 0
    layer_score: str = "signed"  # docs/method.md §4.2 step 1: "signed" (code) | "abs" (paper)
    layer_filter: str = "le"  # docs/method.md §4.2 step 2: "le" (code) | "lt" (paper)
    # Table 6 ablations of the refining map: all = G·A_s ⊙ A_f; af = A_f; as = mean A_s (all
    # maps); g_as = G-filtered A_s; af_as = mean(A_s) ⊙ A_f.
    refine_map: str = "all"
    box_threshold: float = _VOC.box_threshold  # docs/method.md §3.4: 0.4 VOC, 0.7 COCO
    sinkhorn_iters: int = 3  # docs/method.md §4.3
    power: int = 2  # docs/method.md §4.3 α
    # docs/method.md §3.2 (None: the CLIP's own exp(logit_scale), 100 for OpenAI)
    cam_logit_scale: Optional[float] = None
    bg_power: float = 1.0  # docs/method.md §5.1 background exponent


@dataclass
class PARConfig:
    """Pixel-adaptive refinement (PAR) of the CAMs into pseudo labels."""

    num_iter: int = 20
    dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    w1: float = 0.3
    w2: float = 0.01


@dataclass
class LossConfig:
    """Losses."""

    seg: str = "balanced"  # "balanced" (code, docs/method.md §7.1) | "ce" (paper)
    aff: str = "linear"  # "linear" (code, docs/method.md §7.2) | "bce" (paper Eq. 10)
    aff_weight: float = 0.1
    aff_radius: int = 8


@dataclass
class InferenceConfig:
    """Test-time pipeline."""

    long_side: int = 512  # 0 disables the resize
    scales: list = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    crf: bool = False
    # Arithmetic of the inference forward (WeCLIP.segment: frozen CLIP + decoder): "fp32" or
    # "bf16" (eager PyTorch only; exported graphs are fp32). docs/method.md §9.
    precision: str = "fp32"


@dataclass
class WeCLIPConfig:
    """Everything that defines a WeCLIP model. ``build_model`` takes this."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    par: PARConfig = field(default_factory=PARConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> "WeCLIPConfig":
        _check_choice("backbone.normalize", self.backbone.normalize, ("imagenet", "clip"))
        _check_choice("backbone.patch_stem", self.backbone.patch_stem, ("linear", "conv"))
        _check_choice("backbone.precision", self.backbone.precision, PRECISIONS)
        _check_choice("inference.precision", self.inference.precision, PRECISIONS)
        _check_choice("text.dataset", self.text.dataset, ("voc", "coco", "custom"))
        if self.text.dataset == "custom" and not self.text.class_names:
            raise ConfigError("text.class_names: required when text.dataset is 'custom' (or give the data's "
                              "class list file, data.class_names_file, when training)")
        for key in ("class_names", "class_prompts", "bg_prompts", "templates"):
            _check_strings(f"text.{key}", getattr(self.text, key))
        if self.text.class_prompts is not None and self.text.class_names is not None:
            if len(self.text.class_prompts) != len(self.text.class_names):
                raise ConfigError("text.class_prompts: must have one entry per text.class_names entry")
        if not self.text.templates or any("{}" not in t for t in self.text.templates):
            raise ConfigError("text.templates: every template must contain '{}'")
        _check_choice("decoder.input_blocks", self.decoder.input_blocks, ("code", "paper"))
        for key in ("dim", "num_layers", "num_heads", "mlp_ratio"):
            v = getattr(self.decoder, key)
            if v < 0:
                raise ConfigError(f"decoder.{key}: must be positive (or 0 to follow the backbone), got {v}")
        if self.decoder.mlp_ratio < 1:
            raise ConfigError(f"decoder.mlp_ratio: must be positive, got {self.decoder.mlp_ratio}")
        if self.decoder.dim and self.decoder.num_heads and self.decoder.dim % self.decoder.num_heads:
            raise ConfigError("decoder.dim: must be divisible by decoder.num_heads")
        if not 0.0 <= self.decoder.dropout < 1.0:
            raise ConfigError(f"decoder.dropout: must be in [0, 1), got {self.decoder.dropout}")
        r = self.refine
        _check_choice("refine.layer_score", r.layer_score, ("signed", "abs"))
        _check_choice("refine.layer_filter", r.layer_filter, ("le", "lt"))
        _check_choice("refine.refine_map", r.refine_map, ("all", "af", "as", "g_as", "af_as"))
        if not 0.0 < r.box_threshold < 1.0:
            raise ConfigError(f"refine.box_threshold: must be in (0, 1), got {r.box_threshold}")
        for key in ("candidate_blocks", "static_blocks"):
            if getattr(r, key) < 0:
                raise ConfigError(f"refine.{key}: must be >= 1 (or 0 to follow the backbone), got {getattr(r, key)}")
        for key in ("sinkhorn_iters", "power"):
            if getattr(r, key) < 1:
                raise ConfigError(f"refine.{key}: must be >= 1, got {getattr(r, key)}")
        if r.rfm_switch_iter < 0:
            raise ConfigError("refine.rfm_switch_iter: must be >= 0")
        for key in ("cam_logit_scale", "bg_power"):
            v = getattr(r, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"refine.{key}: must be a positive number, got {v!r}")
        if self.par.num_iter < 0:
            raise ConfigError(f"par.num_iter: must be >= 0, got {self.par.num_iter}")
        if not self.par.dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                          for d in self.par.dilations):
            raise ConfigError(f"par.dilations: a non-empty list of positive integers, got {self.par.dilations!r}")
        for key in ("w1", "w2"):
            v = getattr(self.par, key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"par.{key}: must be a positive number, got {v!r}")
        _check_choice("loss.seg", self.loss.seg, ("balanced", "ce"))
        _check_choice("loss.aff", self.loss.aff, ("linear", "bce"))
        if not (math.isfinite(self.loss.aff_weight) and self.loss.aff_weight >= 0):
            raise ConfigError(f"loss.aff_weight: must be a number >= 0, got {self.loss.aff_weight!r}")
        if self.loss.aff_radius < 1:
            raise ConfigError("loss.aff_radius: must be >= 1")
        if self.backbone.seed < 0:
            raise ConfigError(f"backbone.seed: must be >= 0, got {self.backbone.seed}")
        if not str(self.backbone.clip_weights).strip():
            raise ConfigError("backbone.clip_weights: must not be empty")
        try:
            validate_scales(self.inference.scales, "inference.scales")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if isinstance(self.inference.long_side, bool) or not isinstance(self.inference.long_side, int) \
                or self.inference.long_side < 0:
            raise ConfigError(f"inference.long_side: a non-negative integer (0 disables the resize), "
                              f"got {self.inference.long_side!r}")
        return self


MAX_SCALE = 4.0


def validate_scales(scales: Any, key: str = "scales") -> Tuple[float, ...]:
    """The one rule for test-time scales: a non-empty list of numbers in (0, 4]; returns floats.

    Used by the config, :class:`~weclip_infer.predictor.Segmenter` and the servers alike, so a
    value one of them accepts is accepted by all.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"{key}: a non-empty list of numbers in (0, {MAX_SCALE:g}] expected, got {scales!r}")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 < float(s) <= MAX_SCALE):
            raise ValueError(f"{key}: each scale must be a number in (0, {MAX_SCALE:g}], got {s!r}")
        out.append(float(s))
    return tuple(out)


def _check_strings(key: str, value: Optional[list]) -> None:
    if value is not None and not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}: a list of non-empty strings expected, got {value!r}")


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")



T = TypeVar("T")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a list, got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + u for u in unknown)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Dataclass → plain nested dict (JSON/YAML serialisable)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _deep_merge(base: dict, upd: Mapping) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


MAX_CONFIG_BYTES = 1 << 20  # a config file (YAML or JSON) larger than 1 MiB is refused
MAX_CONFIG_DEPTH = 32  # nesting deeper than this is refused (the schema needs 4 levels)


def check_config_depth(obj: Any, source: str, limit: int = MAX_CONFIG_DEPTH) -> None:
    """Raise ``ConfigError`` when ``obj`` nests mappings/lists deeper than ``limit`` (iterative,
    so a hostile file cannot exhaust the interpreter stack here)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        if depth > limit:
            raise ConfigError(f"{source}: nested deeper than {limit} levels")
        stack.extend((c, depth + 1) for c in children)


def parse_config_text(text: str, source: str, *, json_only: bool = False) -> Any:
    """Parse YAML (or strict JSON with ``json_only``) with bounded size and nesting; errors are
    ``ConfigError`` naming ``source``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(text) if json_only else yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: invalid JSON: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    check_config_depth(data, source)
    return data


def read_config_text(p: Path) -> str:
    """The text of a config file, refused (``ConfigError``) above ``MAX_CONFIG_BYTES`` or unreadable."""
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None


def read_config_file(path: Union[str, "os.PathLike[str]"]) -> dict:
    """A YAML/JSON config file as a dict (empty file: ``{}``); the one reader of config files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = parse_config_text(read_config_text(p), str(p)) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def apply_dataset_preset(data: Mapping, prefix: str = "") -> dict:
    """``data`` (a model-config dict) with the dataset preset of its ``text.dataset`` underneath."""
    text = data.get("text") or {}
    dataset = text.get("dataset", "voc") if isinstance(text, Mapping) else "voc"
    if dataset not in DATASET_PRESETS:
        raise ConfigError(f"{prefix}text.dataset: must be one of {list(DATASET_PRESETS)}, got {dataset!r}")
    p = DATASET_PRESETS[dataset]
    return _deep_merge({"refine": {"box_threshold": p.box_threshold, "rfm_switch_iter": p.rfm_switch_iter}},
                       dict(data))


def backbone_shape(b: BackboneConfig) -> Optional[Tuple[int, int]]:
    """``(depth, width)`` of the image tower that ``b`` names, without loading any weights: from
    ``model_cfg``, from the config stored in a ``.safetensors`` file's header (the shipped CLIPs),
    or from open_clip's config of ``model_name``. None when it cannot be told."""
    cfg = b.model_cfg
    src = str(b.clip_weights)
    if cfg is None:
        from .backbone import BUILTIN_WEIGHTS

        path = Path(BUILTIN_WEIGHTS[src]) if src in BUILTIN_WEIGHTS else Path(src)
        if path.suffix == ".safetensors" and path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                if "open_clip_cfg" in meta:
                    cfg = json.loads(meta["open_clip_cfg"])
            except Exception:  # noqa: BLE001 - unreadable here means "unknown"; loading reports it
                cfg = None
    if cfg is None:
        try:
            import open_clip

            cfg = open_clip.get_model_config(b.model_name)
        except Exception:  # noqa: BLE001
            cfg = None
    vision = cfg.get("vision_cfg") if isinstance(cfg, Mapping) else None
    if not isinstance(vision, Mapping) or not isinstance(vision.get("layers"), int):
        return None
    return int(vision["layers"]), int(vision.get("width", 768))


def resolve_backbone_defaults(cfg: "WeCLIPConfig", depth: int, width: int, prefix: str = "") -> "WeCLIPConfig":
    """Fill the settings left unset (0) that follow the backbone, and check the ones set.

    ``refine.candidate_blocks``/``static_blocks``: the dataset preset's fractions of ``depth``;
    ``decoder.dim``: ``min(256, width)``; ``decoder.num_heads``: ``dim // 32`` rounded down to a
    divisor of ``dim``. A value set explicitly that does not fit raises ``ConfigError`` naming it.
    """
    preset = DATASET_PRESETS.get(cfg.text.dataset, _VOC)
    r, d = cfg.refine, cfg.decoder
    if not r.candidate_blocks:
        r.candidate_blocks = max(1, min(depth, round(preset.candidate_fraction * depth)))
    if not r.static_blocks:
        r.static_blocks = max(1, min(depth, round(preset.static_fraction * depth)))
    for key in ("candidate_blocks", "static_blocks"):
        v = getattr(r, key)
        if v > depth:
            raise ConfigError(f"{prefix}refine.{key}={v} exceeds the backbone depth ({depth} blocks): set it to at "
                              f"most {depth}, or leave it out to follow the backbone")
    if not d.dim:
        d.dim = min(256, int(width))
    if not d.num_heads:
        h = max(1, d.dim // 32)
        while d.dim % h:
            h -= 1
        d.num_heads = h
    if d.dim % d.num_heads:
        raise ConfigError(f"{prefix}decoder.dim={d.dim} must be divisible by {prefix}decoder.num_heads={d.num_heads}")
    return cfg


_FOLLOW_BACKBONE = {"refine": ("candidate_blocks", "static_blocks"), "decoder": ("dim", "num_heads")}


def model_config_from_dict(data: Mapping, overrides: Sequence[str] = (), *, presets: bool = True,
                           prefix: str = "") -> "WeCLIPConfig":
    """The one path from a model-config dict to a validated ``WeCLIPConfig``: ``key=value``
    overrides, the dataset preset underneath (``presets``), type checks, the settings that follow
    the backbone, validation. Errors name the key with ``prefix`` (e.g. ``model.``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    check_config_depth(data, prefix.rstrip(".") or "config")
    data = apply_overrides(dict(data), overrides)
    if presets:
        data = apply_dataset_preset(data, prefix)
    for section, keys in _FOLLOW_BACKBONE.items():  # null and 0 both mean "follow the backbone"
        sec = data.get(section)
        if isinstance(sec, Mapping) and any(k in sec and sec[k] is None for k in keys):
            data[section] = {k: (0 if k in keys and v is None else v) for k, v in sec.items()}
    cfg = from_dict(WeCLIPConfig, data, prefix=prefix)
    try:
        cfg.validate()
        unset = any(not v for v in (cfg.refine.candidate_blocks, cfg.refine.static_blocks, cfg.decoder.dim,
                                        cfg.decoder.num_heads))
        shape = backbone_shape(cfg.backbone)
        if shape is not None:
            resolve_backbone_defaults(cfg, *shape)
        elif unset:
            raise ConfigError("backbone.model_name: cannot tell the depth/width of this backbone; set "
                              "refine.candidate_blocks, refine.static_blocks, decoder.dim and decoder.num_heads")
        return cfg.validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else prefix + msg) from None


def load_config(config: Union[WeCLIPConfig, Mapping, str, Path, None] = None,
                overrides: Sequence[str] = ()) -> WeCLIPConfig:
    """A ``WeCLIPConfig`` from a dataclass, dict or YAML/JSON path, with dataset presets applied
    underneath the given values and ``key=value`` overrides on top; validated. A dataclass is
    taken as complete (no presets); settings left 0 follow the backbone."""
    if isinstance(config, WeCLIPConfig):
        return model_config_from_dict(to_dict(config), overrides, presets=False)
    if config is None:
        data: Any = {}
    elif isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config)))
    elif isinstance(config, (str, Path)):
        data = read_config_file(config)
        if isinstance(data.get("model"), Mapping):
            data = data["model"]
    else:
        raise ConfigError(f"config: expected a mapping or a file path, got {type(config).__name__}")
    return model_config_from_dict(data, overrides)
