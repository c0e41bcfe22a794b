"""`cpmctl bench speed --model M` (or `--recipe R`): generation speed, memory and bandwidth.

For every precision (fp32, bf16, int8 weights with bf16 activations) and batch size: prefill
tokens/s (prompt tokens through the first logits), decode tokens/s (new tokens after the
prefill), peak memory, and the effective bandwidth of decoding: weight bytes × decoding steps
per second (a decoding step reads every weight once, whatever the batch). Beside it, the
machine's memory bandwidth measured in the same run (a sum over a 512 MB tensor), which bounds
the batch-1 decode speed from above. For GPT models the same weights also run through
transformers' `GPT2LMHeadModel.generate` (greedy, exactly as many new tokens). Reported for each
of our runs: its decode speed as a multiple of transformers' at the same batch (int8 against
transformers' bf16, which has no int8), and its effective bandwidth as a fraction of the
measured one: at batch 1, how close decoding comes to the speed the memory allows.
With `module_step`, each of our runs is repeated as `cpmctl-modules`: the same generation
stepping through the module forward instead of the planned step (cpmctl.infer.planned), and
ours is reported as a multiple of it (`vs_module_step`, decode; `prefill_vs_module_step`).

Each measurement runs in a process of its own (`python -m cpmctl.bench.generation` with a JSON
spec on stdin): peak memory is that process's peak resident set (or CUDA's peak allocation),
untouched by the other measurements. `--recipe` benchmarks random weights of a recipe's shape
(e.g. cpm1-small, CPM-Small's 12 × 768 with 30,000 tokens) with no artifact needed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cpmctl.errors import CpmError

#: The transformers precision each of ours is compared with (it has no int8).
BASELINE_PRECISION = {"fp32": "fp32", "bf16": "bf16", "int8": "bf16"}
"""Ours in precision P against transformers in precision B: at least the ratio (batch 1)."""


# ------------------------------------------------------------------- one measurement


def _our_model(spec: dict) -> tuple[nn.Module, int, int]:
    """(model ready for generation, pad id, weight bytes) from a model artifact or a recipe's
    shape. The bytes are counted before preparing: packed weights are opaque tensors."""
    from cpmctl.infer import prepare_for_inference
    from cpmctl.infer.load import PRECISIONS
    from cpmctl.models.artifact import TOKENIZER_DIR, load_model
    from cpmctl.tokenizer import from_folder

    settings = PRECISIONS[spec["precision"]]
    pad_id = 0
    if spec.get("model"):
        model = load_model(spec["model"])[0]
        tokenizer = Path(spec["model"]) / TOKENIZER_DIR
        if tokenizer.is_dir():
            pad_id = from_folder(tokenizer).pad_id
    else:
        model = _random_model(spec)
    weights = _step_bytes(model) // (2 if settings["dtype"] == "bf16" else 1)
    model = prepare_for_inference(model, **settings, device=spec["device"])
    return model, pad_id, _step_bytes(model) if "quantize" in settings else weights


def _random_model(spec: dict) -> nn.Module:
    from cpmctl.models import build_model
    from cpmctl.recipe import load_recipe

    torch.manual_seed(0)
    return build_model(load_recipe(spec["recipe"]).model).eval()


def _transformers_model(spec: dict) -> nn.Module:
    """transformers' GPT-2 holding the same weights as ours (cpmctl.models.hf's mapping)."""
    from cpmctl.models.artifact import load_model
    from cpmctl.models.hf import to_transformers

    model = load_model(spec["model"])[0] if spec.get("model") else _random_model(spec)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    return to_transformers(model).to(device=spec["device"], dtype=dtype)


def _prompts(spec: dict, vocab: int) -> torch.Tensor:
    rng = np.random.default_rng(1234)
    ids = rng.integers(10, vocab, size=(spec["batch"], spec["prompt_tokens"]))
    return torch.from_numpy(ids)


def _time_ours(model: nn.Module, prompts: torch.Tensor, new_tokens: int, pad_id: int,
               planned: bool = True):
    from cpmctl.infer import GenerationSettings, SamplingSettings, generate_tokens

    settings = GenerationSettings(max_new_tokens=new_tokens,
                                  sampling=SamplingSettings(temperature=0.0))
    result = generate_tokens(model, prompts.tolist(), settings, eod_id=None, pad_id=pad_id,
                             planned_step=planned)
    return result.prefill_s, result.decode_s, [row.tokens for row in result.rows]


def _time_transformers(model: nn.Module, prompts: torch.Tensor, new_tokens: int, pad_id: int):
    """Prefill: one forward pass with the cache on; decoding: generate's time minus that."""
    prompts = prompts.to(model.device)
    mask = torch.ones_like(prompts)
    with torch.inference_mode():
        started = time.perf_counter()
        model(prompts, attention_mask=mask, use_cache=True)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(prompts, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_id, eos_token_id=None)
        total = time.perf_counter() - started
    return prefill_s, max(total - prefill_s, 1e-9), out[:, prompts.shape[1]:].tolist()


