"""Configuration dataclasses for the WeCLIP model (spec references in brackets).

Every value that the spec names is a field here, and its default is the spec's value, which
follows the authors' code where paper and code differ (spec §11.1). Each such difference is its
own switch so that both versions can be run and compared.

Configs load from a dataclass, a plain dict or a YAML file; unknown keys and bad values are
rejected with a message that names the key (``ConfigError``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, TypeVar, Union, get_args, get_origin, get_type_hints

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
]


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


@dataclass
class BackboneConfig:
    """Frozen CLIP image/text towers (spec §1).

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
    # Normalisation of input images (spec §1.2): the authors' code uses ImageNet statistics.
    normalize: str = "imagenet"  # "imagenet" (code) | "clip" (paper/CLIP-ES)
    seed: int = 0  # only used for clip_weights == "random"


@dataclass
class TextConfig:
    """Classes and prompts (spec §1.6). ``dataset`` picks the VOC/COCO lists; ``custom`` takes
    ``class_names`` (and optionally ``class_prompts``/``bg_prompts``)."""

    dataset: str = "voc"  # voc | coco | custom
    class_names: Optional[list] = None  # display names, foreground only, label i+1
    class_prompts: Optional[list] = None  # strings put into the template (default: class_names)
    bg_prompts: Optional[list] = None  # background "stuff" prompts
    templates: list = field(default_factory=lambda: ["a clean origami {}."])


@dataclass
class DecoderConfig:
    """The light decoder (spec §3)."""

    dim: int = 256
    num_layers: int = 3  # Table 5 ablation
    num_heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.1  # Dropout2d after fusion (§3.3)
    # §11.1: the code feeds blocks 1..N-1 (11 for ViT-B/16); the paper says all N blocks.
    input_blocks: str = "code"  # "code" | "paper"
    # Fully supervised variant (paper §4.5, Table 7): no text, no RFM, no affinity loss.
    fully_supervised: bool = False


@dataclass
class RefineConfig:
    """Initial CAM, static CLIP-ES refinement and RFM (spec §2, §4)."""

    use_refinement: bool = True  # False: initial GradCAM straight into PAR (Table 4 "w/o RFM")
    use_rfm: bool = True  # False: static refinement for the whole run
    rfm_switch_iter: int = 15000  # §4.1, §11.2 item 1 (the reference VOC run switched at ~9,145)
    count_eval_forwards: bool = False  # §11.2 item 1: the reference counter also counts val forwards
    candidate_blocks: int = 6  # §4.2: last 6 maps (VOC), last 10 (COCO); paper: 7 (blocks 6..12)
    static_blocks: int = 8  # §4.1: mean of the last 8 maps before the switch
    layer_score: str = "signed"  # §4.2 step 1: "signed" (code) | "abs" (paper)
    layer_filter: str = "le"  # §4.2 step 2: "le" (code) | "lt" (paper)
    # Table 6 ablations of the refining map: all = G·A_s ⊙ A_f; af = A_f; as = mean A_s (all
    # maps); g_as = G-filtered A_s; af_as = mean(A_s) ⊙ A_f.
    refine_map: str = "all"
    box_threshold: float = 0.4  # §2.4: 0.4 VOC, 0.7 COCO
    sinkhorn_iters: int = 3  # §4.3
    power: int = 2  # §4.3 α
    cam_logit_scale: Optional[float] = None  # §2.2 (None: the CLIP's own exp(logit_scale), 100 for OpenAI)
    bg_power: float = 1.0  # §2.5 background exponent


@dataclass
class PARConfig:
    """Pixel-adaptive refinement (spec §5.2)."""

    num_iter: int = 20
    dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    w1: float = 0.3
    w2: float = 0.01


@dataclass
class LossConfig:
    """Losses (spec §6)."""

    seg: str = "balanced"  # "balanced" (code, §6.1) | "ce" (paper)
    aff: str = "linear"  # "linear" (code, §6.2) | "bce" (paper Eq. 10)
    aff_weight: float = 0.1
    aff_radius: int = 8


