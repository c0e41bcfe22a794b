"""`cpmctl bench zeroshot-speed`: examples/s of zero-shot scoring, four ways, one run.

1. cpmctl, batched with the shared context: `score(batch_size=B)`: each example's context
   once and its K continuations packed behind it, several examples a row
   (cpmctl.bench.packing), B candidates a forward.
2. cpmctl, one forward per candidate: `score(batch_size=1, share_context=False)`: every
   candidate's context + continuation its own forward (the baseline of 1).
3. cpmctl, batched without sharing: `score(batch_size=B, share_context=False)`: B
   candidates a forward, each its own padded row (what batching alone gives, beside 1).
4. `lm_eval --model hf`: lm-evaluation-harness's HFLM on the same weights exported with
   `cpmctl model convert --to hf`, over the same examples written as a local lm-eval task
   (lm_eval_adapter.export_choice_task), batch size B.

NOTE on 3's tokenizer: lm-eval's hf model loads its tokenizer with AutoTokenizer, and no
file AutoTokenizer reads can reproduce cpmctl's: CPM's tokenizer segments with jieba before
SentencePiece, and Hugging Face `tokenizers` has no jieba pre-tokenizer (a Python tokenizer
class would need trust_remote_code). So HFLM gets a PreTrainedTokenizerFast built here from
the same SentencePiece pieces and scores (Unigram, Metaspace), which segments without jieba:
the token counts differ a little and so can the accuracies; both are shown. It tokenises in
Rust, faster than jieba, so the comparison does not favour cpmctl.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cpmctl.bench.metrics import accuracy_summary
from cpmctl.bench.scoring import score
from cpmctl.bench.tasks import load_task
from cpmctl.errors import CpmError


def hf_tokenizer(tokenizer):
    """A PreTrainedTokenizerFast over a cpm1 tokenizer's SentencePiece vocabulary (see the
    NOTE above: it cannot segment with jieba)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if tokenizer.scheme != "cpm1":
        raise CpmError("the lm_eval --model hf comparison needs a cpm1 (SentencePiece) model")
    sp = tokenizer.sp
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    fast = FastTokenizer(models.Unigram(vocab, unk_id=tokenizer.unk_id,
                                        byte_fallback=tokenizer.byte_fallback))
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=fast, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eod>", bos_token="<eod>")


def _model(model: Path | None, recipe: str | None, tokenizer: Path | None, scratch: Path):
    """The model artifact to time: the one given, or random weights of a recipe's shape."""
    if model is not None:
        return model
    from cpmctl.models import build_model
    from cpmctl.models.artifact import save_model
    from cpmctl.recipe import load_recipe
    from cpmctl.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer).vocab_size
    cfg = load_recipe(recipe, [f"model.vocab_size={vocab}"]).model
    if cfg.arch != "gpt":
        raise CpmError(f"--recipe {recipe}: the comparison with lm_eval's hf model needs gpt")
    torch.manual_seed(0)
    return save_model(scratch / "model", build_model(cfg), cfg, tokenizer, meta={},
                      command=["cpmctl", "bench", "zeroshot-speed"])


