"""Offloaded MoE inference: greedy output identical to the fully resident model for every
order, slot count and budget (encdec and gpt, batch 1 and 8, BASE and top-2 routers), the
measured peak of resident expert memory within the budget, the LRU across decoding steps, the
loader thread, and every bad input refused with one line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from cpmctl.artifacts import MANIFEST, ArtifactWriter
from cpmctl.bench.moe import a100_load_over_compute
from cpmctl.errors import CpmError
from cpmctl.infer import (
    GenerationSettings,
    SamplingSettings,
    generate_tokens,
    prepare_for_inference,
)
from cpmctl.models import ModelConfig, MoeConfig, build_model
from cpmctl.models.artifact import load_model, save_model
from cpmctl.models.shard import reshard_model
from cpmctl.models.weights import INDEX
from cpmctl.offload import OffloadSettings, load_offloaded
from cpmctl.offload.schedule import expert_order
from cpmctl.offload.store import ExpertStore, Loaded
from cpmctl.tokenizer.build import import_tokenizer
from cpmctl.tokenizer.cpm1 import train_processor

CONFIGS = {
    "encdec": dict(arch="encdec", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                   d_ff=96, moe=MoeConfig(experts=8)),
    "gpt": dict(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2, d_ff=96,
                max_positions=64, moe=MoeConfig(experts=8)),
    "gpt-top2": dict(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2, d_ff=96,
                     max_positions=64, moe=MoeConfig(experts=8, router="topk", top_k=2)),
}
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20], [30, 31], [40, 41, 42],
           [50, 51, 52, 53], [60]]
GREEDY = GenerationSettings(max_new_tokens=4, sampling=SamplingSettings(temperature=0.0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    vocabulary = folder / "chinese_vocab.model"
    vocabulary.write_bytes(train_processor(["今天 天气 很 好", "我们 一起 去 公园"] * 2,
                                           vocab_size=22, byte_fallback=False, threads=1))
    return import_tokenizer(vocabulary, folder / "tok", command=["test"])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each config saved as one file, and resharded (several experts per shard)."""
    root = tmp_path_factory.mktemp("offload")
    out = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**config)
        model = build_model(cfg)
        with torch.no_grad():  # centroids large enough that routing spreads over experts
            for module in model.modules():
                if hasattr(module, "centroids"):
                    module.centroids.normal_(0, 1.0)
        out[name] = save_model(root / name, model, cfg, tokenizer, meta={}, command=["test"])
        out[name + "-sharded"] = reshard_model(out[name], root / f"{name}-sharded",
                                               max_shard_bytes=120_000)
    return out


def resident_tokens(path: Path, prompts) -> list[list[int]]:
    model = prepare_for_inference(load_model(path)[0])
    result = generate_tokens(model, prompts, GREEDY, eod_id=None, pad_id=0)
    return [row.tokens for row in result.rows]


def offloaded_tokens(path: Path, settings: OffloadSettings, prompts):
    engine = load_offloaded(path, settings)
    try:
        result = generate_tokens(engine.model, prompts, GREEDY, eod_id=None, pad_id=0)
    finally:
        engine.close()
    return [row.tokens for row in result.rows], engine.report(result.new_tokens, 1.0)


EXPERT = {"encdec": 3 * 64 * 96 * 4, "gpt": (2 * 64 * 96 + 96 + 64) * 4,
          "gpt-top2": (2 * 64 * 96 + 96 + 64) * 4}
ORDERS = ("index", "heavy-first", "resident-first")
#: (order, slots, experts the budget holds, tier, sharded): each order with 2 and more slots,
#: budgets from two slots to every expert, both tiers, both file layouts
SCHEDULES = [("index", 2, 2, "disk", False), ("heavy-first", 3, 5, "host", True),
             ("resident-first", 4, 16, "disk", True), ("heavy-first", 2, 40, "host", False),
             ("resident-first", 2, 2, "host", False), ("index", 3, 3, "disk", True)]
EVERY_SCHEDULE = [(order, slots, held, tier, sharded) for order in ORDERS
                  for slots, held in ((2, 2), (2, 5), (3, 3), (3, 16), (5, 40))
                  for tier in ("disk", "host") for sharded in (False, True)]


def check_identical(models, name: str, batch: int, schedules) -> None:
    prompts = PROMPTS[:batch]
    expected = resident_tokens(models[name], prompts)
    for order, slots, held, tier, sharded in schedules:
        # held prepared experts (oneDNN-packed fp32), plus one load's raw tensors
        budget = (held + 1) * EXPERT[name] + 4096
        settings = OffloadSettings(memory_budget=budget, slots=slots, order=order, tier=tier)
        source = models[name + "-sharded" if sharded else name]
        tokens, report = offloaded_tokens(source, settings, prompts)
        where = (name, batch, order, slots, held, tier, sharded)
        assert tokens == expected, where
        assert 0 < report["peak_resident_expert_bytes"] <= budget, where  # measured
        assert report["loads"] > 0 and report["capacity_experts"] >= slots, where


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_is_identical_to_the_resident_model(models, name, batch):
    check_identical(models, name, batch, SCHEDULES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 8])
