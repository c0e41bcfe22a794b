"""`cpmctl bench run`: one task on one model, every rule, into one report.

    report = run_task(RunSettings(model="work/model", task="tnews", data="clue/tnews"))
    write_report("reports/tnews", report)       # results.json + results.md, an artifact

The report (a dict) has the run's settings, `metrics` (per rule: acc / acc_norm / acc_bytes
with intervals, per-class counts; generation metrics; perplexity) and `examples` (every
example's candidates, scores and prediction). `summary(report)` is it without `examples`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cpmctl.artifacts import MANIFEST, open_artifact
from cpmctl.bench.metrics import METRICS, accuracy_summary
from cpmctl.bench.scoring import Rate, score
from cpmctl.bench.tasks import Task, load_task
from cpmctl.errors import CpmError


@dataclass
class RunSettings:
    """What `bench run` was asked for (its options)."""

    model: str
    task: str
    data: str | None = None
    split: str | None = None
    limit: int | None = None
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    prompt: str | None = None
    embeddings: str | None = None
    """generate: a word2vec text file for the embedding metrics (default: the model's)."""


def load_soft_prompt(path: str, model_path: str):
    """Prompt tuning's artifact for this model (cpmctl.prompt.load_prompt checks that it
    was tuned on this model's digest)."""
    try:
        from cpmctl.prompt import load_prompt
    except ImportError:
        raise CpmError("prompt artifacts need cpmctl's prompt tuning (cpmctl.prompt), which "
                       "this installation lacks") from None
    digest = open_artifact(model_path, ("model", "checkpoint"), option="--model").digest
    return load_prompt(path, digest)


def _fit_prompt(prompt, model, task: Task, settings: RunSettings) -> None:
    """The prompt's width must be the model's and its slots must find the task's parts; it
    then computes where and as the model does."""
    from cpmctl.prompt.artifact import check_fits_model

    check_fits_model(prompt, model.cfg, settings.prompt)
    prompt.layout.check_parts(len(task.context), f"task {task.name}")
    prompt.to(device=settings.device, dtype=model.wte.weight.dtype if model.cfg.arch == "gpt"
              else model.shared.weight.dtype)


def run_task(settings: RunSettings, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Score the task's examples with the model; the report dict (see the module)."""
    from cpmctl.infer import load_for_inference

    task = load_task(settings.task)
    model_artifact = open_artifact(settings.model, ("model", "checkpoint"), option="--model")
    split = settings.split or task.split
    prompt = None
    if settings.prompt is not None:
        if task.rule not in ("cpm1", "choice", "span"):
            raise CpmError(f"--prompt: task {task.name}'s rule {task.rule} scores no "
                           "candidates; a soft prompt applies to cpm1, choice and span")
        prompt = load_soft_prompt(settings.prompt, settings.model)
    report = {"task": task.name, "description": task.description, "rule": task.rule,
              "task_file": task.source, "model": settings.model,
              "model_digest": model_artifact.digest, "split": split, "seed": settings.seed,
              "batch_size": settings.batch_size, "device": settings.device,
              "dtype": settings.dtype, "prompt": settings.prompt}
    if task.rule == "perplexity":
        report.update(_perplexity(task, settings, split, progress))
        return report
    examples = task.read_examples(settings.data, settings.limit, split=split)
    report.update(data=examples.source, examples_read=len(examples),
                  skipped=examples.skipped)
    model, tokenizer = load_for_inference(settings.model, dtype=settings.dtype,
                                          device=settings.device)
    if prompt is not None:
        _fit_prompt(prompt, model, task, settings)
    started = time.perf_counter()
    if task.rule == "generate":
        results, metrics = _generate(task, model, tokenizer, examples, settings, progress)
    else:
        scores = score(model, tokenizer, task, examples, batch_size=settings.batch_size,
                       prompt=prompt, seed=settings.seed, progress=Rate(progress))
        metrics = accuracy_summary(scores, task.rule)
        metrics["candidates"] = task.candidates
        results = [_example_record(s, task.rule) for s in scores]
    seconds = time.perf_counter() - started
    report.update(seconds=seconds, examples_per_s=len(examples) / max(seconds, 1e-9),
                  metrics=metrics, examples=results)
    return report


def _example_record(s, rule: str) -> dict:
    predictions = {metric: s.labels[s.prediction(metric, rule)] for metric in METRICS}
    return {"index": s.index, "line": s.line, "gold": s.labels[s.gold],
            "prediction": predictions["acc"], "correct": predictions["acc"] == s.labels[s.gold],
            "predictions": predictions, "truncated": s.truncated,
            "candidates": [{"label": label, "logprob": lp, "tokens": n, "chars": c, "bytes": b}
                           for label, lp, n, c, b in zip(s.labels, s.logprob, s.tokens, s.chars,
                                                         s.bytes, strict=True)]}


def _generate(task: Task, model, tokenizer, examples, settings: RunSettings, progress):
    from cpmctl.bench.generation_metrics import ModelEmbeddings, Word2Vec, generation_summary
    from cpmctl.infer import GenerationSettings, Prompt, SamplingSettings, TextGenerator

    knobs = dict(task.generate)
    sampling = SamplingSettings(**{k: knobs.pop(k) for k in list(knobs)
                                   if k in ("temperature", "top_k", "top_p",
                                            "repetition_penalty")})
    generation = GenerationSettings(max_new_tokens=knobs.get("max_new_tokens", 32),
                                    sampling=sampling, seed=settings.seed)
    generator = TextGenerator(model, tokenizer, generation)
    prompts = [Prompt("".join(part.format_map(e.fields) for part in task.context),
                      f"{examples.source}:{e.line}") for e in examples]
    rate = Rate(progress)
    generated = []
    for completion in generator.complete(prompts, batch_size=settings.batch_size):
        generated.append(completion.text)
        rate(len(generated), len(prompts))
    references = [e.fields[task.reference_field] for e in examples]
    embedder = (Word2Vec(Path(settings.embeddings)) if settings.embeddings
                else ModelEmbeddings(model, tokenizer))
    metrics = generation_summary(generated, references, embedder)
    metrics["embedding"]["vectors"] = settings.embeddings or "the model's input embeddings"
    results = [{"index": e.index, "line": e.line, "context": p.text, "reference": r,
                "generated": g}
               for e, p, r, g in zip(examples, prompts, references, generated, strict=True)]
    return results, metrics


def _perplexity(task: Task, settings: RunSettings, split: str, progress) -> dict:
    """The perplexity of a dataset artifact's split (its first --limit tokens) or of a text
    file (its first --limit documents, <eod> after each)."""
    from cpmctl.bench.perplexity import _held_out
    from cpmctl.infer import load_for_inference, perplexity

    if settings.data is None:
        raise CpmError("the perplexity task needs --data: a text file or a dataset artifact")
    model, tokenizer = load_for_inference(settings.model, dtype=settings.dtype,
                                          device=settings.device)
    started = time.perf_counter()
    if (Path(settings.data) / MANIFEST).is_file():
        ids = _held_out(settings.model, settings.data, split, settings.limit or 10**9)
        source, documents = f"{settings.data} ({split})", None
    else:
        examples = task.read_examples(settings.data, settings.limit, split=split)
        pieces = []
        for encoded in tokenizer.encode_batch([e.fields["text"] for e in examples]):
            pieces += encoded + [tokenizer.eod_id]
        ids, source, documents = torch.tensor(pieces), examples.source, len(examples)
    window = min(task.window or model.cfg.max_positions, max(ids.numel() - 1, 1))
    progress(f"perplexity of {ids.numel():,} tokens in windows of {window}")
    value = perplexity(model, ids, window=window, batch_size=settings.batch_size)
    seconds = time.perf_counter() - started
    scored = (ids.numel() - 1) // window * window
    return {"data": source, "documents": documents, "seconds": seconds,
            "metrics": {"perplexity": value, "tokens": ids.numel(), "scored_tokens": scored,
                        "window": window}, "examples": []}


def summary(report: dict) -> dict:
    """The report without its per-example records (what --json prints)."""
    return {k: v for k, v in report.items() if k != "examples"}
