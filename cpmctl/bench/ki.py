"""`cpmctl bench ki`: what knowledge-inherited growth saves, measured on one dataset.

A teacher (tiny-gpt, trained as the quick start trains it, or `--teacher`), and a student
twice its width and depth (4 × 128, 8 heads), trained for the same number of steps:

    (a) scratch      random init, LM loss
    (b) ki           random init, the KI loss with the teacher ([inherit])
    (c) grown        initialised by `cpmctl grow` from the teacher, LM loss
    (d) grown+ki     grown, and the KI loss

For each: the steps it needs to reach the scratch run's final validation loss, linearly
interpolated between evaluations (the model's loss before its first step counts as the
evaluation at step 0), their ratio to the scratch run's own, the wall time, and the seconds
spent in the teacher's forward passes.

Two accountings of the cost. The literature's (bert2BERT, KI) treats the teacher as given:
the ratio counts the student's steps only. The other counts what the teacher cost too, in
student-step equivalents of training FLOPs (models.training_flops_per_token): its training
(its steps, on batches the size of the students') for every run that uses it, and its forward
passes during the distilled steps (a forward is a third of a trained token's FLOPs). Both are
reported; which one matters depends on whether the smaller model existed anyway.

Every run is an ordinary run folder under the work directory (the grown model in
grown-model/), so `cpmctl plot` draws them again.

NOTE: the student's width is grown with a random split of the copies (`--split-noise`):
tiny-gpt has no dropout, and exact block-diagonal copies would otherwise train in lockstep.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import open_artifact
from ..console import info
from ..errors import CpmError
from ..grow import GrowOptions, grow
from ..models import training_flops_per_token
from ..models.artifact import read_model_json
from ..plot import Curve, write_png
from ..recipe import load_recipe

STUDENT = ["model.d_model=128", "model.n_heads=8", "model.n_layers=4"]
RUNS = (("scratch", "random init, LM loss"), ("ki", "random init, KI loss"),
        ("grown", "grown from the teacher, LM loss"), ("grown+ki", "grown, KI loss"))


@dataclass
class KiSettings:
    dataset: str
    workdir: str
    steps: int = 500
    teacher: str | None = None
    alpha: float = 1.0
    decay_ratio: float = 0.4
    temperature: float = 2.0
    split_noise: float = 0.5
    eval_every: int = 0  # 0: steps / 10
    seed: int = 1234


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve reaches `target`, linearly interpolated between
    the two evaluations around it; None if it never does."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if y1 <= target:
            if y0 <= target:
                return float(x0)
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    if points and points[0][1] <= target:
        return float(points[0][0])
    return None


def steps_with_teacher(steps: float, run: str, teacher_steps: int, teacher_per_token: float,
                       decay_steps: int) -> float:
    """`steps` of run `run` plus what its teacher cost, in student steps of equal FLOPs: the
    teacher's training for every run but scratch, and for the KI runs a teacher forward (a
    third of a trained token) for each distilled step (α > 0 before `decay_steps`)."""
    if run == "scratch":
        return steps
    distilled = min(steps, decay_steps) if run.endswith("ki") else 0.0
    return steps + teacher_per_token * (teacher_steps + distilled / 3)


def _train(settings: KiSettings, name: str, overrides: list[str]) -> dict:
    from ..train.loop import Trainer

    run = Path(settings.workdir) / name
    every = settings.eval_every or max(settings.steps // 10, 1)
    recipe = load_recipe("tiny-gpt", [
        f'data.dataset="{settings.dataset}"', f'run.output="{run}"', f'run.name="{name}"',
        f"run.seed={settings.seed}", f"train.steps={settings.steps}",
        f"train.warmup_steps={min(50, settings.steps // 10)}", f"train.eval_every={every}",
        "checkpoint.every=0", *overrides])
    started = time.perf_counter()
    trainer = Trainer(recipe, resume=False, force=True)
    initial = trainer.evaluate()
    final = trainer.run()
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in
               (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    points = [(0, initial)] + [(r["step"], r["valid_loss"]) for r in records
                               if r.get("valid_loss") is not None]
    teacher_seconds = getattr(trainer.objective, "teacher_seconds", 0.0)
    info(f"bench ki: {name} done in {seconds:.0f} s, final valid loss {points[-1][1]:.4f}")
    return {"run": str(run), "final": str(final), "points": points, "seconds": seconds,
            "teacher_seconds": teacher_seconds}


def bench_ki(settings: KiSettings) -> dict:
    if settings.steps < 10:
        raise CpmError(f"--steps must be at least 10, not {settings.steps}")
    workdir = Path(settings.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_run = None
    if settings.teacher is None:
        teacher_run = _train(settings, "teacher", [])
        teacher = teacher_run["final"]
    else:
        teacher = str(open_artifact(settings.teacher, expect="model", option="--teacher").path)
    student = load_recipe("tiny-gpt", [f'data.dataset="{settings.dataset}"', *STUDENT]).model
    grown_path, lineage = grow(teacher, student, workdir / "grown-model",
                               GrowOptions(split_noise=settings.split_noise,
                                           seed=settings.seed), force=True)
    ki = [f'inherit.teacher="{teacher}"', f"inherit.alpha={settings.alpha}",
          f"inherit.decay_steps={max(int(settings.steps * settings.decay_ratio), 1)}",
          f"inherit.temperature={settings.temperature}"]
    grown_init = [f'init.model="{grown_path}"']
    overrides = {"scratch": [], "ki": ki, "grown": grown_init, "grown+ki": grown_init + ki}
    runs = {name: _train(settings, name, STUDENT + overrides[name]) for name, _ in RUNS}
    target = runs["scratch"]["points"][-1][1]
    scratch_steps = steps_to_reach(runs["scratch"]["points"], target)
    seq_len = load_recipe("tiny-gpt").data.seq_len
    per_token = training_flops_per_token(read_model_json(teacher)[0], seq_len) / \
        training_flops_per_token(student, seq_len)
    teacher_steps = int(open_artifact(teacher, expect="model").meta.get("steps", 0))
    decay = max(int(settings.steps * settings.decay_ratio), 1)
    rows = []
    for name, description in RUNS:
        run = runs[name]
        reached = steps_to_reach(run["points"], target)
        with_teacher = None if reached is None else steps_with_teacher(
            reached, name, teacher_steps, per_token, decay)
        rows.append({"run": name, "description": description,
                     "steps_to_scratch_final": reached,
                     "ratio_to_scratch": None if reached is None else reached / scratch_steps,
                     "steps_with_teacher": with_teacher,
                     "ratio_with_teacher": None if with_teacher is None
                     else with_teacher / scratch_steps,
                     "final_valid_loss": run["points"][-1][1], "seconds": run["seconds"],
                     "teacher_seconds": run["teacher_seconds"], "path": run["run"]})
    best = min((r for r in rows[1:] if r["ratio_to_scratch"] is not None),
               key=lambda r: r["ratio_to_scratch"], default=None)
    return {"dataset": settings.dataset, "steps": settings.steps, "teacher": teacher,
            "teacher_trained_s": teacher_run["seconds"] if teacher_run else None,
            "teacher_steps": teacher_steps, "teacher_flops_per_student_token": per_token,
            "grow_max_abs_logit_delta": lineage["max_abs_logit_delta"],
            "scratch_final_valid_loss": target, "rows": rows,
            "best": None if best is None else best["run"],
            "best_ratio": None if best is None else best["ratio_to_scratch"],
            "curves": {name: runs[name]["points"] for name, _ in RUNS},
            "seconds": time.perf_counter() - started}


def plot_ki(report: dict, out: str | Path) -> Path:
    curves = [Curve(name, [x for x, _ in points], [y for _, y in points])
              for name, points in report["curves"].items()]
    return write_png(curves, out, "valid_loss", "step",
                     title=f"tiny-gpt ×2 width and depth, {report['steps']} steps: "
                           "validation loss")
