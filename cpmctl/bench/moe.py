"""`cpmctl bench moe`: offloaded MoE generation against the fully resident model and against
synchronous on-demand loading, in one run, on the same prompts (greedy, so every run's tokens
can be compared with the resident model's).

Runs, in order:
1. `resident`: the whole model in memory (load_model + prepare_for_inference), the baseline;
   timed first and again last, the faster of the two counting (other work on the machine
   slows either).
2. `on-demand`: each expert loaded when its layer needs it, nothing overlapped, nothing
   cached (InfMoE without its pipeline), the load path throttled to the simulated bandwidth.
3. offloaded, from host memory, throttled to the simulated bandwidth, with `resident_fraction`
   of the expert memory as the budget, `slots` slots, in each order (index, heavy-first,
   resident-first) with the LRU cache; then heavy-first with the `frequency` cache, with it
   the cross-layer prefetch (whose prediction accuracy is reported), and with the `pin` cache.
4. offloaded from the model's files for real (no throttle): once after dropping the files'
   pages from the page cache (posix_fadvise DONTNEED), once again with the cache warm; the
   bytes the process read from storage (/proc/self/io read_bytes) say what the cache served.
5. with `prefill_tokens`, the prompt-heavy regime as rows of its own: `prefill_batches`
   batches of `prefill_tokens`-token prompts, one new token, generated in turn (the engine's
   cache kept between batches), resident / on-demand / offloaded with the LRU and the `pin`
   cache, in prompt tokens per second, at a bandwidth of its own (`_prefill_rows`).

Each run's rate is given over the whole generation (prefill included: it loads too) and over
decoding alone. Beside them, the ceiling that the routing itself sets (moe_bound.py): the
fewest loads any cache of the budget's size needs for the experts this run used, and the
best × resident they leave at the simulated bandwidth if every load overlapped compute.

The simulated bandwidth of the decoding rows (unless given) keeps a PCIe-4-to-accelerator
ratio on this machine: an expert's compute while decoding is bound by the speed its weights
are read at (HBM on a GPU, DRAM here), and a load by the bus, so the load is given this
machine's measured read bandwidth times PCIe 4.0 x16 (~25 GB/s in practice) over an A100's
HBM2 (1,555 GB/s). Taking the ratio against FLOP/s instead (an A100's over PCIe's bytes/s)
would be right only where the compute is bound by arithmetic — an A100 expert at more than
~(FLOP/s / HBM bytes/s) x bytes per weight / 2 tokens — and would make a decoding load 200x
(bf16) too dear; the report gives, per regime, the tokens per expert and the A100's own load /
compute ratio at that count (roofline), next to what this simulation imposes. The
prompt-heavy rows are bound by arithmetic, and get that ratio (`_prefill_rows`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cpmctl.errors import CpmError

PCIE4_GB_S = 25.0
HBM_GB_S = 1555.0  # A100 40GB
A100_TFLOP_S = {"fp32": 19.5, "bf16": 312.0}  # dense, without / with tensor cores
ORDERS_COMPARED = ("index", "heavy-first", "resident-first")


@dataclass(frozen=True)
class MoeBenchSettings:
    model: str | None = None
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    batch: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 8
    resident_fraction: float = 0.25
    slots: int = 3
    bandwidth_gb_s: float = 0.0  # 0: derived from this machine (module doc)
    dtype: str = "fp32"
    workdir: str | None = None  # where --recipe's random model is written (default: a temp)
    disk: bool = True
    threads: int = 0  # PyTorch's compute threads (0: its default)
    prefill_tokens: int = 0  # > 0: add the prompt-heavy rows (prompts of this many tokens)
    prefill_batches: int = 3  # of the prompt-heavy rows, generated in turn by one engine

    def check(self) -> None:
        if (self.model is None) == (self.recipe is None):
            raise CpmError("bench moe: give one of --model or --recipe")
        for key in ("batch", "prompt_tokens", "new_tokens"):
            if getattr(self, key) < 1:
                raise CpmError(f"--{key.replace('_', '-')} must be at least 1")
        if self.prefill_batches < 1:
            raise CpmError(f"--prefill-batches must be at least 1, got {self.prefill_batches}")
        if self.prefill_tokens < 0:
            raise CpmError(f"--prefill-tokens must be 0 (off) or more, got "
                           f"{self.prefill_tokens}")
        if self.dtype not in A100_TFLOP_S:
            raise CpmError(f"--dtype: expected fp32 or bf16, got {self.dtype!r}")
        if not 0 < self.resident_fraction <= 1:
            raise CpmError(f"--resident-fraction must be in (0, 1], got "
                           f"{self.resident_fraction}")
        if self.slots < 2:
            raise CpmError(f"--slots must be at least 2, got {self.slots}")
        if not self.bandwidth_gb_s >= 0:
            raise CpmError("--simulate-bandwidth must be positive (0: derived)")


def _random_model(settings: MoeBenchSettings, folder: Path, progress) -> Path:
    from cpmctl.models import count_parameters
    from cpmctl.models.shard import write_random_model
    from cpmctl.recipe import load_recipe

    cfg = load_recipe(settings.recipe, settings.overrides).model
    if not cfg.moe.experts:
        raise CpmError(f"--recipe {settings.recipe}: a dense model (model.moe.experts is 0); "
                       f"bench moe needs an MoE model")
    need = 4 * count_parameters(cfg)
    free = shutil.disk_usage(folder).free
    if need > free // 2:
        raise CpmError(f"--recipe {settings.recipe}: its random weights take "
                       f"{need / 1e9:.1f} GB; {folder} has {free / 1e9:.1f} GB free")
    progress(f"writing random weights ({need / 1e9:.2f} GB) to {folder / 'model'}")
    return write_random_model(cfg, folder / "model", max_shard_bytes=2 * 10**9,
                              command=["cpmctl", "bench", "moe"])


def _prompts(batch: int, tokens: int, vocab: int, seed: int = 1234) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, vocab, size=(batch, tokens)).tolist()


def _generate(model, batches: list[list[list[int]]], new_tokens: int):
    """Each batch of prompts generated in turn: one result over all of them (rows in order,
    times summed), and each batch's prefill time."""
    from cpmctl.infer import GenerationSettings, SamplingSettings, generate_tokens
    from cpmctl.infer.generate import BatchResult

    settings = GenerationSettings(max_new_tokens=new_tokens,
                                  sampling=SamplingSettings(temperature=0.0))
    results = [generate_tokens(model, prompts, settings, eod_id=None, pad_id=0)
               for prompts in batches]
    return (BatchResult([row for r in results for row in r.rows],
                        sum(r.prefill_s for r in results), sum(r.decode_s for r in results)),
            [r.prefill_s for r in results])


