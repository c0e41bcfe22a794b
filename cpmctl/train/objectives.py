"""Training objectives: CPM-1's causal LM and CPM-2's span corruption (T5's algorithm), the
fused chunked LM head with its knowledge-inheritance KL, and the objectives the trainer runs.

    objective = build_objective(recipe, eod_id, tokenizer, device)   # CausalLM/SpanCorruption,
    batch = objective.batch(rows, sample_indices)                    # in KI when [inherit] is set
    record = objective.loss(model, batch, step)   # LossRecord: loss, count, values to log

    batch = lm_batch(samples, eod_id)                       # samples: [B, L + 1] int64
    loss, n = lm_loss(model(batch["input_ids"]), batch["labels"], batch["loss_mask"])

    raw, _ = recipe.data.span_lengths()                     # 512 -> 568 raw tokens
    batch = encdec_batch(samples, consumed, seed, recipe.data, eod_id=..., pad_id=...,
                         sentinels=tokenizer.sentinels)     # samples: [B, <= raw]
    logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                   batch["decoder_attention_mask"])
    loss, n = encdec_loss(logits, batch["labels"], batch["loss_mask"])

Conventions chosen here (CPM-2's scripts follow T5 in the algorithm; these pin the details):

- Both the encoder input and the target end with one `<eod>` (the "one closing token" each that
  `span_corruption_lengths` counts; T5 closes both with EOS, CPM's end-of-text token is `<eod>`).
- Sentinels are numbered per sample from `<s_0>` upwards, in the order the spans occur, in both
  the input and the target (the target starts with `<s_0>`).
- The decoder input is the target shifted right by one with `<pad>` as the start token (T5's
  `decoder_start_token_id`); it is a real token (decoder_attention_mask 1 there). Padding after
  the target is `<pad>` with mask 0 in input_ids, decoder_input_ids and labels; the loss uses
  `loss_mask`, never the label value, so labels are padded with `<pad>` rather than -100.
- Randomness: row i of a batch starting at global sample `consumed_start` is corrupted with
  `np.random.default_rng([seed, consumed_start + i])`, so a sample's corruption depends only on
  (seed, its global index): a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CpmError
from ..kernels import dense
from ..recipe import DataConfig
from ..recipe.schema import span_counts

__all__ = ["CausalLM", "LossRecord", "SpanCorruption", "build_objective", "distill_loss",
           "encdec_batch", "encdec_loss", "fused_distill_loss", "fused_lm_loss", "lm_batch",
           "lm_loss", "noise_span_lengths", "span_corrupt"]


# ---------------------------------------------------------------- CPM-1: causal LM


def lm_batch(samples: np.ndarray, eod_id: int) -> dict[str, torch.Tensor]:
    """[B, L + 1] packed token windows -> input_ids and labels [B, L] (int64), loss_mask [B, L]
    (float32): 0 where the *input* token is `<eod>` (the first token of the next packed
    document is not predicted from the previous document's end), else 1. `<eod>` itself is a
    label like any other token: the model learns where a document ends."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.long)
    if x.ndim != 2 or x.shape[1] < 2:
        raise CpmError(f"lm_batch needs samples of shape [batch, seq_len + 1], got "
                       f"{tuple(x.shape)}")
    inputs, labels = x[:, :-1], x[:, 1:]
    loss_mask = (inputs != eod_id).float()
    return {"input_ids": inputs.contiguous(), "labels": labels.contiguous(),
            "loss_mask": loss_mask}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean cross entropy over the tokens where loss_mask is 1, how many those are).

    The cross entropy is taken on fp32 logits whatever the model's precision (a softmax over a
    30k vocabulary in bf16 loses the small probabilities). With no unmasked token the loss is
    an exact 0 that still depends on the logits (so backward works), and the count is 0.
    """
    vocab = logits.shape[-1]
    per_token = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1).long(),
                                reduction="none")
    mask = loss_mask.reshape(-1).to(per_token.dtype)
    count = int(mask.sum().item())
    total = (per_token * mask).sum()
    return total / max(count, 1), count


encdec_loss = lm_loss
"""CPM-2's loss over the decoder's logits: the same masked fp32 mean as `lm_loss`."""


# ---------------------------------------------------------------- CPM-2: span corruption


def _segment(rng: np.random.Generator, items: int, segments: int) -> np.ndarray:
    """`items` split at random into `segments` parts of length >= 1 (T5's
    `_random_segmentation`: shuffle segments - 1 start marks over the items - 1 gaps)."""
    marks = np.zeros(items - 1, dtype=bool)
    marks[:segments - 1] = True
    rng.shuffle(marks)
    segment_id = np.concatenate([[0], np.cumsum(marks)])
    return np.bincount(segment_id, minlength=segments)


def noise_span_lengths(length: int, noise_density: float, mean_span: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(non-noise span lengths, noise span lengths), one each per span, every one >= 1; the
    sample reads non-noise 0, noise 0, non-noise 1, noise 1, ... (T5's
    `random_spans_noise_mask`: a sample never starts with noise).

    How many noise tokens and spans: `span_counts` (the one rule, which the recipe's length
    arithmetic uses too).
    """
    if length < 2:
        raise CpmError(f"span corruption needs at least 2 tokens, got {length}")
    noise, spans = span_counts(length, noise_density, mean_span)
    return _segment(rng, length - noise, spans), _segment(rng, noise, spans)