def test_identical_for_every_order_slot_count_budget_and_tier(models, name, batch):
    check_identical(models, name, batch, EVERY_SCHEDULE)


@pytest.mark.parametrize("dtype, quantize", [("bf16", None), ("bf16", "int8")])
def test_experts_are_prepared_as_the_resident_model_is(models, dtype, quantize):
    """bf16, and int8 through the existing kernel, per expert as it enters a slot."""
    model = prepare_for_inference(load_model(models["gpt"])[0], dtype=dtype, quantize=quantize)
    expected = generate_tokens(model, PROMPTS, GREEDY, eod_id=None, pad_id=0)
    engine = load_offloaded(models["gpt"], OffloadSettings(memory_budget=10**5, slots=2,
                                                           order="heavy-first"),
                            dtype=dtype, quantize=quantize)
    result = generate_tokens(engine.model, PROMPTS, GREEDY, eod_id=None, pad_id=0)
    report = engine.report()
    engine.close()
    assert [r.tokens for r in result.rows] == [r.tokens for r in expected.rows]
    assert report["expert_bytes"] < EXPERT["gpt"]  # half (bf16) or less (int8) of fp32's
    assert report["peak_resident_expert_bytes"] <= 10**5


def test_on_demand_loading_without_cache_is_identical_too(models):
    expected = resident_tokens(models["encdec"], PROMPTS[:4])
    sync = OffloadSettings(memory_budget=10**6, slots=1, overlap=False, cache=False)
    tokens, report = offloaded_tokens(models["encdec"], sync, PROMPTS[:4])
    assert tokens == expected
    assert report["hit_rate"] == 0.0
    assert report["stall_s"] > 0  # every load is waited for


def test_lru_keeps_experts_across_decoding_steps(models):
    """With room for every expert, each is loaded once and every later use is a hit."""
    engine = load_offloaded(models["gpt"], OffloadSettings(memory_budget=10**7, slots=2))
    generate_tokens(engine.model, PROMPTS, GREEDY, eod_id=None, pad_id=0)
    first = engine.report()
    generate_tokens(engine.model, PROMPTS, GREEDY, eod_id=None, pad_id=0)
    report = engine.report()
    engine.close()
    assert first["loads"] <= 2 * 8  # 2 layers x 8 experts, each at most once
    assert sum(layer["misses"] for layer in first["layers"]) == first["loads"]
    assert report["loads"] == first["loads"]  # the second run: every use a hit
    assert report["hit_rate"] > first["hit_rate"]
    assert report["bytes_moved"] == report["loads"] * EXPERT["gpt"]
    assert [layer["layer"] for layer in report["layers"]] == ["blocks.0.moe", "blocks.1.moe"]
    # with room for two only, experts are evicted and loaded again
    engine = load_offloaded(models["gpt"], OffloadSettings(
        memory_budget=3 * EXPERT["gpt"] + 4096, slots=2))
    generate_tokens(engine.model, PROMPTS, GREEDY, eod_id=None, pad_id=0)
    assert engine.report()["loads"] > 16 and engine.store.capacity == 2
    engine.close()


def test_orders():
    counts = [0, 3, 1, 5, 0, 1]
    readiness = {5: (0, 0), 2: (0, 0), 3: (1, 7), 1: (1, 9)}.get  # 3's load started first
    assert expert_order("index", counts, readiness) == [1, 2, 3, 5]
    assert expert_order("heavy-first", counts, readiness) == [3, 1, 2, 5]
    assert expert_order("resident-first", counts, readiness) == [2, 5, 3, 1]
    absent = {5: (0, 0), 2: (0, 0)}
    assert expert_order("resident-first", counts,
                        lambda e: absent.get(e, (2, 0))) == [2, 5, 1, 3]


def test_loads_run_on_the_loader_thread_ahead_of_the_compute():
    threads, started = [], []

    def load(key) -> Loaded:
        threads.append(threading.current_thread().name)
        started.append((key, time.perf_counter()))
        time.sleep(0.02)
        return Loaded(torch.nn.Identity(), 10, 0, 1_000_000)

    store = ExpertStore(load, capacity=3, simulate_bandwidth=1e8)  # 1 MB at 0.1 GB/s: 10 ms
    first, second = store.request((0, 0)), store.request((0, 1))
    store.wait(first)
    store.wait(second)
    for entry in (first, second):
        store.release(entry)
    assert all(name.startswith("cpmctl-expert-loader") for name in threads)
    assert store.stats.loads == 2 and store.stats.bytes_moved == 2_000_000
    assert store.stats.load_s >= 2 * 0.02
    assert store.is_resident((0, 0)) and store.request((0, 0)).module is not None
    store.close()


