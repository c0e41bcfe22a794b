"""Mixture-of-experts FFN (CPM-2-MoE): a BASE layer, or a top-k softmax router.

When `cfg.moe.experts > 0`, every FFN of either architecture is a `MoeFFN`. It holds its own
norm and its own residual, so the block calls `x = moe(x)`, never `x + moe(...)`:

    h        = norm(x)                          # also the experts' input
    affinity = h @ centroids.T                  # [tokens, experts], computed in fp32
    out      = x + sum over the token's experts e of  gate_e * FFN_e(h)

Routers (`cfg.moe.router`):
- 'base' (BASE layers, Lewis et al. 2021): one expert per token. Training uses a balanced
  assignment — every expert gets exactly tokens/E tokens, so no auxiliary loss is needed;
  inference (`not self.training`) takes the argmax. The gate is sigmoid(affinity) of the chosen
  expert, as in BASE: it is the only path by which the centroids get a gradient.
- 'topk' (Switch/GShard): gates = softmax(affinity); each token goes to its top_k experts with
  the (not renormalised) softmax probability as gate; an expert takes at most
  ceil(capacity_factor * tokens * top_k / experts) tokens, earlier-ranked choices first, then in
  token order; a token an expert drops only loses that expert's term (the residual carries it).
  The Switch load-balancing loss is kept in `self.aux_loss`. The capacity is a training
  device: inference (`not self.training`) drops nothing, so a token's output never depends on
  the other tokens of its batch (padding included) and a batch generates what its prompts
  generate one by one.

The exact relation a dense -> MoE growth can rely on: if every expert is a copy of one dense
FFN `f`, then `MoeFFN(x) = x + g(x) * f(norm(x))`, with g = sigmoid(affinity of the chosen
expert) for 'base' (exactly 0.5 when the centroids are zero) and g = the sum of the kept gates
for 'topk'. Doubling the copies' output projection with zero centroids therefore gives exactly
`x + f(norm(x))`. The norm is the dense block's kind (`make_norm`: LayerNorm with bias in a
GPT, RMSNorm in the encoder-decoder), so a dense model grows into an MoE exactly (cpmctl grow).

Experts are a ModuleList of ordinary FFNs, one module (and one set of tensors) per expert, so
offloaded inference can move them one at a time: `route` and `run_experts` are separate steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dropout import Dropout
from .layers import RMSNorm


@dataclass
class Routing:
    """Which token goes to which expert with which gate: three aligned 1-d tensors."""

    tokens: torch.Tensor  # int64 [n], index into the flattened tokens
    experts: torch.Tensor  # int64 [n]
    gates: torch.Tensor  # float [n]


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Assign each of T tokens one of E experts so that the counts are balanced exactly.

    scores: [T, E] affinities. Returns int64 [T]. Expert e takes T // E tokens, plus one for the
    first T % E experts. That is the same as padding the batch to a multiple of E with
    E - T % E dummy tokens pinned one each to the last experts, without running the dummies:
    when T is a multiple of E every expert gets exactly T / E.

    An auction, vectorised over tokens: each round, every unassigned token bids for its best
    expert that still has room, and each expert accepts its highest-scoring bidders up to its
    remaining room. A round either places every bidder or fills some expert, so there are at
    most E rounds (the only Python loop). A greedy approximation of the optimal assignment
    (BASE solves it with a full auction); tokens keep their argmax whenever that is balanced.

    NOTE: the balance is over the tokens this process sees (padding positions included); BASE
    balances across all workers with an all-to-all, which a multi-process engine can add by
    gathering the scores first.
    """
    n_tokens, n_experts = scores.shape
    scores = scores.detach().float()
    room = torch.full((n_experts,), n_tokens // n_experts, dtype=torch.long, device=scores.device)
    room[: n_tokens % n_experts] += 1
    assignment = torch.full((n_tokens,), -1, dtype=torch.long, device=scores.device)
    free = torch.arange(n_tokens, device=scores.device)  # unassigned tokens
    while free.numel():
        bids = scores[free].masked_fill(room == 0, -math.inf)
        best, choice = bids.max(-1)
        # bidders grouped by expert, best score first inside each group
        order = torch.argsort(best, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        counts = torch.bincount(choice, minlength=n_experts)
        group_start = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=scores.device) - group_start[choice[order]]
        winners = order[rank < room[choice[order]]]
        assignment[free[winners]] = choice[winners]
        room -= torch.bincount(choice[winners], minlength=n_experts)
        still_free = torch.ones_like(free, dtype=torch.bool)
        still_free[winners] = False
        free = free[still_free]
    return assignment


class MoeFFN(nn.Module):
    """E experts behind a router; includes the pre-norm and the residual (see module doc)."""

    def __init__(self, cfg: ModelConfig, make_expert: Callable[[], nn.Module],
                 make_norm: Callable[[], nn.Module] | None = None):
        super().__init__()
        moe = cfg.moe
        self.router = moe.router
        self.top_k = moe.top_k if moe.router == "topk" else 1
        self.capacity_factor = moe.capacity_factor
        self.norm = make_norm() if make_norm else RMSNorm(cfg.d_model, cfg.eps)
        self.centroids = nn.Parameter(torch.empty(moe.experts, cfg.d_model))
        self.experts = nn.ModuleList(make_expert() for _ in range(moe.experts))
        self.dropout = Dropout(cfg.dropout)
        self.aux_loss = torch.zeros(())  # Switch balance loss of the last forward (topk only)

    def __getstate__(self):
        # NOTE: aux_loss holds the last forward's graph, which deepcopy and pickle refuse;
        # a copy (a frozen teacher, a checkpoint of the module) gets it detached.
        state = self.__dict__.copy()
        state["aux_loss"] = self.aux_loss.detach()
        return state

    @property
    def n_experts(self) -> int:
        return self.centroids.shape[0]

    def affinity(self, h: torch.Tensor) -> torch.Tensor:
        """[T, d] normed hidden -> [T, E] fp32 affinities (autocast off: routing is fragile)."""
        with torch.autocast(h.device.type, enabled=False):
            return h.float() @ self.centroids.float().t()

    def route(self, h: torch.Tensor) -> Routing:
        """Choose experts and gates for the normed tokens h [T, d]; sets `self.aux_loss`."""
        scores = self.affinity(h)
        n_tokens = scores.shape[0]
        if self.router == "base":
            self.aux_loss = scores.new_zeros(())
            if self.training:
                experts = balanced_assignment(scores)
            else:
                experts = scores.argmax(-1)
            chosen = scores.gather(1, experts[:, None]).squeeze(1)
            tokens = torch.arange(n_tokens, device=h.device)
            return Routing(tokens, experts, torch.sigmoid(chosen))

        probs = scores.softmax(-1)
        gates, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        # k-major order: every token's first choice is served before any second choice
        experts, gates = experts.t().reshape(-1), gates.t().reshape(-1)
        tokens = torch.arange(n_tokens, device=h.device).repeat(self.top_k)
        onehot = F.one_hot(experts, self.n_experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place in the expert's queue
        keep = position < (self.capacity(n_tokens) if self.training else n_tokens)
        # Switch: E * sum_e (fraction of assignments to e) * (mean router probability of e)
        fraction = onehot.float().mean(0)
        self.aux_loss = self.n_experts * (fraction * probs.mean(0)).sum()
        return Routing(tokens[keep], experts[keep], gates[keep])

    def capacity(self, n_tokens: int) -> int:
        """topk: the most tokens one expert takes in a batch of n_tokens."""
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def run_experts(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """sum of gate * FFN_e(h[token]) per token, [T, d]; one expert call at a time.

        NOTE: every expert is called, one that got no token with an empty batch: its weights
        then join the backward pass with zero gradients, which DDP requires (it waits for
        every parameter's gradient), and ZeRO-3's per-module weight gathering, a collective,
        happens on every process whatever the routing chose there."""
        order = torch.argsort(routing.experts, stable=True)
        counts = torch.bincount(routing.experts, minlength=self.n_experts).tolist()
        out = torch.zeros_like(h)
        for expert, tokens, gates in zip(self.experts, routing.tokens[order].split(counts),
                                         routing.gates[order].split(counts), strict=True):
            y = expert(h[tokens]) * gates[:, None]
            out = out.index_add(0, tokens, y.to(out.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        h = self.norm(x)
        y = self.run_experts(h, self.route(h))
        return (x + self.dropout(y)).reshape(shape)


def moe_aux_loss(model: nn.Module, weight: float) -> torch.Tensor:
    """weight * the sum of the MoE layers' auxiliary losses from the last forward (0 if none)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoeFFN)]
    if not losses:
        return torch.zeros(())
    return weight * torch.stack([loss.to(losses[0].device) for loss in losses]).sum()
