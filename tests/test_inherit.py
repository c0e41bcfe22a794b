"""Knowledge inheritance: the KI loss against a hand computation, its schedule, the frozen
teacher, tokenizer compatibility, and `[inherit]` runs end to end (resume, DDP, DeepSpeed,
grown init + teacher in one run)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.recipe import InheritConfig, load_recipe
from cpmctl.tokenizer import from_folder
from cpmctl.train.inherit import KnowledgeInheritance, Teacher, alpha_at, load_teacher
from cpmctl.train.objectives import CausalLM, distill_loss, fused_distill_loss
from tests.test_grow import tokenizer_artifact
from tests.test_train import cpmctl, dataset, metrics, recipe, torchrun  # noqa: F401

# --- the loss -------------------------------------------------------------------------------

STUDENT = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.3, -0.2, 1.5, 0.0, 2.0]]
TEACHER = [[2.0, 1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0, 1.0]]
LABELS = [1, 4]


def by_hand(alpha: float, t: float) -> tuple[float, float, float]:
    """(loss, LM, KL) of the 2-token, 5-word example, computed with `math` alone."""
    def softmax(row, temperature):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    lm = kl = 0.0
    for s, q_t, label in zip(STUDENT, TEACHER, LABELS, strict=True):
        lm += -math.log(softmax(s, 1.0)[label])
        p, q = softmax(q_t, t), softmax(s, t)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    lm, kl = lm / 2, kl / 2
    return (1 - alpha) * lm + alpha * t * t * kl, lm, kl


def test_the_ki_loss_equals_a_hand_computation_at_t_2():
    expected = by_hand(0.3, 2.0)
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher, labels, mask = torch.tensor(TEACHER), torch.tensor(LABELS), torch.ones(2)
    identity = torch.eye(5)  # hidden @ I.T: the logits themselves
    fused = fused_distill_loss(student, identity, labels, mask, teacher, identity,
                               alpha=0.3, temperature=2.0, chunk=1)
    plain = distill_loss(student, teacher, labels, mask, alpha=0.3, temperature=2.0)
    for got in (fused, plain):
        loss, count, lm, kd = got
        assert int(count) == 2
        assert [float(loss.detach()), float(lm), float(kd)] == pytest.approx(expected, abs=1e-6)
    # the gradients agree too: (1 - a)(softmax - onehot)/N + a T (q_T - p_T)/N
    fused[0].backward()
    grad = student.grad.clone()
    student.grad = None
    plain[0].backward()
    torch.testing.assert_close(grad, student.grad, atol=1e-6, rtol=1e-5)


def test_the_fused_chunked_kl_equals_the_plain_one_over_shared_ids():
    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.3).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(2, 30, 8), torch.randn(43, 8) * 0.3
    labels, mask = torch.randint(50, (2, 30)), (torch.rand(2, 30) > 0.2).float()
    shared = torch.randperm(50)[:40]  # the teacher's 40 tokenizer ids, in the student
    kwargs = dict(alpha=0.6, temperature=2.0, shared=shared, teacher_vocab=40)
    fused = fused_distill_loss(hidden, weight, labels, mask, teacher_hidden, teacher_weight,
                               chunk=7, **kwargs)
    fused[0].backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = distill_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels, mask,
                         **kwargs)
    plain[0].backward()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a.float(), torch.as_tensor(b).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-7, rtol=1e-5)


def test_alpha_schedules():
    linear = InheritConfig(teacher="t", alpha=0.8, decay_steps=100)
    assert [alpha_at(s, linear, 1000) for s in (0, 50, 100, 150)] == \
        pytest.approx([0.8, 0.4, 0.0, 0.0])
    step = InheritConfig(teacher="t", alpha=1.0, decay_steps=100, schedule="step")
    assert [alpha_at(s, step, 1000) for s in (0, 50, 99, 100, 150)] == [1, 1, 1, 0, 0]
    default = InheritConfig(teacher="t")  # decay_steps 0: over the whole run
    assert alpha_at(500, default, 1000) == pytest.approx(0.5)


def test_the_ki_objective_leaves_the_teacher_frozen_and_out_of_the_student():
    cfg = ModelConfig(arch="gpt", vocab_size=60, d_model=32, n_heads=4, n_layers=2,
                      max_positions=32)
    torch.manual_seed(0)
    student, teacher = build_model(cfg), build_model(cfg)
    teacher.eval()
    teacher.requires_grad_(False)
    data = type("Data", (), {"seq_len": 16})()
    objective = KnowledgeInheritance(CausalLM(data, eod_id=7), Teacher(teacher, vocab=60),
                                     InheritConfig(teacher="t", alpha=0.5, decay_steps=10), 20)
    batch = objective.batch(torch.randint(8, 60, (3, 17)).numpy(), None)
    record = objective.loss(student, batch, step=5)
    record.loss.backward()
    assert record.constants == {"alpha": 0.25} and set(record.means) == {"lm_loss", "kd_loss"}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())
    # evaluation: the LM loss alone, whatever the step
    plain = CausalLM(data, eod_id=7).loss(student, batch).loss.detach()
    assert float(objective.loss(student, batch).loss.detach()) == pytest.approx(float(plain))
    assert float(record.means["lm_loss"]) == pytest.approx(float(plain))
    late = objective.loss(student, batch, step=10)
    assert "kd_loss" not in late.means
    assert float(late.loss.detach()) == pytest.approx(float(plain))
    teacher.to(torch.bfloat16)  # teacher_precision = "bf16": about the same KL
    low = objective.loss(student, batch, step=5)
    assert float(low.means["kd_loss"]) == pytest.approx(float(record.means["kd_loss"]),
                                                        rel=0.05)


# --- teachers and tokenizers ----------------------------------------------------------------

def test_teacher_loading_checks_the_tokenizers(tmp_path):
    from cpmctl.tokenizer.base import SPACE, SPECIAL_PIECES

    base = [*SPECIAL_PIECES, SPACE, *"我们今天气很好"]
    tokenizer_artifact(tmp_path / "small", base)
    tokenizer_artifact(tmp_path / "big", [*base[:9], "天气", *base[9:], "猫"])
    tokenizer_artifact(tmp_path / "other", [*SPECIAL_PIECES, SPACE, "猫", "狗"])
    cfg = ModelConfig(arch="gpt", vocab_size=len(base), d_model=32, n_heads=4, n_layers=1,
                      max_positions=32)
    save_model(tmp_path / "teacher", build_model(cfg), cfg, tmp_path / "small", meta={})
    inherit = InheritConfig(teacher=str(tmp_path / "teacher"), teacher_precision="bf16")
    big = ModelConfig(arch="gpt", vocab_size=len(base) + 2, d_model=64, n_heads=4, n_layers=1,
                      max_positions=32)
    teacher = load_teacher(inherit, big, from_folder(tmp_path / "big"), torch.device("cpu"),
                           tmp_path / "big")
    assert not teacher.model.training and teacher.vocab == len(base)
    assert all(not p.requires_grad and p.dtype == torch.bfloat16
               for p in teacher.model.parameters())
    assert teacher.shared.tolist() == [*range(9), *range(10, 17)]
    assert teacher.to_teacher[9] == 0 and not teacher.known[9]  # 天气: the student's only
    same = load_teacher(inherit, cfg, from_folder(tmp_path / "small"), torch.device("cpu"),
                        tmp_path / "small")
    assert same.shared is None and same.to_teacher is None
    with pytest.raises(Exception, match="does not extend the teacher's") as error:
        load_teacher(inherit, cfg, from_folder(tmp_path / "other"), torch.device("cpu"),
                     tmp_path / "other")
    assert str(error.value).count("sha256:") == 2  # both digests named


def test_inherit_recipe_fields_are_validated(tmp_path):
    path = tmp_path / "r.toml"
    for text, key in (('schedule = "cosine"', "inherit.schedule"),
                      ('teacher_precision = "fp16"', "inherit.teacher_precision")):
        path.write_text(f"[inherit]\n{text}\n", encoding="utf-8")
        with pytest.raises(Exception, match=key):
            load_recipe(path)


def test_bad_teachers_are_refused(dataset, tmp_path, cli):  # noqa: F811
    folder = dataset.parent
    corpus = cli("train", "--recipe", recipe(tmp_path, dataset), "--set",
                 f"inherit.teacher={folder / 'corpus'}")
    assert corpus.code == 2 and "is a corpus; inherit.teacher needs a model" in corpus.err
    cfg = ModelConfig(arch="gpt", vocab_size=4000, d_model=64, n_heads=4, n_layers=2,
                      max_positions=64)
    save_model(tmp_path / "unrelated", build_model(cfg), cfg, folder / "tok2", meta={})
    unrelated = cli("train", "--recipe", recipe(tmp_path, dataset), "--set",
                    f"inherit.teacher={tmp_path / 'unrelated'}")
    assert unrelated.code == 2 and "does not extend the teacher's" in unrelated.err
    assert unrelated.err.count("sha256:") == 2
    assert not (tmp_path / "run-r").exists()  # refused before the run folder is made


# --- runs end to end ------------------------------------------------------------------------

def teacher_model(tmp_path, dataset, arch="gpt"):  # noqa: F811
    """A briefly trained model to distil from."""
    done = cpmctl("-q", "train", "--recipe", recipe(tmp_path, dataset, "teacher", steps=4,
                                                     every=0, eval_every=0, arch=arch))
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()
    return tmp_path / "run-teacher" / "final"


def ki_args(teacher, decay=8) -> tuple[str, ...]:
    return ("--set", f"inherit.teacher={teacher}", "--set", "inherit.alpha=0.9",
            "--set", f"inherit.decay_steps={decay}", "--set", "model.dropout=0.0")


def test_grown_init_and_a_teacher_in_one_run(dataset, tmp_path, cli):  # noqa: F811
    """The CPM-2 recipe: [init] model = the grown teacher, [inherit] teacher = the teacher."""
    teacher = teacher_model(tmp_path, dataset)
    big = recipe(tmp_path, dataset, "big", steps=6, every=3, eval_every=3)
    wider = ("--set", "model.d_model=128", "--set", "model.n_heads=8", "--set",
             "model.n_layers=3")
    grown = cli("grow", "--from", teacher, "--recipe", big, *wider, "-o", tmp_path / "grown")
    assert grown.code == 0, grown.err
    run = cli("train", "--recipe", big, *wider, "--set", f"init.model={tmp_path / 'grown'}",
              *ki_args(teacher, decay=4))
    assert run.code == 0, run.err
    records = metrics(tmp_path / "run-big")
    assert [r["alpha"] for r in records] == pytest.approx([0.9, 0.675, 0.45, 0.225, 0, 0])
    # step 1's student IS the grown teacher: its KL is 0 up to fp32 rounding (seen: -3e-9)
    assert all(r["kd_loss"] >= -1e-6 for r in records[:4]) and "kd_loss" not in records[4]
    for r in records[:4]:  # the loss is the weighted sum of the two terms logged
        kd = r["alpha"] * 4.0 * r["kd_loss"]
        assert r["loss"] == pytest.approx((1 - r["alpha"]) * r["lm_loss"] + kd, rel=1e-5)
    assert records[0]["kd_loss"] < 1e-3  # grown from the teacher: the same function
    from safetensors import safe_open

    checkpoint = tmp_path / "run-big" / "checkpoints" / "step-00000003" / "model.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        assert f.get_tensor("wte.weight").shape == (4000, 128)  # the student only


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_a_ki_run_killed_and_resumed_gives_the_same_losses(dataset, tmp_path, arch):  # noqa: F811
    teacher = teacher_model(tmp_path, dataset, arch)
    straight = cpmctl("-q", "train", "--recipe", recipe(tmp_path, dataset, "a", steps=30,
                                                          every=5, eval_every=0, arch=arch),
                      *ki_args(teacher, decay=20))
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()
    killed_recipe = recipe(tmp_path, dataset, "b", steps=30, every=5, eval_every=0, arch=arch)
    killed = cpmctl("-q", "train", "--recipe", killed_recipe, *ki_args(teacher, decay=20))
    log, deadline = tmp_path / "run-b" / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 17):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    resumed = cpmctl("train", "--recipe", killed_recipe, "--resume", *ki_args(teacher, 20))
    assert resumed.wait(timeout=600) == 0
    assert "resuming" in resumed.stderr.read().decode()
    keys = ("step", "loss", "grad_norm", "lm_loss", "kd_loss", "alpha")
    a, b = metrics(tmp_path / "run-a"), metrics(tmp_path / "run-b")
    assert [tuple(r.get(k) for k in keys) for r in a] == [tuple(r.get(k) for k in keys)
                                                          for r in b]
    assert (tmp_path / "run-a/final/model.safetensors").read_bytes() == \
        (tmp_path / "run-b/final/model.safetensors").read_bytes()


@pytest.mark.slow
def test_ki_under_ddp_and_deepspeed_computes_what_one_process_does(dataset, tmp_path, cli):  # noqa: F811,E501
    teacher = teacher_model(tmp_path, dataset)
    one = cli("train", "--recipe", recipe(tmp_path, dataset, "one", steps=6, eval_every=0),
              *ki_args(teacher, decay=4))
    assert one.code == 0, one.err
    two = torchrun(tmp_path, recipe(tmp_path, dataset, "two", steps=6, eval_every=0),
                   *ki_args(teacher, decay=4))
    assert two.wait(timeout=600) == 0, two.stderr.read().decode()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ds = subprocess.run([sys.executable, "-m", "cpmctl", "-q", "train", "--recipe",
                         str(recipe(tmp_path, dataset, "ds", steps=6, eval_every=0)),
                         "--set", "engine.name=deepspeed", "--set", "engine.zero_stage=1",
                         *ki_args(teacher, decay=4)], capture_output=True, text=True,
                        timeout=600, env=env)
    assert ds.returncode == 0, ds.stderr
    reference = metrics(tmp_path / "run-one")
    for run in ("run-two", "run-ds"):
        for x, y in zip(reference, metrics(tmp_path / run), strict=True):
            for key in ("loss", "lm_loss", "alpha"):
                assert x[key] == pytest.approx(y[key], abs=1e-5), (run, key)


@pytest.mark.slow
def test_bench_ki_runs_the_whole_experiment(dataset, tmp_path, cli):  # noqa: F811
    """One invocation (the teacher trained too): the table, the runs, the PNG."""
    work = tmp_path / "ki"
    result = cli("bench", "ki", "--dataset", dataset, "--steps", "10", "--workdir", work)
    assert result.code == 0, result.err
    assert "steps: to the target" in result.out and "grown+ki: grown, KI loss" in result.out
    assert "+teacher: adding the teacher's 10 training steps" in result.out
    assert sorted(p.name for p in work.iterdir()) == [
        "grown", "grown+ki", "grown-model", "ki", "ki-curves.png", "scratch", "teacher"]
    assert (work / "ki-curves.png").read_bytes().startswith(b"\x89PNG")
    assert "alpha" in metrics(work / "ki")[0] and "alpha" not in metrics(work / "grown")[0]
    # grown from the trained teacher: the grown runs start where the teacher ended
    from cpmctl.artifacts import open_artifact

    lineage = open_artifact(work / "grown-model", "model").meta["lineage"]
    assert lineage["max_abs_logit_delta"] <= 1e-5
    assert lineage["source_digest"] == open_artifact(work / "teacher" / "final").digest
