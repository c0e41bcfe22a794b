"""`cpmctl bench prompt`: what prompt tuning costs at CPM-Small's shape, in one run, against
(a) full fine-tuning of the same model and (b) Hugging Face PEFT's prompt tuning on the same
weights exported to transformers' GPT-2.

All four train on the same examples (a task's training data, tokenised once by cpmctl's
scoring), the same batch, prompt length and precision, with AdamW, clipping at 1.0 and the
same loss: the cross-entropy of the gold candidate over the candidates' summed
log-likelihoods. Each runs in a fresh process, so its peak resident memory (VmHWM) is
its own; steps/s is timed after `warmup` steps. The weights are a random CPM-Small-shaped
model (speed and memory do not depend on their values); the tokenizer and data are real.

- cpmctl prompt tuning: the backbone frozen, the soft prompt in front (PEFT's place), the LM
  head applied to the scored positions only (`cpmctl.bench.scoring.candidate_losses`); once
  keeping the activations, once recomputing them in the backward pass
  (`tune-prompt --activation-checkpointing`).
- full fine-tuning: the same forward pass without a prompt, every weight trained (lr 1e-4).
- PEFT: `get_peft_model(GPT2LMHeadModel.from_pretrained(exported), PromptTuningConfig)` used as
  its documentation shows: the virtual tokens prepended, logits for every position,
  log-softmax over them.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bench.scoring import candidate_losses
from ..errors import CpmError

METHODS = ("cpmctl prompt tuning", "cpmctl prompt tuning, activations recomputed",
           "cpmctl full fine-tuning", "PEFT prompt tuning")
LR = {"prompt": 5e-3, "full": 1e-4}  # tune-prompt's defaults for stage 1 and stage 2


@dataclass(frozen=True)
class BenchSpec:
    """What every method gets: the shape, the rows of each example (context with the prompt's
    slots in front, continuation), the gold candidates, and the loop settings."""

    cfg: object
    hf_folder: str
    """The same weights exported with `model convert --to hf`, for PEFT to load."""
    groups: list  # per example: [(context ids, continuation ids, slots), ...]
    gold: list[int]
    rule: str
    """The task's scoring rule: choice/span candidates share their context's forward."""
    length: int
    pad_id: int
    batch: int
    steps: int
    warmup: int
    precision: str
    threads: int
    seed: int


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM).

    NOTE: not getrusage's ru_maxrss, which Linux carries across execve: a spawned child would
    report the parent's peak at fork time (measured: every method showed the parent's 1.1 GB)."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _gold_ce(scores: torch.Tensor, sizes: list[int], gold: list[int]) -> torch.Tensor:
    loss, at = scores.new_zeros(()), 0
    for k, g in zip(sizes, gold, strict=True):
        loss = loss - torch.log_softmax(scores[at:at + k], dim=0)[g]
        at += k
    return loss / len(sizes)


def _ours(spec: BenchSpec, model, prompt, indices: list[int]) -> torch.Tensor:
    """tune-prompt's forward and loss (its `scoring.batch_layout`: a choice rule's
    candidates share one forward of their context)."""
    from ..bench.scoring import Row, batch_layout, make_batch

    groups = [[Row(list(c) if prompt is not None else list(c[spec.length:]), list(t),
                   list(s) if prompt is not None else [])
               for c, t, s in spec.groups[i]] for i in indices]
    batch = make_batch(groups, batch_layout(spec.rule, "gpt"), "gpt", spec.pad_id)
    logprob, _ = candidate_losses(model, batch, prompt)
    return _gold_ce(logprob, [len(spec.groups[i]) for i in indices],
                    [spec.gold[i] for i in indices])


def peft_scores(model, rows: list[tuple[list[int], list[int]]], length: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's forward over (context, continuation) rows whose contexts start with `length`
    prompt slots (they are dropped: PEFT prepends its virtual tokens inside): input ids
    right-padded (the last token left out, as cpmctl leaves it: it predicts nothing, and a row
    then fits the same positions), transformers' logits for every position; the log-softmax
    at the continuations' positions only, gathered in one indexing op. Returns each
    continuation's summed log-likelihood [R] and token count [R].

    NOTE: an earlier version indexed [R, L, V] log-probabilities row by row; the backward of
    each index allocated and zeroed the whole [R, L, V] gradient, which made PEFT's side
    several times slower than PEFT itself is."""
    seqs = [(list(c[length:]) + list(t), len(t)) for c, t in rows]
    longest = max(len(s) for s, _ in seqs) - 1
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    row_of, position, target = [], [], []
    for r, (s, n) in enumerate(seqs):
        ids[r, :len(s) - 1] = torch.tensor(s[:-1])
        mask[r, :len(s) - 1] = 1
        for t in range(len(s) - n, len(s)):  # the continuation's tokens
            row_of.append(r)
            position.append(length + t - 1)  # the state that predicts token t
            target.append(s[t])
    logits = model(input_ids=ids, attention_mask=mask).logits  # [R, length + longest, V]
    row_of = torch.tensor(row_of)
    picked = logits[row_of, torch.tensor(position)].float()  # [N, V]
    logprobs = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(target)[:, None])[:, 0]
    sums = torch.zeros(len(seqs), dtype=logprobs.dtype).index_add(0, row_of, logprobs)
    return sums, torch.tensor([n for _, n in seqs])


