"""`cpmctl tune-prompt`: prompt tuning (stage 1), stage 2, and PEFT conversion."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cpmctl.errors import CpmError


def _peft_folder(option: str, pair: tuple) -> Path | None:
    """`--to peft DIR` / `--from peft DIR`: the folder, or None when the option is absent."""
    if pair is None or pair == (None, None):
        return None
    fmt, folder = pair
    if fmt != "peft":
        raise CpmError(f"{option}: the one format is peft ({option} peft DIR), not {fmt!r}")
    return Path(folder)


def tune_prompt(
    model: Path = typer.Option(None, "--model", "-m", help="The base model artifact."),
    task: str = typer.Option(None, "--task", "-t",
                             help="A shipped task name (sentiment) or a task .toml file."),
    train: Path = typer.Option(None, "--train", help="Training data (the task's format)."),
    valid: Path = typer.Option(
        None, "--valid", help="Validation data: accuracy by the task's rule, early stopping, "
                              "the best prompt kept."),
    output: Path = typer.Option(
        None, "--output", "-o", help="The prompt artifact to write (stage 2: the model)."),
    length: int = typer.Option(100, help="Prompt vectors (CPM-2: 100)."),
    position: str = typer.Option(
        "front", help="front, middle, back, or counts F:M:B summing to --length (33:34:33): "
                      "before, between and after the task's input parts."),
    init: str = typer.Option("mask", help="mask, vocab, or text:SOME TEXT (repeated or cut)."),
    lr: float = typer.Option(None, help="Learning rate, constant (default 5e-3; stage 2: 1e-4)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    clip: float = typer.Option(1.0, help="Gradient clipping norm (0: none)."),
    epochs: int = typer.Option(1, help="Passes over the training data (unless --steps)."),
    steps: int = typer.Option(0, help="Optimizer steps (0: what --epochs takes)."),
    batch_size: int = typer.Option(16, help="Examples per optimizer step."),
    micro_batch: int = typer.Option(0, help="Examples per forward pass (0: the batch)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast; CPU and GPU)."),
    eval_every: int = typer.Option(0, help="Steps between validations (0: every epoch)."),
    patience: int = typer.Option(
        0, help="Stop after this many validations without improvement (0: never)."),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints (0: none)."),
    eval_batch: int = typer.Option(32, help="Candidates per forward pass in validation."),
    seed: int = typer.Option(0, help="Seeds the init, the data order and dropout."),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing",
        help="Recompute activations in the backward pass: less memory, one more forward."),
    device: str = typer.Option("cpu", help="cpu, or cuda where there is one."),
    stage2: bool = typer.Option(
        False, "--stage2", help="Tune the whole model from the --prompt state (without "
                                "--prompt: full fine-tuning)."),
    fix_prompt: bool = typer.Option(False, "--fix-prompt", help="Stage 2: keep the prompt "
                                                               "fixed."),
    engine: str = typer.Option(
        "torch", help="Stage 2: torch, or deepspeed (ZeRO, for models whose optimizer state "
                      "does not fit; one process)."),
    zero_stage: int = typer.Option(None, help="--engine deepspeed: the ZeRO stage 0-3 "
                                              "(default 2)."),
    offload_optimizer: bool = typer.Option(
        False, "--offload-optimizer", help="--engine deepspeed: optimizer state and step in "
                                           "host memory."),
    prompt: Path = typer.Option(
        None, "--prompt", help="A prompt artifact: stage 2's start, or what --to converts."),
    prompt_out: Path = typer.Option(None, "--prompt-out",
                                    help="Stage 2: where the tuned prompt goes."),
    to: tuple[str, str] = typer.Option(
        None, "--to", help="Convert --prompt: --to peft DIR (PEFT prompt tuning)."),
    from_: tuple[str, str] = typer.Option(
        None, "--from", help="Convert a PEFT adapter into -o: --from peft DIR."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a soft prompt on a frozen model (CPM-2's prompt tuning), or with --stage2 the
    whole model from a prompt-tuned state; writes a prompt artifact (kilobytes) tied to the
    model's digest. Rerunning an interrupted command resumes from its last checkpoint.

    PEFT: --prompt P --to peft DIR writes a PEFT adapter for the model exported with
    `cpmctl model convert --to hf`; --from peft DIR --model M --task T -o P reads one back.

    Example: cpmctl tune-prompt -m model -t sentiment --train train.jsonl --length 20 -o prompt
    """
    to_dir, from_dir = _peft_folder("--to", to), _peft_folder("--from", from_)
    # NOTE: imported here: torch takes seconds to import and the other commands need none.
    if to_dir is not None:
        from cpmctl.prompt.peft import to_peft

        if prompt is None:
            raise CpmError("--to peft DIR converts a prompt: give --prompt P")
        print(to_peft(prompt, to_dir, force=force))
        return
    missing = [name for name, value in (("--model", model), ("--task", task),
                                        ("--output", output)) if value is None]
    if from_dir is not None:
        from cpmctl.bench.tasks import load_task
        from cpmctl.prompt.peft import from_peft
        from cpmctl.prompt.tune import task_definition

        if missing:
            raise CpmError(f"--from peft DIR needs {', '.join(missing)}")
        print(from_peft(from_dir, model, task_definition(load_task(task)), output, force=force))
        return
    if train is None:
        missing.append("--train")
    if missing:
        raise CpmError(f"tune-prompt needs {', '.join(missing)}")
    from cpmctl.prompt.tune import TuneInputs, TuneSettings, tune

    settings = TuneSettings(
        length=length, position=position, init=init, lr=lr, weight_decay=weight_decay,
        grad_clip=clip, epochs=epochs, steps=steps, batch_size=batch_size,
        micro_batch=micro_batch, precision=precision, eval_every=eval_every, patience=patience,
        checkpoint_every=checkpoint_every, eval_batch=eval_batch, seed=seed, device=device,
        stage2=stage2, fix_prompt=fix_prompt, activation_checkpointing=activation_checkpointing,
        engine=engine, zero_stage=zero_stage, offload_optimizer=offload_optimizer)
    summary = tune(TuneInputs(model, task, train, valid, prompt), settings, output,
                   prompt_out=prompt_out, force=force)
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(summary.get("model") or summary["prompt"])
        if "model" in summary and "prompt" in summary:
            print(summary["prompt"])
