"""The expert store: where each MoE expert lives, and the slots it is computed in.

Tiers, coldest first:
- the model's files (`disk`): one expert's tensors read alone with pread (weights.py), which
  releases the GIL; the OS page cache may serve a read that was made before;
- host memory (`host`): every expert's stored tensors read once at start (pinned on CUDA, so
  a copy to the GPU is a DMA that overlaps compute);
- slots: experts prepared for compute (the model's dtype, int8, oneDNN-packed, on the
  device), at most `capacity` of them, within the memory budget; on a CPU-only machine the
  slots are the resident-RAM budget. An LRU keeps them across layers and decoding steps.

A load is: fetch the stored tensors from the expert's tier, then prepare them into a slot
(`Preparer`) — on CUDA, on a copy stream whose event the compute stream waits for. Loads run
on one loader thread, so the next expert's load overlaps the current expert's compute; with
`overlap=False` they run synchronously when the expert is needed (the on-demand baseline).
`simulate_bandwidth` stretches every load to nbytes / bandwidth (sleeping the remainder): a
simulation of a slower bus (PCIe) on a machine where a load is a memory copy, never a default.

Resident bytes are measured on the live tensors of the prepared experts (their storages; a
oneDNN-packed weight, which has none, at its logical size), plus the temporaries of the load
in flight, and their peak is reported.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

Key = tuple[int, int]  # (MoE layer, expert)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: its storage's size, or for an opaque (oneDNN) tensor, which has
    no storage, its logical size."""
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module holds: parameters, buffers and tensors kept as plain attributes
    (PackedLinear's packed weight), each once."""
    found: dict[int, torch.Tensor] = {}
    for m in module.modules():
        values = [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]
        for value in values:
            if isinstance(value, torch.Tensor):
                found[id(value)] = value
    return list(found.values())


def storage_ids(tensors) -> set[int]:
    ids = set()
    for t in tensors:
        try:
            ids.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
    return ids


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    cpu_computed: int = 0

    @property
    def hit_rate(self) -> float:
        used = self.hits + self.misses
        return self.hits / used if used else 0.0


@dataclass
class StoreStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    loads: int = 0
    bytes_moved: int = 0
    load_s: float = 0.0  # time spent loading (on the loader thread, or inline)
    stall_s: float = 0.0  # time the compute waited for a load
    peak_resident_bytes: int = 0

    def layer(self, index: int) -> LayerStats:
        return self.layers.setdefault(index, LayerStats())


@dataclass
class Entry:
    key: Key
    future: Future | None = None
    module: nn.Module | None = None
    nbytes: int = 0
    pins: int = 0
    event: object = None  # a CUDA event the compute stream waits for


@dataclass(frozen=True)
class Loaded:
    module: nn.Module
    nbytes: int  # of the prepared expert (measured)
    transient: int  # of the load's temporaries alive at its end (measured)
    moved: int  # bytes fetched from the tier


class ExpertStore:
    """Experts by (layer, expert): `request` a load, `wait` for the prepared module, `release`
    it after its compute (it stays cached until evicted, least recently used first)."""

    def __init__(self, load: Callable[[Key], Loaded], *, capacity: int, overlap: bool = True,
                 cache: bool = True, device: torch.device | None = None,
                 simulate_bandwidth: float | None = None):
        self._load = load
        self.capacity = capacity
        self.overlap = overlap
        self.cache = cache
        self.device = device or torch.device("cpu")
        self.bandwidth = simulate_bandwidth  # bytes per second
        self.stats = StoreStats()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._wanted: set[Key] = set()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="cpmctl-expert-loader") \
            if overlap else None
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._compute_stream = torch.cuda.current_stream(self.device) if cuda else None

    def is_resident(self, key: Key) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.module is not None

    def request(self, key: Key) -> Entry:
        """Pin `key` and start its load if it is not resident (or loading)."""
        with self._lock:
            stats = self.stats.layer(key[0])
            entry = self._entries.get(key)
            if entry is not None:
                stats.hits += 1
                self._entries.move_to_end(key)
                entry.pins += 1
                return entry
            stats.misses += 1
            self._make_room()
            entry = self._entries[key] = Entry(key, pins=1)
        if self._loader is not None:
            entry.future = self._loader.submit(self._timed_load, entry)
        else:  # synchronous: the compute waits for the whole load
            entry.future = Future()
            started = time.perf_counter()
            try:
                entry.future.set_result(self._timed_load(entry))
            except BaseException as exc:  # surfaced by wait(), as from the thread
                entry.future.set_exception(exc)
            self.stats.stall_s += time.perf_counter() - started
        return entry

    def wait(self, entry: Entry) -> nn.Module:
        """The prepared module of a requested expert, once its load is done."""
        if entry.module is None:
            started = time.perf_counter()
            try:
                entry.future.result()
            except BaseException:
                with self._lock:
                    self._entries.pop(entry.key, None)
                raise
            self.stats.stall_s += time.perf_counter() - started
        if entry.event is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.event)
        return entry.module

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if not self.cache and entry.pins == 0:
                self._entries.pop(entry.key, None)

    def begin_layer(self, layer: int, experts) -> None:
        """The experts the layer about to run will use: evicted last while it runs."""
        with self._lock:
            self._wanted = {(layer, e) for e in experts}

    def _make_room(self) -> None:
        """Evict unpinned experts until one more fits (lock held). The victim: one the running
        layer does not want if there is one, from the layer holding the most slots, least
        recently used there.

        NOTE: layers run in a cycle, so a plain global LRU evicts exactly the experts the next
        step needs (measured: hit rate 0 at 25% resident, 8 layers x 16 experts); keeping each
        layer's share even makes it a per-layer LRU, as mixtral-offloading keeps."""
        while len(self._entries) >= self.capacity:
            free = [k for k, e in self._entries.items() if e.pins == 0]
            if not free:  # cannot happen while slots <= capacity (engine.py checks)
                raise RuntimeError("expert store: every slot is pinned")
            unwanted = [k for k in free if k not in self._wanted] or free
            held: dict[int, int] = {}
            for layer, _ in self._entries:
                held[layer] = held.get(layer, 0) + 1
            most = max(held[layer] for layer, _ in unwanted)
            victim = next(k for k in unwanted if held[k[0]] == most)  # LRU first
            del self._entries[victim]

    def _timed_load(self, entry: Entry) -> None:
        started = time.perf_counter()
        with torch.inference_mode():
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    loaded = self._load(entry.key)
                    entry.event = torch.cuda.Event()
                    entry.event.record(self._copy_stream)
                # NOTE: made on the copy stream, read on the compute stream: without this the
                # allocator could hand an evicted expert's memory to the next load while the
                # compute stream still reads it
                for tensor in module_tensors(loaded.module):
                    if tensor.is_cuda:
                        tensor.record_stream(self._compute_stream)
            else:
                loaded = self._load(entry.key)
        if self.bandwidth:
            floor = loaded.moved / self.bandwidth
            left = floor - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)
        with self._lock:
            entry.module, entry.nbytes = loaded.module, loaded.nbytes
            resident = sum(e.nbytes for e in self._entries.values() if e.module is not None)
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes,
                                                 resident + loaded.transient)
            self.stats.loads += 1
            self.stats.bytes_moved += loaded.moved
            self.stats.load_s += time.perf_counter() - started

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        with self._lock:
            self._entries.clear()
