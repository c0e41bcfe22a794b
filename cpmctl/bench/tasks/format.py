"""The task file: one TOML file a task, parsed strictly into a `Task`.

A task says where its examples come from (a reader and the fields a data line must have), how
each candidate answer is written out (templates), and how the candidates are compared (a
rule). The keys, all but `rule` optional:

    name = "tnews"
    description = "..."
    rule = "cpm1"            # cpm1 | choice | span | generate | perplexity
    reader = "jsonl"         # jsonl | chid | text  (data_readers.py)
    context = ["这是关于{choice}的文章："]   # the context, as one or more text parts
    continuation = "{sentence}"             # the scored text
    eod = false              # append <eod> to the continuation (CPM-1's ChID)
    label_field = "label_desc"   # label tasks: the gold label of a line
    options_field = "candidates" # option tasks: a line's own list of answers ...
    answer_field = "answer"      # ... and the gold one (an index into it, or its text)
    candidates = "sampled:4"     # all | sampled:K (the gold + K-1 others, seeded)
    skip_labels = ["-"]          # lines with these labels are skipped and counted
    fields = ["id"]              # more fields every line must have
    reference_field = "response" # generate: the reference text
    package_data = "sentiment"   # the data installed packages ship, when no file is given
    split = "dev"                # the default split ...
    [splits]                     # ... and the file of each split in a data folder
    dev = "dev.json"
    [labels]                     # label tasks: the verbalizer, label -> the word in {choice}
    news_story = "故事"
    [generate]                   # generate: max_new_tokens, top_k, top_p, temperature,
    max_new_tokens = 32          #           repetition_penalty
    [perplexity]                 # perplexity: window (tokens, 0 = the model's)
    window = 0

Templates are Python format strings over the data fields plus `{choice}`: the candidate's
word (a label task's verbalized label, or an option task's option text). A label task without
a `[labels]` table takes its label set from the data (IFLYTEK: its Chinese `label_des` names
are the words).

Rules:
- `cpm1` (CPM-1's zero-shot rule): every candidate's text is scored; the lowest mean loss per
  continuation token wins. `{choice}` may stand in the context (TNEWS: one continuation under
  K label-bearing contexts) or in the continuation (ChID: the whole passage with the idiom).
- `choice` (lm-evaluation-harness's multiple choice): one shared context, `{choice}` in the
  continuation only; acc = the highest summed log-likelihood, acc_norm divides it by the
  continuation's length in characters, acc_bytes by its UTF-8 bytes.
- `span` (encdec only, the span-filling form): like `choice`, but the context holds a literal
  `<s_0>` where the answer goes; the encoder reads the context, the decoder scores
  `<s_0>` + continuation. (With `cpm1`/`choice` an encdec model gets `<s_0>` after the
  context.)
- `generate`: the model continues the context; generation metrics against `reference_field`.
- `perplexity`: the perplexity of a text file (one document a line) or a dataset artifact.

The other side (prompt tuning) relies on: `load_task`, `Task.read_examples`, `Task.requests`,
`Candidate.context_parts` (one part per context template part) and `Task.labels`.
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl.errors import CpmError

RULES = ("cpm1", "choice", "span", "generate", "perplexity")
READERS = ("jsonl", "chid", "text")
SCORED_RULES = ("cpm1", "choice", "span")
"""The rules that compare candidates (the others have no labels)."""
SPAN_MARKER = "<s_0>"
CHOICE = "choice"
"""The template placeholder for the candidate's word."""
_KEYS = {"name", "description", "rule", "reader", "context", "continuation", "eod",
         "label_field", "options_field", "answer_field", "candidates", "skip_labels", "fields",
         "reference_field", "split", "splits", "labels", "generate", "perplexity",
         "package_data"}
_GENERATE_KEYS = {"max_new_tokens": int, "top_k": int, "top_p": float, "temperature": float,
                  "repetition_penalty": float}
_SAMPLED = re.compile(r"sampled:(\d+)")


