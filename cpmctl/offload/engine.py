"""A model whose dense part is resident and whose MoE experts live in the expert store.

    offloaded = load_offloaded("work/moe", OffloadSettings(memory_budget=2 * 2**30, slots=3,
                                                          order="heavy-first"))
    generate_tokens(offloaded.model, ...)          # as any model; experts load as needed
    offloaded.report(generated_tokens, seconds)    # hit rates, bytes moved, stalls, peak

Setting up: the model is built on the meta device, every tensor's name, shape and dtype is
checked against the weights' headers, and only the dense tensors are read. Each `MoeFFN`
keeps its norm, router and residual; its `run_experts` step is replaced, on the instance, by
the layer scheduler (schedule.py), and its experts are dropped from it. One expert is loaded
as a probe, to measure the bytes a prepared expert takes (and its load's temporaries); the
budget must hold two of them (the pipeline's minimum), and then holds `capacity` of them.
With `prefetch`, a forward pre-hook keeps each MoE layer's input for the scheduler's
prediction of the next layer's experts (`_predictor`).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cpmctl.artifacts import open_artifact
from cpmctl.errors import CpmError
from cpmctl.infer.load import DTYPES, prepare_for_inference, resolve_device
from cpmctl.models.artifact import (
    MODEL_JSON,
    build_on_meta,
    check_config_fits,
    fill_model,
    read_model_json,
)
from cpmctl.models.moe import MoeFFN
from cpmctl.models.weights import open_weights
from cpmctl.offload.costs import CostModel, measure_cost_model
from cpmctl.offload.schedule import ORDERS, LayerScheduler
from cpmctl.offload.store import (
    POLICIES,
    ExpertStore,
    Key,
    Loaded,
    module_tensors,
    storage_ids,
    tensor_bytes,
)
from cpmctl.resources import human_bytes

TIERS = ("disk", "host")
_EXPERT_PART = ".experts."


@dataclass(frozen=True)
class OffloadSettings:
    memory_budget: int = 2 * 2**30
    """Bytes of prepared experts kept resident (slots + LRU cache)."""
    slots: int = 2
    """Experts pinned at once in a layer's pipeline: the one computing + the next loading."""
    order: str = "index"
    """index, heavy-first or resident-first (schedule.py)."""
    tier: str = ""
    """Where experts live off the slots: disk (read from the files on each load) or host
    (read into host RAM once, pinned on CUDA). Empty: disk on CPU, host on CUDA."""
    simulate_bandwidth: float = 0.0
    """GB/s: stretch every load to its bytes over this bandwidth (a simulation; 0: off)."""
    overlap: bool = True
    """False: load synchronously when needed (the on-demand baseline of the benchmark)."""
    cache: bool = True
    """False: free an expert right after its compute (no LRU across steps)."""
    cpu_compute: bool = False
    """CUDA only: compute a cold expert on the CPU when the cost model says it is faster."""
    policy: str = "lru"
    """Which cached expert is evicted: lru (per-layer share), frequency or pin (store.py)."""
    prefetch: bool = False
    """Load the experts the next layer's router picks for this layer's input (schedule.py)."""

    def check(self, device: torch.device) -> None:
        if self.order not in ORDERS:
            raise CpmError(f"--order: expected one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.policy not in POLICIES:
            raise CpmError(f"--cache-policy: expected one of {', '.join(POLICIES)}, got "
                           f"{self.policy!r}")
        if self.prefetch and not (self.overlap and self.cache):
            raise CpmError("prefetching needs the overlapped, cached pipeline")
        if self.tier and self.tier not in TIERS:
            raise CpmError(f"--offload-from: expected disk or host, got {self.tier!r}")
        minimum = 2 if self.overlap else 1
        if self.slots < minimum:
            raise CpmError(f"--slots must be at least {minimum} (one expert computing while "
                           f"the next loads), got {self.slots}")
        if self.memory_budget <= 0:
            raise CpmError(f"--memory-budget must be positive, got {self.memory_budget}")
        if not self.simulate_bandwidth >= 0 or self.simulate_bandwidth == float("inf"):
            raise CpmError(f"--simulate-bandwidth must be a positive number of GB/s (0: off), "
                           f"got {self.simulate_bandwidth}")
        if self.cpu_compute and device.type != "cuda":
            raise CpmError("--cpu-compute chooses between the CPU and copying to the GPU: it "
                           "needs --device cuda")


@dataclass
class OffloadedModel:
    model: nn.Module
    store: ExpertStore
    settings: OffloadSettings
    layer_names: list[str]
    expert_bytes: int  # one prepared expert, measured
    transient_bytes: int  # a load's temporaries beside it, measured
    stored_expert_bytes: int  # all experts as stored in the files
    tier: str
    cost_model: CostModel | None = None
    scheduler: LayerScheduler | None = None
    _closers: list = field(default_factory=list)

    def report(self, generated_tokens: int = 0, decode_s: float = 0.0) -> dict:
        stats = self.store.stats
        layers = []
        for index, name in enumerate(self.layer_names):
            layer = stats.layer(index)
            layers.append({"layer": name, "hits": layer.hits, "prefetched": layer.prefetched,
                           "misses": layer.misses, "cpu_computed": layer.cpu_computed,
                           "hit_rate": round(layer.hit_rate, 4)})
        hits = sum(x["hits"] + x["prefetched"] for x in layers)
        used = hits + sum(x["misses"] for x in layers)
        prefetch = None
        if self.settings.prefetch and self.scheduler is not None:
            prefetch = {**self.scheduler.accuracy.to_dict(), "loads": stats.prefetch_loads,
                        "wasted": stats.prefetch_wasted}
        return {
            "tier": self.tier, "order": self.settings.order, "slots": self.settings.slots,
            "cache_policy": self.settings.policy, "prefetch": prefetch,
            "memory_budget_bytes": self.settings.memory_budget,
            "capacity_experts": self.store.capacity, "expert_bytes": self.expert_bytes,
            "load_transient_bytes": self.transient_bytes,
            "stored_expert_bytes": self.stored_expert_bytes,
            "simulated_bandwidth_gb_s": self.settings.simulate_bandwidth or None,
            "tokens": generated_tokens,
            "tokens_per_s": generated_tokens / decode_s if decode_s > 0 else None,
            "hit_rate": hits / used if used else 0.0,
            "loads": stats.loads, "bytes_moved": stats.bytes_moved,
            "bytes_moved_per_token": stats.bytes_moved / generated_tokens
            if generated_tokens else None,
            "load_s": stats.load_s, "stall_s": stats.stall_s,
            "peak_resident_expert_bytes": stats.peak_resident_bytes,
            "cost_model": self.cost_model.to_dict() if self.cost_model else None,
            "layers": layers,
        }

    def close(self) -> None:
        self.store.close()
        for close in self._closers:
            close()


def _is_expert(name: str) -> bool:
    return _EXPERT_PART in name


def load_offloaded(path: str | Path, settings: OffloadSettings, *, dtype: str = "fp32",
                   quantize: str | None = None, device: str = "cpu") -> OffloadedModel:
    """The MoE model at `path`, ready to generate with its experts offloaded."""
    target = resolve_device(device)
    settings.check(target)
    artifact = open_artifact(path, expect=("model", "checkpoint"), option="--model")
    cfg, tied = read_model_json(artifact.path)
    if cfg.moe.experts == 0:
        raise CpmError(f"--offload: {artifact.path} is a dense model (model.moe.experts is 0); "
                       f"offloading moves MoE experts, run it without --offload")
    tier = settings.tier or ("host" if target.type == "cuda" else "disk")
    weights = open_weights(artifact.path)
    try:
        check_config_fits(cfg, len(weights.entries) + len(tied), weights.total_numel,
                          artifact.path / MODEL_JSON, weights.where)
        model = build_on_meta(cfg)
        fill_model(weights, model, tied, skip=_is_expert)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoeFFN)]
        names: dict[Key, dict[str, str]] = {}
        for index, (name, moe) in enumerate(layers):
            for e, expert in enumerate(moe.experts):
                prefix = f"{name}.experts.{e}."
                names[(index, e)] = {n: prefix + n for n, _ in expert.named_parameters()}
        template = copy.deepcopy(layers[0][1].experts[0])
        for _, moe in layers:
            moe.experts = nn.ModuleList()
        model = prepare_for_inference(model, dtype=dtype, quantize=quantize, device=device)
        stored = sum(weights.entries[n].nbytes for parts in names.values()
                     for n in parts.values())

        def label(key: Key) -> str:
            return f"{layers[key[0]][0]} expert {key[1]}"

        host: dict[Key, dict[str, torch.Tensor]] = {}
        if tier == "host":
            for key, parts in names.items():
                host[key] = {n: _pin(weights.read(full, what=label(key)), target)
                             for n, full in parts.items()}

        def fetch(key: Key) -> dict[str, torch.Tensor]:
            if tier == "host":
                return host[key]
            return {n: weights.read(full, what=label(key)) for n, full in names[key].items()}

        def load(key: Key) -> Loaded:
            raw = fetch(key)
            module = copy.deepcopy(template)
            made = []
            for name, tensor in raw.items():
                # a copy into the slot from host memory; on the CPU from disk, the read is it
                value = tensor.to(torch.float32, copy=tier == "host" and target.type == "cpu")
                made.append(value)
                owner, _, attr = name.rpartition(".")
                module.get_submodule(owner)._parameters[attr] = nn.Parameter(
                    value, requires_grad=False)
            module = prepare_for_inference(module, dtype=dtype, quantize=quantize,
                                           device=device)
            held = module_tensors(module)
            kept = storage_ids(held)
            temporaries = {}
            for t in made + (list(raw.values()) if tier == "disk" else []):
                if t.device == target and t.untyped_storage().data_ptr() not in kept:
                    temporaries[t.untyped_storage().data_ptr()] = tensor_bytes(t)
            return Loaded(module, sum(tensor_bytes(t) for t in held),
                          sum(temporaries.values()),
                          sum(t.numel() * t.element_size() for t in raw.values()))

        probe = max(names, key=lambda k: sum(weights.entries[n].nbytes
                                             for n in names[k].values()))
        with torch.inference_mode():
            measured = load(probe)
        expert_bytes, transient = measured.nbytes, measured.transient
        del measured
        capacity = (settings.memory_budget - transient) // expert_bytes
        minimum = 2 * expert_bytes + transient
        if settings.overlap and capacity < 2:
            raise CpmError(f"--memory-budget {human_bytes(settings.memory_budget)} is below two "
                           f"expert slots: {artifact.path} needs at least "
                           f"{human_bytes(minimum)} (one expert is "
                           f"{human_bytes(expert_bytes)} prepared"
                           + (f", plus {human_bytes(transient)} while one loads)"
                              if transient else ")"))
        if settings.slots > max(capacity, 1):
            raise CpmError(f"--slots {settings.slots}: --memory-budget "
                           f"{human_bytes(settings.memory_budget)} holds {capacity} expert(s) "
                           f"of {human_bytes(expert_bytes)}; lower --slots or raise the budget")
        if not settings.cache:
            capacity = settings.slots
        capacity = min(capacity, len(names))
        store = ExpertStore(load, capacity=capacity, overlap=settings.overlap,
                            cache=settings.cache, device=target,
                            simulate_bandwidth=settings.simulate_bandwidth * 1e9 or None,
                            policy=settings.policy, slots=settings.slots,
                            layers=len(layers),
                            reserve=settings.slots if settings.prefetch else 0)
        cost_model = cpu_expert = None
        if settings.cpu_compute:
            cpu_dtype = DTYPES[dtype] if dtype in DTYPES else torch.float32

            def cpu_function(key: Key):
                module = copy.deepcopy(template)
                for name, tensor in host[key].items():
                    owner, _, attr = name.rpartition(".")
                    module.get_submodule(owner)._parameters[attr] = nn.Parameter(
                        tensor.to(cpu_dtype), requires_grad=False)
                return module

            cost_model = measure_cost_model(
                list(host[probe].values()), target,
                lambda x: cpu_function(probe)(x), cfg.d_model, cpu_dtype)

            def cpu_expert(key: Key, tokens: int):
                if not cost_model.cpu_is_cheaper(tokens):
                    return None
                return lambda x: cpu_function(key)(x.to(cpu_dtype))
        scheduler = LayerScheduler(store, {i: m.n_experts for i, (_, m) in enumerate(layers)},
                                   slots=settings.slots, order=settings.order,
                                   cpu_expert=cpu_expert,
                                   predict=_predictor(layers) if settings.prefetch else None,
                                   wrap=stack_wraps([name for name, _ in layers]))
        for index, (_, moe) in enumerate(layers):
            moe.run_experts = functools.partial(scheduler.run, index)
    except BaseException:
        weights.close()
        raise
    return OffloadedModel(model, store, settings, [name for name, _ in layers], expert_bytes,
                          transient, stored, tier, cost_model, scheduler, [weights.close])


