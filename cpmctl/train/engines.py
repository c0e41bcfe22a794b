"""Training engines: who runs the backward pass and the optimizer step.

The trainer drives any engine through the same few calls, per optimizer step:

    engine.set_lr(lr)
    for each micro-batch:
        with engine.accumulate(last=...):
            loss = objective.loss(engine.forward_module, batch)
            engine.backward(loss)
    grad_norm = engine.finish_step()

and, around the loop, `state_dicts()` (full fp32 weights and a torch AdamW state dict: what a
checkpoint holds, whatever the engine), `extra_state()` / `load_extra_state()` (JSON-safe
state of the engine itself, such as fp16's loss scale, kept in trainer_state.json),
`restore(checkpoint)` and `final_model()`.

- `TorchEngine`: the model itself, or DDP around it under `torchrun` (gloo on CPU, NCCL on GPU).
- `DeepSpeedEngine` (cpmctl.train.deepspeed_engine): ZeRO 0-3, bf16, optimizer offload.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..recipe import Recipe
from .checkpoint import load_checkpoint
from .optim import build_optimizer


@dataclass
class Processes:
    """Where this process stands among the training processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(engine: str) -> Processes:
    """One process, or this one of a group started by `torchrun` or the `deepspeed` launcher
    (their WORLD_SIZE/RANK/LOCAL_RANK/MASTER_* variables). DeepSpeed wants a process group even
    alone: for one process the variables are set here when absent."""
    cuda = torch.cuda.is_available()
    if engine == "deepspeed" and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and engine == "torch":
        return Processes(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if engine == "deepspeed":
        from .deepspeed_engine import init_distributed

        init_distributed(backend)
    else:
        dist.init_process_group(backend)
    return Processes(dist.get_rank(), world_size, device)


def stop_processes() -> None:
    """End what start_processes began (the process group, DeepSpeed's included), so that a
    later run in the same Python process starts afresh instead of meeting a stale group."""
    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()  # and the groups DeepSpeed keeps of it
    else:
        dist.destroy_process_group()


def compile_blocks(model: nn.Module) -> None:
    """`engine.compile`: compile each repeated block of the model in place (`Module.compile`;
    the blocks of every top-level `nn.ModuleList`: GPT's blocks, the encoder's and decoder's).

    NOTE: why blocks and not the whole model: the blocks of a stack run the same code on
    parameters of the same shapes, so torch.compile compiles one and every other block reuses
    its kernels: compile time is one block's, not n_layers' (whole-model compile traces every
    block into one graph). What stays eager between them (embeddings, the final norm, the fused
    head and loss, the optimizer) is a few large ops each. Parameter names do not change."""
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                block.compile()


class TorchEngine:
    """Plain PyTorch: autocast for bf16/fp16, `clip_grad_norm_`, fused AdamW; DDP when
    several processes run (wrapped on first use, so a restore happens before DDP's broadcast).

    fp16 (CUDA) trains with dynamic loss scaling (`torch.amp.GradScaler`): the loss is scaled
    up before backward, the gradients unscaled before clipping, and a step whose gradients
    overflowed is skipped while the scale backs off; the scale is checkpointed with the run."""

    def __init__(self, model: nn.Module, recipe: Recipe, processes: Processes):
        self.processes, self.train = processes, recipe.train
        self.module = model.to(processes.device)
        self.optimizer = build_optimizer(self.module, recipe.train)
        self.scaler = (torch.amp.GradScaler(processes.device.type)
                       if recipe.train.precision == "fp16" else None)
        self._compile = recipe.engine.compile
        self._forward: nn.Module | None = None

    @property
    def forward_module(self) -> nn.Module:
        """What the objective calls in training: the model, through torch.compile when the
        recipe asks, inside DDP when distributed. Built on first use (after a restore, before
        DDP's first broadcast); checkpoints and evaluation use `module`, which has the plain
        parameter names."""
        if self._forward is None:
            if self._compile:
                compile_blocks(self.module)
            forward = self.module
            if self.processes.world_size > 1:
                forward = nn.parallel.DistributedDataParallel(forward)
            self._forward = forward
        return self._forward

    def autocast(self):
        precision, device = self.train.precision, self.processes.device.type
        if precision == "fp32":
            return torch.autocast(device, enabled=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device, dtype=dtype)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def accumulate(self, last: bool):
        """Around a micro-batch's forward and backward: DDP all-reduces only on the last."""
        module = self.forward_module
        distributed = isinstance(module, nn.parallel.DistributedDataParallel)
        return module.no_sync() if distributed and not last else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def finish_step(self) -> float:
        """Clip, step, clear the gradients; returns the gradient norm before clipping (of the
        unscaled gradients under fp16; inf or nan there means the step was skipped)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.module.parameters(),
                                        self.train.grad_clip or float("inf"))
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def extra_state(self) -> dict:
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.module.state_dict(), self.optimizer.state_dict()

    def restore(self, checkpoint: Path, probe=None) -> dict:
        """Load a checkpoint's weights and optimizer state; returns its trainer state."""
        return load_checkpoint(checkpoint, self.module, self.optimizer)

    def final_model(self) -> nn.Module:
        return self.module


def build_engine(model: nn.Module, recipe: Recipe, processes: Processes):
    if recipe.engine.name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, recipe, processes)
    return TorchEngine(model, recipe, processes)
