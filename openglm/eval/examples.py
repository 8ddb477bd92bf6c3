"""What evaluation tasks are made of: the examples of each task type, a subtask (examples with
one prompt format, and how a k-shot prompt is built), and the readers every data format shares
(JSON, JSON Lines, string fields), each error naming the file and example."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from openglm.config import ConfigError
from openglm.data.documents import json_object
from openglm.eval.metrics import CJK


def join_space(before: str, after: str) -> str:
    """What joins two texts that meet at characters `before` and `after` without whitespace: a
    space, except next to Chinese or Japanese characters, which are written without one."""
    return "" if CJK.match(before) or CJK.match(after) else " "


class TaskError(ConfigError):
    """A task config or data file is unusable; the message names the file (and example index)."""


@dataclass(frozen=True)
class Document:
    text: str


@dataclass(frozen=True)
class ClozeExample:
    """`context` + `continuation` is the passage; the continuation is the target word with the
    whitespace before it (so English BPE sees " word", as in running text)."""

    context: str
    continuation: str
    target: str


@dataclass(frozen=True)
class ChoiceExample:
    query: str
    choices: tuple[str, ...]
    gold: tuple[int, ...]  # indices of the correct choices (BIG-bench: the highest target score)

    @property
    def answer(self) -> str:
        return self.choices[self.gold[0]]


@dataclass(frozen=True)
class GenExample:
    query: str
    targets: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.targets[0]


@dataclass(frozen=True)
class PairExample:
    """CrowS-Pairs: the more and the less stereotypical sentence of a minimal pair."""

    more: str
    less: str
    group: str  # bias_type


@dataclass(frozen=True)
class TripleExample:
    """StereoSet intrasentence: one context's stereotype, anti-stereotype and unrelated fillings."""

    stereotype: str
    anti_stereotype: str
    unrelated: str
    target: str  # the target term, over which StereoSet averages
    group: str  # bias_type


@dataclass(frozen=True)
class InfillExample:
    """A passage cut into the text before a span, the span, and the text after it."""

    left: str
    span: str
    right: str


Example = Document | ClozeExample | ChoiceExample | GenExample | PairExample | TripleExample | InfillExample


@dataclass(frozen=True)
class Subtask:
    """A list of examples of one type with one prompt format (a BIG-bench subtask, an MMLU subject)."""

    name: str  # "" for a task without subtasks
    path: Path
    type: str
    examples: list[Any]
    prefix: str = ""
    separator: str = "\n"
    stop: str | None = None  # gen: the answer ends before this
    output_regex: str | None = None  # gen: the answer is this regex's first match (BIG-bench)
    limit: int | None = None  # evaluate the first `limit` examples (all stay demonstration candidates)

    @property
    def evaluated(self) -> list[Any]:
        return self.examples[: self.limit]

    def prompt(self, index: int, shots: int, seed: int) -> str:
        """The k-shot prompt of example `index` (module docstring)."""
        example = self.examples[index]
        if shots == 0:
            return self.prefix + example.query
        pool = [i for i in range(len(self.examples)) if i != index]
        if shots > len(pool):
            raise TaskError(f"{self.path}: {shots} shots asked, but only {len(pool)} other examples to draw them from")
        rng = np.random.default_rng([seed, index])
        chosen = rng.choice(pool, size=shots, replace=False)
        demos = [self.examples[i].query + self.examples[i].answer for i in chosen]
        return self.prefix + self.separator.join([*demos, example.query])

    def postprocess(self, text: str) -> str:
        """A generated answer as BIG-bench scores it: cut at the stop string, then the regex's match."""
        if self.stop:
            text = text.split(self.stop, 1)[0]
        if self.output_regex:
            found = re.findall(self.output_regex, text)
            text = found[0] if found else ""
            text = text if isinstance(text, str) else text[0]
        return text.strip()


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a .json (a BIG-bench task) or YAML (a task config) file."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except yaml.YAMLError as err:
        raise TaskError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: expected {what}")
    return data


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(example index, record) of a .jsonl file; the index counts non-blank lines from 0."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot be read ({err})") from None
    for line in lines:
        if not line.strip():
            continue
        index = len(records)
        records.append((index, json_object(line, f"{path}: example {index}", TaskError)))
    if not records:
        raise TaskError(f"{path}: holds no examples")
    return records


def string_field(path: Path, index: int, record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise TaskError(f"{path}: example {index}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{path}: example {index}: field {name!r} must be a non-empty string")
    return value
