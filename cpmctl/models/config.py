"""The `[model]` section of a recipe: one typed config for every architecture.

Every field's docstring is its `--help` text in recipes. The published CPM sizes (ARCHITECTURE
§5) are the `recipes/` files; `cpmctl model info --recipe R` counts their parameters on the
meta device.
"""

from __future__ import annotations

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
