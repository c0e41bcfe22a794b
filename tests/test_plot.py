"""`cpmctl plot`: curves from metrics.jsonl as a PNG, labels from run names, bad input."""

from __future__ import annotations

import json

import pytest

from cpmctl.bench.ki import steps_to_reach, steps_with_teacher
from cpmctl.errors import CpmError
from cpmctl.plot import read_curves


def run_folder(path, name, records):
    path.mkdir(parents=True)
    (path / "recipe.toml").write_text(f'[run]\nname = "{name}"\n', encoding="utf-8")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                        encoding="utf-8")
    return path


@pytest.fixture
def runs(tmp_path):
    a = run_folder(tmp_path / "a", "scratch", [
        {"step": s, "loss": 5 - s / 10, "tokens": 100, **({"valid_loss": 6 - s / 10}
                                                          if s % 2 == 0 else {})}
        for s in range(1, 9)])
    b = run_folder(tmp_path / "b", "grown", [
        {"step": s, "loss": 4 - s / 10, "tokens": 50, "valid_loss": 5 - s / 10}
        for s in range(1, 5)])
    return a, b


def test_curves_by_step_and_by_tokens(runs):
    a, b = runs
    by_step = read_curves([a, b], "valid_loss", "step")
    assert [c.label for c in by_step] == ["scratch", "grown"]
    assert by_step[0].xs == [2, 4, 6, 8] and by_step[0].ys == pytest.approx([5.8, 5.6, 5.4, 5.2])
    by_tokens = read_curves([a, b], "loss", "tokens")
    assert by_tokens[0].xs[:3] == [100, 200, 300] and by_tokens[1].xs == [50, 100, 150, 200]


def test_the_png_and_json(runs, tmp_path, cli):
    a, b = runs
    out = tmp_path / "plots" / "curves.png"
    result = cli("plot", str(a), str(b), "-o", str(out), "--x", "tokens")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 5000
    assert not list(out.parent.glob(".*partial"))
    points = json.loads(cli("plot", str(a), "--metric", "loss", "--json").out)
    assert points[0]["label"] == "scratch" and len(points[0]["loss"]) == 8


def test_same_names_are_told_apart_by_folder(tmp_path):
    one = run_folder(tmp_path / "x", "r", [{"step": 1, "loss": 1.0}])
    two = run_folder(tmp_path / "y", "r", [{"step": 1, "loss": 2.0}])
    assert [c.label for c in read_curves([one, two], "loss")] == [str(one), str(two)]


def test_bad_input(runs, tmp_path, cli):
    a, _ = runs
    missing = cli("plot", str(a), "--metric", "kd_loss", "-o", str(tmp_path / "c.png"))
    assert missing.code == 2 and f"{a}: its metrics.jsonl has no 'kd_loss'" in missing.err
    assert "loss, tokens, valid_loss" in missing.err and not (tmp_path / "c.png").exists()
    no_run = cli("plot", str(tmp_path), "-o", str(tmp_path / "c.png"))
    assert no_run.code == 2 and "no metrics.jsonl" in no_run.err
    not_png = cli("plot", str(a), "-o", str(tmp_path / "c.jpg"))
    assert not_png.code == 2 and "PNG" in not_png.err
    nowhere = cli("plot", str(a))  # stdout is captured: not a terminal
    assert nowhere.code == 2 and "pass -o FILE.png" in nowhere.err
    (a / "metrics.jsonl").write_text('{"step": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(CpmError, match="metrics.jsonl:2: not a JSON line"):
        read_curves([a], "loss")


def test_steps_to_reach_interpolates_between_evaluations():
    points = [(0, 8.0), (10, 6.0), (20, 5.0), (30, 4.5)]
    assert steps_to_reach(points, 5.5) == pytest.approx(15.0)
    assert steps_to_reach(points, 4.5) == pytest.approx(30.0)
    assert steps_to_reach(points, 8.0) == 0.0
    assert steps_to_reach(points, 4.0) is None


def test_steps_with_teacher_counts_its_training_and_its_forward_passes():
    # a teacher token costs 0.3 of a student's; 500 teacher steps = 150 student steps
    assert steps_with_teacher(40.0, "scratch", 500, 0.3, 20) == 40.0
    assert steps_with_teacher(40.0, "grown", 500, 0.3, 20) == pytest.approx(40 + 150)
    # distilled for the first 20 steps: 20 forwards = 20 x 0.3 / 3 student steps
    assert steps_with_teacher(40.0, "grown+ki", 500, 0.3, 20) == pytest.approx(40 + 150 + 2)
    assert steps_with_teacher(10.0, "ki", 500, 0.3, 20) == pytest.approx(10 + 150 + 1)