def _read_bytes() -> int | None:
    """Bytes this process has had read from storage (not from the page cache)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _drop_page_cache(folder: Path) -> None:
    for path in folder.glob("model*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _offloaded_run(path: Path, offload, batches, new_tokens: int, dtype: str, reference,
                   name: str, trace: list | None = None) -> dict:
    """One engine generating every batch of prompts in turn (its cache kept between them)."""
    from cpmctl.offload import load_offloaded

    engine = load_offloaded(path, offload, dtype=dtype)
    engine.scheduler.trace = trace
    before = _read_bytes()
    try:
        result, prefills = _generate(engine.model, batches, new_tokens)
    finally:
        engine.close()
    after = _read_bytes()
    report = engine.report(result.new_tokens, result.prefill_s + result.decode_s)
    report.update(run=name, **_rates(result, batches, prefills),
                  identical=[r.tokens for r in result.rows] == reference,
                  storage_read_bytes=None if before is None else after - before)
    return report


def _rates(result, batches, prefills: list[float]) -> dict:
    """New tokens per second over the whole generation (prefill included: it loads too), over
    decoding alone, and prompt tokens per second of the prefill: over every batch, and over
    the batches after the first (`warm`: the first fills an offloaded run's cache, as it does
    once in a server's life)."""
    decoded = any(len(row.tokens) > 1 for row in result.rows)  # a token fed back
    prompt_tokens = [sum(map(len, prompts)) for prompts in batches]
    warm = sum(prompt_tokens[1:]) / sum(prefills[1:]) if len(batches) > 1 else None
    return {"tokens_per_s": result.new_tokens / (result.prefill_s + result.decode_s),
            "decode_tokens_per_s": result.tokens_per_s if decoded else None,
            "prompt_tokens_per_s": sum(prompt_tokens) / result.prefill_s,
            "warm_prompt_tokens_per_s": warm,
            "prefill_s": result.prefill_s, "decode_s": result.decode_s}


def tokens_per_expert(calls) -> float:
    """Tokens per expert that got any, over the given MoE layer calls."""
    active = sum(sum(1 for n in counts if n) for _, counts in calls)
    return sum(sum(counts) for _, counts in calls) / active if active else 0.0


def a100_load_over_compute(tokens: float, expert_bytes: int, dtype: str) -> float:
    """An A100's time to copy one expert over PCIe 4.0 x16 over its time to compute it at
    `tokens` tokens, by the roofline: max(weights / HBM bandwidth, 2 x weights x tokens /
    FLOP/s)."""
    weights = expert_bytes / (4 if dtype == "fp32" else 2)
    compute = max(expert_bytes / (HBM_GB_S * 1e9),
                  2 * weights * tokens / (A100_TFLOP_S[dtype] * 1e12))
    return expert_bytes / (PCIE4_GB_S * 1e9) / compute


def _expert_compute_s(model, tokens: int) -> float:
    """The best of 5 times of one prepared expert of `model` at `tokens` tokens (its weights
    stay in the CPU's caches between the repeats: a lower bound on a cold expert's time)."""
    from cpmctl.models.moe import MoeFFN

    expert = next(m for m in model.modules() if isinstance(m, MoeFFN)).experts[0]
    x = torch.randn(tokens, model.cfg.d_model)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(6):
            started = time.perf_counter()
            expert(x)
            best = min(best, time.perf_counter() - started)
    return best


def bench_moe(settings: MoeBenchSettings, progress: Callable[[str], None]) -> dict:
    from cpmctl.infer.load import check_threads

    settings.check()
    if check_threads(settings.threads):
        torch.set_num_threads(settings.threads)
    scratch = None
    if settings.recipe is not None:
        base = Path(settings.workdir) if settings.workdir else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="cpmctl-bench-moe-", dir=base))
    try:
        path = Path(settings.model) if settings.model else _random_model(settings, scratch,
                                                                         progress)
        return _bench(path, settings, progress)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _resident_rates(model, batches, new_tokens: int) -> tuple[list, dict]:
    """(the greedy tokens, the rates) of the resident model."""
    result, prefills = _generate(model, batches, new_tokens)
    return [r.tokens for r in result.rows], _rates(result, batches, prefills)