@dataclass
class InferenceConfig:
    """Test-time pipeline (spec §8)."""

    long_side: int = 512  # 0 disables the resize
    scales: list = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    crf: bool = False


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
        _check_choice("text.dataset", self.text.dataset, ("voc", "coco", "custom"))
        if self.text.dataset == "custom" and not self.text.class_names:
            raise ConfigError("text.class_names: required when text.dataset is 'custom'")
        if self.text.class_prompts is not None and self.text.class_names is not None:
            if len(self.text.class_prompts) != len(self.text.class_names):
                raise ConfigError("text.class_prompts: must have one entry per text.class_names entry")
        if not self.text.templates or any("{}" not in t for t in self.text.templates):
            raise ConfigError("text.templates: every template must contain '{}'")
        _check_choice("decoder.input_blocks", self.decoder.input_blocks, ("code", "paper"))
        for key in ("dim", "num_layers", "num_heads", "mlp_ratio"):
            v = getattr(self.decoder, key)
            if v < (0 if key == "num_layers" else 1):
                raise ConfigError(f"decoder.{key}: must be positive, got {v}")
        if self.decoder.dim % self.decoder.num_heads:
            raise ConfigError("decoder.dim: must be divisible by decoder.num_heads")
        if not 0.0 <= self.decoder.dropout < 1.0:
            raise ConfigError(f"decoder.dropout: must be in [0, 1), got {self.decoder.dropout}")
        r = self.refine
        _check_choice("refine.layer_score", r.layer_score, ("signed", "abs"))
        _check_choice("refine.layer_filter", r.layer_filter, ("le", "lt"))
        _check_choice("refine.refine_map", r.refine_map, ("all", "af", "as", "g_as", "af_as"))
        if not 0.0 < r.box_threshold < 1.0:
            raise ConfigError(f"refine.box_threshold: must be in (0, 1), got {r.box_threshold}")
        for key in ("candidate_blocks", "static_blocks", "sinkhorn_iters", "power"):
            if getattr(r, key) < 1:
                raise ConfigError(f"refine.{key}: must be >= 1, got {getattr(r, key)}")
        if r.rfm_switch_iter < 0:
            raise ConfigError("refine.rfm_switch_iter: must be >= 0")
        if self.par.num_iter < 0 or not self.par.dilations or any(int(d) < 1 for d in self.par.dilations):
            raise ConfigError("par.dilations: positive integers required; par.num_iter >= 0")
        _check_choice("loss.seg", self.loss.seg, ("balanced", "ce"))
        _check_choice("loss.aff", self.loss.aff, ("linear", "bce"))
        if self.loss.aff_radius < 1:
            raise ConfigError("loss.aff_radius: must be >= 1")
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


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")


# Dataset-dependent defaults (spec §7.5 table).
DATASET_PRESETS: dict[str, dict] = {
    "voc": {"refine": {"box_threshold": 0.4, "candidate_blocks": 6, "rfm_switch_iter": 15000}},
    "coco": {"refine": {"box_threshold": 0.7, "candidate_blocks": 10, "rfm_switch_iter": 40000}},
    "custom": {},
}

T = TypeVar("T")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if dataclasses.is_dataclass(tp):
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
    names = {f.name for f in dataclasses.fields(cls)}
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


def load_config(config: Union[WeCLIPConfig, Mapping, str, Path, None] = None,
                overrides: Sequence[str] = ()) -> WeCLIPConfig:
    """A ``WeCLIPConfig`` from a dataclass, dict or YAML/JSON path, with dataset presets applied
    underneath the given values and ``key=value`` overrides on top; validated."""
    if isinstance(config, WeCLIPConfig):
        data = to_dict(config)
        explicit = True
    elif config is None:
        data, explicit = {}, False
    elif isinstance(config, Mapping):
        data, explicit = json.loads(json.dumps(dict(config))), False
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if "model" in data and isinstance(data["model"], Mapping):
            data = data["model"]
        explicit = False
    data = apply_overrides(data, overrides)
    if not explicit:
        dataset = (data.get("text") or {}).get("dataset", "voc")
        if dataset not in DATASET_PRESETS:
            raise ConfigError(f"text.dataset: must be one of {list(DATASET_PRESETS)}, got {dataset!r}")
        data = _deep_merge(DATASET_PRESETS[dataset], data)
    return from_dict(WeCLIPConfig, data).validate()