def _weight_bytes(model: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Bytes of the parameters and buffers, a tied weight once, leaving out `skip`'s."""
    seen = {id(t) for m in skip for t in [*m.parameters(), *m.buffers()]}
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _step_bytes(model: nn.Module) -> int:
    """The weight bytes one decoding step reads: a GPT's whole model; an encoder-decoder's
    decoder and head, without the encoder (run once per prompt) and the cross-attention key
    and value projections (applied once to the encoder's output, then cached)."""
    if model.cfg.arch != "encdec":
        return _weight_bytes(model)
    cached = tuple(m for block in model.decoder for m in (block.cross_attn.k, block.cross_attn.v))
    return sum(_weight_bytes(m, cached) for m in (model.decoder, model.decoder_norm,
                                                   model.lm_head))


def measure(spec: dict) -> dict:
    """One (implementation, precision, batch) measurement; the best of spec['repeat']."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    transformers = spec["impl"] == "transformers"
    if transformers:
        model, pad_id = _transformers_model(spec), 0
        weights, timer = _weight_bytes(model), _time_transformers
    else:
        model, pad_id, weights = _our_model(spec)
        planned = spec["impl"] == "cpmctl"

        def timer(*args):
            return _time_ours(*args, planned=planned)
    vocab = model.config.vocab_size if transformers else model.cfg.vocab_size
    prompts = _prompts(spec, vocab)
    timer(model, prompts, 4, pad_id)  # warm-up: allocator, kernels, thread pools
    best = None
    for _ in range(spec["repeat"]):
        prefill_s, decode_s, tokens = timer(model, prompts, spec["new_tokens"], pad_id)
        if best is None or decode_s < best[1]:
            best = (prefill_s, decode_s, tokens)
    prefill_s, decode_s, tokens = best
    batch, new = spec["batch"], spec["new_tokens"]
    if spec["device"].startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "impl": spec["impl"], "precision": spec["precision"], "batch": batch,
        "prefill_tok_s": batch * spec["prompt_tokens"] / prefill_s,
        "decode_tok_s": batch * new / decode_s,
        "weights_mb": weights / 2**20, "peak_mb": peak_mb,
        # a decoding step reads every weight once: bytes × steps/s
        "effective_gb_s": weights * (new / decode_s) / 1e9,
        "first_tokens": tokens[0][:8],
    }
    if spec["precision"] == "int8":
        from cpmctl.kernels.int8 import kernel_name

        record["int8_kernel"] = kernel_name()
    elif spec["impl"] != "transformers" and spec["device"] == "cpu":
        from cpmctl.infer.packed import kernel_name

        record["matmul_kernel"] = kernel_name(torch.float32 if spec["precision"] == "fp32"
                                              else torch.bfloat16)
    return record


# ----------------------------------------------------------------------- the report


def memory_bandwidth_gb_s(megabytes: int = 512, repeat: int = 5) -> float:
    """Read bandwidth: the best of `repeat` sums over a `megabytes` fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeat))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _run_isolated(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "cpmctl.bench.generation"],
                          input=json.dumps(spec), capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise CpmError(f"bench speed: the {spec['impl']} {spec['precision']} batch "
                       f"{spec['batch']} run failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout)


def bench_generation(*, model: str | None, recipe: str | None, precisions: list[str],
                     batches: list[int], prompt_tokens: int, new_tokens: int, repeat: int,
                     device: str, threads: int | None, baseline: bool, progress,
                     module_step: bool = False) -> dict:
    """Every (precision, batch) for ours (and through the module forward, `module_step`), and
    for transformers where it has the precision; the measured bandwidth; our ratios to them and
    to the bandwidth limit."""
    arch = _arch(model, recipe)
    base = {"model": model, "recipe": recipe, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeat": repeat, "device": device, "threads": threads}
    runs = []
    for precision in precisions:
        for batch in batches:
            impls = ["cpmctl", "cpmctl-modules"] if module_step else ["cpmctl"]
            if baseline and arch == "gpt" and precision != "int8":
                impls.append("transformers")
            for impl in impls:
                progress(f"{impl} {precision} batch {batch}")
                runs.append(_run_isolated({**base, "impl": impl, "precision": precision,
                                           "batch": batch}))
    report = {"model": model or f"recipe {recipe} (random weights)", "arch": arch,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "device": device,
              "threads": threads or torch.get_num_threads(),
              "memory_bandwidth_gb_s": memory_bandwidth_gb_s(), "runs": runs}
    _compare(runs, report["memory_bandwidth_gb_s"])
    return report


def _arch(model: str | None, recipe: str | None) -> str:
    if model:
        from cpmctl.artifacts import open_artifact
        from cpmctl.models.artifact import read_model_json

        artifact = open_artifact(model, expect=("model", "checkpoint"), option="--model")
        return read_model_json(artifact.path)[0].arch
    from cpmctl.recipe import load_recipe

    return load_recipe(recipe).model.arch


def _compare(runs: list[dict], bandwidth_gb_s: float) -> None:
    """Adds to each of our runs `of_bandwidth` (effective GB/s over the measured), and to the
    planned ones `vs_transformers` (decode tokens/s over transformers' at the same batch, in
    BASELINE_PRECISION) and, where measured, `vs_module_step` / `prefill_vs_module_step`
    (decode / prefill tokens/s over the module forward's, same precision and batch). Every run
    at a batch above 1 gets `vs_batch_1` (its decode tokens/s over batch 1's, same
    implementation and precision) where batch 1 was measured."""
    theirs = {(r["precision"], r["batch"]): r["decode_tok_s"] for r in runs
              if r["impl"] == "transformers"}
    modules = {(r["precision"], r["batch"]): r for r in runs if r["impl"] == "cpmctl-modules"}
    single = {(r["impl"], r["precision"]): r["decode_tok_s"] for r in runs if r["batch"] == 1}
    for run in runs:
        one = single.get((run["impl"], run["precision"]))
        if run["batch"] > 1 and one:
            run["vs_batch_1"] = run["decode_tok_s"] / one
        if run["impl"] == "transformers":
            continue
        run["of_bandwidth"] = run["effective_gb_s"] / bandwidth_gb_s if bandwidth_gb_s else None
        if run["impl"] != "cpmctl":
            continue
        baseline = theirs.get((BASELINE_PRECISION[run["precision"]], run["batch"]))
        if baseline:
            run["vs_transformers"] = run["decode_tok_s"] / baseline
        module = modules.get((run["precision"], run["batch"]))
        if module:
            run["vs_module_step"] = run["decode_tok_s"] / module["decode_tok_s"]
            run["prefill_vs_module_step"] = run["prefill_tok_s"] / module["prefill_tok_s"]


if __name__ == "__main__":
    print(json.dumps(measure(json.load(sys.stdin))))