def next_moe_layers(names: list[str]) -> dict[int, int]:
    """MoE layer -> the MoE layer that runs next on the same hidden states: the next block of
    the same stack (`decoder.blocks.0.moe` -> `decoder.blocks.1.moe`); an encoder's last
    layer has none (the decoder runs on other tokens), nor has a stack's last."""
    where = {name: index for index, name in enumerate(names)}
    following = {}
    for index, name in enumerate(names):
        block, _, tail = name.rpartition(".")
        stack, _, number = block.rpartition(".")
        if number.isdigit():
            nxt = where.get(f"{stack}.{int(number) + 1}.{tail}")
            if nxt is not None:
                following[index] = nxt
    return following


def stack_wraps(names: list[str]) -> dict[int, int]:
    """Each stack's last MoE layer -> the MoE layer that runs after it: the first of the last
    stack (a GPT's blocks, an encoder-decoder's decoder), which runs after the encoder once
    and after its own last layer at every decoding step and every new batch."""
    stacks: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        stacks.setdefault(name.rpartition(".")[0].rpartition(".")[0], []).append(index)
    first = list(stacks.values())[-1][0] if stacks else 0
    return {indices[-1]: first for indices in stacks.values()}


def _predictor(layers: list[tuple[str, MoeFFN]]):
    """The scheduler's `predict`: each MoE layer's input is kept (a forward pre-hook) and the
    next layer's norm and router are applied to it: [d] per token -> the experts' counts."""
    following = next_moe_layers([name for name, _ in layers])
    inputs: dict[int, torch.Tensor] = {}
    for index, (_, moe) in enumerate(layers):
        if index in following:
            moe.register_forward_pre_hook(
                lambda module, args, index=index: inputs.__setitem__(index, args[0]))

    def predict(layer: int) -> tuple[int, list[int]] | None:
        x = inputs.pop(layer, None)
        if x is None:
            return None
        nxt = layers[following[layer]][1]
        scores = nxt.affinity(nxt.norm(x.reshape(-1, x.shape[-1])))
        chosen = scores.topk(nxt.top_k, dim=-1).indices.reshape(-1)
        return following[layer], torch.bincount(chosen, minlength=nxt.n_experts).tolist()

    return predict


