"""`cpmctl generate`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from cpmctl.cli.stdin import json_field, stdin_lines
from cpmctl.console import info
from cpmctl.errors import CpmError


def one_line(text: str) -> str:
    """A completion on one output line: backslash, newline and carriage return escaped as
    \\\\, \\n and \\r (undo with `printf '%b'` or any unescaper)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _prompts(text: str | None, jsonl: bool) -> Iterator:
    """The prompts, read lazily: completions come out while stdin is still being read."""
    from cpmctl.infer.text import Prompt  # NOTE: here: cpmctl.infer imports torch

    if text is not None:
        yield Prompt(text, "the TEXT argument")
        return
    for number, line in stdin_lines():
        where = f"stdin line {number}"
        if not jsonl:
            yield Prompt(line, where)
            continue
        record, prompt = json_field(number, line, "prompt")
        if not isinstance(prompt, str):
            raise CpmError(f"{where}: 'prompt' must be a string")
        yield Prompt(prompt, where, {k: v for k, v in record.items() if k != "prompt"})


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(
    model: Path = typer.Option(..., "--model", "-m", help="A model (or checkpoint) artifact."),
    text: str = typer.Argument(
        None, help="The prompt; without it, stdin is read, one prompt a line."
    ),
    jsonl: bool = typer.Option(
        False, "--jsonl", help='Read stdin as JSONL: {"prompt": ...} a line (other fields are '
                               "kept in --json output)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Write one JSON record a line: prompt, completion, tokens, "
                              "finish_reason, prefill_s, decode_s, tokens_per_s (+ spans)."
    ),
    stream: bool = typer.Option(
        False, "--stream", help="Print the text as it is generated (text output, batch 1)."
    ),
    max_new_tokens: int = typer.Option(64, help="The most tokens generated per prompt."),
    temperature: float = typer.Option(
        1.0, help="Divides the logits after top-k and top-p; 0 is greedy (deterministic)."
    ),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0: all)."),
    top_p: float = typer.Option(
        0.9, help="Sample among the most likely tokens up to this probability (1: all)."
    ),
    repetition_penalty: float = typer.Option(
        1.0, help="CTRL's penalty on tokens already present (1: none; 1.2 is common)."
    ),
    stop: list[str] = typer.Option(
        [], "--stop", help="End a completion at this text, cut before it (repeatable; gpt)."
    ),
    seed: int = typer.Option(0, help="Sampling seed: same input, settings and seed, same text."),
    batch_size: int = typer.Option(1, help="Prompts generated together (left-padded)."),
    dtype: str = typer.Option(
        None, help="fp32 or bf16 (default: fp32; bf16 with --quantize int8)."
    ),
    quantize: str = typer.Option(
        None, help="int8: int8 weights per output channel, bf16 activations (CPU)."
    ),
    device: str = typer.Option("cpu", help="cpu, or cuda where there is one."),
    threads: int = typer.Option(0, help="CPU threads for PyTorch (0: its default)."),
    prompt: Path = typer.Option(
        None, "--prompt", help="A soft prompt (cpmctl tune-prompt) tuned on --model, placed "
                               "around every input."),
    offload: bool = typer.Option(
        False, "--offload", help="MoE models: keep the experts out of memory and load each "
                                 "as the router asks, within --memory-budget."),
    memory_budget: str = typer.Option(
        "2GiB", help="--offload: memory for prepared experts (slots and cache), e.g. 512MiB."),
    slots: int = typer.Option(
        2, help="--offload: experts held at once per layer (>= 2): one computing while the "
                "next ones load."),
    order: str = typer.Option(
        "index", help="--offload: expert order per layer: index, heavy-first or resident-first."),
    offload_from: str = typer.Option(
        None, help="--offload: disk (read each load from the model's files; the CPU default) "
                   "or host (every expert in RAM once; pinned, the cuda default)."),
    simulate_bandwidth: float = typer.Option(
        0.0, help="--offload: a SIMULATION of a slower bus for measurements: stretch each "
                  "expert load to this many GB/s (0: off)."),
    cpu_compute: bool = typer.Option(
        False, "--cpu-compute", help="--offload on cuda: compute a cold expert on the CPU when "
                                     "a measured cost model says that beats copying it."),
    cache_policy: str = typer.Option(
        "lru", help="--offload: which cached expert makes room: lru (least recently used, an "
                    "even share per layer), frequency (the least routed to so far) or pin "
                    "(each layer keeps the first experts it loads; the rest rotate)."),
    prefetch: bool = typer.Option(
        False, "--prefetch", help="--offload: while a layer computes, load the experts the "
                                  "next layer's router picks for its input."),
    offload_report: Path = typer.Option(
        None, help="--offload: write its metrics (hit rate per layer, bytes moved, stalls, "
                   "peak resident expert bytes) as JSON to this file."),
) -> None:
    """Generate text after each prompt, one completion a line on stdout: gpt models continue
    the prompt; encdec models (CPM-2) fill the gaps marked <s_0>, <s_1>, ... and print the
    prompt with the gaps filled (a prompt without one gets <s_0> at its end).

    A completion ends at <eod>, at a --stop text (cut before it), or after
    --max-new-tokens. A newline inside it is written as \\n and a backslash as
    \\\\, so each completion is one line; --jsonl and --json carry any text.

    A gpt prompt must leave room for a new token in the model's context
    (model.max_positions): a longer one is an error naming its line, never
    silently cut; generation stops at the context's end ("length").

    Prompt i samples with its own generator, seeded from --seed and i: the
    output does not depend on --batch-size. Timings in --json are those of
    the prompt's batch.

    --offload (MoE models) loads the experts as the router asks, within
    --memory-budget; the output is the same as without it.

    Example: echo 今天天气很好， | cpmctl generate -m quickstart/runs/tiny-gpt/final
    """
    # NOTE: imported here: torch takes seconds to import and the other commands need none.
    import torch

    from cpmctl.infer import (
        GenerationSettings,
        SamplingSettings,
        TextGenerator,
        load_for_inference,
    )
    from cpmctl.infer.load import check_threads

    if text is not None and jsonl:
        raise CpmError("--jsonl reads prompts from stdin: drop TEXT or --jsonl")
    if stream and as_json:
        raise CpmError("--stream prints text as it comes: it does not go with --json")
    if check_threads(threads):
        torch.set_num_threads(threads)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, seed=seed,
        sampling=SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty))
    settings.check(lambda name: "--" + name.replace("_", "-"))
    soft = None
    if prompt is not None:
        from cpmctl.artifacts import open_artifact
        from cpmctl.prompt import load_prompt

        soft = load_prompt(prompt, open_artifact(model).digest)
    offloaded = None
    if offload:
        from cpmctl.data.shards import parse_size
        from cpmctl.offload import OffloadSettings, load_offloaded_for_inference

        offloaded, tokenizer = load_offloaded_for_inference(
            model, OffloadSettings(
                memory_budget=parse_size(memory_budget, "--memory-budget"), slots=slots,
                order=order, tier=offload_from or "", simulate_bandwidth=simulate_bandwidth,
                cpu_compute=cpu_compute, policy=cache_policy, prefetch=prefetch),
            dtype=dtype or ("bf16" if quantize else "fp32"), quantize=quantize, device=device)
        loaded = offloaded.model
    else:
        if offload_from or simulate_bandwidth or cpu_compute or offload_report or prefetch \
                or slots != 2 or order != "index" or memory_budget != "2GiB" \
                or cache_policy != "lru":
            raise CpmError("--memory-budget, --slots, --order, --offload-from, "
                           "--simulate-bandwidth, --cpu-compute, --cache-policy, --prefetch "
                           "and --offload-report go with --offload")
        loaded, tokenizer = load_for_inference(
            model, dtype=dtype or ("bf16" if quantize else "fp32"), quantize=quantize,
            device=device)
    generator = TextGenerator(loaded, tokenizer, settings, stop=stop, prompt=soft)
    show = (lambda chunk: _write(one_line(chunk))) if stream else None
    count = tokens = 0
    started = time.perf_counter()
    for completion in generator.complete(_prompts(text, jsonl), batch_size=batch_size,
                                         stream=show):
        if as_json:
            _write(json.dumps(completion.record(), ensure_ascii=False) + "\n")
        else:
            _write("\n" if stream else one_line(completion.text) + "\n")
        count += 1
        tokens += completion.tokens
    elapsed = time.perf_counter() - started
    if count:
        info(f"{count} completion(s), {tokens:,} tokens in {elapsed:.2f} s")
    if offloaded is not None:
        from cpmctl.offload import summary_line

        report = offloaded.report(tokens, elapsed)
        offloaded.close()
        info(summary_line(report))
        if offload_report is not None:
            offload_report.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
