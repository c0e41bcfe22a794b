"""`cpmctl bench prompt-accuracy`: cpmctl's prompt tuning and PEFT's, trained alike on the same
model and data, then scored on the same held-out examples (accuracy, 95% Wilson interval).

    report = compare_accuracy("model", "sentiment-label.toml", "train.jsonl", "test.jsonl",
                              length=20, steps=300)

Both start from the same table (tune-prompt's `--init`, copied into PEFT's prompt embedding),
see the same examples in the same order (tune-prompt's seeded permutation per epoch), and use
the same AdamW (learning rate, weight decay), clipping and loss: the cross-entropy of the gold
candidate over the task rule's scores (cpm1: mean log-likelihood per token; choice/span: the
sum). Only the implementation differs. cpmctl: `tune-prompt`'s own steps (Tuner.train_step:
the prompt's slots in the model's input, a choice rule's context computed once for its
candidates, the head on the scored positions), scored by `bench run --prompt`'s `score`.
PEFT: `get_peft_model(GPT2LMHeadModel.from_pretrained(...), PromptTuningConfig)` on the model
exported with `model convert --to hf`, its virtual tokens prepended, logits everywhere. The
prompt is in front: PEFT's only place. Examples are cut to fit alike (tune-prompt's rows).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..bench.metrics import proportion
from ..bench.scoring import score
from ..errors import CpmError
from .bench import peft_scores
from .tune import TuneInputs, Tuner, TuneSettings, _Rows


def _gold_loss(scores: torch.Tensor, counts: torch.Tensor, rows: list[list], gold: list[int],
               rule: str) -> torch.Tensor:
    """The summed cross-entropy of the gold candidates (Tuner._loss's, on PEFT's scores)."""
    scores = scores / counts if rule == "cpm1" else scores
    loss, at = scores.new_zeros(()), 0
    for candidates, g in zip(rows, gold, strict=True):
        loss = loss - torch.log_softmax(scores[at:at + len(candidates)], dim=0)[g]
        at += len(candidates)
    return loss


def _peft_predictions(model, rows: list[list], length: int, pad_id: int, rule: str,
                      batch: int) -> list[int]:
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            scores, counts = peft_scores(model, [(r.context, r.continuation) for g in chunk
                                                 for r in g], length, pad_id)
            scores = scores / counts if rule == "cpm1" else scores
            at = 0
            for candidates in chunk:
                predictions.append(int(scores[at:at + len(candidates)].argmax()))
                at += len(candidates)
    return predictions


def _train_peft(tuner: Tuner, initial: torch.Tensor, hf_folder: Path):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import GPT2LMHeadModel

    s = tuner.settings
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(hf_folder),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                              num_virtual_tokens=s.length))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(initial)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    model.train()
    rows, gold, rule = tuner.train.rows, tuner.train.gold, tuner.task.rule
    for step in range(tuner.total_steps):
        indices = tuner._positions(step)
        scores, counts = peft_scores(model, [(r.context, r.continuation) for i in indices
                                             for r in rows[i]], s.length, tuner.tokenizer.pad_id)
        loss = _gold_loss(scores, counts, [rows[i] for i in indices],
                          [gold[i] for i in indices], rule) / len(indices)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def compare_accuracy(model_path, task_name: str, train_path, test_path, *, length: int = 20,
                     steps: int = 300, batch: int = 16, lr: float | None = None,
                     init: str = "mask", seed: int = 0, eval_batch: int = 32) -> dict:
    """Train both ways (`steps` steps of `batch` examples), score both on `test_path`."""
    from ..models.convert import convert_to_hf

    if steps < 1:
        raise CpmError(f"--steps must be at least 1, got {steps}")
    settings = TuneSettings(length=length, position="front", init=init, steps=steps,
                            batch_size=batch, lr=lr, seed=seed, checkpoint_every=0,
                            eval_batch=eval_batch)
    tuner = Tuner(TuneInputs(Path(model_path), task_name, Path(train_path)), settings)
    if tuner.cfg.arch != "gpt" or tuner.cfg.moe.experts:
        raise CpmError(f"{model_path}: PEFT's side runs on transformers' GPT-2, so the model "
                       "must be a dense gpt")
    task, rule = tuner.task, tuner.task.rule
    examples = task.read_examples(Path(test_path))
    test = _Rows(task, tuner.tokenizer, tuner.cfg, examples, tuner.prompt, seed,
                 str(test_path))
    initial = tuner.prompt.table.detach().clone()
    results = {}
    started = time.perf_counter()
    tuner.model.train()
    while tuner.step < tuner.total_steps:
        tuner.train_step()
    seconds = time.perf_counter() - started
    tuner.model.eval()
    with torch.autocast("cpu", enabled=False):
        scored = score(tuner.model, tuner.tokenizer, task, test.examples,
                       batch_size=eval_batch, prompt=tuner.prompt, seed=seed)
    ours = [s.prediction("acc", rule) for s in scored]
    results["cpmctl"] = (ours, seconds)
    with tempfile.TemporaryDirectory() as scratch:
        hf = convert_to_hf(model_path, Path(scratch) / "hf")
        started = time.perf_counter()
        peft_model = _train_peft(tuner, initial, hf)
        seconds = time.perf_counter() - started
        theirs = _peft_predictions(peft_model, test.rows, length, tuner.tokenizer.pad_id, rule,
                                   eval_batch)
    results["PEFT"] = (theirs, seconds)
    report = {"task": task.name, "rule": rule, "length": length, "steps": steps,
              "batch": batch, "lr": settings.learning_rate, "init": init, "seed": seed,
              "train_examples": len(tuner.train.examples), "test_examples": len(test.examples),
              "left_out": len(examples) - len(test.examples), "ways": {}}
    for name, (predictions, seconds) in results.items():
        correct = sum(p == g for p, g in zip(predictions, test.gold, strict=True))
        report["ways"][name] = {**proportion(correct, len(predictions)),
                                "train_seconds": round(seconds, 2)}
    report["same_prediction"] = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)
    return report
