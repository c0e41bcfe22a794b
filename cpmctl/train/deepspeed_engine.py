"""The DeepSpeed engine: `deepspeed.initialize` with a config derived from the recipe.

    [engine]
    name = "deepspeed"
    zero_stage = 2            # 0-3; bf16 needs >= 1
    offload_optimizer = true  # optimizer state and step in host memory (stage >= 1)

    cpmctl train --recipe R.toml                                   # one process
    deepspeed --num_gpus 8 --no_local_rank --module cpmctl train --recipe R.toml
    torchrun --nnodes 2 --nproc_per_node 8 ... -m cpmctl train --recipe R.toml

The optimizer is ours (torch AdamW, decay on weight matrices only, see optim.py), handed to
DeepSpeed, which partitions its state (ZeRO) and keeps fp32 masters of bf16 weights. With an
offloaded optimizer this is torch's AdamW running on the CPU, not DeepSpeed's JIT-built
`cpu_adam` (no compiler needed; slower at scale).

Checkpoints never go through DeepSpeed's own `save_checkpoint`, which pickles: through its
tensor-fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state` and their
setters, which work for ZeRO 1-3 and offload) the partitioned fp32 masters and Adam moments
are gathered, one parameter at a time, into exactly the checkpoint a `TorchEngine` writes:
model.safetensors with full fp32 weights, and a torch AdamW state dict. A run's checkpoints
thus read the same whatever engine wrote them, and `final/` is an ordinary model artifact.
The price: the main process holds the full fp32 weights and moments while it writes them
(three times the model size in host memory).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..errors import CpmError
from ..models import build_model
from ..recipe import Recipe
from .checkpoint import load_checkpoint, read_optimizer
from .engines import Processes
from .optim import build_optimizer

if not torch.cuda.is_available():
    # NOTE: without this DeepSpeed probes for accelerators and logs a warning at import.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def init_distributed(backend: str) -> None:
    """DeepSpeed's process group (it wraps torch.distributed's), quietly.

    NOTE: on CPU, DeepSpeed would JIT-compile a shared-memory all-reduce op at every start
    where its build cache misses (45 s here, and a C++ compiler needed); gloo's all-reduce
    does the same job, so the op is switched off."""
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed calls collectives torch deprecates; torch warns at every call, not once.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def ds_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config for a recipe (batch sizes, clipping, precision, ZeRO)."""
    train, engine = recipe.train, recipe.engine
    accumulation = train.accumulation(recipe.data.seq_len, world_size)
    zero: dict = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": train.micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},  # dynamic loss scaling
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch's AdamW on the CPU when offloading
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """The `TorchEngine` interface (see engines.py) over a DeepSpeed engine."""

    def __init__(self, model: nn.Module, recipe: Recipe, processes: Processes,
                 optimizer: torch.optim.Optimizer | None = None):
        """`optimizer`: the recipe's (build_optimizer) when None; tune-prompt's stage 2 hands
        in its own (the model's groups and the prompt's), with "names" in every group."""
        self.recipe, self.processes = recipe, processes
        optimizer = optimizer or build_optimizer(model, recipe.train)
        # The torch layout of the optimizer's state dict (groups, names, hyper-parameters),
        # taken before DeepSpeed replaces the groups' parameters by flat partitions.
        self._layout = optimizer.state_dict()["param_groups"]
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model.to(processes.device), optimizer=optimizer,
            config=ds_config(recipe, processes.world_size))
        self.module = self.ds.module
        self._norm: float | None = None

    @property
    def forward_module(self) -> nn.Module:
        return self.ds

    @property
    def zero3(self) -> bool:
        return self.recipe.engine.zero_stage == 3

    def autocast(self):
        return nullcontext()  # DeepSpeed casts the weights to bf16/fp16 itself

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def accumulate(self, last: bool):
        return nullcontext()  # DeepSpeed counts micro-steps itself

    def backward(self, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's micro-step (the optimizer steps on the last one). The loss
        is already scaled for accumulation by the trainer, hence scale_wrt_gas=False."""
        self.ds.backward(loss, scale_wrt_gas=False)
        if self.ds.is_gradient_accumulation_boundary():
            self._norm = self._plain_grad_norm()
        self.ds.step()

    def _plain_grad_norm(self) -> float | None:
        """Stage 0 in fp32 clips the plain gradients without reporting their norm."""
        if self.recipe.engine.zero_stage or self.recipe.train.precision != "fp32":
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(nn.utils.get_total_norm(grads)) if grads else 0.0

    def finish_step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float(self._norm or 0.0)

    # --- checkpoints ---------------------------------------------------------------

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _link_moments(self) -> None:
        """NOTE: DeepSpeed 0.19's ZeRO 1/2 link each parameter's view of the Adam moments
        after the first group's first step, before the other groups have any: re-link."""
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    @property
    def _partitioned(self) -> bool:
        """Whether DeepSpeed keeps the fp32 masters and moments in partitions (ZeRO >= 1;
        stage 0 trains fp32 only, its parameters are the masters).
        NOTE: decided by the stage, never per parameter: under ZeRO 1/2 a parameter that lies
        wholly in another process's partition has no mapping here, yet gathering it is a
        collective that every process must join."""
        return self.recipe.engine.zero_stage >= 1

    def _fp32(self, p: nn.Parameter) -> torch.Tensor:
        """The full fp32 master of `p`; a frozen parameter (no optimizer's) has none: itself."""
        return safe_get_full_fp32_param(p) if self._partitioned and p.requires_grad else p

    def _moment(self, p: nn.Parameter, key: str) -> torch.Tensor:
        if self._partitioned:
            return safe_get_full_optimizer_state(p, key)
        return self._base_optimizer().state[p][key]

    def _adam_step(self) -> float:
        steps = {float(s["step"]) for s in self._base_optimizer().state.values() if "step" in s}
        return steps.pop() if steps else 0.0

    #: DeepSpeed's dynamic loss scaler (fp16): what a bit-exact resume needs of it.
    _SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def extra_state(self) -> dict:
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if not self.ds.fp16_enabled() or scaler is None:
            return {}
        return {"loss_scaler": {name: float(getattr(scaler, name))
                                for name in self._SCALER_FIELDS if hasattr(scaler, name)}}

    def load_extra_state(self, state: dict) -> None:
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        for name, value in state.get("loss_scaler", {}).items():
            if scaler is not None and name in self._SCALER_FIELDS:
                setattr(scaler, name, value if name == "cur_scale" else int(value))

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Full fp32 weights and the torch AdamW state dict, gathered from the partitions.
        Collective: every process calls it (the main one writes)."""
        self._link_moments()
        weights = full_state_dict(self.module, self._fp32)
        params = dict(self.module.named_parameters())
        step = torch.tensor(self._adam_step())
        state, groups = {}, []
        for layout, live in zip(self._layout, self.optimizer.param_groups, strict=True):
            groups.append({**layout, "lr": live["lr"]})
            for index, name in zip(layout["params"], layout["names"], strict=True):
                p = params[name]
                state[index] = {"step": step.clone(),
                                **{k: self._moment(p, k).detach().float().cpu().clone()
                                   for k in ADAM_MOMENTS}}
        return weights, {"state": state, "param_groups": groups}

    def restore(self, checkpoint: Path, probe) -> dict:
        """Load a checkpoint into the partitions; returns its trainer state. `probe()` gives a
        loss from a real batch: one step on it times 0 at learning rate 0 makes DeepSpeed
        create its (lazily built) optimizer state without changing a weight."""
        cpu = build_model(self.recipe.model)
        trainer_state = load_checkpoint(checkpoint, cpu, None)
        self.load_state(dict(cpu.named_parameters()), read_optimizer(Path(checkpoint)), probe,
                        str(checkpoint))
        return trainer_state

    def load_state(self, weights: dict[str, torch.Tensor], saved: dict, probe,
                   where: str) -> None:
        """Write full fp32 `weights` (by parameter name) and a torch AdamW state dict `saved`
        into the partitions (`restore`'s work, for a checkpoint read elsewhere)."""
        if len(saved["param_groups"]) != len(self._layout):
            raise CpmError(f"{where}: the optimizer has {len(self._layout)} parameter "
                           f"group(s), the checkpoint {len(saved['param_groups'])}")
        self._materialise_state(probe)
        self._link_moments()
        params = dict(self.module.named_parameters())
        for layout in self._layout:
            for index, name in zip(layout["params"], layout["names"], strict=True):
                self._set(params[name], weights[name], saved["state"].get(index))
        step = saved["state"][next(iter(saved["state"]))]["step"] if saved["state"] else 0.0
        for s in self._base_optimizer().state.values():
            if "step" in s:
                s["step"].fill_(float(step))

    def _materialise_state(self, probe) -> None:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.set_lr(0.0)
        for _ in range(self.ds.gradient_accumulation_steps()):
            self.ds.backward(probe() * 0.0, scale_wrt_gas=False)
            self.ds.step()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _set(self, p: nn.Parameter, weight: torch.Tensor, moments: dict | None) -> None:
        """Write one parameter's fp32 master, its working copy and its Adam moments."""
        weight = weight.detach()
        if not self._partitioned:  # stage 0, fp32: the parameter is the master
            p.data.copy_(weight)
            state = self._base_optimizer().state[p]
            for key in ADAM_MOMENTS:
                state[key].copy_(moments[key] if moments else torch.zeros_like(weight))
            return
        safe_set_full_fp32_param(p, weight.to(p.device))
        for key in ADAM_MOMENTS:
            value = moments[key] if moments else torch.zeros_like(weight)
            safe_set_full_optimizer_state(p, value.to(p.device), key)
        if hasattr(p, "ds_id"):  # ZeRO 3: the bf16 copy is partitioned too
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(weight.to(p.dtype))
        else:
            p.data.copy_(weight.to(p.dtype))

    def final_model(self) -> nn.Module:
        """A CPU fp32 copy of the model with the consolidated master weights (collective)."""
        weights = full_state_dict(self.module, self._fp32)
        model = build_model(self.recipe.model)
        model.load_state_dict(weights)
        return model


def full_state_dict(module: nn.Module, fp32_of) -> dict[str, torch.Tensor]:
    """The module's state dict with every parameter replaced by `fp32_of(parameter)` on the
    CPU; a tied weight stays one tensor under all its names (the artifact stores it once)."""
    done: dict[int, torch.Tensor] = {}
    state = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in done:
            done[id(p)] = fp32_of(p).detach().float().cpu().clone()
        state[name] = done[id(p)]
    for name, b in module.named_buffers():
        state[name] = b.detach().cpu()
    return state