def _pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host copies are pinned where they are copied to a GPU (a DMA that overlaps compute)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def load_offloaded_for_inference(path: str | Path, settings: OffloadSettings, *,
                                 dtype: str = "fp32", quantize: str | None = None,
                                 device: str = "cpu"):
    """(offloaded model, its tokenizer): what `cpmctl generate --offload` runs."""
    from cpmctl.infer.load import model_tokenizer

    offloaded = load_offloaded(path, settings, dtype=dtype, quantize=quantize, device=device)
    return offloaded, model_tokenizer(path, offloaded.model.cfg.vocab_size)


def summary_line(report: dict) -> str:
    """The offload metrics of a run, on one line (stderr)."""
    rate = report["tokens_per_s"]
    per_token = report["bytes_moved_per_token"]
    return (f"offload ({report['tier']}, {report['order']}, {report['slots']} slots, "
            f"{report['capacity_experts']} experts resident at most): "
            + (f"{rate:.2f} tokens/s, " if rate else "")
            + f"hit rate {100 * report['hit_rate']:.1f}%, {report['loads']} loads, "
            + (f"{human_bytes(per_token)} moved per token, " if per_token else "")
            + (f"prefetch recall {100 * report['prefetch']['recall']:.1f}% (precision "
               f"{100 * report['prefetch']['precision']:.1f}%), " if report.get("prefetch")
               else "")
            + f"stalled {report['stall_s']:.2f} s, peak resident experts "
            f"{human_bytes(report['peak_resident_expert_bytes'])} of "
            f"{human_bytes(report['memory_budget_bytes'])}")
