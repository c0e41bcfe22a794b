"""The expert store: where each MoE expert lives, and the slots it is computed in.

Tiers, coldest first:
- the model's files (`disk`): one expert's tensors read alone with pread (weights.py), which
  releases the GIL; the OS page cache may serve a read that was made before;
- host memory (`host`): every expert's stored tensors read once at start (pinned on CUDA, so
  a copy to the GPU is a DMA that overlaps compute);
- slots: experts prepared for compute (the model's dtype, int8, oneDNN-packed, on the
  device), at most `capacity` of them, within the memory budget; on a CPU-only machine the
  slots are the resident-RAM budget. They are kept across layers and decoding steps, and
  evicted by a policy: `lru` (least recently used, an even share per layer), `frequency`
  (the lowest share of its layer's tokens so far: the experts the router prefers stay) or
  `pin` (each layer keeps the first experts it loads for good, an even share of the slots
  the pipeline does not need; the other slots rotate, least recently used first). A long
  prompt's prefill touches every expert of every layer once a pass: a cycle in which LRU and
  frequency evict exactly what comes next, and pinned experts hit on every later pass.

A load is: fetch the stored tensors from the expert's tier, then prepare them into a slot
(`Preparer`) — on CUDA, on a copy stream whose event the compute stream waits for. Loads run
on one loader thread, so the next expert's load overlaps the current expert's compute; with
`overlap=False` they run synchronously when the expert is needed (the on-demand baseline).
`simulate_bandwidth` stretches every load to nbytes / bandwidth (sleeping the remainder): a
simulation of a slower bus (PCIe) on a machine where a load is a memory copy, never a default.

Resident bytes are measured on the live tensors of the prepared experts (their storages; a
oneDNN-packed weight, which has none, at its logical size), plus the temporaries of the load
in flight, and their peak is reported.

A prefetch (`prefetch`) starts the load of an expert that a prediction says the next layer will
use, without pinning it: it never takes the room the running pipeline needs (while a layer
runs, at most `capacity - slots` prefetches are in flight, less the experts `pin` keeps; between
layers the pipeline needs none; `pin` with prefetches keeps `reserve` more slots rotating for
them), never evicts what the running layer still wants or the prediction wants, never a kept
expert, and an expert still loading is never evicted. A load the running layer asks for
evicts, if it can, neither.
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


POLICIES = ("lru", "frequency", "pin")


@dataclass
class LayerStats:
    hits: int = 0  # resident (or loading) from an earlier use
    prefetched: int = 0  # resident (or loading) because a prefetch predicted it
    misses: int = 0  # loaded on demand
    cpu_computed: int = 0

    @property
    def hit_rate(self) -> float:
        """Uses that did not wait for a load of their own: hits and prefetched ones."""
        used = self.hits + self.prefetched + self.misses
        return (self.hits + self.prefetched) / used if used else 0.0


@dataclass
class StoreStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    loads: int = 0
    bytes_moved: int = 0
    load_s: float = 0.0  # time spent loading (on the loader thread, or inline)
    stall_s: float = 0.0  # time the compute waited for a load
    peak_resident_bytes: int = 0
    prefetch_loads: int = 0  # loads a prefetch started
    prefetch_wasted: int = 0  # of those, evicted (or left at the end) without being used

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
    unused_prefetch: bool = False  # loaded by a prefetch, not used yet
    kept: bool = False  # `pin`: evicted only when nothing else can go
    seq: int = 0  # the order loads were started in (the loader runs them in this order)

    @property
    def evictable(self) -> bool:
        return self.pins == 0 and self.module is not None


@dataclass(frozen=True)
class Loaded:
    module: nn.Module
    nbytes: int  # of the prepared expert (measured)
    transient: int  # of the load's temporaries alive at its end (measured)
    moved: int  # bytes fetched from the tier


class ExpertStore:
    """Experts by (layer, expert): `request` a load, `wait` for the prepared module, `release`
    it after its compute (it stays cached until the policy evicts it); `prefetch` predicted
    ones."""

    def __init__(self, load: Callable[[Key], Loaded], *, capacity: int, overlap: bool = True,
                 cache: bool = True, device: torch.device | None = None,
                 simulate_bandwidth: float | None = None, policy: str = "lru",
                 slots: int = 2, layers: int = 1, reserve: int = 0):
        self._load = load
        self.capacity = capacity
        self.policy = policy
        self.slots = slots  # the most a layer's pipeline pins at once
        self.layers = layers  # MoE layers (`pin` shares its kept experts among them)
        self.reserve = reserve  # `pin`: slots kept for prefetches beside the pipeline's
        self._frequency: dict[Key, float] = {}  # see begin_layer
        self.overlap = overlap
        self.cache = cache
        self.device = device or torch.device("cpu")
        self.bandwidth = simulate_bandwidth  # bytes per second
        self.stats = StoreStats()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._wanted: set[Key] = set()
        self._predicted: set[Key] = set()
        self._running = False  # between begin_layer and end_layer
        self._started = 0  # entries made so far (their seq)
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

    def holds(self, key: Key) -> bool:
        """Resident or loading."""
        with self._lock:
            return key in self._entries

    def has_room(self) -> bool:
        """Whether one more expert can be loaded without evicting one that the running layer
        still wants, that a prediction wants, or that `pin` keeps."""
        with self._lock:
            if len(self._entries) < self.capacity:
                return True
            return bool(self._evictable(self._wanted | self._predicted, strict=True)[1])

    def readiness(self, key: Key) -> tuple[int, int]:
        """A sort key, soonest ready first: resident, then loading (in the order the loader
        takes them), then neither."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return (2, 0)
            return (0, 0) if entry.module is not None else (1, entry.seq)

    def request(self, key: Key) -> Entry:
        """Pin `key` and start its load if it is not resident (or loading). If prefetches in
        flight hold all the room (between layers they may take the pipeline's), wait for one."""
        while True:
            with self._lock:
                stats = self.stats.layer(key[0])
                entry = self._entries.get(key)
                if entry is not None:
                    if entry.unused_prefetch:
                        stats.prefetched += 1
                        entry.unused_prefetch = False
                    else:
                        stats.hits += 1
                    self._entries.move_to_end(key)
                    entry.pins += 1
                    return entry
                in_flight = self._prefetch_holding_the_room()
                if in_flight is None:
                    stats.misses += 1
                    self._make_room(self._wanted | self._predicted)
                    entry = self._entries[key] = self._new_entry(key, pins=1)
                    break
            started = time.perf_counter()
            while in_flight.future is None:  # prefetch() submits after releasing the lock
                time.sleep(1e-4)
            try:
                in_flight.future.result()
            except Exception:  # a failed prefetch frees its room (_prefetch_load)
                pass
            self.stats.stall_s += time.perf_counter() - started
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
            if entry.pins == 0:
                self._wanted.discard(entry.key)  # computed: the running layer is done with it
                if not self.cache:
                    self._entries.pop(entry.key, None)

    def begin_layer(self, layer: int, experts, tokens: list[int] | None = None) -> None:
        """The experts the layer about to run will use (evicted last while it runs), and the
        tokens routed to each of the layer's experts: `frequency` keeps the experts with the
        largest sum, over their layer's calls, of their share of the call's tokens (each call
        counts once, so a long prompt's routing is a first estimate and an encoder layer that
        ran only on the prompt does not outweigh the decoder layers that run every step)."""
        with self._lock:
            self._wanted = {(layer, e) for e in experts}
            self._predicted = set()
            self._running = True
            total = sum(tokens or ())
            for e, n in enumerate(tokens or ()):
                if n:
                    self._frequency[(layer, e)] = self._frequency.get((layer, e), 0.0) + n / total

    def end_layer(self) -> None:
        """The running layer has computed its experts: its pipeline needs no room now."""
        with self._lock:
            self._wanted = set()
            self._running = False

    def prefetch(self, keys) -> int:
        """Start loading the predicted `keys` (most wanted first) that are not resident, as
        far as there is room that neither the running pipeline nor a wanted expert needs;
        the number of loads started. Never waits and never fails: a prediction is a hint."""
        if self._loader is None:
            return 0
        started = []
        with self._lock:
            keys = list(keys)
            self._predicted = set(keys)
            for key in keys:
                if key in self._entries:
                    continue
                loading = sum(1 for e in self._entries.values() if e.pins == 0
                              and e.module is None)
                kept = sum(e.kept for e in self._entries.values())
                pipeline = self.slots if self._running else 0
                if loading + 1 > self.capacity - pipeline - kept:
                    break
                if not self._make_room(self._wanted | self._predicted, strict=True,
                                       outranked_by=key):
                    break
                entry = self._entries[key] = self._new_entry(key, unused_prefetch=True)
                started.append(entry)
            self.stats.prefetch_loads += len(started)
        for entry in started:
            entry.future = self._loader.submit(self._prefetch_load, entry)
        return len(started)

    def _prefetch_load(self, entry: Entry) -> None:
        try:
            self._timed_load(entry)
        except BaseException:
            # NOTE: a failed prefetch holds no room; if the expert is used, its own load
            # fails again and names it (or, if it was already asked for, wait() raises this)
            with self._lock:
                if entry.pins == 0 and self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
            raise

    def _prefetch_holding_the_room(self) -> Entry | None:
        """The oldest prefetch still loading when the store is full and nothing can be
        evicted (lock held), else None."""
        if len(self._entries) < self.capacity or any(e.evictable for e in self._entries.values()):
            return None
        return next((e for e in self._entries.values() if e.pins == 0 and e.module is None),
                    None)

    def _new_entry(self, key: Key, **fields) -> Entry:
        self._started += 1
        return Entry(key, kept=self._keeps(key), seq=self._started, **fields)

    def _keeps(self, key: Key) -> bool:
        """`pin`: whether a new entry for `key` is kept for good (lock held): while its layer
        keeps fewer than its share of `capacity - slots - reserve` (the first layers get the
        remainder)."""
        if self.policy != "pin":
            return False
        total = self.capacity - self.slots - self.reserve
        share = total // self.layers + (key[0] < total % self.layers)
        return sum(e.kept for k, e in self._entries.items() if k[0] == key[0]) < share

    def _make_room(self, protected: set[Key], *, strict: bool = False,
                   outranked_by: Key | None = None) -> bool:
        """Evict loaded, unpinned experts until one more fits (lock held); False if `strict`
        and only `protected` ones could go. The victim is one not protected if there is one,
        chosen by the policy (`_victim`). With `outranked_by` (a prefetch), only an expert
        that the policy ranks below that one may go: under `frequency`, one routed to less
        often (a prediction must not push out an expert more likely to be used).

        NOTE: layers run in a cycle, so a plain global LRU evicts exactly the experts the next
        step needs (measured: hit rate 0 at 25% resident, 8 layers x 16 experts); keeping each
        layer's share even makes it a per-layer LRU, as mixtral-offloading keeps."""
        while len(self._entries) >= self.capacity:
            free, unprotected = self._evictable(protected, strict=strict)
            if outranked_by is not None and self.policy == "frequency":
                rank = self._frequency.get(outranked_by, 0.0)
                unprotected = [k for k in unprotected if self._frequency.get(k, 0.0) < rank]
            if strict and not unprotected:
                return False
            if not free:  # cannot happen while slots <= capacity (engine.py checks)
                raise RuntimeError("expert store: every slot is pinned or loading")
            victim = self._victim(unprotected or free)
            if self._entries.pop(victim).unused_prefetch:
                self.stats.prefetch_wasted += 1
        return True

    def _evictable(self, protected: set[Key], *, strict: bool) -> tuple[list[Key], list[Key]]:
        """(the loaded, unpinned experts that may go, those of them not `protected`), lock
        held. A kept expert (`pin`) may go only when nothing else can, and never if `strict`."""
        free = [k for k, e in self._entries.items() if e.evictable]
        if self.policy == "pin":
            rotating = [k for k in free if not self._entries[k].kept]
            free = rotating if rotating or strict else free
        return free, [k for k in free if k not in protected]

    def _victim(self, candidates: list[Key]) -> Key:
        """`lru`: from the layer holding the most slots, its least recently used;
        `frequency`: the lowest routing frequency so far, least recently used among equals;
        `pin`: the least recently used (of the rotating ones, which `_make_room` offers)."""
        if self.policy == "frequency":
            return min(candidates, key=lambda k: self._frequency.get(k, 0.0))  # LRU on ties
        if self.policy == "pin":
            return candidates[0]
        held: dict[int, int] = {}
        for layer, _ in self._entries:
            held[layer] = held.get(layer, 0) + 1
        most = max(held[layer] for layer, _ in candidates)
        return next(k for k in candidates if held[k[0]] == most)  # LRU first

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
            self.stats.prefetch_wasted += sum(e.unused_prefetch for e in self._entries.values())
            self._entries.clear()