def _faster(first: dict, again: dict) -> dict:
    """Each rate the better of two runs (other work on the machine slows either)."""
    keys = ("tokens_per_s", "decode_tokens_per_s", "prompt_tokens_per_s",
            "warm_prompt_tokens_per_s")
    best = {k: max(first[k] or 0.0, again[k] or 0.0) or None for k in keys}
    best["prefill_s"] = min(first["prefill_s"], again["prefill_s"])
    best["decode_s"] = min(first["decode_s"], again["decode_s"])
    return {**best, "both_runs": [{k: run[k] for k in keys} for run in (first, again)]}


def _ratios(runs: list[dict], rate: str, suffix: str) -> None:
    resident, on_demand = runs[0][rate], runs[1][rate]
    for run in runs:
        run["vs_resident" + suffix] = run[rate] / resident if run[rate] and resident else None
        run["vs_on_demand" + suffix] = run[rate] / on_demand if run[rate] and on_demand \
            else None


def _bench(path: Path, settings: MoeBenchSettings, progress) -> dict:
    from cpmctl.bench.generation import memory_bandwidth_gb_s
    from cpmctl.bench.moe_bound import decode_calls, load_bound
    from cpmctl.infer import prepare_for_inference
    from cpmctl.models.artifact import load_model
    from cpmctl.offload import OffloadSettings, load_offloaded

    model, cfg = load_model(path)
    if not cfg.moe.experts:
        raise CpmError(f"--model {path}: a dense model (model.moe.experts is 0); bench moe "
                       f"needs an MoE model")
    progress("resident")
    model = prepare_for_inference(model, dtype=settings.dtype)
    prompts = [_prompts(settings.batch, settings.prompt_tokens, cfg.vocab_size)]
    _generate(model, prompts, 1)  # NOTE: warm-up: the first call pays oneDNN's set-up
    reference, resident = _resident_rates(model, prompts, settings.new_tokens)
    read_gb_s = memory_bandwidth_gb_s()
    bandwidth = settings.bandwidth_gb_s or read_gb_s * PCIE4_GB_S / HBM_GB_S
    engine = load_offloaded(path, OffloadSettings(memory_budget=2**62, tier="disk"),
                            dtype=settings.dtype)  # a probe: the prepared expert's bytes
    expert_bytes, n_experts = engine.expert_bytes, len(engine.layer_names) * cfg.moe.experts
    transient, stored_bytes = engine.transient_bytes, engine.stored_expert_bytes // n_experts
    engine.close()
    resident_experts = max(settings.slots, round(settings.resident_fraction * n_experts))
    # the budget holds resident_experts prepared experts, plus one load's temporaries
    budget = resident_experts * expert_bytes + transient
    runs = [{"run": "resident", **resident, "identical": True}]
    trace: list = []
    progress("on-demand (synchronous, no cache)")
    sync = OffloadSettings(memory_budget=budget, slots=1, tier="host", overlap=False,
                           cache=False, simulate_bandwidth=bandwidth)
    runs.append(_offloaded_run(path, sync, prompts, settings.new_tokens, settings.dtype,
                               reference, "on-demand", trace))
    offload = OffloadSettings(memory_budget=budget, slots=settings.slots, tier="host",
                              simulate_bandwidth=bandwidth)
    variants = [(f"offloaded {order}", replace(offload, order=order))
                for order in ORDERS_COMPARED]
    best = replace(offload, order="heavy-first", policy="frequency")
    variants += [("offloaded heavy-first, frequency", best),
                 ("offloaded heavy-first, frequency, prefetch", replace(best, prefetch=True)),
                 ("offloaded heavy-first, pin", replace(offload, order="heavy-first",
                                                        policy="pin"))]
    for name, variant in variants:
        progress(name)
        runs.append(_offloaded_run(path, variant, prompts, settings.new_tokens, settings.dtype,
                                   reference, name))
    if settings.disk:
        disk = replace(offload, order="heavy-first", tier="disk", simulate_bandwidth=0.0)
        _drop_page_cache(path)
        progress("offloaded heavy-first from disk, cold page cache")
        runs.append(_offloaded_run(path, disk, prompts, settings.new_tokens, settings.dtype,
                                   reference, "disk heavy-first, cold cache"))
        progress("offloaded heavy-first from disk, warm page cache")
        runs.append(_offloaded_run(path, disk, prompts, settings.new_tokens, settings.dtype,
                                   reference, "disk heavy-first, warm cache"))
    progress("resident again (the machine's load changes: the faster run is the baseline)")
    runs[0].update(_faster(resident, _resident_rates(model, prompts, settings.new_tokens)[1]))
    _ratios(runs, "tokens_per_s", "")
    _ratios(runs, "decode_tokens_per_s", "_decode")
    bound = load_bound(trace, resident_experts, expert_bytes=stored_bytes,
                       bandwidth_bytes_s=bandwidth * 1e9,
                       resident_s=runs[0]["prefill_s"] + runs[0]["decode_s"],
                       resident_decode_s=runs[0]["decode_s"], experts=n_experts)
    decode_tokens = tokens_per_expert(decode_calls(trace))
    regimes = [{"regime": "decoding", "tokens_per_expert": decode_tokens,
                "a100_load_over_compute": a100_load_over_compute(
                    decode_tokens, stored_bytes, settings.dtype)}]
    prefill = None
    if settings.prefill_tokens:
        prefill, regime = _prefill_rows(path, model, cfg, settings, budget, stored_bytes,
                                        progress)
        regimes.append(regime)
    del model
    return {
        "model": str(settings.model or f"recipe {settings.recipe} (random weights)"),
        "arch": cfg.arch, "experts_per_layer": cfg.moe.experts, "moe_layers": n_experts
        // cfg.moe.experts, "expert_bytes": expert_bytes, "stored_expert_bytes": stored_bytes,
        "expert_memory_bytes": expert_bytes * n_experts,
        "resident_experts": resident_experts, "memory_budget_bytes": budget,
        "batch": settings.batch, "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens, "slots": settings.slots,
        "dtype": settings.dtype, "threads": torch.get_num_threads(),
        "read_bandwidth_gb_s": read_gb_s, "simulated_bandwidth_gb_s": bandwidth,
        "bandwidth_rule": "given" if settings.bandwidth_gb_s else
        f"read bandwidth x {PCIE4_GB_S:g} / {HBM_GB_S:g} (PCIe 4.0 x16 over A100 HBM2)",
        "simulated_load_over_read": read_gb_s / bandwidth,
        "regimes": regimes, "bound": bound, "prefill_tokens": settings.prefill_tokens,
        "prefill_batches": settings.prefill_batches,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs, "prefill_runs": prefill,
    }


