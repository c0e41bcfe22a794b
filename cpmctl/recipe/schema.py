"""The recipe's typed tree: one dataclass per TOML section, every field with a default and
a docstring (its `--help` text), and the span-corruption arithmetic the [data] section needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cpmctl.errors import CpmError
from cpmctl.models.config import ModelConfig

SCHEDULES = ("cosine", "linear", "noam", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ENGINES = ("torch", "deepspeed")
INHERIT_SCHEDULES = ("linear", "step")
TEACHER_PRECISIONS = ("fp32", "bf16")


@dataclass
class RunConfig:
    """What the run is called, where it writes, and its seed."""

    name: str = "run"
    """Name of the run; a plain name, no '/' (it names the output folder by default)."""
    output: str = ""
    """Folder of the run artifact (checkpoints, metrics, final model); empty means runs/<name>."""
    seed: int = 1234
    """Seed of the initialisation, the data order and dropout (Megatron's default, kept by the
    CPM scripts)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name


@dataclass
class DataConfig:
    """The training data: a dataset artifact cut into fixed-length samples."""

    dataset: str = ""
    """Path of the dataset artifact (`cpmctl data tokenize` output) to train on."""
    train_split: str = "train"
    """Split of the dataset to train on."""
    eval_split: str = "valid"
    """Split to evaluate on every train.eval_every steps; empty disables evaluation."""
    seq_len: int = 1024
    """Tokens per sample: the context length (gpt), or the encoder input length after span
    corruption (encdec). CPM-1: 1,024; CPM-2: 512."""
    decoder_seq_len: int = 0
    """encdec: decoder (target) length; 0 means derived: the length span corruption of a
    seq_len input produces (T5's rule). CPM-2: 256."""
    noise_density: float = 0.15
    """encdec: fraction of the raw tokens masked by span corruption (T5 and CPM-2: 0.15)."""
    mean_span: float = 3.0
    """encdec: mean length of a masked span, in tokens (T5 and CPM-2: 3)."""

    def span_lengths(self) -> tuple[int, int]:
        """encdec: (raw tokens cut per sample, decoder length) for span corruption."""
        raw, targets = span_corruption_lengths(self.seq_len, self.noise_density, self.mean_span)
        return raw, self.decoder_seq_len or targets


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, AdamW, learning-rate schedule, precision, logging."""

    steps: int = 1000
    """Optimizer steps to train for."""
    global_batch: int = 0
    """Samples per optimizer step, over all processes and accumulation micro-steps. 0 means
    derived from global_batch_tokens, or micro_batch × processes when that is 0 too."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step (a multiple of data.seq_len); the alternative to global_batch,
    0 when unused."""
    micro_batch: int = 8
    """Samples per process per forward/backward pass; the rest of the global batch is gradient
    accumulation."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: 'cosine' or 'linear' decay to lr × min_lr_ratio at
    the last step, 'noam' (lr × sqrt(warmup / step), the peak-normalised inverse square root)
    or 'constant'. Warmup is linear from 0 in every case."""
    warmup_steps: int = 0
    """Steps of linear warmup; set this or warmup_ratio, not both (0: unused)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of train.steps; set this or warmup_steps, not both (0: unused)."""
    min_lr_ratio: float = 0.1
    """cosine and linear: the final learning rate as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices only, not to biases and norm scales, as
    in Megatron (CPM-1 and CPM-2: 0.01)."""
    beta1: float = 0.9
    """Adam beta1 (CPM-1 and CPM-2: 0.9)."""
    beta2: float = 0.999
    """Adam beta2 (CPM-1 and CPM-2: 0.999)."""
    eps: float = 1e-8
    """Adam epsilon (CPM-1 and CPM-2: 1e-8)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (CPM: 1.0)."""
    precision: str = "fp32"
    """'fp32', 'bf16' (mixed, fp32 master weights) or 'fp16' (mixed with dynamic loss scaling;
    needs CUDA, which the trainer checks)."""
    eval_every: int = 1000
    """Evaluate on data.eval_split every this many steps; 0 disables evaluation."""
    eval_steps: int = 10
    """Batches of global_batch samples per evaluation."""
    log_every: int = 10
    """Write a metrics line (loss, lr, tokens/s) every this many steps."""

    @property
    def warmup(self) -> int:
        """Warmup in steps, whichever of warmup_steps and warmup_ratio is set."""
        return self.warmup_steps or int(round(self.warmup_ratio * self.steps))

    def batch_samples(self, seq_len: int, world_size: int = 1) -> int:
        """Samples per optimizer step for this sequence length and number of processes."""
        if self.global_batch:
            return self.global_batch
        if self.global_batch_tokens:
            return self.global_batch_tokens // seq_len
        return self.micro_batch * world_size

    def accumulation(self, seq_len: int, world_size: int = 1) -> int:
        """Micro-steps per optimizer step; a `CpmError` when the batch does not divide."""
        samples = self.batch_samples(seq_len, world_size)
        per_pass = self.micro_batch * world_size
        if samples % per_pass:
            raise CpmError(f"train.global_batch {samples} is not a multiple of train.micro_batch "
                           f"{self.micro_batch} × {world_size} processes")
        return samples // per_pass


@dataclass
class EngineConfig:
    """How the training step is executed: plain PyTorch (DDP) or DeepSpeed."""

    name: str = "torch"
    """'torch' (one process or DDP under torchrun) or 'deepspeed' (ZeRO, offload; multi-node)."""
    zero_stage: int = 0
    """deepspeed: ZeRO stage 0-3 (1 partitions optimizer state, 2 also gradients, 3 also
    parameters); bf16 needs stage >= 1."""
    offload_optimizer: bool = False
    """deepspeed, zero_stage >= 1: keep the optimizer state and step in host memory."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~1/3 more compute."""
    compile: bool = False
    """torch engine: compile each block of the model with torch.compile (one compile serves the
    whole stack; the first steps compile; needs a C++ compiler on CPU)."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every: int = 1000
    """Write a checkpoint every this many steps; 0 writes only the final one."""
    keep: int = 3
    """Keep the newest this many step checkpoints; 0 keeps all."""


@dataclass
class InitConfig:
    """Where the weights start."""

    model: str = ""
    """Model artifact to warm-start from (e.g. a `cpmctl grow` output); empty means random
    initialisation."""


@dataclass
class InheritConfig:
    """Knowledge inheritance (docs/design.md §7): distil from a frozen teacher while training."""

    teacher: str = ""
    """Model artifact of the teacher; empty disables knowledge inheritance."""
    alpha: float = 1.0
    """Starting weight a of the distillation loss: loss = (1 - a)·LM + a·T²·KL(teacher ‖
    student), a following inherit.schedule (the KI paper: 1)."""
    decay_steps: int = 0
    """Steps over which alpha goes to 0; 0 means train.steps (the KI paper: 55k of 125k)."""
    schedule: str = "linear"
    """'linear': a = alpha × (1 - step / decay_steps), then 0; 'step': a = alpha until
    decay_steps, then 0 (with alpha 1: pure distillation, then pure LM)."""
    temperature: float = 2.0
    """Softmax temperature T of teacher and student in the KL term (the KI paper: 2)."""
    teacher_precision: str = "fp32"
    """Weights and forward pass of the frozen teacher: 'fp32' or 'bf16' (half the memory)."""


@dataclass
class Recipe:
    """A training recipe: one section per component."""

    run: RunConfig = field(default_factory=RunConfig)
    """[run]: name, output folder, seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """[model]: architecture and sizes, with [model.moe]."""
    data: DataConfig = field(default_factory=DataConfig)
    """[data]: dataset and sequence lengths."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """[train]: steps, batch, optimizer, schedule, precision, logging."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """[engine]: torch or deepspeed and their memory options."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """[checkpoint]: how often to save, how many to keep."""
    init: InitConfig = field(default_factory=InitConfig)
    """[init]: warm-start weights."""
    inherit: InheritConfig = field(default_factory=InheritConfig)
    """[inherit]: knowledge-inheritance teacher."""


def span_counts(tokens: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of T5 span corruption of `tokens` raw tokens (>= 2): noise =
    round(tokens × density) clamped to [1, tokens - 1]; spans = max(1, round(noise /
    mean_span)), also at most the non-noise tokens (a case only densities near 1 reach, where
    T5 would make empty spans; fewer spans only shortens the output)."""
    noise = min(max(int(round(tokens * noise_density)), 1), tokens - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, min(spans, noise, tokens - noise)


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_span: float) -> tuple[int, int]:
    """(raw tokens, target length) such that span corruption of the raw tokens gives an encoder
    input of at most `inputs_length`: T5's rule, where the input keeps the unmasked tokens plus
    one sentinel per span and the target holds the masked tokens plus one sentinel per span,
    each with one closing token."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans = span_counts(tokens, noise_density, mean_span)
        return tokens - noise + spans + 1, noise + spans + 1

    # NOTE: T5 scans upwards from inputs_length - 1 one token at a time, which is slow for dense
    # noise. The input length never falls as tokens grow (each extra token adds at most one
    # noise token), so a binary search finds the same answer. inputs_length - 1 always fits.
    fits, over = max(inputs_length - 1, 2), inputs_length
    while lengths(over)[0] <= inputs_length:
        fits, over = over, over * 2
    while over - fits > 1:
        middle = (fits + over) // 2
        if lengths(middle)[0] <= inputs_length:
            fits = middle
        else:
            over = middle
    return fits, lengths(fits)[1]

