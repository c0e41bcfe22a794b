"""Data readers: the public formats, read into validated `Example`s.

- `jsonl`: one JSON object a line (CLUE's TNEWS / IFLYTEK / OCNLI `*.json` files are JSONL,
  as are STC's post/response files and what `bench data-prepare` writes). A label task's
  label set is its `[labels]` table, or else CLUE's `labels.json` beside the data file, or
  else the labels the data holds (in order of first appearance).
- `chid`: ChID in either public layout, told apart line by line. CLUE's: `content` is a list
  of passages with blanks like `#idiom000378#`, `candidates` its 10 idioms, and the answers in
  `{split}_answer.json` beside the data (blank tag -> index): one example per blank, the other
  blanks of its passage removed. FewCLUE's: `content` is one passage with one `#idiom#` blank,
  7 `candidates`, `answer` the index. Both become the fields `before`, `after`, `candidates`,
  `answer` (what `bench data-prepare idiom-cloze` writes too).
- `text`: one document a non-empty line, field `text` (the perplexity rule).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cpmctl.bench.tasks.format import Example, Task
from cpmctl.errors import CpmError

CLUE_LABELS_FILE = "labels.json"
_CLUE_BLANK = re.compile(r"#idiom\d+#")
_FEWCLUE_BLANK = "#idiom#"


class Examples(list):
    """The examples of a file, with `skipped`: the lines left out by the task's skip_labels
    (OCNLI's `-`), and `source`: what they were read from."""

    def __init__(self, items=(), *, skipped: int = 0, source: str = ""):
        super().__init__(items)
        self.skipped = skipped
        self.source = source


def resolve_data_path(task: Task, path: Path, split: str) -> Path:
    """A data file as given, or the split's file inside a data folder."""
    if not path.is_dir():
        if not path.is_file():
            raise CpmError(f"{path}: no such data file (for --data)")
        return path
    if split not in task.splits:
        known = ", ".join(task.splits) or "none"
        raise CpmError(f"{task.source}: splits: no file for split {split!r} (known: {known}); "
                       "give --data the file itself")
    resolved = path / task.splits[split]
    if not resolved.is_file():
        raise CpmError(f"{resolved}: no such file (split {split!r} of {path})")
    return resolved


def read_examples(task: Task, path: Path | None, limit: int | None, split: str) -> Examples:
    """The examples of `path` (see the module docstring), at most `limit` of them."""
    if path is None:
        if task.package_data is None:
            raise CpmError(f"task {task.name} reads its data from a file: give --data")
        from cpmctl.bench.tasks.package_data import package_records

        records = package_records(task.package_data, split)
        return _from_records(task, records, f"{task.package_data} ({split})", limit, None)
    path = resolve_data_path(task, path, split)
    if task.reader == "text":
        return _from_records(task, _text_records(path), str(path), limit, path)
    records = _jsonl_records(path)
    if task.reader == "chid":
        records = _chid_records(path, records, split)
    return _from_records(task, records, str(path), limit, path)


def _jsonl_records(path: Path):
    """(line number, object) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise CpmError(f"{path}:{number}: not a JSON line ({exc})") from None
            if not isinstance(record, dict):
                raise CpmError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _text_records(path: Path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, {"text": line.rstrip("\n")}


def _chid_records(path: Path, records, split: str):
    """Both ChID layouts as one-blank records with before / after / candidates / answer."""
    answers = None
    for number, record in records:
        where = f"{path}:{number}"
        content = record.get("content")
        candidates = record.get("candidates")
        if not isinstance(candidates, list):
            raise CpmError(f"{where}: missing field 'candidates' (a list of idioms)")
        if isinstance(content, str):  # FewCLUE: one passage, one blank, the answer inline
            if content.count(_FEWCLUE_BLANK) != 1:
                raise CpmError(f"{where}: a FewCLUE ChID passage has one {_FEWCLUE_BLANK} "
                               "blank")
            if "answer" not in record:
                raise CpmError(f"{where}: missing field 'answer'")
            before, after = content.split(_FEWCLUE_BLANK)
            yield number, {"before": before, "after": after, "candidates": candidates,
                           "answer": record["answer"]}
            continue
        if not isinstance(content, list) or not all(isinstance(p, str) for p in content):
            raise CpmError(f"{where}: missing field 'content' (a passage, or a list of them)")
        if answers is None:
            answers = _chid_answers(path, split)
        for passage in content:
            for blank in _CLUE_BLANK.finditer(passage):
                tag = blank.group(0)
                if tag not in answers:
                    raise CpmError(f"{where}: blank {tag} is not in the answer file "
                                   f"{_answer_file(path).name}: it does not match the data")
                before = _CLUE_BLANK.sub("", passage[:blank.start()])
                after = _CLUE_BLANK.sub("", passage[blank.end():])
                yield number, {"before": before, "after": after, "candidates": candidates,
                               "answer": answers[tag], "blank": tag}


def _answer_file(path: Path) -> Path:
    return path.with_name(f"{path.stem}_answer.json")


def _chid_answers(path: Path, split: str) -> dict:
    answer_path = _answer_file(path)
    try:
        answers = json.loads(answer_path.read_text(encoding="utf-8"))
    except OSError:
        raise CpmError(f"{path}: CLUE ChID keeps its answers in {answer_path.name} beside the "
                       "data; it is missing") from None
    except ValueError as exc:
        raise CpmError(f"{answer_path}: not JSON ({exc})") from None
    if not isinstance(answers, dict) or not all(isinstance(v, int) for v in answers.values()):
        raise CpmError(f"{answer_path}: expected an object of blank tag -> answer index")
    return answers


def _clue_label_set(path: Path | None, field: str) -> list[str] | None:
    """CLUE's labels.json beside the data: the label set of a task without [labels]."""
    if path is None or not (path.parent / CLUE_LABELS_FILE).is_file():
        return None
    labels = []
    for number, record in _jsonl_records(path.parent / CLUE_LABELS_FILE):
        if field not in record:
            raise CpmError(f"{path.parent / CLUE_LABELS_FILE}:{number}: missing field "
                           f"{field!r}")
        labels.append(str(record[field]))
    return labels


def _from_records(task: Task, records, source: str, limit: int | None,
                  path: Path | None) -> Examples:
    """Validate records into examples: required fields, labels, options and answers."""
    if limit is not None and limit < 1:
        raise CpmError(f"--limit must be at least 1, got {limit}")
    examples, skipped = [], 0
    label_set = None
    if task.label_field is not None:
        label_set = list(task.labels) or _clue_label_set(path, task.label_field)
    seen: dict[str, None] = {}
    for number, record in records:
        where = f"{source}:{number}"
        missing = [name for name in task.fields if name not in record]
        if missing:
            raise CpmError(f"{where}: missing field {missing[0]!r} (task {task.name} needs "
                           f"{', '.join(task.fields)})")
        gold, choices = None, ()
        if task.label_field is not None:
            gold = str(record[task.label_field])
            if gold in task.skip_labels:
                skipped += 1
                continue
            if label_set is not None and gold not in label_set:
                what = "[labels]" if task.labels else CLUE_LABELS_FILE
                raise CpmError(f"{where}: label {gold!r} is not in the task's {what} "
                               f"({task.source})")
            seen.setdefault(gold)
        elif task.options_field is not None:
            gold, choices = _options(record, task, where)
        for name in task.fields:
            if name != task.options_field and not isinstance(record[name], (str, int, float)):
                raise CpmError(f"{where}: field {name!r} must be text, got "
                               f"{type(record[name]).__name__}")
        fields = {name: str(record[name]) for name in task.fields if name != task.options_field}
        examples.append(Example(len(examples), number, fields, gold, choices))
        if limit is not None and len(examples) >= limit:
            break
    if task.label_field is not None:
        pool = tuple(label_set if label_set is not None else seen)
        if task.rule != "generate" and len(pool) < 2:
            raise CpmError(f"{source}: task {task.name} needs at least 2 labels, found "
                           f"{len(pool)}")
        examples = [Example(e.index, e.line, e.fields, e.gold, pool) for e in examples]
    if not examples:
        raise CpmError(f"{source}: no examples")
    return Examples(examples, skipped=skipped, source=source)


def _options(record: dict, task: Task, where: str) -> tuple[str, tuple[str, ...]]:
    options = record[task.options_field]
    if (not isinstance(options, list) or len(options) < 2
            or not all(isinstance(o, str) and o for o in options)):
        raise CpmError(f"{where}: field {task.options_field!r} must be a list of at least 2 "
                       "non-empty strings")
    if len(set(options)) != len(options):
        raise CpmError(f"{where}: field {task.options_field!r} holds an option twice")
    answer = record[task.answer_field]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise CpmError(f"{where}: field {task.answer_field!r} must be an index or an option")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise CpmError(f"{where}: answer index {answer} is outside the {len(options)} "
                           "options")
        return options[answer], tuple(options)
    if answer not in options:
        raise CpmError(f"{where}: answer {answer!r} is not one of the options")
    return answer, tuple(options)