def _prefill_rows(path: Path, model, cfg, settings: MoeBenchSettings, budget: int,
                  stored_bytes: int, progress) -> tuple[list[dict], dict]:
    """The prompt-heavy regime: `prefill_batches` batches of long prompts, one new token each,
    generated in turn by one engine (its cache kept between them, as a server's is); rates in
    prompt tokens/s.

    The simulated bandwidth (unless given) gives one expert's load on this machine the ratio to
    its compute that an A100 has over PCIe 4.0 x16 at the same tokens per expert (roofline,
    `a100_load_over_compute`): here a prompt-heavy expert is bound by arithmetic, not by reading
    its weights, so the decoding rule (read bandwidth x PCIe / HBM) would not be PCIe-like."""
    from cpmctl.offload import OffloadSettings

    batches = [_prompts(settings.batch, settings.prefill_tokens, cfg.vocab_size, seed)
               for seed in range(1234, 1234 + settings.prefill_batches)]
    nominal = settings.batch * settings.prefill_tokens * cfg.moe.top_k / cfg.moe.experts
    compute_s = _expert_compute_s(model, max(1, round(nominal)))
    a100 = a100_load_over_compute(nominal, stored_bytes, settings.dtype)
    bandwidth = settings.bandwidth_gb_s or stored_bytes / (a100 * compute_s) / 1e9
    progress(f"prefill: {settings.prefill_batches} batches of {settings.batch} x "
             f"{settings.prefill_tokens}-token prompts, resident")
    reference, first = _resident_rates(model, batches, 1)
    rows = [{"run": "prefill resident", **first, "identical": True}]
    trace: list = []
    progress("prefill: on-demand")
    sync = OffloadSettings(memory_budget=budget, slots=1, tier="host", overlap=False,
                           cache=False, simulate_bandwidth=bandwidth)
    rows.append(_offloaded_run(path, sync, batches, 1, settings.dtype, reference,
                               "prefill on-demand", trace))
    offload = OffloadSettings(memory_budget=budget, slots=settings.slots, tier="host",
                              simulate_bandwidth=bandwidth, order="heavy-first")
    pinned = replace(offload, policy="pin")
    for name, variant in (("prefill offloaded heavy-first", offload),
                          ("prefill offloaded heavy-first, pin", pinned),
                          ("prefill offloaded resident-first, pin, prefetch",
                           replace(pinned, order="resident-first", prefetch=True))):
        progress(name.replace("prefill ", "prefill: "))
        rows.append(_offloaded_run(path, variant, batches, 1, settings.dtype, reference, name))
    rows[0].update(_faster(first, _resident_rates(model, batches, 1)[1]))
    _ratios(rows, "prompt_tokens_per_s", "")
    _ratios(rows, "warm_prompt_tokens_per_s", "_warm")
    tokens = tokens_per_expert(trace)
    regime = {"regime": f"prefill of {settings.prefill_tokens}-token prompts",
              "tokens_per_expert": tokens,
              "a100_load_over_compute": a100_load_over_compute(tokens, stored_bytes,
                                                               settings.dtype),
              "expert_compute_s": compute_s, "simulated_bandwidth_gb_s": bandwidth,
              "bandwidth_rule": "given" if settings.bandwidth_gb_s else
              f"load / compute of an A100 over PCIe 4.0 x16 at {nominal:.0f} tokens per expert",
              "simulated_load_over_compute": stored_bytes / (bandwidth * 1e9) / compute_s}
    return rows, regime
