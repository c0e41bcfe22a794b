"""Knowledge inheritance (docs/design.md §7): train a student while distilling a frozen teacher.

    [inherit]
    teacher = "runs/small/final"      # a model artifact
    alpha = 1.0                       # α₀
    decay_steps = 55000               # 0: train.steps
    schedule = "linear"               # or "step"
    temperature = 2.0
    teacher_precision = "fp32"        # or "bf16"

loss = (1 − α)·LM + α·T²·KL(p_teacher,T ‖ p_student,T) over the positions the LM loss counts,
divided by their number, as thunlp/Knowledge-Inheritance computes it; α = max(0, α₀·(1 −
step / decay_steps)) ('linear'), or α₀ until decay_steps and 0 after ('step': with α₀ = 1, pure
distillation, then pure LM). Once α is 0 the teacher is not run at all.

The teacher is loaded frozen: eval mode, no gradients, under `no_grad`, outside autocast in its
own precision; it is held by the objective, not by the trained model, so no engine wraps it,
no optimizer sees it and no checkpoint holds it. Being deterministic (no dropout in eval, MoE
routing by argmax), it keeps a resumed run bit-exact.

Tokenizers: the teacher's and the student's (the dataset's) are the same, or the student's
holds every piece of the teacher's (a `cpmctl grow --tokenizer` model). Then the KL is over
the teacher's ids, the student's softmax taken over the same ids; the teacher reads each input
token through its own id, and a position whose input or label is a piece only the student has
is left out of the KL (the LM loss still counts it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import open_artifact
from ..errors import CpmError
from ..grow.vocab import token_pieces
from ..models.artifact import TOKENIZER_DIR, load_model
from ..models.config import ModelConfig
from ..recipe import InheritConfig
from ..tokenizer import from_folder
from .objectives import LossRecord, distill_loss, fused_distill_loss

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def alpha_at(step: int, cfg: InheritConfig, total_steps: int) -> float:
    """The weight of the distillation term at optimizer step `step` (0-based)."""
    decay = cfg.decay_steps or total_steps
    if cfg.schedule == "step":
        return cfg.alpha if step < decay else 0.0
    return max(0.0, cfg.alpha * (1.0 - step / decay))


@dataclass
class Teacher:
    """The frozen teacher and how its ids relate to the student's.

    `to_teacher`: student id -> teacher id (the teacher's <unk> for a student-only piece), None
    when the ids are the same; `shared`: teacher id -> student id, None when the same;
    `known`: bool per student id, True where the teacher has the piece; `vocab`: the teacher's
    ids the KL covers."""

    model: torch.nn.Module
    vocab: int
    to_teacher: torch.Tensor | None = None
    shared: torch.Tensor | None = None
    known: torch.Tensor | None = None


def _vocabulary(teacher_tok, student_tok, teacher_digest: str, student_digest: str,
                teacher_cfg: ModelConfig, student_cfg: ModelConfig, device) -> dict:
    old, new = token_pieces(teacher_tok), token_pieces(student_tok)
    if old == new and teacher_cfg.vocab_size == student_cfg.vocab_size:
        return {"vocab": teacher_cfg.vocab_size}
    index: dict[str, int] = {}
    for i, piece in enumerate(new):
        index.setdefault(piece, i)
    if len(new) < len(old) or any(piece not in index for piece in old):
        raise CpmError(f"inherit.teacher: its tokenizer ({teacher_digest}) and the student's "
                       f"({student_digest}, of data.dataset) differ, and the student's does "
                       "not extend the teacher's; distil from a teacher with the same "
                       "tokenizer or grow the student with cpmctl grow --tokenizer")
    shared = torch.tensor([index[piece] for piece in old], dtype=torch.long)
    to_teacher = torch.full((student_cfg.vocab_size,), teacher_tok.unk_id, dtype=torch.long)
    to_teacher[shared] = torch.arange(len(old))
    known = torch.zeros(student_cfg.vocab_size, dtype=torch.bool)
    known[shared] = True
    return {"vocab": len(old), "shared": shared.to(device),
            "to_teacher": to_teacher.to(device), "known": known.to(device)}


def load_teacher(cfg: InheritConfig, student_cfg: ModelConfig, student_tokenizer,
                 device: torch.device, student_tokenizer_dir: Path) -> Teacher:
    """The teacher of `[inherit]`, frozen, on `device`, in `teacher_precision`."""
    artifact = open_artifact(cfg.teacher, expect="model", option="inherit.teacher")
    model, teacher_cfg = load_model(artifact.path, option="inherit.teacher")
    if teacher_cfg.arch != student_cfg.arch:
        raise CpmError(f"inherit.teacher {cfg.teacher} is a {teacher_cfg.arch} model; the "
                       f"student (model.arch) is {student_cfg.arch}: they must match")
    tokenizer_dir = artifact.path / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise CpmError(f"inherit.teacher {cfg.teacher} has no {TOKENIZER_DIR}/: without it "
                       "the teacher's ids cannot be matched to the student's")
    digests = (open_artifact(tokenizer_dir, "tokenizer").digest,
               open_artifact(student_tokenizer_dir, "tokenizer").digest)
    vocabulary = _vocabulary(from_folder(tokenizer_dir), student_tokenizer, *digests,
                             teacher_cfg, student_cfg, device)
    model.to(device=device, dtype=TEACHER_DTYPES[cfg.teacher_precision])
    model.eval()
    model.requires_grad_(False)
    return Teacher(model, **vocabulary)


class KnowledgeInheritance:
    """An objective (CausalLM, SpanCorruption) with the KI loss around it; see the module
    doc. Evaluation (`step` None) is the wrapped objective's loss alone, so validation losses
    compare with those of a run without a teacher. Logs lm_loss, kd_loss (while α > 0) and
    alpha; `teacher_seconds` adds up the wall time of the teacher's forward passes."""

    def __init__(self, objective, teacher: Teacher, cfg: InheritConfig, total_steps: int):
        self.objective, self.teacher, self.cfg = objective, teacher, cfg
        self.total_steps = total_steps
        self.window = objective.window
        self.teacher_seconds = 0.0

    def batch(self, rows, indices) -> dict:
        return self.objective.batch(rows, indices)

    def _teacher_batch(self, batch: dict) -> dict:
        if self.teacher.to_teacher is None:
            return batch
        return {key: self.teacher.to_teacher[value] if key.endswith("input_ids") else value
                for key, value in batch.items()}

    def _kd_mask(self, batch: dict) -> torch.Tensor | None:
        """The LM positions whose input and label the teacher knows."""
        known = self.teacher.known
        if known is None:
            return None
        inputs = batch.get("decoder_input_ids", batch["input_ids"])
        return batch["loss_mask"] * (known[inputs] & known[batch["labels"]])

    def loss(self, model, batch: dict, step: int | None = None) -> LossRecord:
        if step is None:
            return self.objective.loss(model, batch)
        alpha = alpha_at(step, self.cfg, self.total_steps)
        if alpha == 0.0:
            record = self.objective.loss(model, batch, step)
            return LossRecord(record.loss, record.count, {"lm_loss": record.loss.detach()},
                              {"alpha": 0.0})
        teacher, objective, temperature = self.teacher.model, self.objective, self.cfg.temperature
        teacher_batch = self._teacher_batch(batch)
        shape = dict(alpha=alpha, temperature=temperature, shared=self.teacher.shared,
                     kd_mask=self._kd_mask(batch), teacher_vocab=self.teacher.vocab)
        device_type = batch["labels"].device.type
        started = time.perf_counter()
        if objective.fused:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                teacher_hidden, teacher_head = objective.hidden(teacher, teacher_batch)
            self.teacher_seconds += time.perf_counter() - started
            hidden, head = objective.hidden(model, batch)
            loss, count, lm, kd = fused_distill_loss(hidden, head, batch["labels"],
                                                     batch["loss_mask"], teacher_hidden,
                                                     teacher_head, **shape)
        else:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                teacher_logits = objective.logits(teacher, teacher_batch)
            self.teacher_seconds += time.perf_counter() - started
            loss, count, lm, kd = distill_loss(objective.logits(model, batch), teacher_logits,
                                               batch["labels"], batch["loss_mask"], **shape)
        return LossRecord(loss, count, {"lm_loss": lm, "kd_loss": kd}, {"alpha": alpha})
