"""Dense -> MoE (CPM-2's `init_ckpt.py`): every FFN becomes E experts, each a copy of it.

The MoE layer computes `x + sum of gate_e · FFN_e(norm(x))` (models/moe.py) with the dense
block's own norm kind, so the dense norm becomes the MoE norm and the dense FFN every expert.
What is left is the gate, which a dense block does not have:

- 'base' router: gate = sigmoid(affinity of the chosen expert), exactly 0.5 when the
  centroids are 0; the experts' output projections (and their bias) are doubled.
- 'topk' router: at inference (no capacity) a token gets its top_k experts, each with its
  softmax probability, exactly 1/E with zero centroids; the output projections are scaled by
  E / top_k.

`router_init`: 'zero' centroids (the default) keep the function exactly; 'orthogonal' (gain
0.01, as CPM-2 and BASE layers initialise them) moves every gate by ~1% of itself, and the
measured change of the logits is reported. `expert_noise` adds N(0, noise²) to the experts'
weights (symmetry breaking, off by default: it breaks exactness too). The BASE router breaks
the symmetry between the copies by itself: its balanced assignment gives each expert other
tokens, hence other gradients.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..models.config import ModelConfig

ROUTER_INITS = ("zero", "orthogonal")
#: the dense block's (norm, FFN) names, per stack
_DENSE = {"blocks": ("ln_2", "mlp"), "encoder": ("ln_2", "ffn"), "decoder": ("ln_3", "ffn")}
_OUT = ("c_proj.weight", "c_proj.bias", "wo.weight")


def grow_moe(state: dict[str, torch.Tensor], cfg: ModelConfig, target: ModelConfig, *,
             router_init: str = "zero", expert_noise: float = 0.0,
             seed: int = 0) -> tuple[dict, ModelConfig, dict]:
    """The dense -> MoE operator: `target.moe`'s experts and router, every expert a copy."""
    moe = target.moe
    gain = 2.0 if moe.router == "base" else moe.experts / moe.top_k
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    blocks = set()
    for name, tensor in state.items():
        match = re.match(r"(blocks|encoder|decoder)\.(\d+)\.(\w+)\.(.+)", name)
        norm, ffn = _DENSE.get(match.group(1), (None, None)) if match else (None, None)
        if match is None or match.group(3) not in (norm, ffn):
            out[name] = tensor
            continue
        prefix = f"{match.group(1)}.{match.group(2)}.moe."
        blocks.add(prefix)
        if match.group(3) == norm:
            out[prefix + "norm." + match.group(4)] = tensor.clone()
            continue
        for e in range(moe.experts):
            copy = tensor * gain if name.endswith(_OUT) else tensor.clone()
            if expert_noise > 0:
                copy = copy + expert_noise * torch.randn(copy.shape, generator=generator)
            out[f"{prefix}experts.{e}.{match.group(4)}"] = copy
    for index, prefix in enumerate(sorted(blocks)):
        centroids = torch.zeros(moe.experts, cfg.d_model)
        if router_init == "orthogonal":
            # NOTE: nn.init.orthogonal_ draws from the global RNG: a forked, seeded one here
            with torch.random.fork_rng():
                torch.manual_seed(seed + index)
                torch.nn.init.orthogonal_(centroids, gain=0.01)
        out[prefix + "centroids"] = centroids
    grown = replace(cfg, moe=replace(moe))
    return out, grown, {"operator": "moe", "experts": moe.experts, "router": moe.router,
                        "top_k": moe.top_k, "router_init": router_init,
                        "expert_noise": expert_noise,
                        "exact": router_init == "zero" and expert_noise == 0}
