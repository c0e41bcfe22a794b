"""Accuracy metrics of scored candidates, with 95% Wilson score intervals.

    summary = accuracy_summary(scores, rule="cpm1")
    summary["acc"] == {"value": 0.61, "correct": 61, "n": 100, "low": 0.51, "high": 0.70}

The interval is Wilson's score interval (z = 1.96): unlike the normal approximation it stays
inside [0, 1] and is honest for small n and for accuracies near 0 or 1. "Above chance" in a
report means the interval's lower end is above the chance rate (1 / candidates, averaged
over the examples).
"""

from __future__ import annotations

import math

METRICS = ("acc", "acc_norm", "acc_bytes")
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"value": correct / n if n else 0.0, "correct": correct, "n": n, "low": low,
            "high": high}


def accuracy_summary(scores, rule: str) -> dict:
    """acc, acc_norm, acc_bytes (each with its interval), the chance rate and the per-class
    counts (gold label -> n, correct, predicted) of a list of ExampleScore."""
    summary: dict = {}
    for metric in METRICS:
        correct = sum(s.prediction(metric, rule) == s.gold for s in scores)
        summary[metric] = proportion(correct, len(scores))
    summary["chance"] = (sum(1 / len(s.labels) for s in scores) / len(scores)
                         if scores else 0.0)
    per_class: dict[str, dict] = {}
    for s in scores:
        gold = s.labels[s.gold]
        predicted = s.labels[s.prediction("acc", rule)]
        per_class.setdefault(gold, {"n": 0, "correct": 0, "predicted": 0})
        per_class.setdefault(predicted, {"n": 0, "correct": 0, "predicted": 0})
        per_class[gold]["n"] += 1
        per_class[gold]["correct"] += predicted == gold
        per_class[predicted]["predicted"] += 1
    summary["per_class"] = dict(sorted(per_class.items()))
    summary["truncated"] = sum(s.truncated for s in scores)
    return summary