# ---------------------------------------------------------------- the command line


def test_generate_offload_prints_what_resident_generate_prints(models, cli, tmp_path):
    args = ("generate", "--model", models["gpt-sharded"], "--temperature", "0",
            "--max-new-tokens", "5", "今天")
    plain = cli(*args)
    assert plain.code == 0, plain.err
    report = tmp_path / "offload.json"
    offloaded = cli(*args, "--offload", "--memory-budget", "200KiB", "--order", "heavy-first",
                    "--offload-report", report)
    assert offloaded.code == 0, offloaded.err
    assert offloaded.out == plain.out
    assert "hit rate" in offloaded.err and "peak resident experts" in offloaded.err
    data = json.loads(report.read_text())
    assert data["order"] == "heavy-first" and data["tier"] == "disk"
    assert data["peak_resident_expert_bytes"] <= 200 * 1024
    assert len(data["layers"]) == 2


def assert_refused(result, *needles) -> None:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_budget_below_two_slots_names_the_minimum(models, cli):
    result = cli("generate", "--model", models["gpt"], "--offload", "--memory-budget", "20KiB",
                 "x")
    assert_refused(result, "--memory-budget 20.00 KiB is below two expert slots",
                   "needs at least")
    with pytest.raises(CpmError, match=r"--slots 4: --memory-budget .* holds 2 expert\(s\)"):
        load_offloaded(models["gpt"], OffloadSettings(memory_budget=3 * EXPERT["gpt"],
                                                      slots=4))


@pytest.mark.parametrize("args, message", [
    (("--slots", "1"), "--slots must be at least 2"),
    (("--order", "random"), "--order: expected one of index, heavy-first, resident-first"),
    (("--memory-budget", "lots"), "--memory-budget: cannot read 'lots' as a size"),
    (("--offload-from", "tape"), "--offload-from: expected disk or host"),
    (("--simulate-bandwidth", "-1"), "--simulate-bandwidth must be a positive number"),
    (("--cpu-compute",), "--cpu-compute chooses between the CPU and copying to the GPU"),
])
def test_bad_offload_options(models, cli, args, message):
    assert_refused(cli("generate", "--model", models["gpt"], "--offload", *args, "x"), message)


def test_offload_options_need_offload(models, cli):
    assert_refused(cli("generate", "--model", models["gpt"], "--slots", "3", "x"),
                   "go with --offload")


def test_offload_on_a_dense_model(cli, tmp_path, tokenizer):
    cfg = ModelConfig(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                      max_positions=64)
    dense = save_model(tmp_path / "dense", build_model(cfg), cfg, tokenizer, meta={},
                       command=["test"])
    assert_refused(cli("generate", "--model", dense, "--offload", "x"),
                   "is a dense model (model.moe.experts is 0)")


def rewrite(source: Path, out: Path, edit) -> Path:
    with ArtifactWriter(out, "model", command=["test"]) as writer:
        for child in source.iterdir():
            if child.name == "tokenizer":
                import shutil
                shutil.copytree(child, writer.dir / child.name)
            elif child.name != MANIFEST:
                (writer.dir / child.name).write_bytes(child.read_bytes())
        edit(writer.dir)
        return writer.commit({})


def flip_expert_byte(folder: Path) -> None:
    """One byte of blocks.1.moe.experts.3's c_fc weight, in its shard."""
    index = json.loads((folder / INDEX).read_text())
    name = "blocks.1.moe.experts.3.c_fc.weight"
    path = folder / index["weight_map"][name]
    data = bytearray(path.read_bytes())
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    data[start + 100] ^= 0x01  # a small change of one value: only a checksum sees it
    path.write_bytes(bytes(data))


def truncate_expert(folder: Path) -> None:
    """Cut the shard holding blocks.1.moe.experts.3 inside its c_proj weight."""
    index = json.loads((folder / INDEX).read_text())
    name = "blocks.1.moe.experts.3.c_proj.weight"
    path = folder / index["weight_map"][name]
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    start = 8 + length + json.loads(data[8:8 + length])[name]["data_offsets"][0]
    path.write_bytes(data[:start + 10])


def drop_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_a_corrupted_expert_is_named_when_it_is_loaded(models, cli, tmp_path, tier):
    bad = rewrite(models["gpt-sharded"], tmp_path / "bad", flip_expert_byte)
    prompts = "\n".join(["今天", "天气", "我们", "公园", "很好"] * 4) + "\n"
    result = cli_with_stdin(cli, prompts, "generate", "--model", bad, "--offload",
                            "--offload-from", tier, "--temperature", "0", "--batch-size", "8",
                            "--memory-budget", "1MiB", "--max-new-tokens", "12")
    assert_refused(result, "blocks.1.moe.experts.3.c_fc.weight",
                   "(blocks.1.moe expert 3) is corrupted")


