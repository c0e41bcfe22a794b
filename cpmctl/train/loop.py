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
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cpmctl import console
from cpmctl.artifacts import MANIFEST, finalize_in_place, open_artifact
from cpmctl.console import info, warn
from cpmctl.data.samples import PackedSamples, open_dataset
from cpmctl.errors import CpmError
from cpmctl.models import build_model, checkpoint_activations
from cpmctl.models.artifact import load_model, save_model
from cpmctl.recipe import Recipe, dump_recipe, load_recipe, recipe_digest
from cpmctl.tokenizer import from_folder
from cpmctl.train.checkpoint import (
    check_world_size,
    find_resumable,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cpmctl.train.engines import build_engine, start_processes
from cpmctl.train.objectives import encdec_batch, encdec_loss, fused_lm_loss, lm_batch, lm_loss
from cpmctl.train.schedule import learning_rate

RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.jsonl"


class CausalLM:
    """CPM-1: next-token prediction over packed windows; no loss where the input is <eod>.

    `fused`: the head and the loss fused (`fused_lm_loss`), so the full logits never exist.
    It reads the head's weight outside the model's forward, which ZeRO-3 (weights gathered
    per module, inside its forward) does not allow: there the model applies its head."""

    def __init__(self, data, eod_id: int, fused: bool = True):
        self.window = data.seq_len
        self.eod_id, self.fused = eod_id, fused

    def batch(self, rows: np.ndarray, indices: np.ndarray) -> dict:
        return lm_batch(rows, self.eod_id)

    def loss(self, model, batch: dict):
        if not self.fused:
            return lm_loss(model(batch["input_ids"]), batch["labels"], batch["loss_mask"])
        hidden = model(batch["input_ids"], return_hidden=True)
        head = getattr(model, "module", model).lm_head.weight  # through DDP's/DeepSpeed's
        return fused_lm_loss(hidden, head, batch["labels"], batch["loss_mask"])


class SpanCorruption:
    """CPM-2: T5 span corruption of raw windows, each derived from (seed, its global sample
    index), so the corruption survives a resume and does not depend on the process count."""

    def __init__(self, data, seed: int, tokenizer):
        if tokenizer.sentinels is None:
            raise CpmError(f"model.arch = 'encdec' trains on span corruption, which needs "
                           f"sentinels <s_0>...: {data.dataset} was tokenized with a "
                           f"{tokenizer.scheme} tokenizer that has none (use --scheme cpm2)")
        self.data, self.seed, self.tokenizer = data, seed, tokenizer
        self.window = data.span_lengths()[0] - 1  # PackedSamples adds one token

    def batch(self, rows: np.ndarray, indices: np.ndarray) -> dict:
        tok = self.tokenizer
        parts = [encdec_batch(rows[i:i + 1], int(indices[i]), self.seed, self.data,
                              eod_id=tok.eod_id, pad_id=tok.pad_id, sentinels=tok.sentinels)
                 for i in range(len(rows))]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def loss(self, model, batch: dict):
        logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                       batch["decoder_attention_mask"])
        return encdec_loss(logits, batch["labels"], batch["loss_mask"])