def _peft(spec: BenchSpec, model, indices: list[int]) -> torch.Tensor:
    rows = [(c, t) for i in indices for c, t, _ in spec.groups[i]]
    scores, _ = peft_scores(model, rows, spec.length, spec.pad_id)
    return _gold_ce(scores, [len(spec.groups[i]) for i in indices],
                    [spec.gold[i] for i in indices])


def _measure(method: str, spec: BenchSpec) -> dict:
    """One method's run (in its own process): steps/s and peak RSS."""
    from ..models import build_model, checkpoint_activations
    from ..train.optim import parameter_groups
    from .memory import fix_mmap_threshold
    from .soft import PromptLayout, SoftPrompt

    fix_mmap_threshold()  # every method alike: tune-prompt runs so (memory.py)
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    lr = LR["prompt"]
    if method != METHODS[3]:
        model = build_model(spec.cfg)  # the seed's weights: those exported to hf_folder
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    prompt = None
    if method in METHODS[:2]:
        model.requires_grad_(False)
        if method == METHODS[1]:
            checkpoint_activations(model)
        prompt = SoftPrompt(PromptLayout(spec.length, 0, 0), spec.cfg.d_model)
        torch.nn.init.normal_(prompt.table, std=spec.cfg.init_std)
        params = [{"params": [prompt.table], "weight_decay": 0.01}]
        step_loss = lambda idx: _ours(spec, model, prompt, idx)  # noqa: E731
    elif method == METHODS[2]:
        params, lr = parameter_groups(model, 0.01), LR["full"]
        step_loss = lambda idx: _ours(spec, model, None, idx)  # noqa: E731
    else:
        from peft import PromptTuningConfig, TaskType, get_peft_model
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(spec.hf_folder)
        weights_mb = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**20
        model = get_peft_model(hf, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                      num_virtual_tokens=spec.length))
        params = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": 0.01}]
        step_loss = lambda idx: _peft(spec, model, idx)  # noqa: E731
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    rss_ready = _peak_rss_mb()
    start, losses = None, []
    for step in range(spec.warmup + spec.steps):
        if step == spec.warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        first = step * spec.batch % len(spec.groups)
        indices = [(first + k) % len(spec.groups) for k in range(spec.batch)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = step_loss(indices)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"method": method, "steps_per_s": spec.steps / seconds,
            "cpu_s_per_step": round(cpu_seconds / spec.steps, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_training_mb": round(rss_ready, 1),
            "weights_mb": round(weights_mb, 1),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "losses": [round(x, 4) for x in losses]}


def _run_alone(method: str, spec: BenchSpec) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_measure, (method, spec))