def cli_with_stdin(cli, text: str, *args):
    import io
    import sys

    stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8")
    try:
        return cli(*args)
    finally:
        sys.stdin = stdin


def test_a_nan_expert_in_a_single_file_model_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    def poison(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["decoder.1.moe.experts.5.wo.weight"][0, 0] = float("nan")
        save_file(tensors, str(folder / "model.safetensors"))

    bad = rewrite(models["encdec"], tmp_path / "bad", poison)
    with pytest.raises(CpmError, match=r"decoder.1.moe.experts.5.wo.weight \(decoder.1.moe "
                                       r"expert 5\) holds NaN"):
        load_offloaded(bad, OffloadSettings(memory_budget=10**6, tier="host"))


@pytest.mark.parametrize("edit, message", [
    (truncate_expert, "(truncated: tensor blocks.1.moe.experts.3.c_proj.weight"),
    (drop_shard, "is missing"),
])
def test_a_damaged_shard_is_refused_before_generating(models, cli, tmp_path, edit, message):
    bad = rewrite(models["gpt-sharded"], tmp_path / "bad", edit)
    result = cli("generate", "--model", bad, "--offload", "x")
    assert result.code == 2 and message in result.err, result.err
    assert result.out == ""


@pytest.mark.slow
def test_bench_moe_compares_every_run_with_the_resident_tokens(models, cli):
    result = cli("bench", "moe", "--model", models["gpt-sharded"], "--new-tokens", "3",
                 "--resident-fraction", "0.5", "--prefill-tokens", "24", "--prefill-batches",
                 "2", "--threads", "1", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    names = [run["run"] for run in report["runs"]]
    assert names == ["resident", "on-demand", "offloaded index", "offloaded heavy-first",
                     "offloaded resident-first", "offloaded heavy-first, frequency",
                     "offloaded heavy-first, frequency, prefetch", "offloaded heavy-first, pin",
                     "disk heavy-first, cold cache", "disk heavy-first, warm cache"]
    prefill = report["prefill_runs"]
    assert [run["run"] for run in prefill] == ["prefill resident", "prefill on-demand",
                                               "prefill offloaded heavy-first",
                                               "prefill offloaded heavy-first, pin",
                                               "prefill offloaded resident-first, pin, prefetch"]
    assert report["prefill_batches"] == 2
    assert prefill[2]["tokens"] == 2 * report["batch"]  # one new token a prompt, both batches
    assert prefill[3]["cache_policy"] == "pin" and prefill[3]["hit_rate"] > 0
    assert prefill[4]["prefetch"]["used"] > 0
    for run in prefill:  # the second batch alone, warm: the first filled the cache
        assert run["warm_prompt_tokens_per_s"] > 0 and run["vs_on_demand_warm"] > 0
    assert all(run["identical"] for run in report["runs"] + prefill)
    for run in report["runs"][1:] + prefill[1:]:
        assert run["peak_resident_expert_bytes"] <= report["memory_budget_bytes"]
        assert len(run["layers"]) == 2
    assert report["resident_experts"] == 8  # half of 2 layers x 8 experts
    assert report["threads"] == 1
    bound = report["bound"]  # Belady: no run loads less than the fewest possible
    assert 0 < bound["min_loads"] <= min(run["loads"] for run in report["runs"][1:8])
    assert 0 < bound["ceiling_vs_resident"] <= 1
    assert report["runs"][6]["prefetch"]["used"] > 0
    assert [r["regime"] for r in report["regimes"]] == ["decoding",
                                                        "prefill of 24-token prompts"]
    prompt_heavy = report["regimes"][1]
    assert prompt_heavy["tokens_per_expert"] > report["regimes"][0]["tokens_per_expert"]
    # its bandwidth gives this machine an A100's load / compute at the tokens per expert
    nominal = report["batch"] * 24 / 8  # BASE: each expert takes an even share
    assert prompt_heavy["simulated_load_over_compute"] == pytest.approx(
        a100_load_over_compute(nominal, report["stored_expert_bytes"], "fp32"))
    assert "at most" in cli("bench", "moe", "--model", models["gpt-sharded"], "--new-tokens",
                            "2", "--no-disk").out  # the table and the bound, as printed


def test_bench_moe_refuses_a_dense_model(cli, tmp_path):
    cfg = ModelConfig(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                      max_positions=64)
    dense = save_model(tmp_path / "dense", build_model(cfg), cfg, None, meta={},
                       command=["test"])
    assert_refused(cli("bench", "moe", "--model", dense), "a dense model")