def span_corrupt(tokens: np.ndarray, noise_density: float, mean_span: float,
                 sentinels: tuple[int, int] | None, rng: np.random.Generator, *,
                 eod_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one sample -> (inputs, targets), int64.

    inputs: the non-noise tokens with each noise span replaced by one sentinel; targets: each
    sentinel followed by the tokens of its span. Sentinels are `<s_0>`, `<s_1>`, ... in order
    (`sentinels` is the tokenizer's (first id, count)); a sample that needs more spans than the
    tokenizer has sentinels is a `CpmError`. With `eod_id`, both end with it (CPM's closing
    token; `encdec_batch` always passes it).
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    keep, noise = noise_span_lengths(len(tokens), noise_density, mean_span, rng)
    spans = len(noise)
    available = sentinels[1] if sentinels else 0
    if spans > available:
        raise CpmError(f"span corruption of {len(tokens)} tokens needs {spans} sentinels; "
                       f"the tokenizer has {available}")
    first = sentinels[0] if sentinels else 0
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    pos = 0
    for k in range(spans):
        sentinel = np.array([first + k], dtype=np.int64)
        inputs += [tokens[pos:pos + keep[k]], sentinel]
        pos += keep[k]
        targets += [sentinel, tokens[pos:pos + noise[k]]]
        pos += noise[k]
    assert pos == len(tokens)
    if eod_id is not None:
        end = np.array([eod_id], dtype=np.int64)
        inputs.append(end)
        targets.append(end)
    return np.concatenate(inputs), np.concatenate(targets)


def encdec_batch(samples: np.ndarray, consumed_start: int, seed: int, data: DataConfig, *,
                 eod_id: int, pad_id: int, sentinels: tuple[int, int] | None,
                 decoder_start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Span-corrupt raw rows [B, raw_len] (raw_len at most `data.span_lengths()[0]`, e.g. 568
    for CPM-2's 512) into a padded encoder-decoder batch.

    Row i uses `np.random.default_rng([seed, consumed_start + i])`: its corruption depends only
    on the seed and its global sample index. Returns int64 tensors input_ids, attention_mask
    [B, data.seq_len] and decoder_input_ids, decoder_attention_mask, labels [B, decoder length]
    (`data.span_lengths()[1]`), and loss_mask (float32, = decoder_attention_mask). The decoder
    input is the target shifted right after `decoder_start_id` (default: `pad_id`, T5's).
    """
    rows = np.asarray(samples)
    if rows.ndim != 2:
        raise CpmError(f"encdec_batch needs samples of shape [batch, raw_len], got {rows.shape}")
    enc_len = data.seq_len
    _, dec_len = data.span_lengths()
    start = pad_id if decoder_start_id is None else decoder_start_id
    batch = rows.shape[0]
    input_ids = np.full((batch, enc_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, enc_len), dtype=np.int64)
    decoder_input_ids = np.full((batch, dec_len), pad_id, dtype=np.int64)
    labels = np.full((batch, dec_len), pad_id, dtype=np.int64)
    decoder_mask = np.zeros((batch, dec_len), dtype=np.int64)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([int(seed), int(consumed_start) + i])
        inputs, targets = span_corrupt(row, data.noise_density, data.mean_span, sentinels, rng,
                                       eod_id=eod_id)
        if len(inputs) > enc_len or len(targets) > dec_len:
            raise CpmError(f"span corruption of {len(row)} tokens gives {len(inputs)} input and "
                           f"{len(targets)} target tokens, more than data.seq_len {enc_len} / "
                           f"the decoder length {dec_len}; cut at most "
                           f"{data.span_lengths()[0]} raw tokens per sample")
        input_ids[i, :len(inputs)] = inputs
        attention_mask[i, :len(inputs)] = 1
        labels[i, :len(targets)] = targets
        decoder_input_ids[i, 0] = start
        decoder_input_ids[i, 1:len(targets)] = targets[:-1]
        decoder_mask[i, :len(targets)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_mask,
           "labels": labels}
    tensors = {key: torch.from_numpy(value) for key, value in out.items()}
    tensors["loss_mask"] = tensors["decoder_attention_mask"].float()
    return tensors


HEAD_CHUNK = 1024
"""Rows of the fused head per chunk. NOTE: at CPM-Small's shape (1,024 rows, vocabulary
30,000) the bf16 head took 8.7 s with chunks of 256 and 6.7 s with 1,024 (each chunk adds a
[vocab, d_model] weight-gradient product into fp32); fp32 was the same for 256-1,024. A chunk's
fp32 logits are chunk x vocab x 4 bytes: 123 MB here."""


class _FusedHeadLoss(torch.autograd.Function):
    """sum over rows of mask * cross_entropy(hidden @ weight.T, labels), a chunk of rows at a
    time, with the gradients computed chunk by chunk in the forward pass; with a `teacher`
    (its hidden states and head, `_Teacher`), the distillation term beside it, chunked the
    same way: returns (w_lm * ce + w_kd * kd, ce, kd), the last two sums for logging only.

    kd per row: KL(p_teacher ‖ p_student) at temperature T, both softmaxes over the teacher's
    ids (`teacher.shared`: the student's id of each teacher id, None when the vocabularies are
    one), and its gradient with respect to the student's logits there is (q_student - p) / T.

    NOTE: why: the full fp32 logits [tokens, vocab] never exist, for the student or the
    teacher. At tiny-gpt's shape they are most of a training step's memory traffic; chunked,
    the head and its loss run ~1.6x faster on CPU, with the same values (to float rounding).

    Precision: the three matmuls (logits, d hidden, d weight) run in `_head_dtype`, autocast's
    dtype where it is on: what an `nn.Linear` head computes under autocast (bf16 operands, the
    products summed in fp32 inside the matmul, a bf16 result). The softmax, the loss and the
    sum of the weight gradient over the chunks stay fp32. (LayerNorm's output is fp32 under CPU
    autocast, so taking the hidden states' dtype ran the whole head in fp32 in a bf16 run.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk, teacher, w_lm, w_kd):
        dtype = _head_dtype(hidden)
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # fp32 on the CPU: cpmctl's kernel (~2x PyTorch's matmul there), else PyTorch's
        head, add_weight_grad = dense.head_products(weight_c, min(chunk, hidden.shape[0]))
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = head(hidden_c[rows]).float()
                picked = logits.gather(1, labels[rows, None]).squeeze(1)
                lse = torch.logsumexp(logits, -1)
                ce_total += ((lse - picked) * mask[rows]).sum()
                kd_grad = None
                if teacher is not None:
                    kd_rows, kd_grad = teacher.chunk_kl(logits, rows)
                    kd_total += kd_rows.sum()
                if needs_grad:
                    grad = logits.sub_(lse[:, None]).exp_()  # the softmax, over the logits
                    grad.scatter_add_(1, labels[rows, None],
                                      torch.full_like(picked[:, None], -1.0))
                    grad *= mask[rows, None] * w_lm
                    if kd_grad is not None:
                        teacher.add_grad(grad, kd_grad * w_kd)
                    grad_c = grad.to(dtype)
                    grad_hidden[rows] = grad_c @ weight_c
                    if dtype == torch.float32:
                        add_weight_grad(grad_c, hidden_c[rows], grad_weight)
                    else:  # a bf16 product per chunk, summed in fp32
                        grad_weight += grad_c.T @ hidden_c[rows]
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ce, kd = ce_total.clone(), kd_total.clone()
        ctx.mark_non_differentiable(ce, kd)
        return w_lm * ce_total + w_kd * kd_total, ce, kd

    @staticmethod
    def backward(ctx, grad_output, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None,
                None, None)


def _head_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the fused head's matmuls run in: autocast's where it is on for the hidden
    states' device (as an `nn.Linear` head would run under it), else the hidden states'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _Teacher:
    """The teacher's side of one fused distillation: its hidden rows and head, the id map, the
    rows the KL counts (`kd_mask`) and the temperature; the KL of a chunk and its gradient."""

    def __init__(self, hidden, weight, shared, kd_mask, temperature: float, vocab: int):
        self.hidden, self.weight = hidden, weight
        self.shared, self.kd_mask, self.t, self.vocab = shared, kd_mask, temperature, vocab

    def chunk_kl(self, student_logits: torch.Tensor, rows: slice):
        """(kd per row × kd_mask, d kd / d the student's logits over the shared ids)."""
        teacher_logits = (self.hidden[rows] @ self.weight.T).float()[:, :self.vocab]
        kd, grad = kl_rows(student_logits, teacher_logits, self.shared, self.t)
        mask = self.kd_mask[rows, None]
        return kd * mask[:, 0], grad * mask

    def add_grad(self, grad: torch.Tensor, kd_grad: torch.Tensor) -> None:
        if self.shared is None:
            grad += kd_grad
        else:
            grad.index_add_(1, self.shared, kd_grad)


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            shared: torch.Tensor | None, temperature: float):
    """KL(p_teacher,T ‖ p_student,T) per row (fp32) and its gradient with respect to the
    student's logits over the teacher's ids. The student's softmax is taken over the teacher's
    ids only (`shared`: their student ids; None: the same vocabulary), so both are
    distributions over the same support."""
    student = student_logits.float() if shared is None else student_logits.float()[:, shared]
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)
    p = log_p.exp()
    kd = (p * (log_p - log_q)).sum(-1)
    return kd, (log_q.exp() - p) / temperature


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  loss_mask: torch.Tensor,
                  chunk: int = HEAD_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_loss(hidden @ weight.T, labels, loss_mask)` without materialising the logits:
    (mean loss over unmasked tokens, their count)."""
    mask = loss_mask.reshape(-1).float()
    count = mask.sum()
    total, _, _ = _FusedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                       labels.reshape(-1), mask, chunk, None, 1.0, 0.0)
    return total / count.clamp(min=1), count


def fused_distill_loss(hidden, weight, labels, loss_mask, teacher_hidden, teacher_weight, *,
                       alpha: float, temperature: float, shared: torch.Tensor | None = None,
                       kd_mask: torch.Tensor | None = None, teacher_vocab: int | None = None,
                       chunk: int = HEAD_CHUNK):
    """The KI loss with the student's head fused in and chunked, for the student and the
    teacher (no [tokens × vocab] logits ever exist):

        loss = (1 - alpha)·LM + alpha·T²·KL(p_teacher,T ‖ p_student,T)

    both terms summed over the positions the LM loss counts (`kd_mask`, default `loss_mask`:
    a subset of them) and divided by their number. `teacher_vocab`: the teacher's ids the KL
    covers (its tokenizer's), default all of its head's rows. Returns (loss, count, lm mean,
    kd mean), the means detached, for logging."""
    mask = loss_mask.reshape(-1).float()
    kd_rows = mask if kd_mask is None else kd_mask.reshape(-1).float()
    count = mask.sum()
    teacher = _Teacher(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
                       shared, kd_rows, temperature,
                       teacher_vocab or teacher_weight.shape[0])
    total, ce, kd = _FusedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                         labels.reshape(-1), mask, chunk, teacher,
                                         1.0 - alpha, alpha * temperature ** 2)
    denominator = count.clamp(min=1)
    return total / denominator, count, ce / denominator, kd / denominator


def distill_loss(logits, teacher_logits, labels, loss_mask, *, alpha: float, temperature: float,
                 shared: torch.Tensor | None = None, kd_mask: torch.Tensor | None = None,
                 teacher_vocab: int | None = None):
    """`fused_distill_loss` for a model that applies its head itself (encdec, ZeRO-3), from
    the logits: the same value, through autograd."""
    vocab = logits.shape[-1]
    lm, count = lm_loss(logits, labels, loss_mask)
    flat = logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    teacher = teacher[:, :teacher_vocab or teacher.shape[-1]]
    kd_rows, _ = kl_rows(flat, teacher, shared, temperature)
    rows = (loss_mask if kd_mask is None else kd_mask).reshape(-1).float()
    kd = (kd_rows * rows).sum() / max(count, 1)
    loss = (1.0 - alpha) * lm + alpha * temperature ** 2 * kd
    return loss, count, lm.detach(), kd.detach()


# ---------------------------------------------------------------- the objectives


@dataclass
class LossRecord:
    """One micro-batch's loss as an objective gives it to the trainer.

    `loss`: the mean over `count` target tokens (what the optimizer minimises); `means`: other
    per-token means to log beside it (the trainer weights them by `count` like the loss);
    `constants`: values that are the same on every micro-batch of a step (logged as they are).
    """

    loss: torch.Tensor
    count: torch.Tensor | int
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)


class CausalLM:
    """CPM-1: next-token prediction over packed windows; no loss where the input is <eod>.

    `fused`: the head and the loss fused (`fused_lm_loss`), so the full logits never exist.
    It reads the head's weight outside the model's forward, which ZeRO-3 (weights gathered
    per module, inside its forward) does not allow: there the model applies its head.

    `loss(model, batch, step)`: `step` is the optimizer step being taken, None when evaluating;
    this objective's loss is the same either way (a wrapper such as knowledge inheritance's
    uses it)."""

    def __init__(self, data, eod_id: int, fused: bool = True):
        self.window = data.seq_len
        self.eod_id, self.fused = eod_id, fused

    def batch(self, rows: np.ndarray, indices: np.ndarray) -> dict:
        return lm_batch(rows, self.eod_id)

    def hidden(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states, head weight), for a fused head; through DDP's/DeepSpeed's
        wrapper."""
        hidden = model(batch["input_ids"], return_hidden=True)
        return hidden, getattr(model, "module", model).lm_head.weight

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"])

    def loss(self, model, batch: dict, step: int | None = None) -> LossRecord:
        if not self.fused:
            return LossRecord(*lm_loss(self.logits(model, batch), batch["labels"],
                                       batch["loss_mask"]))
        hidden, head = self.hidden(model, batch)
        return LossRecord(*fused_lm_loss(hidden, head, batch["labels"], batch["loss_mask"]))


class SpanCorruption:
    """CPM-2: T5 span corruption of raw windows, each derived from (seed, its global sample
    index), so the corruption survives a resume and does not depend on the process count."""

    fused = False  # the model applies its own head

    def __init__(self, data, seed: int, tokenizer):
        if tokenizer.sentinels is None:
            raise CpmError(f"model.arch = 'encdec' trains on span corruption, which needs "
                           f"sentinels <s_0>...: {data.dataset} was tokenized with a "
                           f"{tokenizer.scheme} tokenizer that has none (use --scheme cpm2)")
        self.data, self.seed, self.tokenizer = data, seed, tokenizer
        self.window = data.span_lengths()[0] - 1  # PackedSamples adds one token

    def batch(self, rows: np.ndarray, indices: np.ndarray) -> dict:
        tok = self.tokenizer
        parts = [encdec_batch(rows[i:i + 1], int(indices[i]), self.seed, self.data,
                              eod_id=tok.eod_id, pad_id=tok.pad_id, sentinels=tok.sentinels)
                 for i in range(len(rows))]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def logits(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                     batch["decoder_attention_mask"])

    def loss(self, model, batch: dict, step: int | None = None) -> LossRecord:
        return LossRecord(*encdec_loss(self.logits(model, batch), batch["labels"],
                                       batch["loss_mask"]))


def build_objective(recipe, eod_id: int, tokenizer, device: torch.device):
    """The recipe's objective: causal LM (gpt) or span corruption (encdec), wrapped in
    knowledge inheritance when `[inherit] teacher` is set (cpmctl.train.inherit)."""
    zero3 = recipe.engine.name == "deepspeed" and recipe.engine.zero_stage == 3
    objective = (CausalLM(recipe.data, eod_id, fused=not zero3) if recipe.model.arch == "gpt"
                 else SpanCorruption(recipe.data, recipe.run.seed, tokenizer))
    if not recipe.inherit.teacher:
        return objective
    from .inherit import KnowledgeInheritance, load_teacher

    teacher = load_teacher(recipe.inherit, recipe.model, tokenizer, device,
                           Path(recipe.data.dataset) / "tokenizer")
    return KnowledgeInheritance(objective, teacher, recipe.inherit, recipe.train.steps)