def bench_prompt(model_path, task_name: str, train_path, *, shape: str = "cpm1-small",
                 length: int = 100, batch: int = 4, steps: int = 3, warmup: int = 1,
                 precision: str = "fp32", examples: int = 64, seed: int = 0) -> dict:
    """Run the three methods one after another; ratios are against PEFT and full tuning."""
    import random

    from ..artifacts import open_artifact
    from ..bench.scoring import encode_candidate, fit_group, make_row
    from ..bench.tasks import load_task
    from ..models import build_model
    from ..models.artifact import TOKENIZER_DIR
    from ..models.hf import write_hf_folder
    from ..recipe import load_recipe
    from ..tokenizer import from_folder
    from .soft import PromptLayout, SoftPrompt

    for name, value, low in (("--batch", batch, 1), ("--steps", steps, 1),
                             ("--warmup", warmup, 0), ("--length", length, 1),
                             ("--examples", examples, 1)):
        if value < low:
            raise CpmError(f"{name} must be at least {low}, got {value}")
    if precision not in ("fp32", "bf16"):
        raise CpmError(f"--precision must be fp32 or bf16, got {precision!r}")
    base = open_artifact(model_path, expect=("model", "checkpoint"), option="--model")
    tokenizer = from_folder(base.path / TOKENIZER_DIR)
    cfg = load_recipe(shape).model
    if cfg.arch != "gpt" or cfg.moe.experts:
        raise CpmError(f"--shape {shape}: PEFT's baseline runs on transformers' GPT-2, so the "
                       "shape must be a dense gpt")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CpmError(f"{base.path}: its tokenizer has {tokenizer.vocab_size:,} tokens, more "
                       f"than --shape {shape}'s vocabulary ({cfg.vocab_size:,})")
    task = load_task(task_name)
    prompt = SoftPrompt(PromptLayout(length, 0, 0), cfg.d_model)
    groups, gold = [], []
    for example in task.read_examples(train_path):
        requests = task.requests(example, random.Random(f"{seed}:{example.index}"))
        rows = [make_row(encode_candidate(tokenizer, c, eod=task.eod), prompt)
                for c in requests.candidates]
        try:
            rows, _ = fit_group(rows, cfg.max_positions)
        except CpmError:
            continue
        groups.append([(r.context, r.continuation, r.slots) for r in rows])
        gold.append(requests.gold)
        if len(groups) >= examples:
            break
    if not groups:
        raise CpmError(f"{train_path}: no example fits {shape}'s context beside the prompt")
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(seed)
        hf_folder = Path(scratch) / "hf"
        write_hf_folder(hf_folder, build_model(cfg), cfg, None)
        spec = BenchSpec(cfg, str(hf_folder), groups, gold, task.rule, length,
                         tokenizer.pad_id, batch,
                         steps, warmup, precision, torch.get_num_threads(), seed)
        runs = [_run_alone(method, spec) for method in METHODS]
    ours, recomputed, full, peft = runs
    tokens = sum(len(c) + len(t) for g in groups[:batch] for c, t, _ in g)
    return {
        "shape": shape, "layers": cfg.n_layers, "d_model": cfg.d_model,
        "vocab_size": cfg.vocab_size, "task": task.name, "length": length, "batch": batch,
        "candidates_per_step": sum(len(g) for g in groups[:batch]),
        "tokens_per_step": tokens, "steps": steps, "warmup": warmup, "precision": precision,
        "threads": torch.get_num_threads(), "runs": runs,
        "rss_vs_full_finetuning": round(ours["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "rss_vs_peft": round(ours["peak_rss_mb"] / peft["peak_rss_mb"], 3),
        "recomputed_rss_vs_full_finetuning": round(recomputed["peak_rss_mb"]
                                                   / full["peak_rss_mb"], 3),
        "recomputed_rss_vs_peft": round(recomputed["peak_rss_mb"] / peft["peak_rss_mb"], 3),
        "recomputed_speed_vs_peft": round(recomputed["steps_per_s"] / peft["steps_per_s"], 3),
        "speed_vs_peft": round(ours["steps_per_s"] / peft["steps_per_s"], 3),
        # CPU seconds a step (all threads): less at the mercy of other jobs than wall time
        "cpu_speed_vs_peft": round(peft["cpu_s_per_step"] / ours["cpu_s_per_step"], 3),
        "cpu_speed_vs_full_finetuning": round(full["cpu_s_per_step"]
                                              / ours["cpu_s_per_step"], 3),
        "speed_vs_full_finetuning": round(ours["steps_per_s"] / full["steps_per_s"], 3),
    }
