"""The cross-layer prefetch, the frequency and pin caches and the load bound of offloaded MoE
inference:
greedy output still identical to the resident model, the prefetch never taking the pipeline's
room, its prediction accuracy counted, pinned experts hitting where LRU cannot, and Belady's
minimum as the bench reports it."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from cpmctl.bench.moe import a100_load_over_compute, tokens_per_expert
from cpmctl.bench.moe_bound import decode_calls, load_bound, min_loads, uses
from cpmctl.errors import CpmError
from cpmctl.offload import OffloadSettings
from cpmctl.offload.engine import next_moe_layers, stack_wraps
from cpmctl.offload.store import ExpertStore, Loaded
from tests import test_offload
from tests.test_offload import (
    CONFIGS,
    EXPERT,
    PROMPTS,
    assert_refused,
    offloaded_tokens,
    resident_tokens,
)

# the same tiny models (module fixtures, built again for this module)
tokenizer = test_offload.tokenizer
models = test_offload.models

#: (order, slots, experts the budget holds, tier, policy, prefetch)
SCHEDULES = [("heavy-first", 2, 2, "host", "frequency", True),
             ("index", 2, 6, "disk", "lru", True),
             ("heavy-first", 3, 6, "host", "frequency", False),
             ("resident-first", 2, 20, "disk", "frequency", True),
             ("heavy-first", 3, 6, "disk", "pin", False), ("index", 2, 5, "host", "pin", True)]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 8])
def test_prefetch_and_frequency_keep_the_greedy_output(models, name, batch):
    prompts = PROMPTS[:batch]
    expected = resident_tokens(models[name], prompts)
    for order, slots, held, tier, policy, prefetch in SCHEDULES:
        budget = (held + 1) * EXPERT[name] + 4096
        settings = OffloadSettings(memory_budget=budget, slots=slots, order=order, tier=tier,
                                   policy=policy, prefetch=prefetch)
        tokens, report = offloaded_tokens(models[name + "-sharded"], settings, prompts)
        where = (name, batch, order, slots, held, tier, policy, prefetch)
        assert tokens == expected, where
        assert 0 < report["peak_resident_expert_bytes"] <= budget, where  # measured
        assert report["cache_policy"] == policy, where
        assert (report["prefetch"] is not None) == prefetch, where


def test_prefetch_predicts_the_next_layer_and_counts_how_well(models):
    budget = 21 * EXPERT["gpt"] + 4096
    settings = OffloadSettings(memory_budget=budget, slots=2, order="heavy-first",
                               prefetch=True)
    tokens, report = offloaded_tokens(models["gpt"], settings, PROMPTS)
    assert tokens == resident_tokens(models["gpt"], PROMPTS)
    p = report["prefetch"]
    # 2 layers: the second is predicted from the first's input at each forward pass (prefill +
    # 3 steps), the first from its own last call at each step: 7 predicted calls
    assert p["used"] >= 7 and 0 < p["correct"] <= min(p["predicted"], p["used"])
    assert p["recall"] == p["correct"] / p["used"]
    assert p["precision"] == p["correct"] / p["predicted"]
    first, second = report["layers"]
    # the budget holds every expert: the first layer's guesses find theirs resident
    assert first["prefetched"] == 0 < second["prefetched"] <= p["correct"]
    assert 0 < p["loads"] and p["wasted"] <= p["loads"]
    misses = sum(layer["misses"] for layer in report["layers"])
    assert report["loads"] == misses + p["loads"]  # every load: a demand or a prefetch
    assert report["bytes_moved"] == report["loads"] * EXPERT["gpt"]


def test_next_moe_layers_stay_in_their_stack():
    names = ["encoder.blocks.0.moe", "encoder.blocks.1.moe", "decoder.blocks.0.moe",
             "decoder.blocks.1.moe", "decoder.blocks.2.moe"]
    assert next_moe_layers(names) == {0: 1, 2: 3, 3: 4}
    assert next_moe_layers(["blocks.0.moe", "blocks.1.moe"]) == {0: 1}
    # after a stack's last layer: the decoder's first (the next step), a GPT's first
    assert stack_wraps(names) == {1: 2, 4: 2}
    assert stack_wraps(["blocks.0.moe", "blocks.1.moe"]) == {1: 0}


def _slow_store(capacity: int, slots: int, *, policy: str = "lru", fail=()):
    loading = threading.Event()

    def load(key) -> Loaded:
        loading.wait(5)
        if key in fail:
            raise CpmError(f"layer {key[0]} expert {key[1]}: corrupted")
        return Loaded(torch.nn.Identity(), 10, 0, 100)

    return ExpertStore(load, capacity=capacity, slots=slots, policy=policy), loading


def test_a_prefetch_leaves_the_pipeline_its_room():
    store, loading = _slow_store(capacity=4, slots=2)
    store.begin_layer(0, [0, 1])  # layer 0 runs: its pipeline needs 2 slots
    assert store.prefetch([(1, e) for e in range(5)]) == 2  # capacity - slots in flight
    assert store.prefetch([(1, 9)]) == 0
    first, second = store.request((0, 0)), store.request((0, 1))  # the pipeline's two slots
    loading.set()
    for entry in (first, second):
        store.wait(entry)
        store.release(entry)
    deadline = time.monotonic() + 5
    while not (store.is_resident((1, 0)) and store.is_resident((1, 1))):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    store.end_layer()  # between layers the pipeline needs no room: (1, 9) may take (0, 0)'s
    assert store.prefetch([(1, 0), (1, 1), (1, 9)]) == 1
    used = store.request((1, 0))  # a prefetched expert, used: counted as prefetched
    store.wait(used)
    store.release(used)
    stats = store.stats.layer(1)
    assert (stats.prefetched, stats.hits, stats.misses) == (1, 0, 0)
    store.close()
    assert store.stats.prefetch_loads == 3 and store.stats.prefetch_wasted == 2  # (1, 1), (1, 9)


def test_a_miss_waits_for_the_prefetches_that_hold_all_the_room():
    store, loading = _slow_store(capacity=2, slots=1)
    assert store.prefetch([(1, 0), (1, 1)]) == 2  # between layers: all of it
    store.begin_layer(1, [2])  # the prediction was wrong: the layer wants expert 2
    threading.Timer(0.2, loading.set).start()
    entry = store.request((1, 2))  # every slot loading a prefetch: waits for one
    store.wait(entry)
    store.release(entry)
    assert store.is_resident((1, 2))
    assert store.stats.stall_s >= 0.1
    store.close()
    assert store.stats.prefetch_wasted == 2  # one evicted for expert 2, one never used


def test_a_failed_prefetch_holds_no_room_and_its_use_names_the_expert():
    store, loading = _slow_store(capacity=3, slots=2, fail={(1, 2)})
    assert store.prefetch([(1, 2)]) == 1
    loading.set()
    deadline = time.monotonic() + 5
    while store.prefetch([(1, 3)]) == 0:  # room again once the failed load is gone
        assert time.monotonic() < deadline
        time.sleep(0.01)
    entry = store.request((1, 2))
    with pytest.raises(CpmError, match="layer 1 expert 2: corrupted"):
        store.wait(entry)
    store.close()


@pytest.mark.parametrize("policy, evicted", [("lru", (0, 0)), ("frequency", (0, 1))])
def test_frequency_keeps_the_experts_the_router_prefers(policy, evicted):
    store = ExpertStore(lambda key: Loaded(torch.nn.Identity(), 10, 0, 100), capacity=2,
                        overlap=False, policy=policy, slots=1)
    store.begin_layer(0, [0], [7, 1])  # expert 0 gets most of the tokens
    for key in ((0, 0), (0, 1)):  # 0 used first: the least recently used
        store.release(store.request(key))
    store.begin_layer(0, [2], [0, 0, 1])
    store.release(store.request((0, 2)))
    assert not store.is_resident(evicted)
    assert all(store.is_resident(k) for k in ((0, 0), (0, 1), (0, 2)) if k != evicted)
    store.close()


def _cycle(store: ExpertStore, layers: int, experts: int) -> None:
    """One pass that uses every expert of every layer once, as a long prompt's prefill does."""
    for layer in range(layers):
        store.begin_layer(layer, range(experts), [1] * experts)
        for e in range(experts):
            store.release(store.request((layer, e)))


