"""Generation at the text level: prompts in, completions out, in input order.

    generator = TextGenerator(model, tokenizer, settings, stop=("。",))
    for completion in generator.complete([Prompt("今天天气很好，", where="stdin line 1")]):
        completion.text, completion.finish_reason, completion.record()

GPT (CPM-1): the completion is the text generated after the prompt. It ends at `<eod>` (not
part of the text), at the first stop string (the text is cut before it), or at the length
limit. Stop strings are matched on the decoded completion, not on token ids, so a stop string
is found however the tokenizer happens to split it.

Encoder-decoder (CPM-2): the prompt's `<s_N>` gaps are filled (infill.py); the completion is
the prompt's text with the spans in place, and `spans` lists them.

Streaming (`stream`, GPT, one prompt at a time) hands over the completion's text as it grows.
Text is held back while it may still change: the last characters that could be the start of a
stop string, and a character still being spelled out byte by byte (shown as U+FFFD).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from torch import nn

from cpmctl.errors import CpmError
from cpmctl.infer.generate import BatchResult, GenerationSettings, check_prompt, generate_tokens
from cpmctl.infer.infill import encode_infill, ends_infill, fill
from cpmctl.tokenizer import Tokenizer

_PARTIAL = "\ufffd"  # how a tokenizer decodes the first bytes of a multi-byte character


@dataclass
class Prompt:
    text: str
    where: str = "the prompt"
    """Where the prompt came from, for error messages ("stdin line 3")."""
    extra: dict = field(default_factory=dict)
    """Fields carried into the output record as they are (a JSONL input record's others)."""


@dataclass
class Completion:
    prompt: Prompt
    text: str
    tokens: int
    """Tokens generated, a closing <eod> included."""
    finish_reason: str
    """'eod', 'stop' or 'length' (see generate.RowResult)."""
    prefill_s: float
    decode_s: float
    """The timings of the prompt's batch (generate.BatchResult)."""
    spans: list[str] | None = None
    """Encoder-decoder: the generated spans, in the order of the prompt's sentinels."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s > 0 else 0.0

    def record(self) -> dict:
        """The `--json` output record."""
        record = {**self.prompt.extra, "prompt": self.prompt.text, "completion": self.text,
                  "tokens": self.tokens, "finish_reason": self.finish_reason,
                  "prefill_s": round(self.prefill_s, 6), "decode_s": round(self.decode_s, 6),
                  "tokens_per_s": round(self.tokens_per_s, 2)}
        if self.spans is not None:
            record["spans"] = self.spans
        return record


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class _CompletionText:
    """One GPT row's text while it is generated: stop strings, and what streaming may show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str],
                 stream: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stream = stream
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.shown = 0
        self.text: str | None = None  # set when a stop string cut it

    def _show(self, text: str) -> None:
        if self.stream is not None and len(text) > self.shown:
            self.stream(text[self.shown:])
            self.shown = len(text)

    def on_token(self, tokens: list[int]) -> str | None:
        text = self.tokenizer.decode(tokens)
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.text = text[:cut]
            return "stop"
        self._show(text[:len(text) - self.hold].rstrip(_PARTIAL))
        return None

    def finish(self, tokens: list[int], eod_id: int) -> str:
        if self.text is None:
            self.text = self.tokenizer.decode(tokens[:-1] if tokens[-1] == eod_id else tokens)
        self._show(self.text)
        return self.text


def _batches(items: Iterable[Prompt], size: int) -> Iterator[list[Prompt]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class TextGenerator:
    """A loaded model and tokenizer with the settings and stop strings of one run."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, settings: GenerationSettings,
                 *, stop: Sequence[str] = (), prompt=None):
        settings.check()
        if any(not s for s in stop):
            raise CpmError("a stop string must not be empty")
        self.encdec = model.cfg.arch == "encdec"
        if self.encdec and tokenizer.sentinels is None:
            raise CpmError("an encdec model fills the gaps marked <s_0>, <s_1>, ...: its "
                           "tokenizer has no sentinels")
        if self.encdec and stop:
            raise CpmError("stop strings are for gpt models; an encdec model's output ends "
                           "when every <s_N> gap has its span")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.stop = tuple(stop)
        self.prompt = prompt  # a soft prompt (cpmctl.prompt) around every input, or None

    def complete(self, prompts: Iterable[Prompt], *, batch_size: int = 1,
                 stream: Callable[[str], None] | None = None) -> Iterator[Completion]:
        """Completions in the order of `prompts`, read and generated `batch_size` at a time
        (so the first ones come out before the last prompt is read)."""
        if batch_size < 1:
            raise CpmError(f"the batch size must be at least 1, got {batch_size}")
        if stream is not None and (batch_size != 1 or self.encdec):
            raise CpmError("streaming shows one gpt completion at a time: it needs a gpt "
                           "model and a batch size of 1")
        index = 0
        for batch in _batches(prompts, batch_size):
            for prompt in batch:
                if not prompt.text:
                    raise CpmError(f"{prompt.where}: the prompt is empty")
            if self.encdec:
                yield from self._infill(batch, index)
            else:
                yield from self._continue(batch, index, stream)
            index += len(batch)

    def _generate(self, prompts: list[list[int]], index: int, on_token) -> BatchResult:
        return generate_tokens(self.model, prompts, self.settings, eod_id=self.tokenizer.eod_id,
                               pad_id=self.tokenizer.pad_id,
                               vocab_size=self.tokenizer.vocab_size, first_index=index,
                               on_token=on_token, soft_prompt=self.prompt)

    def _continue(self, batch: list[Prompt], index: int,
                  stream: Callable[[str], None] | None) -> Iterator[Completion]:
        ids = [self.tokenizer.encode(prompt.text) for prompt in batch]
        for prompt, prompt_ids in zip(batch, ids, strict=True):
            check_prompt(self.model, prompt_ids, prompt.where)
        texts = [_CompletionText(self.tokenizer, self.stop, stream) for _ in batch]
        watch = self.stop or stream is not None
        result = self._generate(
            ids, index, (lambda row, tokens: texts[row].on_token(tokens)) if watch else None)
        for prompt, text, row in zip(batch, texts, result.rows, strict=True):
            yield Completion(prompt, text.finish(row.tokens, self.tokenizer.eod_id),
                             len(row.tokens), row.finish_reason, result.prefill_s,
                             result.decode_s)

    def _infill(self, batch: list[Prompt], index: int) -> Iterator[Completion]:
        infills = [encode_infill(self.tokenizer, prompt.text, prompt.where) for prompt in batch]

        def on_token(row: int, tokens: list[int]) -> str | None:
            return "eod" if ends_infill(self.tokenizer, infills[row], tokens[-1]) else None

        result = self._generate([infill.ids for infill in infills], index, on_token)
        for prompt, infill, row in zip(batch, infills, result.rows, strict=True):
            text, spans = fill(self.tokenizer, infill, row.tokens)
            yield Completion(prompt, text, len(row.tokens), row.finish_reason,
                             result.prefill_s, result.decode_s, spans)