@dataclass(frozen=True)
class Example:
    """One validated data line: its fields, the gold answer and the answers to choose from.

    `choices` is the candidate pool: the task's labels (label tasks) or the line's own options
    (option tasks); `gold` is one of them. `line` is the 1-based line of the data file (for
    messages and the report)."""

    index: int
    line: int
    fields: dict
    gold: str | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One rendered candidate: the context as text parts (one per context template part, so a
    soft prompt can go before, between or after them), the continuation text, and the label
    (a label task's label, an option task's option text) it stands for."""

    context_parts: list[str]
    continuation: str
    label: str


@dataclass(frozen=True)
class ScoringRequests:
    """The candidates of one example and the index of the gold one among them."""

    example: Example
    candidates: list[Candidate]
    gold: int


@dataclass
class Task:
    """A parsed task file. See the module docstring for what each key means."""

    name: str
    rule: str
    source: str
    description: str = ""
    reader: str = "jsonl"
    context: list[str] = field(default_factory=lambda: [""])
    continuation: str = ""
    eod: bool = False
    label_field: str | None = None
    options_field: str | None = None
    answer_field: str | None = None
    candidates: str = "all"
    skip_labels: tuple[str, ...] = ()
    fields: list[str] = field(default_factory=list)
    reference_field: str | None = None
    package_data: str | None = None
    split: str = "dev"
    splits: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    window: int = 0

    @property
    def sample_size(self) -> int | None:
        """K of `sampled:K`, None for `all`."""
        match = _SAMPLED.fullmatch(self.candidates)
        return int(match.group(1)) if match else None

    @property
    def option_task(self) -> bool:
        """True when each line brings its own answers (options_field), False for labels."""
        return self.options_field is not None

    def read_examples(self, path: str | Path | None, limit: int | None = None, *,
                      split: str | None = None) -> list[Example]:
        """The validated examples of a data file, or of a split (default: the task's) in a data
        folder, or (path None) of the task's package data; CpmError naming the data line on a
        bad one. The list's `skipped` attribute counts the lines left out by skip_labels."""
        from cpmctl.bench.tasks.data_readers import read_examples

        return read_examples(self, None if path is None else Path(path), limit,
                             split or self.split)

    def requests(self, example: Example, rng) -> ScoringRequests:
        """The example's candidates rendered through the templates; `rng` (a
        `random.Random`) draws `sampled:K`'s others."""
        pool = list(example.choices)
        size = self.sample_size
        if size is not None and size < len(pool):
            others = [c for c in pool if c != example.gold]
            pool = rng.sample(others, size - 1) + [example.gold]
            pool.sort(key=list(example.choices).index)  # the candidates in the pool's order
        candidates = [self.render(example, choice) for choice in pool]
        return ScoringRequests(example, candidates, pool.index(example.gold))

    def render(self, example: Example, choice: str) -> Candidate:
        """One candidate: the templates filled with the example's fields and the choice's
        word."""
        values = {**example.fields, CHOICE: self.labels.get(choice, choice)}
        return Candidate([part.format_map(values) for part in self.context],
                         self.continuation.format_map(values), choice)


def template_fields(template: str) -> list[str]:
    """The placeholder names of a format string (ValueError on a malformed one)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}}} must be a plain field name")
        names.append(name)
    return names


def parse_task(data: dict, source: str) -> Task:
    """A Task from a parsed TOML table; CpmError naming `source` and the key at fault."""
    def fail(key: str, message: str):
        raise CpmError(f"{source}: {key}: {message}")

    unknown = sorted(set(data) - _KEYS)
    if unknown:
        fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    if "rule" not in data:
        fail("rule", f"missing (one of {', '.join(RULES)})")
    kwargs: dict = {}
    for key, kind in (("name", str), ("description", str), ("rule", str), ("reader", str),
                      ("continuation", str), ("eod", bool), ("label_field", str),
                      ("options_field", str), ("answer_field", str), ("candidates", str),
                      ("reference_field", str), ("split", str), ("package_data", str)):
        if key in data:
            if not isinstance(data[key], kind):
                fail(key, f"expected a {kind.__name__}, got {data[key]!r}")
            kwargs[key] = data[key]
    for key in ("context", "skip_labels", "fields"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, str) and key == "context":
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, "expected a list of strings")
        kwargs[key] = tuple(value) if key == "skip_labels" else list(value)
    for key in ("splits", "labels"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            fail(key, "expected a table of strings")
        kwargs[key] = {str(k): v for k, v in table.items()}
    generate = data.get("generate", {})
    if not isinstance(generate, dict):
        fail("generate", "expected a table")
    for key, value in generate.items():
        kind = _GENERATE_KEYS.get(key)
        if kind is None:
            fail(f"generate.{key}", f"unknown key (known: {', '.join(_GENERATE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)):
            fail(f"generate.{key}", f"expected a number, got {value!r}")
    kwargs["generate"] = dict(generate)
    ppl = data.get("perplexity", {})
    if not isinstance(ppl, dict) or set(ppl) - {"window"} or not isinstance(
            ppl.get("window", 0), int) or ppl.get("window", 0) < 0:
        fail("perplexity", "expected a table with window = a non-negative integer")
    kwargs["window"] = ppl.get("window", 0)
    name = kwargs.pop("name", Path(source).stem)
    task = Task(name=name, source=source, **kwargs)
    _check(task, fail)
    return task


def _check(task: Task, fail) -> None:
    """The rules that tie the keys together."""
    if task.rule not in RULES:
        fail("rule", f"unknown rule {task.rule!r} (one of {', '.join(RULES)})")
    if task.reader not in READERS:
        fail("reader", f"unknown reader {task.reader!r} (one of {', '.join(READERS)})")
    if task.candidates != "all":
        size = task.sample_size
        if size is None or size < 2:
            fail("candidates", f"expected 'all' or 'sampled:K' with K >= 2, got "
                               f"{task.candidates!r}")
    used: dict[str, list[str]] = {}
    for key, templates in (("context", task.context), ("continuation", [task.continuation])):
        for template in templates:
            try:
                used.setdefault(key, []).extend(template_fields(template))
            except ValueError as exc:
                fail(key, f"{template!r}: {exc}")
    in_context = CHOICE in used["context"]
    in_continuation = CHOICE in used["continuation"]
    if task.rule in SCORED_RULES:
        if (task.label_field is None) == (task.options_field is None):
            fail("label_field", f"rule {task.rule} needs label_field (labels) or "
                                "options_field (each line's own answers), one of them")
        if task.option_task and task.answer_field is None:
            fail("answer_field", "an options_field needs the answer_field that says which "
                                 "option is right")
        if not (in_context or in_continuation):
            fail("context", f"no {{{CHOICE}}} in the templates: every candidate would be "
                            "the same text")
        if not task.continuation:
            fail("continuation", f"rule {task.rule} scores the continuation: it is missing")
        if task.rule in ("choice", "span") and (in_context or not in_continuation):
            fail("continuation", f"rule {task.rule} shares one context among the candidates: "
                                 f"{{{CHOICE}}} goes in the continuation, not the context")
        marked = any(SPAN_MARKER in part for part in task.context)
        if task.rule == "span" and not marked:
            fail("context", f"rule span needs {SPAN_MARKER} in the context where the answer "
                            "goes")
        if task.rule != "span" and marked:
            fail("context", f"{SPAN_MARKER} marks the gap of rule span; rule {task.rule} has "
                            "none")
    elif in_context or in_continuation or task.labels:
        fail("labels" if task.labels else "context",
             f"rule {task.rule} compares no candidates: no {{{CHOICE}}} and no [labels]")
    if task.package_data is not None and task.package_data not in ("sentiment", "idiom-cloze"):
        fail("package_data", f"unknown package data {task.package_data!r} (sentiment or "
                             "idiom-cloze)")
    if task.rule == "generate" and task.reference_field is None:
        fail("reference_field", "rule generate needs the field with the reference text")
    if task.option_task and task.labels:
        fail("labels", "an option task's answers are its lines' options: no [labels]")
    field_names = [n for names in used.values() for n in names if n != CHOICE]
    extra = [task.label_field, task.options_field, task.answer_field, task.reference_field,
             "text" if task.reader == "text" else None]
    task.fields = list(dict.fromkeys(field_names + [f for f in extra if f] + task.fields))


def load_task_file(path: Path) -> Task:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CpmError(f"{path}: cannot read the task file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise CpmError(f"{path}: the task file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise CpmError(f"{path}: not valid TOML ({exc})") from None
    return parse_task(data, str(path))
