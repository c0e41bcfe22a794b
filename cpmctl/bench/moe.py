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
   resident-first).
4. offloaded from the model's files for real (no throttle): once after dropping the files'
   pages from the page cache (posix_fadvise DONTNEED), once again with the cache warm; the
   bytes the process read from storage (/proc/self/io read_bytes) say what the cache served.

The simulated bandwidth (unless given) keeps a PCIe-4-to-accelerator ratio on this machine:
an expert's compute while decoding is bound by the speed its weights are read at (HBM on a
GPU, DRAM here), and a load by the bus, so the load is given this machine's measured read
bandwidth times PCIe 4.0 x16 (~25 GB/s in practice) over an A100's HBM2 (1,555 GB/s).
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

    def check(self) -> None:
        if (self.model is None) == (self.recipe is None):
            raise CpmError("bench moe: give one of --model or --recipe")
        for key in ("batch", "prompt_tokens", "new_tokens"):
            if getattr(self, key) < 1:
                raise CpmError(f"--{key.replace('_', '-')} must be at least 1")
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


def _prompts(settings: MoeBenchSettings, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    return rng.integers(10, vocab, size=(settings.batch, settings.prompt_tokens)).tolist()


def _generate(model, prompts, new_tokens: int):
    from cpmctl.infer import GenerationSettings, SamplingSettings, generate_tokens

    settings = GenerationSettings(max_new_tokens=new_tokens,
                                  sampling=SamplingSettings(temperature=0.0))
    return generate_tokens(model, prompts, settings, eod_id=None, pad_id=0)


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


def _offloaded_run(path: Path, offload, prompts, settings: MoeBenchSettings, reference,
                   name: str) -> dict:
    from cpmctl.offload import load_offloaded

    engine = load_offloaded(path, offload, dtype=settings.dtype)
    before = _read_bytes()
    try:
        result = _generate(engine.model, prompts, settings.new_tokens)
    finally:
        engine.close()
    after = _read_bytes()
    report = engine.report(result.new_tokens, result.prefill_s + result.decode_s)
    report.update(run=name, tokens_per_s=_rate(result),
                  identical=[r.tokens for r in result.rows] == reference,
                  storage_read_bytes=None if before is None else after - before)
    return report


def _rate(result) -> float:
    """New tokens per second over the whole generation (prefill included: it loads too)."""
    return result.new_tokens / (result.prefill_s + result.decode_s)


def bench_moe(settings: MoeBenchSettings, progress: Callable[[str], None]) -> dict:
    from cpmctl.bench.generation import memory_bandwidth_gb_s
    from cpmctl.infer import prepare_for_inference
    from cpmctl.models.artifact import load_model
    from cpmctl.offload import OffloadSettings, load_offloaded

    settings.check()
    scratch = None
    if settings.recipe is not None:
        base = Path(settings.workdir) if settings.workdir else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="cpmctl-bench-moe-", dir=base))
    try:
        path = Path(settings.model) if settings.model else _random_model(settings, scratch,
                                                                         progress)
        model, cfg = load_model(path)
        if not cfg.moe.experts:
            raise CpmError(f"--model {path}: a dense model (model.moe.experts is 0); bench moe "
                           f"needs an MoE model")
        progress("resident")
        model = prepare_for_inference(model, dtype=settings.dtype)
        prompts = _prompts(settings, cfg.vocab_size)
        _generate(model, prompts, 1)  # NOTE: warm-up: the first call pays oneDNN's set-up
        resident = _generate(model, prompts, settings.new_tokens)
        reference = [r.tokens for r in resident.rows]
        read_gb_s = memory_bandwidth_gb_s()
        bandwidth = settings.bandwidth_gb_s or read_gb_s * PCIE4_GB_S / HBM_GB_S
        engine = load_offloaded(path, OffloadSettings(memory_budget=2**62, tier="disk"),
                                dtype=settings.dtype)  # a probe: the prepared expert's bytes
        expert_bytes, n_experts = engine.expert_bytes, len(engine.layer_names) * cfg.moe.experts
        transient = engine.transient_bytes
        engine.close()
        resident_experts = max(settings.slots, round(settings.resident_fraction * n_experts))
        # the budget holds resident_experts prepared experts, plus one load's temporaries
        budget = resident_experts * expert_bytes + transient
        runs = [{"run": "resident", "tokens_per_s": _rate(resident), "identical": True}]
        progress("on-demand (synchronous, no cache)")
        sync = OffloadSettings(memory_budget=budget, slots=1, tier="host", overlap=False,
                               cache=False, simulate_bandwidth=bandwidth)
        runs.append(_offloaded_run(path, sync, prompts, settings, reference, "on-demand"))
        offload = OffloadSettings(memory_budget=budget, slots=settings.slots, tier="host",
                                  simulate_bandwidth=bandwidth)
        for order in ORDERS_COMPARED:
            progress(f"offloaded {order}")
            runs.append(_offloaded_run(path, replace(offload, order=order), prompts, settings,
                                       reference, f"offloaded {order}"))
        if settings.disk:
            disk = replace(offload, order="heavy-first", tier="disk", simulate_bandwidth=0.0)
            _drop_page_cache(path)
            progress("offloaded heavy-first from disk, cold page cache")
            runs.append(_offloaded_run(path, disk, prompts, settings, reference,
                                       "disk heavy-first, cold cache"))
            progress("offloaded heavy-first from disk, warm page cache")
            runs.append(_offloaded_run(path, disk, prompts, settings, reference,
                                       "disk heavy-first, warm cache"))
        progress("resident again (the machine's load changes: the faster run is the baseline)")
        again = _rate(_generate(model, prompts, settings.new_tokens))
        del model
        runs[0].update(tokens_per_s=max(runs[0]["tokens_per_s"], again),
                       both_runs_tokens_per_s=[runs[0]["tokens_per_s"], again])
        resident_rate, sync_rate = runs[0]["tokens_per_s"], runs[1]["tokens_per_s"]
        for run in runs:
            run["vs_resident"] = run["tokens_per_s"] / resident_rate
            run["vs_on_demand"] = run["tokens_per_s"] / sync_rate
        return {
            "model": str(settings.model or f"recipe {settings.recipe} (random weights)"),
            "arch": cfg.arch, "experts_per_layer": cfg.moe.experts, "moe_layers": n_experts
            // cfg.moe.experts, "expert_bytes": expert_bytes,
            "expert_memory_bytes": expert_bytes * n_experts,
            "resident_experts": resident_experts, "memory_budget_bytes": budget,
            "batch": settings.batch, "prompt_tokens": settings.prompt_tokens,
            "new_tokens": settings.new_tokens, "slots": settings.slots,
            "dtype": settings.dtype, "threads": torch.get_num_threads(),
            "read_bandwidth_gb_s": read_gb_s, "simulated_bandwidth_gb_s": bandwidth,
            "bandwidth_rule": "given" if settings.bandwidth_gb_s else
            f"read bandwidth x {PCIE4_GB_S:g} / {HBM_GB_S:g} (PCIe 4.0 x16 over A100 HBM2)",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": runs,
        }
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
