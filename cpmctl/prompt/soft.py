"""The soft prompt: a `length x d_model` table whose rows stand in for the word embeddings of
their slots in the input (CPM-2's prompt tuning, docs/design.md §8).

    layout = parse_position("33:34:33", length=100, parts=2)
    prompt = SoftPrompt(layout, d_model=4096)
    prompt.initialize(model, tokenizer, "mask", seed=0)
    ids, slots = prompt.place([s1_ids, s2_ids])      # placeholder ids + the slot positions
    embeds = prompt.embed(model, ids_tensor, slots)  # slots: flat token indices

Where the slots go: a position is three counts (front, middle, back) that sum to the length.
Front slots come before the first input part, middle slots between the first and the second
part (a sentence pair: between s1 and s2), back slots after the last part. For GPT the input is
the context before the scored continuation; for an encoder-decoder it is the encoder input (the
decoder gets no prompt, as in CPM-2). Attention and positions see a slot as an ordinary token:
only its embedding differs.

The benchmark's scoring (cpmctl.bench.scoring) relies on `place` and `embed` exactly as
written here: `place` returns ids with `PLACEHOLDER_ID` in the slots and the slot positions in
table-row order; `embed` takes the ids as a [batch, seq] tensor and the positions as
[batch, length] (or a list of lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CpmError

#: The id written into a prompt slot by `place`; its embedding is always replaced.
PLACEHOLDER_ID = 0
POSITIONS = {"front": (1, 0, 0), "middle": (0, 1, 0), "back": (0, 0, 1)}
INITS = ("mask", "vocab", "text:")


@dataclass(frozen=True)
class PromptLayout:
    """How many prompt slots go before, between and after the input parts."""

    front: int
    middle: int
    back: int

    @property
    def length(self) -> int:
        return self.front + self.middle + self.back

    @property
    def spec(self) -> str:
        """The `--position` spelling of this layout (front/middle/back, or the three counts)."""
        for name, unit in POSITIONS.items():
            if (self.front, self.middle, self.back) == tuple(u * self.length for u in unit):
                return name
        return f"{self.front}:{self.middle}:{self.back}"

    def check_parts(self, parts: int, where: str = "the task") -> None:
        """A middle prompt needs two input parts to go between."""
        if self.middle and parts < 2:
            raise CpmError(f"{where} has {parts} input part; a prompt with middle slots "
                           f"(--position {self.spec}) needs two (a sentence pair): use front "
                           "or back, or ratios with 0 in the middle")


def parse_position(position: str, length: int) -> PromptLayout:
    """`front`, `middle`, `back`, or counts `F:M:B` summing to `length` (CPM-2's 33:34:33)."""
    if length < 1:
        raise CpmError(f"--length must be at least 1, got {length}")
    if position in POSITIONS:
        return PromptLayout(*(unit * length for unit in POSITIONS[position]))
    pieces = position.split(":")
    try:
        counts = [int(p) for p in pieces]
    except ValueError:
        counts = []
    if len(counts) != 3 or any(c < 0 for c in counts):
        raise CpmError(f"--position: expected front, middle, back or three counts F:M:B "
                       f"(like 33:34:33), got {position!r}")
    if sum(counts) != length:
        raise CpmError(f"--position {position}: the counts sum to {sum(counts)}, but --length "
                       f"is {length}; they must sum to the length")
    return PromptLayout(*counts)


def word_embedding(model: nn.Module) -> nn.Embedding:
    """The input word embedding of a GPT (wte) or an encoder-decoder (shared)."""
    return model.wte if model.cfg.arch == "gpt" else model.shared


def init_ids(init: str, length: int, tokenizer, seed: int) -> list[int]:
    """The vocabulary rows a prompt starts from: `mask` (every slot the <mask> embedding),
    `vocab` (rows drawn at random, seeded, from the ordinary pieces), or `text:...` (the text's
    tokens repeated or cut to the length, as PEFT's TEXT init)."""
    if init == "mask":
        return [tokenizer.special["mask"]] * length
    if init == "vocab":
        special = set(tokenizer.special.values())
        ordinary = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
        generator = torch.Generator().manual_seed(seed)
        return ordinary[torch.randint(len(ordinary), (length,), generator=generator)].tolist()
    if init.startswith("text:"):
        ids = tokenizer.encode(init.removeprefix("text:"))
        if not ids:
            raise CpmError(f"--init {init!r}: the text encodes to no tokens")
        return (ids * (length // len(ids) + 1))[:length]
    raise CpmError(f"--init: expected mask, vocab or text:SOME TEXT, got {init!r}")


class SoftPrompt(nn.Module):
    """The prompt table and its layout; the only trainable thing in prompt tuning."""

    def __init__(self, layout: PromptLayout, d_model: int):
        super().__init__()
        self.layout = layout
        self.table = nn.Parameter(torch.zeros(layout.length, d_model))

    @property
    def length(self) -> int:
        return self.layout.length

    def initialize(self, model: nn.Module, tokenizer, init: str, seed: int = 0) -> None:
        """Copy the rows of `init_ids(...)` from the model's word embedding."""
        ids = torch.tensor(init_ids(init, self.length, tokenizer, seed))
        with torch.no_grad():
            weight = word_embedding(model).weight
            self.table.copy_(weight[ids.to(weight.device)].float())

    def place(self, parts_ids: list[list[int]]) -> tuple[list[int], list[int]]:
        """The input parts' ids joined with the prompt's slots in between (PLACEHOLDER_ID
        there), and the positions of the slots in table-row order."""
        self.layout.check_parts(len(parts_ids), "this input")
        front, middle, back = self.layout.front, self.layout.middle, self.layout.back
        ids: list[int] = []
        slots: list[int] = []

        def add_slots(count: int) -> None:
            slots.extend(range(len(ids), len(ids) + count))
            ids.extend([PLACEHOLDER_ID] * count)

        add_slots(front)
        for index, part in enumerate(parts_ids):
            ids.extend(part)
            if index == 0:
                add_slots(middle)
        add_slots(back)
        return ids, slots

    def embed(self, model: nn.Module, input_ids: torch.Tensor,
              slots: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """The word embeddings of `input_ids` [batch, seq] with row k of the table at token
        `slots[e][k]` of the flattened [batch * seq] ids, for each of E examples (one a row,
        or several in a packed row); gradients reach the table only."""
        embeds = word_embedding(model)(input_ids)
        slots = torch.as_tensor(slots, dtype=torch.long, device=embeds.device)
        if slots.ndim != 2 or slots.shape[1] != self.length:
            raise ValueError(f"slots must be [examples, {self.length}], got "
                             f"{tuple(slots.shape)}")
        rows = self.table.to(device=embeds.device, dtype=embeds.dtype)
        flat = embeds.reshape(-1, embeds.shape[-1]).index_put(
            (slots.reshape(-1),), rows.repeat(slots.shape[0], 1))
        return flat.view_as(embeds)
