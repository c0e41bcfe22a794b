"""Ranges, enumerations and contradictions between fields, checked after a recipe is built."""

from __future__ import annotations

import difflib
import math
import typing

from cpmctl.models.config import config_problems
from cpmctl.recipe.origin import Origin, show_value
from cpmctl.recipe.schema import (
    ENGINES,
    INHERIT_SCHEDULES,
    PRECISIONS,
    SCHEDULES,
    TEACHER_PRECISIONS,
    Recipe,
    span_corruption_lengths,
)


def validate(r: Recipe, origin: Origin) -> None:
    """Ranges, enumerations and contradictions; raises the first problem found."""

    def fail(message: str, key: str, *more: str) -> typing.NoReturn:
        raise origin.error(message, key, *more)

    def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            fail(f"{key} must be one of {', '.join(choices)}, not {value!r}{hint}", key)

    def at_least(key: str, value: float, low: float) -> None:
        if not value >= low:
            fail(f"{key} must be at least {low}, not {show_value(value)}", key)

    def within(key: str, value: float, low: float, high: float, *, high_open=True,
               low_open=False) -> None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            fail(f"{key} must be in {span}, not {show_value(value)}", key)

    run, m, d, t, e = r.run, r.model, r.data, r.train, r.engine

    # [run]
    if not run.name or "/" in run.name or "\\" in run.name or run.name in (".", ".."):
        fail(f"run.name must be a plain name (not empty, no '/'), not {run.name!r}", "run.name")

    # [model]: the rules live with the model (cpmctl.models.config), for every config source
    for message, keys in config_problems(m):
        fail(message, *keys)

    # [data]
    at_least("data.seq_len", d.seq_len, 3 if m.arch == "encdec" else 1)
    at_least("data.decoder_seq_len", d.decoder_seq_len, 0)
    if not d.train_split:
        fail("data.train_split must not be empty", "data.train_split")
    if m.arch == "gpt":
        if d.seq_len > m.max_positions:
            fail(f"data.seq_len {d.seq_len} is longer than model.max_positions "
                 f"{m.max_positions}", "data.seq_len", "model.max_positions")
        if d.decoder_seq_len:
            fail("data.decoder_seq_len applies to encdec models only (arch is gpt)",
                 "data.decoder_seq_len", "model.arch")
    else:
        within("data.noise_density", d.noise_density, 0.0, 1.0, low_open=True)
        within("data.mean_span", d.mean_span, 1.0, d.seq_len, high_open=False)
        _, targets = span_corruption_lengths(d.seq_len, d.noise_density, d.mean_span)
        if d.decoder_seq_len and d.decoder_seq_len < targets:
            fail(f"data.decoder_seq_len {d.decoder_seq_len} is shorter than the {targets} "
                 f"target tokens span corruption makes of data.seq_len {d.seq_len} "
                 "(set 0 to derive it)", "data.decoder_seq_len", "data.seq_len")

    # [train]
    at_least("train.steps", t.steps, 1)
    at_least("train.micro_batch", t.micro_batch, 1)
    at_least("train.global_batch", t.global_batch, 0)
    at_least("train.global_batch_tokens", t.global_batch_tokens, 0)
    if t.global_batch and t.global_batch_tokens:
        fail("train.global_batch and train.global_batch_tokens are both set; set one",
             "train.global_batch", "train.global_batch_tokens")
    if t.global_batch_tokens:
        if t.global_batch_tokens % d.seq_len:
            fail(f"train.global_batch_tokens {t.global_batch_tokens} is not a multiple of "
                 f"data.seq_len {d.seq_len}", "train.global_batch_tokens", "data.seq_len")
        samples = t.global_batch_tokens // d.seq_len
        if samples % t.micro_batch:
            fail(f"train.global_batch_tokens {t.global_batch_tokens} ({samples} samples) is not "
                 f"a multiple of train.micro_batch {t.micro_batch} samples",
                 "train.global_batch_tokens", "train.micro_batch")
    if t.global_batch % t.micro_batch:
        fail(f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch "
             f"{t.micro_batch}", "train.global_batch", "train.micro_batch")
    within("train.lr", t.lr, 0.0, math.inf, low_open=True)
    one_of("train.schedule", t.schedule, SCHEDULES)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    within("train.warmup_ratio", t.warmup_ratio, 0.0, 1.0)
    if t.warmup_steps and t.warmup_ratio:
        fail("train.warmup_steps and train.warmup_ratio are both set; set one",
             "train.warmup_steps", "train.warmup_ratio")
    if t.warmup_steps > t.steps:
        fail(f"train.warmup_steps {t.warmup_steps} is more than train.steps {t.steps}",
             "train.warmup_steps", "train.steps")
    if t.schedule == "noam" and not t.warmup:
        fail("train.schedule noam needs a warmup (set train.warmup_steps or "
             "train.warmup_ratio)", "train.schedule")
    within("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, high_open=False)
    at_least("train.weight_decay", t.weight_decay, 0.0)
    within("train.beta1", t.beta1, 0.0, 1.0)
    within("train.beta2", t.beta2, 0.0, 1.0)
    within("train.eps", t.eps, 0.0, math.inf, low_open=True)
    at_least("train.grad_clip", t.grad_clip, 0.0)
    one_of("train.precision", t.precision, PRECISIONS)
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.eval_steps", t.eval_steps, 1)
    at_least("train.log_every", t.log_every, 1)

    # [engine]
    one_of("engine.name", e.name, ENGINES)
    within("engine.zero_stage", e.zero_stage, 0, 3, high_open=False)
    if e.name == "torch" and e.zero_stage:
        fail(f"engine.zero_stage {e.zero_stage} needs engine.name deepspeed (torch has no ZeRO)",
             "engine.zero_stage", "engine.name")
    if e.offload_optimizer and not (e.name == "deepspeed" and e.zero_stage >= 1):
        fail("engine.offload_optimizer needs engine.name deepspeed with engine.zero_stage >= 1",
             "engine.offload_optimizer", "engine.name", "engine.zero_stage")
    if e.name == "deepspeed" and e.compile:
        fail("engine.compile works with engine.name torch only", "engine.compile",
             "engine.name")
    if e.name == "deepspeed" and e.zero_stage == 0 and t.precision != "fp32":
        # NOTE: DeepSpeed's stage-0 mixed-precision optimizer accumulates gradients in half
        # precision and exposes no per-parameter view of its fp32 state to checkpoint.
        fail(f"engine.zero_stage 0 with train.precision {t.precision!r}: DeepSpeed trains "
             "half precision with ZeRO only; use engine.zero_stage >= 1 (or the torch engine)",
             "engine.zero_stage", "train.precision")

    # [checkpoint], [inherit]
    at_least("checkpoint.every", r.checkpoint.every, 0)
    at_least("checkpoint.keep", r.checkpoint.keep, 0)
    within("inherit.alpha", r.inherit.alpha, 0.0, 1.0, high_open=False)
    at_least("inherit.decay_steps", r.inherit.decay_steps, 0)
    within("inherit.temperature", r.inherit.temperature, 0.0, math.inf, low_open=True)
    one_of("inherit.schedule", r.inherit.schedule, INHERIT_SCHEDULES)
    one_of("inherit.teacher_precision", r.inherit.teacher_precision, TEACHER_PRECISIONS)

