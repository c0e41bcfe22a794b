"""lm-evaluation-harness interop: the LM adapter over a tiny cpmctl model gives, per example,
the acc / acc_norm that `bench run`'s choice rule gives; `cpmctl bench lm-eval` runs a local
task YAML over local JSONL (no hub)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cpmctl.bench.scoring import score
from cpmctl.bench.tasks import load_task
from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.tokenizer import load_tokenizer
from tests.conftest import build_reviews
from tests.test_bench_tasks import IDIOM_TASK, write_lines, write_task

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """A random tiny GPT on the sentiment reviews' tokenizer, saved and loaded."""
    folder = tmp_path_factory.mktemp("lm-eval")
    build_reviews(folder, 300, 3000, dataset=False, polarity="pos")
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=3000, d_model=64, n_heads=4, n_layers=2, max_positions=96,
                      init_std=0.1)
    model = build_model(cfg).eval()
    path = save_model(folder / "model", model, cfg, folder / "tok", meta={}, command=["test"])
    return path, model, load_tokenizer(folder / "tok")


def test_choice_rule_equals_lm_eval_through_the_adapter(gpt, tmp_path):
    from lm_eval.tasks import TaskManager

    from cpmctl.bench.lm_eval_adapter import CpmLM, export_choice_task

    path, model, tok = gpt
    task = load_task(write_task(tmp_path / "idioms.toml", IDIOM_TASK))
    examples = load_task("idiom-cloze").read_examples(None, 12)
    data = write_lines(tmp_path / "idioms.jsonl", [
        {"before": e.fields["before"], "after": e.fields["after"], "candidates": list(e.choices),
         "answer": list(e.choices).index(e.gold)} for e in examples])
    examples = task.read_examples(data)
    ours = score(model, tok, task, examples, batch_size=8)
    assert not any(s.truncated for s in ours)  # lm-eval truncates each request on its own
    name = export_choice_task(task, examples, tmp_path / "lm_eval_tasks", "cpmctl_idioms")
    results = lm_eval.simple_evaluate(
        model=CpmLM(model, tok, batch_size=5), tasks=[name], log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")),
        bootstrap_iters=0)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours) == 12
    for sample, mine in zip(samples, ours, strict=False):
        assert sample["acc"] == float(mine.prediction("acc", "choice") == mine.gold)
        assert sample["acc_norm"] == float(mine.prediction("acc_norm", "choice") == mine.gold)
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert [float(x) for x in theirs] == pytest.approx(mine.logprob, abs=1e-4)
    accuracy = sum(m.prediction("acc", "choice") == m.gold for m in ours) / len(ours)
    assert results["results"][name]["acc,none"] == pytest.approx(accuracy)


def test_rolling_loglikelihood_and_generation(gpt):
    from lm_eval.api.instance import Instance

    from cpmctl.bench.lm_eval_adapter import CpmLM

    path, model, tok = gpt
    lm = CpmLM(model, tok, batch_size=4, max_gen_toks=8)
    text = "质量很好，物流也快，包装很结实，下次还会再来买的。" * 6  # > 96 tokens: two windows
    ids = tok.encode(text)
    assert 96 < len(ids) < 192
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    with torch.no_grad():  # by hand: every token once, from at most 96 tokens before it
        full = [tok.eod_id] + ids
        first = torch.log_softmax(model(torch.tensor([full[:96]]))[0].float(), -1)
        expected = sum(first[i, full[i + 1]].item() for i in range(96))
        rest = full[len(full) - 97:]
        second = torch.log_softmax(model(torch.tensor([rest[:-1]]))[0].float(), -1)
        tail = len(full) - 97  # tokens not yet predicted
        expected += sum(second[i, rest[i + 1]].item() for i in range(96 - tail, 96))
    assert total == pytest.approx(expected, abs=1e-3)
    [out] = lm.generate_until([Instance("generate_until", {}, ("今天", {"until": ["。"],
                                                                        "max_gen_toks": 8}), 0)])
    assert isinstance(out, str) and "。" not in out


@pytest.mark.slow  # lm-eval's task manager indexes its thousands of task files: ~15 s
def test_bench_lm_eval_command_on_a_local_task(gpt, cli, tmp_path):
    path, _, _ = gpt
    data = write_lines(tmp_path / "copa.jsonl", [
        {"premise": "天下雨了", "choices": ["地面湿了", "太阳出来了"], "label": 0},
        {"premise": "他很饿", "choices": ["他吃了饭", "他睡觉了"], "label": 0}])
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_copa.yaml").write_text(
        "task: tiny_copa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{premise}}，所以"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
        encoding="utf-8")
    result = cli("bench", "lm-eval", "-m", path, "--tasks", "tiny_copa", "--include-path",
                 folder, "--json")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)["tiny_copa"]
    assert 0 <= metrics["acc,none"] <= 1 and "acc_norm,none" in metrics
    result = cli("bench", "lm-eval", "-m", path, "--tasks", "no_such_task_here")
    assert result.code == 2 and "lm-eval knows no task 'no_such_task_here'" in result.err