@pytest.mark.parametrize("policy, hits", [("lru", 4), ("frequency", 0), ("pin", 6)])
def test_pinned_experts_hit_on_every_pass_of_a_cycle(policy, hits):
    # 4 layers x 8 experts, room for 8 of the 32: pin keeps 6 for good (the first 2, 2, 1 and
    # 1 experts of the layers) and the pipeline's 2 slots rotate; every pass hits those 6.
    # Frequency evicts what comes next; LRU's even share per layer keeps some by chance.
    store = ExpertStore(lambda key: Loaded(torch.nn.Identity(), 10, 0, 100), capacity=8,
                        overlap=False, policy=policy, slots=2, layers=4)
    _cycle(store, 4, 8)
    assert sum(store.stats.layer(i).hits for i in range(4)) == 0  # the first pass: all cold
    _cycle(store, 4, 8)
    assert sum(store.stats.layer(i).hits for i in range(4)) == hits
    _cycle(store, 4, 8)
    assert sum(store.stats.layer(i).hits for i in range(4)) == 2 * hits
    if policy == "pin":
        kept = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0)]
        assert all(store.is_resident(key) for key in kept)
        assert [store.stats.layer(i).hits for i in range(4)] == [4, 4, 2, 2]  # 2 passes
    store.close()


def test_a_kept_expert_makes_room_when_nothing_else_can():
    store = ExpertStore(lambda key: Loaded(torch.nn.Identity(), 10, 0, 100), capacity=3,
                        policy="pin", slots=2, layers=1)

    def use(key):
        entry = store.request(key)
        store.wait(entry)
        return entry

    store.release(use((0, 0)))  # kept: capacity 3 less the pipeline's 2 slots
    pinned = [use((0, 1)), use((0, 2))]  # the rest, pinned by the pipeline
    assert store.prefetch([(0, 4)]) == 0  # never at the cost of a kept expert
    store.release(use((0, 3)))  # no other room: the kept one goes
    assert not store.is_resident((0, 0)) and store.is_resident((0, 3))
    for entry in pinned:
        store.release(entry)
    store.close()


