"""The report artifact of `bench run`: `results.json` (everything, every example) and
`results.md` (the tables), written with ArtifactWriter (manifest last)."""

from __future__ import annotations

import json
from pathlib import Path

from cpmctl.artifacts import ArtifactWriter
from cpmctl.bench.metrics import METRICS

_RULE_WORDS = {
    "acc": {"cpm1": "lowest mean loss per token (CPM-1)",
            "choice": "highest summed log-likelihood", "span": "highest summed log-likelihood"},
    "acc_norm": "summed log-likelihood per character",
    "acc_bytes": "summed log-likelihood per UTF-8 byte",
}


def metric_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, value, detail) rows for the console table and results.md."""
    metrics = report["metrics"]
    rule = report["rule"]
    if rule == "perplexity":
        return [("perplexity", f"{metrics['perplexity']:.3f}",
                 f"{metrics['scored_tokens']:,} tokens in windows of {metrics['window']}")]
    if rule == "generate":
        rows = [(f"Dist-{n}", f"{metrics[f'dist_{n}']['distinct']:,} / "
                 f"{metrics[f'dist_{n}']['ratio']:.3f}", "distinct / all character n-grams")
                for n in (1, 2)]
        rows += [(f"BLEU-{n}", f"{metrics[f'bleu_{n}']:.2f}", "sacrebleu, zh tokenizer")
                 for n in (1, 2)]
        embedding = metrics["embedding"]
        rows += [(f"Embedding {name.title()}", f"{embedding[name]:.4f}",
                  f"{embedding['pairs']:,} pairs, {embedding['vectors']}")
                 for name in ("average", "extrema", "greedy")]
        return rows
    rows = []
    for metric in METRICS:
        m = metrics[metric]
        words = _RULE_WORDS[metric]
        words = words[rule] if isinstance(words, dict) else words
        rows.append((metric, f"{m['value']:.4f}",
                     f"{m['correct']:,}/{m['n']:,}, 95% Wilson [{m['low']:.4f}, "
                     f"{m['high']:.4f}]; {words}"))
    rows.append(("chance", f"{metrics['chance']:.4f}", f"candidates: {metrics['candidates']}"))
    return rows


def _markdown(report: dict) -> str:
    lines = [f"# {report['task']} on {report['model']}", "",
             f"{report.get('description', '')}", "",
             f"Data: {report.get('data')}; rule {report['rule']}; seed {report['seed']}; "
             f"{report['dtype']} on {report['device']}."
             + (f" Skipped lines: {report['skipped']}." if report.get("skipped") else ""), "",
             "| metric | value | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in metric_rows(report)]
    per_class = report["metrics"].get("per_class")
    if per_class:
        lines += ["", "| class | n | correct | predicted |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {c['n']} | {c['correct']} | {c['predicted']} |"
                  for label, c in per_class.items()]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, report: dict, *, force: bool = False) -> Path:
    """The report artifact at `out` (results.json, results.md)."""
    with ArtifactWriter(out, "report", force=force) as writer:
        (writer.dir / "results.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (writer.dir / "results.md").write_text(_markdown(report), encoding="utf-8")
        writer.add_input("model", report["model"], report["model_digest"])
        headline = {k: v["value"] if isinstance(v, dict) and "value" in v else v
                    for k, v in report["metrics"].items()
                    if k in (*METRICS, "perplexity", "bleu_1", "bleu_2")}
        return writer.commit(meta={"task": report["task"], "rule": report["rule"],
                                   "model_digest": report["model_digest"],
                                   "metrics": headline})
