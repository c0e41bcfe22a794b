"""`cpmctl train`: a recipe -> a run folder (recipe.toml, metrics.jsonl, checkpoints/, final/).

    cpmctl train --recipe recipes/tiny-gpt.toml                    # one process
    torchrun --nproc_per_node 2 -m cpmctl train --recipe R.toml    # DDP (gloo on CPU, NCCL on GPU)
    [engine] name = "deepspeed"                                    # ZeRO (deepspeed_engine.py)
    cpmctl train --recipe R.toml --resume                          # continue a killed run

The data order is one integer, the number of samples consumed, so a resumed run continues
with the very next batch; with the model, optimizer and RNG states restored from the newest
valid checkpoint, the loss curve continues exactly as if the run had never stopped.

The loss of a step is the mean over every target token of the global batch: each micro-batch
contributes its token sum divided by the global token count (times the world size, which DDP's
gradient averaging divides out), so one process and N processes compute the same gradient.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cpmctl import console
from cpmctl.artifacts import finalize_in_place, open_artifact
from cpmctl.console import info, warn
from cpmctl.data.samples import PackedSamples, open_dataset
from cpmctl.errors import CpmError
from cpmctl.kernels import dense
from cpmctl.models import build_model, checkpoint_activations, count_parameters
from cpmctl.models.artifact import load_weights, read_model_json, save_model
from cpmctl.models.config import architecture
from cpmctl.recipe import Recipe, dump_recipe, load_recipe, recipe_digest
from cpmctl.resources import check_fits
from cpmctl.tokenizer import from_folder
from cpmctl.train.checkpoint import (
    RESUME_FIELDS,
    check_world_size,
    find_resumable,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cpmctl.train.collectives import Collectives
from cpmctl.train.engines import build_engine, start_processes, stop_processes
from cpmctl.train.objectives import build_objective
from cpmctl.train.run_folder import METRICS_FILE, RECIPE_FILE, RunFolder
from cpmctl.train.schedule import learning_rate


def _check_recipe(recipe: Recipe, processes) -> None:
    if recipe.train.precision == "fp16" and processes.device.type != "cuda":
        raise CpmError("train.precision = 'fp16' needs a CUDA device (loss scaling); "
                       "use 'bf16' or 'fp32' on CPU")
    if (recipe.train.precision == "bf16" and processes.device.type == "cpu" and processes.main
            and not dense.torch_has_native_bf16()):
        warn("train.precision = 'bf16': this CPU has no bf16 matrix instructions (AVX-512 BF16 "
             "or AMX), so PyTorch emulates them and training runs several times slower than "
             "in 'fp32'")
    if not recipe.data.dataset:
        raise CpmError("data.dataset: the recipe names no dataset (cpmctl data tokenize)")


def _check_memory(recipe: Recipe, device: torch.device) -> None:
    """Refuse a model whose fp32 weights (built on the CPU first), and under the torch engine
    its gradients and Adam moments too (16 bytes a parameter, where it trains), cannot fit."""
    parameters = count_parameters(recipe.model)  # on the meta device: nothing allocated
    advice = "choose a smaller [model], or DeepSpeed ZeRO with optimizer offload"
    check_fits(4 * parameters, "cpu", f"building the model's {parameters:,} fp32 parameters",
               advice)
    if recipe.engine.name == "torch":
        check_fits(16 * parameters, device, f"training {parameters:,} parameters with AdamW "
                   "(weights, gradients, two moments)", advice)


class Trainer:
    """One training run, from a recipe, in the run folder `recipe.run.output_dir`."""

    def __init__(self, recipe: Recipe, *, resume: bool, force: bool = False):
        self.recipe, self.resume = recipe, resume
        self.processes = start_processes(recipe.engine.name)
        if not self.processes.main:
            console.settings.quiet = True  # one progress line per step, not one per process
        _check_recipe(recipe, self.processes)
        self.run_dir = recipe.run.output_dir
        data, train = recipe.data, recipe.train
        self.stream = open_dataset(data.dataset, data.train_split)
        if self.stream.vocab_size > recipe.model.vocab_size:
            raise CpmError(f"model.vocab_size {recipe.model.vocab_size} is smaller than the "
                           f"tokenizer of {data.dataset} ({self.stream.vocab_size} tokens)")
        self.dataset_tokenizer = Path(data.dataset) / "tokenizer"
        tokenizer = from_folder(self.dataset_tokenizer)
        self.objective = build_objective(recipe, self.stream.eod_id, tokenizer,
                                         self.processes.device)
        self.samples = PackedSamples(self.stream, self.objective.window, recipe.run.seed,
                                     vocab_size=recipe.model.vocab_size)
        self.eval_samples = self._eval_samples()
        self.accumulation = train.accumulation(data.seq_len, self.processes.world_size)
        self.global_batch = train.batch_samples(data.seq_len, self.processes.world_size)
        _check_memory(recipe, self.processes.device)
        torch.manual_seed(recipe.run.seed)
        model = self._initial_model()
        if recipe.engine.activation_checkpointing:
            checkpoint_activations(model)
        self.collectives = Collectives(self.processes.world_size, self.processes.device)
        self.folder = RunFolder(self.run_dir, self.processes.main)
        self.folder.claim(resume=resume, force=force)  # locked from here until the run ends
        try:
            # NOTE: found before the engine starts (DeepSpeed's start takes seconds), so a
            # resume with the wrong number of processes is refused first
            self.checkpoint = find_resumable(self.run_dir) if resume else None
            if self.checkpoint is not None:
                check_world_size(read_trainer_state(self.checkpoint, RESUME_FIELDS),
                                 self.processes.world_size, self.checkpoint)
            self.engine = build_engine(model, recipe, self.processes)
            self.model = self.engine.module
            self.step, self.consumed = 0, 0
            # NOTE: only now, with everything that can fail checked, is the run folder
            # written: a failed start must not leave a folder that blocks the corrected retry.
            self._prepare_run_dir(force)
            if resume:
                self._restore()
        except BaseException:
            self.folder.release()
            raise

    # --- set-up -----------------------------------------------------------------------

    def _prepare_run_dir(self, force: bool) -> None:
        saved = self.run_dir / RECIPE_FILE
        fresh = force or not self.resume
        if not fresh:
            if recipe_digest(load_recipe(saved)) != recipe_digest(self.recipe):
                raise CpmError(f"{self.run_dir}: the recipe differs from the one the run "
                               f"started with ({saved}); resume with that recipe")
        self.collectives.barrier()  # every process has looked before the first one writes
        self.folder.start(dump_recipe(self.recipe, comments=True), self.dataset_tokenizer,
                          fresh=fresh)
        self.collectives.barrier()

    def _eval_samples(self) -> PackedSamples | None:
        data = self.recipe.data
        if not self.recipe.train.eval_every:
            return None
        try:
            stream = open_dataset(data.dataset, data.eval_split)
            return PackedSamples(stream, self.objective.window, 0,
                                 vocab_size=self.recipe.model.vocab_size)
        except CpmError as exc:
            warn(f"no validation: {exc}")
            return None

    def _initial_model(self):
        if not self.recipe.init.model:
            return build_model(self.recipe.model)
        path = open_artifact(self.recipe.init.model, expect=("model", "checkpoint"),
                             option="init.model").path
        cfg, tied = read_model_json(path)
        ours, theirs = architecture(self.recipe.model), architecture(cfg)
        if ours != theirs:
            differ = ", ".join(f"model.{key} {theirs[key]!r} vs {ours[key]!r}"
                               for key in ours if ours[key] != theirs[key])
            raise CpmError(f"init.model {self.recipe.init.model}: its architecture differs "
                           f"from the recipe's [model] ({differ}; grow it first: cpmctl grow)")
        # built from the recipe's [model], so its training settings (dropout) are the recipe's
        model = build_model(self.recipe.model)
        load_weights(path, model, tied)
        return model

    def _restore(self) -> None:
        if self.checkpoint is None:
            info(f"{self.run_dir}: no checkpoint yet; starting from step 0")
            return
        state = self.engine.restore(self.checkpoint, self._probe_loss)
        self.engine.load_extra_state(state.get("engine_state", {}))
        self.step, self.consumed = state["step"], state["consumed_samples"]
        by_rank = state.get("rng_by_rank")
        set_rng_state(by_rank[self.processes.rank] if by_rank else state.get("rng", {}))
        self._truncate_metrics(self.step)
        info(f"resuming {self.run_dir} from {self.checkpoint.name} (step {self.step})")

    def _probe_loss(self) -> torch.Tensor:
        """The loss of the next micro-batch (an engine's restore may need one real step)."""
        batch = {k: v.to(self.processes.device) for k, v in self._micro_batches()[0].items()}
        with self.engine.autocast():
            return self.objective.loss(self.engine.forward_module, batch, self.step).loss

    def _truncate_metrics(self, step: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint."""
        path = self.run_dir / METRICS_FILE
        if self.processes.main and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    logged = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    break  # a line cut short by the kill: nothing after it was checkpointed
                if not isinstance(logged, int) or logged > step:
                    break
                kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # --- the loop ---------------------------------------------------------------------

    def _micro_batches(self) -> list[dict]:
        """This process's share of the next global batch, cut into micro-batches."""
        p, micro = self.processes, self.recipe.train.micro_batch
        rows = self.samples.shard(self.consumed, self.global_batch, p.rank, p.world_size)
        indices = self.consumed + np.arange(p.rank, self.global_batch, p.world_size)
        return [self.objective.batch(rows[i:i + micro], indices[i:i + micro])
                for i in range(0, len(rows), micro)]

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics."""
        train, device = self.recipe.train, self.processes.device
        lr = learning_rate(self.step, train)
        self.engine.set_lr(lr)
        batches = self._micro_batches()
        tokens = self.collectives.sum(float(sum(int(b["loss_mask"].sum()) for b in batches)))
        scale = self.processes.world_size / tokens
        loss_sum, sums, constants = 0.0, {}, {}
        for index, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.engine.accumulate(last=index == len(batches) - 1):
                with self.engine.autocast():
                    record = self.objective.loss(self.engine.forward_module, batch, self.step)
                loss, count = record.loss, record.count
                # The MoE balance loss (top-k router), averaged over the micro-batches.
                aux = self.model.aux_loss / len(batches)
                self.engine.backward(loss * count * scale + aux)
            loss_sum += float(loss.detach()) * int(count)
            for key, mean in record.means.items():  # e.g. lm_loss, kd_loss
                sums[key] = sums.get(key, 0.0) + float(mean) * int(count)
            constants.update(record.constants)  # e.g. alpha
        grad_norm = self.engine.finish_step()
        self.step += 1
        self.consumed += self.global_batch
        return {"step": self.step, "loss": self.collectives.sum(loss_sum) / tokens, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": int(tokens),
                **{key: self.collectives.sum(total) / tokens for key, total in sums.items()},
                **constants}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss on the first `eval_steps` batches of the valid split (the same each time)."""
        if self.eval_samples is None:
            return None
        self.model.eval()
        total = count = 0.0
        micro = self.recipe.train.micro_batch
        for step in range(self.recipe.train.eval_steps):
            rows = self.eval_samples.batch(step * micro, micro)
            batch = self.objective.batch(rows, step * micro + np.arange(micro))
            batch = {k: v.to(self.processes.device) for k, v in batch.items()}
            with self.engine.autocast():
                record = self.objective.loss(self.model, batch)  # no step: the task loss
            total += float(record.loss) * int(record.count)
            count += int(record.count)
        self.model.train()
        return total / max(count, 1)

    def _log(self, record: dict) -> None:
        if self.processes.main:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _checkpoint(self, loss: float) -> None:
        weights, optimizer_state = self.engine.state_dicts()  # collective under ZeRO
        rngs = self.collectives.gather_json(rng_state())
        if self.processes.main:
            state = {"step": self.step, "consumed_samples": self.consumed,
                     "world_size": self.processes.world_size, "rng": rngs[0], "loss": loss,
                     "engine": self.recipe.engine.name,
                     "engine_state": self.engine.extra_state()}
            if len(rngs) > 1:
                state["rng_by_rank"] = rngs
            save_checkpoint(self.run_dir, self.step, weights, self.recipe.model,
                            optimizer_state, state, keep=self.recipe.checkpoint.keep)
        self.collectives.barrier()

    def run(self) -> Path:
        """Train to the last step and write final/; the run folder is unlocked at the end."""
        try:
            return self._run()
        finally:
            self.folder.release()

    def _run(self) -> Path:
        train, every = self.recipe.train, self.recipe.checkpoint.every
        self.model.train()
        started, tokens_since, last_log = time.perf_counter(), 0, time.perf_counter()
        while self.step < train.steps:
            metrics = self.train_step()
            tokens_since += metrics["tokens"]
            if self.step % max(train.log_every, 1) == 0 or self.step == train.steps:
                now = time.perf_counter()
                metrics["tokens_per_s"] = round(tokens_since / max(now - last_log, 1e-9), 1)
                metrics["memory_mb"] = _memory_mb(self.processes.device)
                metrics["elapsed_s"] = round(now - started, 3)
                tokens_since, last_log = 0, now
                info(f"step {self.step}/{train.steps} loss {metrics['loss']:.4f} "
                     f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s")
            if train.eval_every and self.step % train.eval_every == 0:
                metrics["valid_loss"] = self.evaluate()
                if metrics["valid_loss"] is not None:
                    info(f"step {self.step}: valid loss {metrics['valid_loss']:.4f}")
            self._log(metrics)
            if every and self.step % every == 0 and self.step < train.steps:
                self._checkpoint(metrics["loss"])
        return self._finish()

    def _finish(self) -> Path:
        final = self.run_dir / "final"
        model = self.engine.final_model()  # collective under ZeRO
        if self.processes.main:
            save_model(final, model, self.recipe.model, self.folder.tokenizer,
                       meta={"steps": self.step, "recipe": recipe_digest(self.recipe)},
                       force=True)
            finalize_in_place(self.run_dir, "run", {
                "recipe": recipe_digest(self.recipe), "engine": self.recipe.engine.name,
                "world_size": self.processes.world_size, "steps": self.step})
        self.collectives.barrier()
        return final


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    with open("/proc/self/status") as f:
        rss = next((line for line in f if line.startswith("VmRSS")), "VmRSS: 0 kB")
    return round(int(rss.split()[1]) / 1024, 1)


def train(recipe_path: str, overrides: list[str], *, resume: bool, force: bool) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, resume=resume, force=force)
    try:
        return trainer.run()
    finally:
        stop_processes()