def test_belady_needs_the_fewest_loads():
    keys = [(0, e) for e in "abcabda"]
    assert min_loads(keys, 2) == 5  # LRU needs 7 here
    assert min_loads(keys, 4) == 4  # every distinct expert once
    assert min_loads([], 2) == 0
    with pytest.raises(ValueError):
        min_loads(keys, 0)


def test_load_bound_of_a_routing():
    # layer 0 and 1, a prefill using every expert, then 2 decoding steps
    calls = [(0, [5, 3, 1]), (1, [2, 2, 5]), (0, [1, 0, 1]), (1, [0, 2, 0]),
             (0, [2, 0, 0]), (1, [0, 0, 2])]
    assert uses(calls)[:3] == [(0, 0), (0, 1), (0, 2)]  # heavy-first
    assert decode_calls(calls) == calls[2:]
    bound = load_bound(calls, 6, expert_bytes=100, bandwidth_bytes_s=1000.0, resident_s=2.0,
                       resident_decode_s=0.5)
    assert bound["min_loads"] == 6 and bound["distinct_experts"] == 6  # all fit
    assert bound["decode_min_loads"] == 0 and bound["decode_steps"] == 2
    assert bound["min_bus_s"] == pytest.approx(0.6) and bound["ceiling_vs_resident"] == 1.0
    tight = load_bound(calls, 2, expert_bytes=100, bandwidth_bytes_s=100.0, resident_s=2.0,
                       resident_decode_s=0.5, experts=6)
    # decoding uses 4 distinct experts, 2 of them reused: with 2 resident, 2 more loads
    assert tight["decode_min_loads"] == 2 and tight["decode_min_bus_s"] == 2.0
    assert tight["decode_ceiling_vs_resident"] == 0.25
    # 25% of 6 experts: 2 resident (as above); 75%: 4, every decoding expert stays
    assert tight["decode_ceiling_by_resident_fraction"] == {"0.25": 0.25, "0.5": 0.5,
                                                           "0.75": 1.0, "0.9": 1.0}
    assert tokens_per_expert(calls[2:]) == pytest.approx(8 / 5)


def test_the_a100_roofline():
    eight_mib = 8 * 2**20
    assert a100_load_over_compute(1, eight_mib, "fp32") == pytest.approx(1555 / 25)
    # fp32 at 2,048 tokens per expert the A100 computes longer than the copy takes
    assert a100_load_over_compute(2048, eight_mib, "fp32") < 1


def test_generate_with_prefetch_and_frequency(models, cli, tmp_path):
    args = ("generate", "--model", models["gpt-sharded"], "--temperature", "0",
            "--max-new-tokens", "5", "今天")
    plain = cli(*args)
    report = tmp_path / "offload.json"
    offloaded = cli(*args, "--offload", "--memory-budget", "200KiB", "--cache-policy",
                    "frequency", "--prefetch", "--offload-report", report)
    assert offloaded.code == 0, offloaded.err
    assert offloaded.out == plain.out
    data = json.loads(report.read_text())
    assert data["cache_policy"] == "frequency" and data["prefetch"]["used"] > 0
    assert_refused(cli(*args, "--offload", "--cache-policy", "mru"),
                   "--cache-policy: expected one of lru, frequency")
    assert_refused(cli(*args, "--prefetch"), "go with --offload")
