"""Width growth (Staged Training, Shen et al. 2022; bert2BERT's function-preserving init).

Every dimension that grows (the hidden size, the heads, the FFN) gets an index map: new
position -> the old position it copies. The hidden state of the grown model is then the old
one with positions repeated (`[x, x]` for ×2), and each weight matrix is built so that every
output position computes what its old position computed:

    W'[o, i] = W[out(o), in(i)] · S[o, i],   where S sums to 1 over the copies of each old input

- hidden ×k (integer k), heads and FFN ×k alike: S is block-diagonal (copy c of an output
  reads copy c of the input), the Staged Training operator: `[[W, 0], [0, W]]`;
- otherwise S = 1 / (copies of the input position): `[W/k, W/k]` (exact as well).
- `split_noise` b > 0 blends S with a random split (still summing to 1 per copy group): the
  function stays the same to float rounding, but the copies get different gradients. Without
  it (or dropout), copies receive identical updates and train in lockstep forever.

Biases and norm weights follow their output position; embeddings are tiled (they write the
hidden state); the relative position bias is tiled over the heads. The norms over the hidden
state see `[x, x]`, whose mean and mean square are those of x, so inner norms are duplicated
exactly; the last norm feeds the head, which sums over the copies, so its weight and bias are
divided by the copy count (the tied GPT embedding; encdec's head is treated the same way).

A hidden size that is not a multiple of the old one repeats some positions more often than
others: LayerNorm and RMSNorm then see other statistics and the function changes (slightly);
`cpmctl grow` allows it only with --allow-inexact and reports the measured deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.config import ModelConfig


@dataclass
class Dim:
    """How one dimension grows: `index[p]` = the old position new position p copies,
    `copy[p]` = which copy it is (0 for the original), `count[p]` = copies of that old
    position, `k` = the uniform factor when the new size is k × the old (else None)."""

    index: torch.Tensor
    copy: torch.Tensor
    count: torch.Tensor
    k: int | None

    @classmethod
    def identity(cls, n: int) -> Dim:
        return cls.grow(n, n, None)

    @classmethod
    def grow(cls, old: int, new: int, generator: torch.Generator | None) -> Dim:
        if new % old == 0:
            index = torch.arange(new) % old
            return cls(index, torch.arange(new) // old, torch.full((new,), new // old),
                       new // old)
        extra = new - old
        # bert2BERT: the extra positions copy old ones chosen at random (without repeats
        # while there are old positions left)
        chosen = torch.cat([torch.randperm(old, generator=generator)
                            for _ in range(-(-extra // old))])[:extra]
        index = torch.cat([torch.arange(old), chosen])
        counts = torch.bincount(index, minlength=old)
        copy = torch.zeros(new, dtype=torch.long)
        seen = torch.zeros(old, dtype=torch.long)
        for p, i in enumerate(index.tolist()):
            copy[p] = seen[i]
            seen[i] += 1
        return cls(index, copy, counts[index], None)

    def heads_to_inner(self, head_size: int) -> Dim:
        """The map of the attention's inner dimension [heads × head_size] from the heads'."""
        offsets = torch.arange(head_size)
        index = (self.index[:, None] * head_size + offsets).reshape(-1)
        expand = lambda t: t.repeat_interleave(head_size)  # noqa: E731
        return Dim(index, expand(self.copy), expand(self.count), self.k)

    def stacked(self, parts: int, part_size: int) -> Dim:
        """`parts` consecutive blocks with this map each (the fused Q, K, V projection)."""
        index = torch.cat([self.index + part * part_size for part in range(parts)])
        return Dim(index, self.copy.repeat(parts), self.count.repeat(parts), self.k)


def split(out: Dim, into: Dim, noise: float, generator: torch.Generator) -> torch.Tensor:
    """S [new out, new in] for `W'[o, i] = W[out(o), in(i)] · S[o, i]` (module doc)."""
    if out.k is not None and out.k == into.k and out.k > 1:
        s = (out.copy[:, None] == into.copy[None, :]).float()
    else:
        s = (1.0 / into.count.float())[None, :].expand(len(out.index), -1).clone()
    if noise > 0 and bool((into.count > 1).any()):
        u = torch.rand(s.shape, generator=generator) + 1e-3
        groups = torch.zeros(s.shape[0], int(into.index.max()) + 1)
        groups.index_add_(1, into.index, u)
        s = (1 - noise) * s + noise * u / groups[:, into.index]
    return s


def _role(name: str) -> tuple[str | None, str | None, str]:
    """(output dim, input dim, kind) of a parameter by its name; kind is 'matrix', 'vector'
    (follows its output), 'norm', 'last_norm', 'embedding' (tiled columns, no split) or
    'heads' (tiled columns: the relative position bias)."""
    if name.endswith(("ln_f.weight", "ln_f.bias", "decoder_norm.weight")):
        return "hidden", None, "last_norm"
    if name.endswith(("wte.weight", "wpe.weight", "shared.weight", "lm_head.weight")):
        return None, "hidden", "embedding"
    if name.endswith("relative_bias.weight"):
        return None, "heads", "heads"
    if name.endswith("centroids"):
        return None, "hidden", "matrix"
    if name.endswith("c_attn.weight"):
        return "qkv", "hidden", "matrix"
    if name.endswith("c_attn.bias"):
        return "qkv", None, "vector"
    if name.endswith((".q.weight", ".k.weight", ".v.weight")):
        return "inner", "hidden", "matrix"
    if name.endswith(".o.weight") or (name.endswith("c_proj.weight") and ".attn." in name):
        return "hidden", "inner", "matrix"
    if name.endswith(("c_fc.weight", "wi_0.weight", "wi_1.weight")):
        return "ffn", "hidden", "matrix"
    if name.endswith("c_fc.bias"):
        return "ffn", None, "vector"
    if name.endswith(("c_proj.weight", "wo.weight")):
        return "hidden", "ffn", "matrix"
    if name.endswith("c_proj.bias"):
        return "hidden", None, "vector"
    return "hidden", None, "norm"  # ln_*, norm, encoder_norm: weight (and bias)


def grow_width(state: dict[str, torch.Tensor], cfg: ModelConfig, target: ModelConfig, *,
               split_noise: float = 0.0, seed: int = 0) -> tuple[dict, ModelConfig, dict]:
    """The width operator: hidden size, heads and FFN size of `cfg` grown to `target`'s."""
    generator = torch.Generator().manual_seed(seed)
    heads = Dim.grow(cfg.n_heads, target.n_heads, generator)
    inner = heads.heads_to_inner(cfg.head_size)
    dims = {"hidden": Dim.grow(cfg.d_model, target.d_model, generator), "heads": heads,
            "inner": inner, "qkv": inner.stacked(3, cfg.n_heads * cfg.head_size),
            "ffn": Dim.grow(cfg.ffn_size, target.ffn_size, generator)}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.arch == "gpt":
            continue  # tied to wte, set below
        out_dim, in_dim, kind = _role(name)
        rows = dims[out_dim] if out_dim else Dim.identity(tensor.shape[0])
        if kind in ("norm", "vector"):
            out[name] = tensor[rows.index].clone()
        elif kind == "last_norm":
            out[name] = tensor[rows.index] / rows.count.to(tensor.dtype)
        elif kind in ("embedding", "heads"):
            out[name] = tensor[:, dims[in_dim].index].clone()
        else:
            s = split(rows, dims[in_dim], split_noise, generator)
            out[name] = tensor[rows.index][:, dims[in_dim].index] * s.to(tensor.dtype)
    if cfg.arch == "gpt":
        out["lm_head.weight"] = out["wte.weight"]
    grown = replace(cfg, d_model=target.d_model, n_heads=target.n_heads,
                    d_head=cfg.head_size, d_ff=target.ffn_size)
    exact = dims["hidden"].k is not None
    return out, grown, {"operator": "width", "d_model": [cfg.d_model, target.d_model],
                        "n_heads": [cfg.n_heads, target.n_heads],
                        "d_ff": [cfg.ffn_size, target.ffn_size], "exact": exact,
                        "split_noise": split_noise}
