"""`cpmctl tune-prompt`: CPM-2's prompt tuning, and its second stage.

    report = tune(TuneInputs(model, task, train, valid), TuneSettings(length=100), out)

Stage 1 (the default): a soft prompt (soft.py) is trained on a frozen model. Only the prompt
table requires gradients; the backbone's parameters get no `.grad`, the optimizer holds the
prompt alone, and checkpoints hold the prompt alone (checkpoint.py). Stage 2 (`stage2`): the
whole model is tuned from the prompt-tuned state, with the prompt trainable or fixed (CPM-2's
PT -> FT), or, without a starting prompt, the whole model alone (full fine-tuning).

The objective is the task's own scoring rule made differentiable: every candidate of an
example goes through `cpmctl.bench.scoring.candidate_losses` (the same tokenisation, placement
and forward pass as `cpmctl bench run --prompt`; the choice/span rules' candidates share one
forward of their common context, `scoring.batch_layout`), its score is the rule's (cpm1: the mean
log-likelihood per continuation token; choice/span: the summed log-likelihood), and the loss
is the cross-entropy of the gold candidate among them. Validation accuracy is the task's
metric (`acc`) computed by `cpmctl.bench.scoring.score`; early stopping keeps the best prompt.

Settings as CPM-2-Finetune's configs/prompt/: Adam with weight decay 0.01 (AdamW), a constant
learning rate (5e-3 for the prompt), gradient clipping at 1.0. The data order is a seeded
permutation per epoch, the position one integer, so a run killed with SIGKILL and rerun with
the same command resumes from its last checkpoint and logs the same losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..artifacts import ArtifactWriter, digest_path, open_artifact
from ..bench.scoring import (
    batch_layout,
    candidate_losses,
    encode_candidate,
    fit_group,
    make_batch,
    make_row,
    score,
)
from ..bench.tasks import load_task
from ..bench.tasks.format import CHOICE, template_fields
from ..console import info, warn
from ..errors import CpmError
from ..folders import copy_tree
from ..infer.load import resolve_device
from ..models import build_model, checkpoint_activations
from ..models.artifact import TOKENIZER_DIR, load_model, parameter_count, write_model_files
from ..tokenizer import from_folder
from ..train.checkpoint import rng_state, set_rng_state
from ..train.optim import parameter_groups
from . import checkpoint
from .artifact import (
    LoadedPrompt,
    check_fits_model,
    load_prompt,
    prompt_info,
    save_prompt,
    write_prompt_files,
)
from .engine import MODEL, PROMPT, PromptedModel, gathered_weights, start_deepspeed
from .memory import fix_mmap_threshold
from .soft import PromptLayout, SoftPrompt, parse_position

METRICS = "metrics.jsonl"
PRECISIONS = ("fp32", "bf16")
ENGINES = ("torch", "deepspeed")
STAGE1_LR, STAGE2_LR = 5e-3, 1e-4
LOG_EVERY = 10  # steps between progress lines (every step goes to metrics.jsonl)


@dataclass(frozen=True)
class TuneSettings:
    length: int = 100
    position: str = "front"
    init: str = "mask"
    lr: float | None = None
    """None: 5e-3 for the prompt (CPM-2's LCQMC setting), 1e-4 for stage 2 (ours)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    epochs: int = 1
    steps: int = 0
    """Optimizer steps; 0: as many as `epochs` passes over the training examples take."""
    batch_size: int = 16
    micro_batch: int = 0
    """Examples per forward pass (0: the batch); gradients are accumulated over them."""
    precision: str = "fp32"
    eval_every: int = 0
    """Steps between validations; 0: once per epoch."""
    patience: int = 0
    """Stop after this many validations without a better accuracy; 0: never stop early."""
    checkpoint_every: int = 50
    eval_batch: int = 32
    seed: int = 0
    device: str = "cpu"
    stage2: bool = False
    fix_prompt: bool = False
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less
    memory (the frozen model's activations dominate prompt tuning's), one more forward."""
    engine: str = "torch"
    """Stage 2: torch, or deepspeed (ZeRO; engine.py)."""
    zero_stage: int | None = None
    """deepspeed: the ZeRO stage (None: 2)."""
    offload_optimizer: bool = False

    def check(self) -> None:
        bad = []
        for name in ("batch_size", "eval_batch"):
            if getattr(self, name) < 1:
                bad.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("steps", "micro_batch", "eval_every", "patience", "checkpoint_every",
                     "epochs", "seed"):
            if getattr(self, name) < 0:
                bad.append(f"--{name.replace('_', '-')} must be 0 or more")
        if self.epochs < 1 and self.steps < 1:
            bad.append("--epochs or --steps must be at least 1")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                bad.append(f"--{name.replace('_', '-')} must be a finite number >= 0")
        if self.precision not in PRECISIONS:
            bad.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.fix_prompt and not self.stage2:
            bad.append("--fix-prompt keeps the prompt fixed in stage 2: add --stage2")
        bad += self._engine_problems()
        if bad:
            raise CpmError("; ".join(bad))

    def _engine_problems(self) -> list[str]:
        if self.engine not in ENGINES:
            return [f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}"]
        if self.engine == "torch":
            return ["--zero-stage and --offload-optimizer are DeepSpeed's: add --engine "
                    "deepspeed"] if self.offload_optimizer or self.zero_stage is not None else []
        bad = []
        if not self.stage2:
            bad.append("--engine deepspeed is for stage 2 (--stage2): stage 1 trains the "
                       "prompt alone, a few kilobytes")
        stage = self.zero_stage if self.zero_stage is not None else 2
        if not 0 <= stage <= 3:
            bad.append(f"--zero-stage must be 0-3, got {stage}")
        elif stage == 0 and self.precision != "fp32":
            bad.append(f"--zero-stage 0 with --precision {self.precision}: DeepSpeed trains "
                       "half precision with ZeRO only; use --zero-stage 1 or more")
        if self.offload_optimizer and stage < 1:
            bad.append("--offload-optimizer needs --zero-stage 1 or more")
        if self.micro_batch and self.batch_size % self.micro_batch:
            bad.append(f"--engine deepspeed steps after a fixed number of micro-batches: "
                       f"--batch-size {self.batch_size} must be a multiple of --micro-batch "
                       f"{self.micro_batch}")
        return bad

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return STAGE2_LR if self.stage2 else STAGE1_LR


@dataclass(frozen=True)
class TuneInputs:
    model: Path
    task: str
    train: Path
    valid: Path | None = None
    prompt: Path | None = None
    """Stage 2: the prompt-tuned state to start from."""


def task_definition(task) -> dict:
    """The task as prompt.json records it: every field of the parsed task file."""
    return json.loads(json.dumps(dataclasses.asdict(task), ensure_ascii=False, default=str))


class _Rows:
    """Training or validation examples as scored rows, cut to fit the model's context as
    scoring cuts them (the example's tokens go, the prompt's slots stay); one that cannot fit
    even so is left out, with a warning."""

    def __init__(self, task, tokenizer, cfg, examples, prompt, seed: int, source: str):
        import random

        self.examples, self.rows, self.gold = [], [], []
        dropped = 0
        for example in examples:
            requests = task.requests(example, random.Random(f"{seed}:{example.index}"))
            rows = [make_row(encode_candidate(tokenizer, candidate, arch=cfg.arch,
                                              eod=task.eod, span=task.rule == "span"), prompt)
                    for candidate in requests.candidates]
            if cfg.arch == "gpt":
                try:
                    rows, _ = fit_group(rows, cfg.max_positions,
                                        keep_context=task.rule == "cpm1")
                except CpmError:
                    dropped += 1
                    continue
            self.examples.append(example)
            self.rows.append(rows)
            self.gold.append(requests.gold)
        if dropped:
            warn(f"{source}: {dropped:,} of {len(examples):,} examples do not fit the model's "
                 f"context ({cfg.max_positions} positions) beside the prompt even with their "
                 "text cut; they are left out")
        if not self.examples:
            raise CpmError(f"{source}: no example fits the model's context "
                           f"({cfg.max_positions} positions) beside the prompt")


def _check_room(task, tokenizer, cfg, length: int) -> None:
    """A prompt must leave room for the task's template and at least one token of input."""
    if cfg.arch != "gpt":
        return
    literal = "".join(text for part in task.context
                      for text, _, _, _ in string.Formatter().parse(part))
    if any(CHOICE in template_fields(part) for part in task.context):
        literal += max(task.labels.values(), key=len, default="")
    template = len(tokenizer.encode(literal)) if literal else 0
    room = cfg.max_positions - template - 1
    if length > room:
        raise CpmError(f"--length {length}: the model's context is {cfg.max_positions} "
                       f"positions (model.max_positions); beside the task's template and one "
                       f"token of input it leaves room for a prompt of at most {max(room, 0)}")


class Tuner:
    """One tune-prompt run. Builds everything, then `run()` trains and writes the output."""

    def __init__(self, inputs: TuneInputs, settings: TuneSettings):
        settings.check()
        self.inputs, self.settings = inputs, settings
        self.device = resolve_device(settings.device)
        self.base = open_artifact(inputs.model, expect=("model", "checkpoint"), option="--model")
        self.task = load_task(inputs.task)
        if self.task.rule not in ("cpm1", "choice", "span"):
            raise CpmError(f"task {self.task.name}: tune-prompt trains on a task whose rule "
                           f"compares candidates (cpm1, choice, span), not {self.task.rule}")
        tokenizer_dir = self.base.path / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise CpmError(f"{self.base.path}: the model has no {TOKENIZER_DIR}/ to encode the "
                           "task's text with")
        self.tokenizer = from_folder(tokenizer_dir)
        if settings.patience and inputs.valid is None:
            raise CpmError("--patience stops on validation accuracy: give --valid")
        self.start = self._check_prompt_settings()  # before the model is loaded
        fix_mmap_threshold()
        self.model, self.cfg = load_model(self.base.path)
        self.prompt = self._starting_prompt()
        torch.manual_seed(settings.seed)
        source = str(inputs.train)
        self.train = _Rows(self.task, self.tokenizer, self.cfg,
                           self.task.read_examples(inputs.train), self.prompt, settings.seed,
                           source)
        self.valid = None
        if inputs.valid is not None:
            self.valid = _Rows(self.task, self.tokenizer, self.cfg,
                               self.task.read_examples(inputs.valid), self.prompt,
                               settings.seed, str(inputs.valid))
        if settings.activation_checkpointing:
            checkpoint_activations(self.model)
        self.model.to(self.device)
        if self.prompt is not None:
            self.prompt.to(self.device)
        self._freeze()
        self.deepspeed = settings.engine == "deepspeed"
        groups = self._groups()
        self._trainable = [p for group in groups for p in group["params"]]
        if self.deepspeed:  # it moves the model to its device and casts it for bf16
            self.engine = start_deepspeed(self.model, self.prompt, groups, settings)
            self.device = self.engine.processes.device
            self.optimizer = self.engine.optimizer
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate,
                                               weight_decay=settings.weight_decay)
        n = len(self.train.examples)
        self.total_steps = settings.steps or math.ceil(settings.epochs * n / settings.batch_size)
        self.steps_per_epoch = math.ceil(n / settings.batch_size)
        self.step, self.best_acc, self.since_best = 0, None, 0

    # --- set-up -----------------------------------------------------------------------

    def _check_prompt_settings(self) -> PromptLayout | LoadedPrompt | None:
        """Stage 1: the layout from --length/--position; stage 2: the starting prompt, whose
        base must be --model (None: full fine-tuning). Checked before the model is loaded."""
        s = self.settings
        if not s.stage2:
            if self.inputs.prompt is not None:
                raise CpmError("--prompt is the starting point of stage 2: add --stage2")
            start = layout = parse_position(s.position, s.length)
        elif self.inputs.prompt is None:
            return None
        else:
            start = load_prompt(self.inputs.prompt, self.base.digest)
            layout = start.layout
        layout.check_parts(len(self.task.context), f"task {self.task.name}")
        return start

    def _starting_prompt(self) -> SoftPrompt | None:
        s = self.settings
        if self.start is None:
            return None
        if s.stage2:
            check_fits_model(self.start, self.cfg, str(self.inputs.prompt))
            prompt = SoftPrompt(self.start.layout, self.cfg.d_model)
            with torch.no_grad():
                prompt.table.copy_(self.start.table)
            return prompt
        _check_room(self.task, self.tokenizer, self.cfg, s.length)
        prompt = SoftPrompt(self.start, self.cfg.d_model)
        prompt.initialize(self.model, self.tokenizer, s.init, s.seed)
        return prompt

    def _freeze(self) -> None:
        """Stage 1: only the prompt learns. Stage 2: the model, and the prompt unless fixed."""
        s = self.settings
        self.model.requires_grad_(s.stage2)
        if self.prompt is not None:
            self.prompt.requires_grad_(not s.fix_prompt)

    def _groups(self) -> list[dict]:
        """AdamW's parameter groups: stage 2 the model's (decay on weight matrices only), and
        the prompt's (decayed) unless fixed; named as engine.PromptedModel names them under
        DeepSpeed (its state dicts are looked up by name)."""
        s = self.settings
        groups = parameter_groups(self.model, s.weight_decay) if s.stage2 else []
        if self.deepspeed:
            for group in groups:
                group["names"] = [MODEL + name for name in group["names"]]
        if self.prompt is not None and not s.fix_prompt:
            groups.append({"params": [self.prompt.table], "weight_decay": s.weight_decay,
                           "names": [PROMPT if self.deepspeed else "prompt"]})
        return groups

    def trainable(self) -> list[nn.Parameter]:
        return self._trainable

    def resume_key(self) -> str:
        parts = {"base": self.base.digest, "task": task_definition(self.task),
                 "train": digest_path(self.inputs.train),
                 "valid": digest_path(self.inputs.valid) if self.inputs.valid else None,
                 "prompt": open_artifact(self.inputs.prompt).digest if self.inputs.prompt
                 else None, "settings": dataclasses.asdict(self.settings)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # --- the loop ---------------------------------------------------------------------

    def _positions(self, step: int) -> list[int]:
        """The training examples of optimizer step `step`: a seeded permutation per epoch."""
        n, size = len(self.train.examples), self.settings.batch_size
        orders: dict[int, np.ndarray] = {}
        out = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.settings.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][offset]))
        return out

    def _autocast(self):
        # NOTE: DeepSpeed casts the weights to bf16 itself
        enabled = self.settings.precision == "bf16" and not self.deepspeed
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _loss(self, indices: list[int]) -> torch.Tensor:
        """Summed cross-entropy of the gold candidates of these examples."""
        sentinel = self.tokenizer.sentinel_id(0) if self.cfg.arch == "encdec" else None
        batch = make_batch([self.train.rows[i] for i in indices],
                           batch_layout(self.task.rule, self.cfg.arch), self.cfg.arch,
                           self.tokenizer.pad_id, sentinel)
        with self._autocast():
            logprob, counts = (self.engine.forward_module(batch) if self.deepspeed
                               else candidate_losses(self.model, batch, self.prompt))
        scores = logprob / counts if self.task.rule == "cpm1" else logprob
        loss, at = scores.new_zeros(()), 0
        for i in indices:
            k = len(self.train.rows[i])
            loss = loss - torch.log_softmax(scores[at:at + k], dim=0)[self.train.gold[i]]
            at += k
        return loss

    def train_step(self) -> dict:
        s = self.settings
        indices = self._positions(self.step)
        micro = s.micro_batch or s.batch_size
        total = 0.0
        for start in range(0, len(indices), micro):
            loss = self._loss(indices[start:start + micro])
            if self.deepspeed:  # steps, clipping first, after the last micro-batch
                self.engine.backward(loss / len(indices))
            else:
                (loss / len(indices)).backward()
            total += float(loss.detach())
        if self.deepspeed:
            norm = self.engine.finish_step()
        else:
            norm = nn.utils.clip_grad_norm_(self.trainable(), s.grad_clip or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                "loss": total / len(indices), "grad_norm": float(norm),
                "lr": s.learning_rate}

    def evaluate(self) -> float | None:
        """Validation accuracy by the task's rule (None without validation data)."""
        if self.valid is None:
            return None
        self.model.eval()
        with self._autocast():
            results = score(self.model, self.tokenizer, self.task, self.valid.examples,
                            batch_size=self.settings.eval_batch, prompt=self.prompt,
                            seed=self.settings.seed)
        self.model.train()
        return sum(r.prediction("acc", self.task.rule) == r.gold for r in results) / len(results)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def run(self, out: Path, *, prompt_out: Path | None = None, force: bool = False) -> dict:
        s = self.settings
        if s.stage2 and self.prompt is not None and prompt_out is None:
            raise CpmError("stage 2 from a prompt writes the tuned model (-o) and its prompt: "
                           "give --prompt-out")
        kind = "model" if s.stage2 else "prompt"
        with ArtifactWriter(out, kind, force=force, resume_key=self.resume_key()) as writer:
            self._restore(writer)
            self.model.train()
            eval_every = s.eval_every or self.steps_per_epoch
            started, stopped_early = time.perf_counter(), False
            while self.step < self.total_steps:
                before = time.perf_counter()
                record = self.train_step()
                now = time.perf_counter()
                record["examples_per_s"] = round(s.batch_size / max(now - before, 1e-9), 2)
                record["elapsed_s"] = round(now - started, 3)
                if self._due(eval_every) or self.step == self.total_steps:
                    record["valid_acc"] = self._validate(writer.dir)
                if "valid_acc" in record or self.step % LOG_EVERY == 0:
                    info(f"step {self.step}/{self.total_steps} loss {record['loss']:.4f} "
                         f"{record['examples_per_s']:,.1f} examples/s"
                         + (f" valid acc {record['valid_acc']:.4f}"
                            if record.get("valid_acc") is not None else ""))
                with open(writer.dir / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if s.patience and self.since_best >= s.patience:
                    info(f"stopping early: no better validation accuracy in {s.patience} "
                         "evaluations")
                    stopped_early = True
                    break
                if self._due(s.checkpoint_every) and self.step < self.total_steps:
                    self._checkpoint(writer.dir)
            return self._finish(writer, prompt_out, force, stopped_early)

    def _validate(self, folder: Path) -> float | None:
        acc = self.evaluate()
        if acc is None:
            return None
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc, self.since_best = acc, 0
            checkpoint.save_best(folder, **self._state())
        else:
            self.since_best += 1
        return acc

    def _state(self) -> dict:
        """What a checkpoint or the best state holds: the prompt's table (fp32) and, in stage
        2, the model's weights (checkpoint.Weights; under DeepSpeed its gathered masters)."""
        if self.deepspeed:
            weights, table = gathered_weights(self.engine)
            return {"prompt": table if table is not None else self._fixed_table(),
                    "model": (weights, self.cfg)}
        return {"prompt": None if self.prompt is None else self.prompt.table,
                "model": (self.model.state_dict(), self.cfg) if self.settings.stage2 else None}

    def _fixed_table(self) -> torch.Tensor | None:
        """A fixed prompt's table as it started (fp32; DeepSpeed's bf16 copy is rounded)."""
        return None if self.prompt is None else self.start.table

    def _checkpoint(self, folder: Path) -> None:
        state = {"step": self.step, "best_acc": self.best_acc, "since_best": self.since_best,
                 "rng": rng_state()}
        optimizer = (self.engine.state_dicts()[1] if self.deepspeed
                     else self.optimizer.state_dict())
        checkpoint.save(folder, self.step, **self._state(), optimizer=optimizer, state=state)

    def _cpu_copy(self) -> tuple[nn.Module, SoftPrompt | None]:
        """A fresh fp32 CPU model (and prompt) to read a saved state into (DeepSpeed keeps its
        own partitioned, possibly bf16, copies)."""
        model = build_model(self.cfg)
        prompt = None if self.prompt is None else SoftPrompt(self.prompt.layout,
                                                             self.cfg.d_model)
        return model, prompt

    def _restore(self, writer: ArtifactWriter) -> None:
        found = checkpoint.latest(writer.dir) if writer.resumed else None
        if found is None:
            (writer.dir / METRICS).unlink(missing_ok=True)
            return
        if self.deepspeed:
            model, prompt = self._cpu_copy()
            probe = self._probe
            state = checkpoint.load(
                found, prompt=None if prompt is None else prompt.table, model=model,
                optimizer=lambda saved: self.engine.load_state(
                    dict(PromptedModel(model, prompt).named_parameters()), saved, probe,
                    str(found)))
        else:
            state = checkpoint.load(
                found, prompt=None if self.prompt is None else self.prompt.table,
                model=self.model if self.settings.stage2 else None, optimizer=self.optimizer)
        self.step, self.best_acc = state["step"], state["best_acc"]
        self.since_best = state["since_best"]
        set_rng_state(state["rng"])
        lines = (writer.dir / METRICS).read_text(encoding="utf-8").splitlines() \
            if (writer.dir / METRICS).is_file() else []
        kept = [line for line in lines if json.loads(line)["step"] <= self.step]
        (writer.dir / METRICS).write_text("".join(line + "\n" for line in kept), "utf-8")
        info(f"resuming {writer.out} from step {self.step}")

    # --- the output -------------------------------------------------------------------

    def _probe(self) -> torch.Tensor:
        """A loss on the first micro-batch of this step (DeepSpeed's restore steps on it at
        learning rate 0 to build its optimizer state)."""
        micro = self.settings.micro_batch or self.settings.batch_size
        return self._loss(self._positions(self.step)[:micro])

    def _finish(self, writer: ArtifactWriter, prompt_out: Path | None, force: bool,
                stopped_early: bool) -> dict:
        s = self.settings
        if self.deepspeed:  # the output is written from fp32 CPU copies
            weights, table = gathered_weights(self.engine)
            self.model, prompt = self._cpu_copy()
            self.model.load_state_dict(weights)
            if prompt is not None:
                with torch.no_grad():
                    prompt.table.copy_(table if table is not None else self._fixed_table())
                self.prompt = prompt
        # the best validation's state, not the last step's
        checkpoint.load_best(writer.dir, prompt=None if self.prompt is None
                             else self.prompt.table,
                             model=self.model if s.stage2 else None)
        summary = {"steps": self.step, "best_valid_acc": self.best_acc,
                   "stopped_early": stopped_early, "stage": 2 if s.stage2 else 1,
                   "train_examples": len(self.train.examples),
                   "trainable_parameters": sum(p.numel() for p in self.trainable()),
                   "model_parameters": parameter_count(self.model)}
        writer.add_input("base-model", str(self.base.path), self.base.digest)
        writer.add_input("train", str(self.inputs.train), digest_path(self.inputs.train))
        if not s.stage2:
            info_ = prompt_info(self.prompt, init=s.init, task=task_definition(self.task),
                                base=self.base, d_model=self.cfg.d_model)
            write_prompt_files(writer.dir, self.prompt, info_)
            out = writer.commit(meta={"base_model_digest": self.base.digest,
                                      "length": self.prompt.length,
                                      "position": self.prompt.layout.spec,
                                      "task": self.task.name, **summary})
            return {"prompt": str(out), **summary}
        model = self.model.to("cpu")
        write_model_files(writer.dir, model.state_dict(), self.cfg)
        copy_tree(self.base.path / TOKENIZER_DIR, writer.dir / TOKENIZER_DIR)
        out = writer.commit(meta={"arch": self.cfg.arch, "parameters": parameter_count(model),
                                  "tuned_from": self.base.digest, "task": self.task.name,
                                  **summary})
        result = {"model": str(out), **summary}
        if self.prompt is not None:
            tuned = open_artifact(out)
            info_ = prompt_info(self.prompt, init=self.start.info.get("init", "?"),
                                task=task_definition(self.task), base=tuned,
                                d_model=self.cfg.d_model)
            result["prompt"] = str(save_prompt(prompt_out, self.prompt.cpu(), info_,
                                               force=force))
        return result


def tune(inputs: TuneInputs, settings: TuneSettings, out: Path, *,
         prompt_out: Path | None = None, force: bool = False) -> dict:
    """Run tune-prompt; returns what it wrote and a summary (steps, best accuracy, sizes)."""
    from ..train.engines import stop_processes

    try:
        return Tuner(inputs, settings).run(Path(out), prompt_out=prompt_out, force=force)
    finally:
        stop_processes()
