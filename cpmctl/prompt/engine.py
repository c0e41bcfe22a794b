"""Stage 2 under DeepSpeed: `tune-prompt --stage2 --engine deepspeed --zero-stage N`.

    engine = start_deepspeed(model, prompt, groups, settings)   # groups: named, see below
    logprob, counts = engine.forward_module(batch)               # candidate_losses
    engine.backward(loss); norm = engine.finish_step()

The model and its prompt go to cpmctl's DeepSpeed engine (cpmctl.train.deepspeed_engine, the
one `cpmctl train` uses) as ONE module, `PromptedModel`, whose forward is the scoring path's
`candidate_losses`: DeepSpeed then partitions the optimizer state of both (ZeRO 1-2) and the
weights too (ZeRO 3), keeps fp32 masters of bf16 weights, clips and steps. One process (a big
model on one GPU, its optimizer state in host memory with `--offload-optimizer`): tune-prompt
does not shard its examples over processes. The optimizer is tune-prompt's own (AdamW, the
model's decay groups and the prompt's), its groups named as the module's parameters
("model.…", "prompt.table"), so the engine's consolidated state dicts have the torch engine's
layout: a stage-2 checkpoint and output read the same whichever engine wrote them, and a run
killed under DeepSpeed resumes through `DeepSpeedEngine.load_state`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..bench.scoring import candidate_losses
from ..errors import CpmError

MODEL, PROMPT = "model.", "prompt.table"


class PromptedModel(nn.Module):
    """The model and its soft prompt (or None: full fine-tuning) as one trainable module."""

    def __init__(self, model: nn.Module, prompt: nn.Module | None):
        super().__init__()
        self.model, self.prompt = model, prompt

    def forward(self, batch):
        return candidate_losses(self.model, batch, self.prompt)


def start_deepspeed(model: nn.Module, prompt: nn.Module | None, groups: list[dict], settings):
    """A `DeepSpeedEngine` over PromptedModel(model, prompt) with AdamW over `groups` (each
    with "names" as PromptedModel names them). Settings: tune-prompt's (precision, clipping,
    batch and micro-batch, zero_stage, offload_optimizer, learning rate)."""
    from ..recipe.schema import EngineConfig, Recipe, TrainConfig
    from ..train.deepspeed_engine import DeepSpeedEngine
    from ..train.engines import start_processes

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CpmError("tune-prompt --engine deepspeed runs as one process (it does not shard "
                       "its examples over processes): start it without torchrun/deepspeed")
    processes = start_processes("deepspeed")
    train = TrainConfig(precision=settings.precision, grad_clip=settings.grad_clip,
                        micro_batch=settings.micro_batch or settings.batch_size,
                        global_batch=settings.batch_size,
                        lr=settings.learning_rate, weight_decay=settings.weight_decay)
    engine = EngineConfig(name="deepspeed", zero_stage=settings.zero_stage,
                          offload_optimizer=settings.offload_optimizer)
    recipe = Recipe(model=model.cfg, train=train, engine=engine)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    return DeepSpeedEngine(PromptedModel(model, prompt), recipe, processes, optimizer)


def gathered_weights(engine) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the model's full fp32 state dict, the prompt's fp32 table, None when the prompt is
    fixed or absent), gathered from the engine's partitions (collective: every process calls
    it). A fixed prompt has no fp32 master (it is no optimizer's): the caller keeps its own."""
    from ..train.deepspeed_engine import full_state_dict

    state = full_state_dict(engine.module, engine._fp32)
    model = {name.removeprefix(MODEL): t for name, t in state.items() if name.startswith(MODEL)}
    prompt = engine.module.prompt
    trained = prompt is not None and prompt.table.requires_grad
    return model, state[PROMPT] if trained else None
