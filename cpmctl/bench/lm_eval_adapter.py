"""lm-evaluation-harness interop: a cpmctl model as an `lm_eval.api.model.LM`.

    lm = CpmLM.from_artifact("work/model", batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["xcopa_zh"], task_manager=...)

The adapter scores with cpmctl's own code, so a task run here and through `cpmctl bench run`
gives the same numbers: `loglikelihood` tokenises each (context, continuation) pair with
scoring.encode_candidate (joint tokenisation; an empty context is `<eod>`) and runs batches of
them through scoring.candidate_losses; `loglikelihood_rolling` scores a whole text in
windows of the model's context (lm-eval's rolling windows, `<eod>` before the first token);
`generate_until` is `cpmctl generate` (greedy unless the task asks for sampling) cut at the
task's stop strings. Requests are sorted by length before batching and answered in their
order. An encdec model scores `<s_0>` + the continuation after its encoder read the context.

`evaluate` runs lm-eval's `simple_evaluate` over our adapter with a task manager that also
reads `include_path` (local YAML over local files: no hub needed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cpmctl.bench.scoring import (
    candidate_losses,
    encode_candidate,
    fit_group,
    flat_batch,
    make_row,
)
from cpmctl.bench.tasks.format import Candidate
from cpmctl.errors import CpmError

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional extra; `evaluate` and CpmLM say what to install
    LM = object

_INSTALL = "pip install 'cpmctl[lm-eval]'"


class CpmLM(LM):
    """A loaded cpmctl model and tokenizer behind lm-eval's LM API (see the module)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_gen_toks: int = 64):
        if LM is object:
            raise CpmError(f"the lm-eval adapter needs lm-evaluation-harness: {_INSTALL}")
        super().__init__()
        if batch_size < 1:
            raise CpmError(f"--batch-size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.arch = model.cfg.arch

    @classmethod
    def from_artifact(cls, path: str, *, device: str = "cpu", dtype: str = "fp32",
                      batch_size: int = 16) -> CpmLM:
        from cpmctl.infer import load_for_inference

        model, tokenizer = load_for_inference(path, dtype=dtype, device=device)
        return cls(model, tokenizer, batch_size=batch_size)

    @property
    def tokenizer_name(self) -> str:
        return f"cpmctl-{self.tokenizer.scheme}-{self.tokenizer.vocab_size}"

    def _rows(self, pairs: list[tuple[str, str]]):
        rows = []
        for context, continuation in pairs:
            if not continuation:
                raise CpmError("lm-eval asked for the log-likelihood of an empty continuation")
            encoded = encode_candidate(self.tokenizer, Candidate([context], continuation, ""),
                                       arch=self.arch)
            row = make_row(encoded)
            if self.arch == "gpt":
                [row] = fit_group([row], self.model.cfg.max_positions)[0]
            rows.append(row)
        return rows

    def _score_rows(self, rows) -> list[tuple[float, bool]]:
        """(summed log-likelihood, is_greedy) of each row, batched longest first."""
        order = sorted(range(len(rows)),
                       key=lambda i: -(len(rows[i].context) + len(rows[i].continuation)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        sentinel = self.tokenizer.sentinel_id(0) if self.arch == "encdec" else None
        pad = self.tokenizer.pad_id
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = flat_batch([rows[i] for i in chunk], self.arch, pad, pad, sentinel)
                logprob, _, greedy = candidate_losses(self.model, batch, greedy=True)
                for i, lp, g in zip(chunk, logprob.tolist(), greedy.tolist(), strict=True):
                    out[i] = (lp, bool(g))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score_rows(self._rows([tuple(r.args) for r in requests]))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from cpmctl.bench.scoring import Row

        if self.arch != "gpt":
            raise CpmError("loglikelihood_rolling (perplexity) is for gpt models")
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        rows, owners = [], []
        window = self.model.cfg.max_positions
        for i, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            for pair in get_rolling_token_windows(ids, self.tokenizer.eod_id, window, 1):
                context, continuation = make_disjoint_window(pair)
                rows.append(Row(list(context), list(continuation)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score_rows(rows), strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from cpmctl.infer import GenerationSettings, Prompt, SamplingSettings, TextGenerator

        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = (SamplingSettings(temperature=float(kwargs.get("temperature", 1.0)),
                                         top_p=float(kwargs.get("top_p", 1.0)),
                                         top_k=int(kwargs.get("top_k", 0)))
                        if kwargs.get("do_sample") else SamplingSettings(temperature=0.0))
            settings = GenerationSettings(
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                sampling=sampling)
            stop = until if self.arch == "gpt" else ()
            generator = TextGenerator(self.model, self.tokenizer, settings, stop=stop)
            [completion] = generator.complete([Prompt(context or "\n", "lm-eval request")])
            text = completion.text
            for marker in until:  # stop strings are not part of the answer
                if marker and marker in text:
                    text = text[:text.index(marker)]
            out.append(text)
        return out


def evaluate(model: str, tasks: list[str], *, include_path: Path | None = None,
             limit: int | None = None, batch_size: int = 16, num_fewshot: int | None = None,
             device: str = "cpu", dtype: str = "fp32", seed: int = 0,
             log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on a cpmctl model artifact; its results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CpmError(f"cpmctl bench lm-eval needs lm-evaluation-harness: {_INSTALL}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise CpmError(f"--include-path {include_path}: no such folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CpmError(f"--tasks: lm-eval knows no task {unknown[0]!r}"
                       + ("" if include_path else " (local YAML goes in --include-path)"))
    lm = CpmLM.from_artifact(model, device=device, dtype=dtype, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples,
                                   random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed,
                                   bootstrap_iters=1000)


def export_choice_task(task, examples, folder: Path, name: str) -> str:
    """Write a cpmctl `choice` task's examples as an lm-eval task: `{name}.jsonl` (context,
    choices, answer: the candidates as `bench run` renders them) and `{name}.yaml` (local
    JSON, multiple_choice, no target delimiter, acc / acc_norm / acc_bytes). Returns the task
    name, for lm-eval's --include-path folder."""
    import json
    import random

    if task.rule != "choice":
        raise CpmError(f"task {task.name}: only a choice task maps onto lm-eval's "
                       "multiple_choice (one context, K continuations)")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for example in examples:
            requests = task.requests(example, random.Random(f"0:{example.index}"))
            record = {"context": "".join(requests.candidates[0].context_parts),
                      "choices": [c.continuation for c in requests.candidates],
                      "answer": requests.gold}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n",
        encoding="utf-8")
    return name