def _check_recipe(recipe: Recipe, processes) -> None:
    if recipe.train.precision == "fp16" and processes.device.type != "cuda":
        raise CpmError("train.precision = 'fp16' needs a CUDA device (loss scaling); "
                       "use 'bf16' or 'fp32' on CPU")
    if not recipe.data.dataset:
        raise CpmError("data.dataset: the recipe names no dataset (cpmctl data tokenize)")


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
        dataset_meta = open_artifact(data.dataset, "dataset").meta
        if dataset_meta["vocab_size"] > recipe.model.vocab_size:
            raise CpmError(f"model.vocab_size {recipe.model.vocab_size} is smaller than the "
                           f"tokenizer of {data.dataset} ({dataset_meta['vocab_size']} tokens)")
        tokenizer = from_folder(Path(data.dataset) / "tokenizer")
        zero3 = recipe.engine.name == "deepspeed" and recipe.engine.zero_stage == 3
        self.objective = (CausalLM(data, self.stream.eod_id, fused=not zero3)
                          if recipe.model.arch == "gpt"
                          else SpanCorruption(data, recipe.run.seed, tokenizer))
        self.samples = PackedSamples(self.stream, self.objective.window, recipe.run.seed)
        self.eval_samples = self._eval_samples()
        self.accumulation = train.accumulation(data.seq_len, self.processes.world_size)
        self.global_batch = train.batch_samples(data.seq_len, self.processes.world_size)
        torch.manual_seed(recipe.run.seed)
        model = self._initial_model()
        if recipe.engine.activation_checkpointing:
            checkpoint_activations(model)
        # NOTE: found before the engine starts (DeepSpeed's start takes seconds), so a resume
        # with the wrong number of processes is refused first
        self.checkpoint = find_resumable(self.run_dir) if resume else None
        if self.checkpoint is not None:
            check_world_size(read_trainer_state(self.checkpoint), self.processes.world_size,
                             self.checkpoint)
        self.engine = build_engine(model, recipe, self.processes)
        self.model = self.engine.module
        self.step, self.consumed = 0, 0
        # NOTE: only now, with everything that can fail checked, is the run folder touched:
        # a failed start must not leave a folder that blocks the corrected retry.
        self._prepare_run_dir(force)
        if resume:
            self._restore()

    # --- set-up -----------------------------------------------------------------------

    def _prepare_run_dir(self, force: bool) -> None:
        run_dir, recipe_text = self.run_dir, dump_recipe(self.recipe, comments=True)
        if (run_dir / MANIFEST).is_file() and not force:
            raise CpmError(f"{run_dir} is a finished run; pass --force to train it again")
        saved = run_dir / RECIPE_FILE
        if self.resume:
            if not saved.is_file():
                raise CpmError(f"{run_dir}: nothing to resume (no {RECIPE_FILE})")
            before = recipe_digest(load_recipe(saved))
            if before != recipe_digest(self.recipe):
                raise CpmError(f"{run_dir}: the recipe differs from the one the run started "
                               f"with ({saved}); resume with that recipe")
            return
        if saved.is_file() and not force:
            raise CpmError(f"{run_dir} holds a run already; pass --resume to continue it or "
                           "--force to start again")
        self._barrier()  # every process has looked before the first one writes
        if self.processes.main:
            if force and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(recipe_text, encoding="utf-8")
        self._barrier()

    def _eval_samples(self) -> PackedSamples | None:
        data = self.recipe.data
        if not self.recipe.train.eval_every:
            return None
        try:
            stream = open_dataset(data.dataset, data.eval_split)
            return PackedSamples(stream, self.objective.window, 0)
        except CpmError as exc:
            warn(f"no validation: {exc}")
            return None

    def _initial_model(self):
        if not self.recipe.init.model:
            return build_model(self.recipe.model)
        model, cfg = load_model(self.recipe.init.model, option="init.model")
        if cfg != self.recipe.model:
            raise CpmError(f"init.model {self.recipe.init.model}: its architecture differs "
                           "from the recipe's [model] (grow it first: cpmctl grow)")
        return model

    def _restore(self) -> None:
        if self.checkpoint is None:
            info(f"{self.run_dir}: no checkpoint yet; starting from step 0")
            return
        state = self.engine.restore(self.checkpoint, self._probe_loss)
        self.step, self.consumed = state["step"], state["consumed_samples"]
        by_rank = state.get("rng_by_rank")
        set_rng_state(by_rank[self.processes.rank] if by_rank else state["rng"])
        self._truncate_metrics(self.step)
        info(f"resuming {self.run_dir} from {self.checkpoint.name} (step {self.step})")

    def _probe_loss(self) -> torch.Tensor:
        """The loss of the next micro-batch (an engine's restore may need one real step)."""
        batch = {k: v.to(self.processes.device) for k, v in self._micro_batches()[0].items()}
        with self.engine.autocast():
            return self.objective.loss(self.engine.forward_module, batch)[0]

    def _truncate_metrics(self, step: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint."""
        path = self.run_dir / METRICS_FILE
        if self.processes.main and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _barrier(self) -> None:
        if self.processes.world_size > 1:
            dist.barrier()

    # --- the loop ---------------------------------------------------------------------

    def _micro_batches(self) -> list[dict]:
        """This process's share of the next global batch, cut into micro-batches."""
        p, micro = self.processes, self.recipe.train.micro_batch
        rows = self.samples.shard(self.consumed, self.global_batch, p.rank, p.world_size)
        indices = self.consumed + np.arange(p.rank, self.global_batch, p.world_size)
        return [self.objective.batch(rows[i:i + micro], indices[i:i + micro])
                for i in range(0, len(rows), micro)]

    def _gather_json(self, value) -> list:
        """Every process's JSON-safe `value`, in rank order (collective).

        The RNG states differ between processes once they have drawn different amounts (an
        MoE expert's dropout draws as many numbers as the tokens routed to it there), so a
        checkpoint keeps each process's own."""
        if self.processes.world_size == 1:
            return [value]
        device = self.processes.device if dist.get_backend() == "nccl" else torch.device("cpu")
        data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8,
                            device=device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device)
                 for _ in range(self.processes.world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
        longest = int(max(sizes).item())
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:data.numel()] = data
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return [json.loads(bytes(part[:int(size.item())].tolist()).decode("utf-8"))
                for part, size in zip(parts, sizes, strict=True)]

    def _all_sum(self, value: float) -> float:
        if self.processes.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics."""
        train, device = self.recipe.train, self.processes.device
        lr = learning_rate(self.step, train)
        self.engine.set_lr(lr)
        batches = self._micro_batches()
        tokens = self._all_sum(float(sum(int(b["loss_mask"].sum()) for b in batches)))
        scale = self.processes.world_size / tokens
        loss_sum = 0.0
        for index, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.engine.accumulate(last=index == len(batches) - 1):
                with self.engine.autocast():
                    loss, count = self.objective.loss(self.engine.forward_module, batch)
                # The MoE balance loss (top-k router), averaged over the micro-batches.
                aux = self.model.aux_loss / len(batches)
                self.engine.backward(loss * count * scale + aux)
            loss_sum += float(loss.detach()) * int(count)
        grad_norm = self.engine.finish_step()
        self.step += 1
        self.consumed += self.global_batch
        return {"step": self.step, "loss": self._all_sum(loss_sum) / tokens, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": int(tokens)}

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
                loss, n = self.objective.loss(self.model, batch)
            total += float(loss) * int(n)
            count += int(n)
        self.model.train()
        return total / max(count, 1)

    def _log(self, record: dict) -> None:
        if self.processes.main:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _checkpoint(self, loss: float) -> None:
        weights, optimizer_state = self.engine.state_dicts()  # collective under ZeRO
        rngs = self._gather_json(rng_state())
        if self.processes.main:
            state = {"step": self.step, "consumed_samples": self.consumed,
                     "world_size": self.processes.world_size, "rng": rngs[0], "loss": loss,
                     "engine": self.recipe.engine.name}
            if len(rngs) > 1:
                state["rng_by_rank"] = rngs
            save_checkpoint(self.run_dir, self.step, weights, self.recipe.model,
                            optimizer_state, state, keep=self.recipe.checkpoint.keep)
        self._barrier()

    def run(self) -> Path:
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
            tokenizer = Path(self.recipe.data.dataset) / "tokenizer"
            save_model(final, model, self.recipe.model,
                       tokenizer if tokenizer.is_dir() else None,
                       meta={"steps": self.step, "recipe": recipe_digest(self.recipe)},
                       force=True)
            finalize_in_place(self.run_dir, "run", {
                "recipe": recipe_digest(self.recipe), "engine": self.recipe.engine.name,
                "world_size": self.processes.world_size, "steps": self.step})
        self._barrier()
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
        if dist.is_initialized():
            dist.destroy_process_group()


