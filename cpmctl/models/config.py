"""The `[model]` section of a recipe: one typed config for every architecture.

Every field's docstring is its `--help` text in recipes. The published CPM sizes (docs/design.md
§5) are the `recipes/` files; `cpmctl model info --recipe R` counts their parameters on the
meta device.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

ARCHS = ("gpt", "encdec")
ROUTERS = ("base", "topk")


@dataclass
class MoeConfig:
    """Mixture of experts: every FFN replaced by `experts` experts (0: a dense model)."""

    experts: int = 0
    """Experts per MoE layer; 0 keeps the model dense (CPM-2-MoE: 32)."""
    router: str = "base"
    """'base': BASE layers (balanced assignment in training, top-1 at inference, no auxiliary
    loss); 'topk': a softmax router with capacity factor and auxiliary balance loss."""
    top_k: int = 1
    """topk router: experts per token."""
    capacity_factor: float = 1.25
    """topk router: each expert takes at most capacity_factor * tokens * top_k / experts."""
    aux_loss_weight: float = 0.01
    """topk router: weight of the load-balancing auxiliary loss."""


@dataclass
class ModelConfig:
    """The architecture and its sizes."""

    arch: str = "gpt"
    """'gpt' (CPM-1: decoder-only) or 'encdec' (CPM-2: T5 v1.1-style encoder-decoder)."""
    vocab_size: int = 30000
    """Vocabulary size; must equal the tokenizer's (CPM-1: 30,000; CPM-2: 26,240)."""
    d_model: int = 768
    """Hidden size."""
    n_heads: int = 12
    """Attention heads."""
    d_head: int = 0
    """Size of one head; 0 means d_model / n_heads (CPM-1 large: 80; CPM-2: 64)."""
    d_ff: int = 0
    """FFN inner size; 0 means 4 * d_model (CPM-2: 10,240)."""
    n_layers: int = 12
    """Transformer blocks (gpt), or encoder blocks (encdec)."""
    n_decoder_layers: int = 0
    """encdec: decoder blocks; 0 means n_layers."""
    max_positions: int = 1024
    """gpt: learned absolute positions, the longest input."""
    relative_buckets: int = 32
    """encdec: relative position buckets."""
    relative_max_distance: int = 128
    """encdec: distances beyond this share the last bucket."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and FFN outputs."""
    layer_norm_eps: float = 0.0
    """Normalisation epsilon; 0 means 1e-5 (gpt LayerNorm) or 1e-6 (encdec RMSNorm)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    moe: MoeConfig = field(default_factory=MoeConfig)

    @property
    def head_size(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def eps(self) -> float:
        return self.layer_norm_eps or (1e-5 if self.arch == "gpt" else 1e-6)


#: Fields that change how a model trains, not what it computes: configs that differ only here
#: describe the same function and the same tensors (a warm start may change them).
TRAINING_FIELDS = ("dropout", "init_std")
MOE_TRAINING_FIELDS = ("capacity_factor", "aux_loss_weight")


def architecture(cfg: ModelConfig) -> dict:
    """The fields of `cfg` that decide the model's tensors and function."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TRAINING_FIELDS}
    fields["moe"] = {k: v for k, v in fields["moe"].items() if k not in MOE_TRAINING_FIELDS}
    return fields


def config_problems(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every rule a [model] section must satisfy, in one place (recipes, model.json and HF
    configs are all checked by it): (message, the model.* keys at fault) per broken rule."""
    problems: list[tuple[str, tuple[str, ...]]] = []

    def fail(message: str, *keys: str) -> None:
        problems.append((message, tuple(f"model.{key}" for key in keys)))

    def at_least(key: str, low: float) -> None:
        value = _lookup(cfg, key)
        if not value >= low:
            fail(f"model.{key} must be at least {low}, not {value!r}", key)

    def within(key: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = True) -> None:
        value = _lookup(cfg, key)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            fail(f"model.{key} must be in {span}, not {value!r}", key)

    def one_of(key: str, choices: tuple[str, ...]) -> None:
        value = _lookup(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            fail(f"model.{key} must be one of {', '.join(choices)}, not {value!r}{hint}", key)

    one_of("arch", ARCHS)
    for key in ("vocab_size", "d_model", "n_heads", "n_layers", "max_positions",
                "relative_buckets", "relative_max_distance"):
        at_least(key, 1)
    for key in ("d_head", "d_ff", "n_decoder_layers"):
        at_least(key, 0)
    if not cfg.d_head and cfg.n_heads > 0 and cfg.d_model % cfg.n_heads:
        fail(f"model.d_model {cfg.d_model} is not divisible by model.n_heads {cfg.n_heads} "
             "(set model.d_head)", "d_model", "n_heads")
    if cfg.arch == "gpt" and cfg.n_decoder_layers:
        fail("model.n_decoder_layers applies to encdec models only (arch is gpt)",
             "n_decoder_layers", "arch")
    if cfg.arch == "encdec":
        at_least("relative_buckets", 4)
        if cfg.relative_max_distance <= cfg.relative_buckets // 2:
            fail(f"model.relative_max_distance must exceed model.relative_buckets / 2 "
                 f"({cfg.relative_buckets // 2}), not {cfg.relative_max_distance}",
                 "relative_max_distance", "relative_buckets")
    within("dropout", 0.0, 1.0)
    within("layer_norm_eps", 0.0, math.inf)
    within("init_std", 0.0, math.inf, low_open=True)
    at_least("moe.experts", 0)
    one_of("moe.router", ROUTERS)
    at_least("moe.top_k", 1)
    moe = cfg.moe
    if moe.router == "base" and moe.top_k != 1:
        fail("model.moe.top_k must be 1 with the base router (BASE layers route each token to "
             f"one expert), not {moe.top_k}", "moe.top_k", "moe.router")
    if moe.experts and moe.top_k > moe.experts:
        fail(f"model.moe.top_k {moe.top_k} is more than model.moe.experts {moe.experts}",
             "moe.top_k", "moe.experts")
    within("moe.capacity_factor", 0.0, math.inf, low_open=True)
    within("moe.aux_loss_weight", 0.0, math.inf)
    return problems


def _lookup(cfg: ModelConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