def _time(run: Callable[[], list]) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds of this process, the result). NOTE: the CPU time is shown
    beside the wall time because on a machine shared with other jobs the wall time of each
    way depends on what else ran meanwhile; the CPU time much less."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_zeroshot_speed(*, model: Path | None, recipe: str | None, tokenizer: Path | None,
                         task: str, data: Path | None, limit: int, batch_size: int,
                         lm_eval_hf: bool, progress: Callable[[str], None]) -> dict:
    """The three ways on the first `limit` examples of a choice task (see the module)."""
    from cpmctl.infer import load_for_inference

    loaded = load_task(task)
    if loaded.rule != "choice":
        raise CpmError(f"--task {task}: the shared context needs a choice task "
                       f"(rule {loaded.rule})")
    if limit < 1 or batch_size < 1:
        raise CpmError("--limit and --batch-size must be at least 1")
    examples = loaded.read_examples(None if data is None else str(data), limit)
    with tempfile.TemporaryDirectory(prefix="cpmctl-zeroshot-speed-") as scratch:
        scratch = Path(scratch)
        path = _model(model, recipe, tokenizer, scratch)
        network, tok = load_for_inference(path)
        if network.cfg.arch != "gpt":
            raise CpmError(f"{path}: zeroshot-speed times gpt models")
        tok.encode("预热")  # jieba loads its dictionary on first use: not part of a timing
        runs = []
        for way, kwargs in (("cpmctl batched, shared context", dict(batch_size=batch_size)),
                            ("cpmctl one forward per candidate",
                             dict(batch_size=1, share_context=False)),
                            ("cpmctl batched, no shared context",
                             dict(batch_size=batch_size, share_context=False))):
            progress(f"timing {way} on {len(examples)} examples")
            seconds, cpu, scores = _time(
                lambda k=kwargs: score(network, tok, loaded, examples, **k))
            summary = accuracy_summary(scores, loaded.rule)
            runs.append({"way": way, "seconds": seconds, "cpu_seconds": cpu,
                         "examples_per_s": len(examples) / seconds,
                         "acc": summary["acc"]["value"],
                         "acc_norm": summary["acc_norm"]["value"]})
        if lm_eval_hf:
            runs.append(_lm_eval_hf(path, tok, loaded, examples, batch_size, scratch,
                                    progress))
    by_way = {r["way"]: r for r in runs}
    ratios = {}
    for baseline, name in (("cpmctl one forward per candidate", "one forward per candidate"),
                           ("cpmctl batched, no shared context", "batched, no shared context"),
                           ("lm_eval --model hf", "lm_eval --model hf")):
        if baseline in by_way:
            for clock in ("seconds", "cpu_seconds"):
                ratios[f"batched + shared context vs {name} ({clock.replace('_', ' ')})"] = (
                    by_way[baseline][clock] / by_way["cpmctl batched, shared context"][clock])
    return {"task": loaded.name, "examples": len(examples), "model": str(model or recipe),
            "batch_size": batch_size, "threads": torch.get_num_threads(), "runs": runs,
            "ratios": ratios}


def _lm_eval_hf(path: Path, tokenizer, task, examples, batch_size: int, scratch: Path,
                progress) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CpmError("the lm_eval --model hf comparison needs lm-evaluation-harness: pip "
                       "install 'cpmctl[lm-eval]' (or pass --no-hf)") from None
    from cpmctl.bench.lm_eval_adapter import export_choice_task
    from cpmctl.models.convert import convert_to_hf

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    hf_dir = convert_to_hf(path, scratch / "hf")
    name = export_choice_task(task, examples, scratch / "lm_eval_tasks", "cpmctl_speed_task")
    manager = TaskManager(include_path=str(scratch / "lm_eval_tasks"))
    lm = HFLM(pretrained=str(hf_dir), tokenizer=hf_tokenizer(tokenizer), batch_size=batch_size,
              device="cpu", dtype="float32")
    progress(f"timing lm_eval --model hf on {len(examples)} examples")
    # NOTE: only HFLM's loglikelihood is timed (tokenising and scoring), not lm-eval's
    # dataset and request building, so that the figure compares the models' work alone
    spent = []
    scoring = lm.loglikelihood

    def timed(requests, *args, **kwargs):
        seconds, cpu, out = _time(lambda: scoring(requests, *args, **kwargs))
        spent.append((seconds, cpu))
        return out

    lm.loglikelihood = timed
    total, _, results = _time(lambda: lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=manager, log_samples=False, bootstrap_iters=0))
    metrics = results["results"][name]
    seconds = sum(wall for wall, _ in spent)
    return {"way": "lm_eval --model hf", "seconds": seconds,
            "cpu_seconds": sum(cpu for _, cpu in spent), "seconds_with_harness": total,
            "examples_per_s": len(examples) / seconds, "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"]}
