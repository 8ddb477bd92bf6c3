"""Evaluation tasks: YAML configs, the data formats they point at, and few-shot prompts.

A task is a YAML file (a bundled one by name, or a path) or directly a data file or folder whose
format is recognised:

- `.txt`, or `.jsonl` of `{"text"}`: `lm` (documents as `openglm.data.documents.iter_documents` reads them),
  except that a `.jsonl` named `lambada*` is `cloze` (logged); the Pile's
  `{"text", "meta": {"pile_set_name"}}`: `lm`, a subtask per set;
- `.jsonl` of `{"text", "target"}` or GLM-130B's `{"inputs_pretokenized", "targets_pretokenized"}`:
  `cloze` (LAMBADA; the cloze shapes are `load_cloze`'s); GLM-130B's
  `{"inputs_pretokenized", "choices_pretokenized", "label"}`: `mul`; `{"text", "span"}`: `infill`;
- a BIG-bench `task.json`, or a folder holding one (subtasks in subfolders): `mul` where examples
  carry `target_scores`, `gen` where they carry `target`; listed choices in BIG-bench's own order
  (`choice_order`, `_load_bigbench`); a SQuAD-format `.json` (CMRC 2018, DRCD): `gen`; StereoSet's
  `.json`: `bias`;
- `.csv`: MMLU, C-Eval, CMMLU (a folder of them is one subtask per file): `mul`; CrowS-Pairs: `bias`;
- with `verbalizers` in the task YAML: CLUE / FewCLUE classification JSON Lines, `mul`.

The readers beyond BIG-bench and LAMBADA are `openglm.eval.formats`'.

Every example is turned into a *query* here (the example's text with its prefixes, ending where
the answer starts) and its answer(s), so the runner never sees a format. A k-shot prompt is
`prefix + separator.join(k demonstrations + [query])`, a demonstration being another example's
query followed by its (first gold) answer, drawn without replacement by a generator seeded with
(seed, example index): the same prompt whatever order or subset of examples is evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from openglm.data.documents import CorpusError, iter_documents
from openglm.eval import formats
from openglm.eval.examples import (
    ChoiceExample,
    ClozeExample,
    Document,
    GenExample,
    Subtask,
    TaskError,
    join_space,
    jsonl_records,
    read_mapping,
    string_field,
)

logger = logging.getLogger(__name__)

READ_AS_TYPES = ("lm", "cloze", "mul", "gen")  # what `--task-type` may read a data file as
TASK_TYPES = (*READ_AS_TYPES, "bias", "infill")  # bias and infill files are known by their format
CHOICE_ORDERS = ("bigbench", "seeded")
BIGBENCH_SEED = 42  # JsonTask's random_seed (bigbench 1.0.0, bigbench/api/json_task.py)
CLOZE_MODES = ("bidirectional", "unidirectional")
# BIG-bench's JsonTask defaults (bigbench/api/json_task.py).
BIGBENCH_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "few_shot_example_separator": "\n",
}


@dataclass(frozen=True)
class TaskConfig:
    """One task as a YAML file describes it (paths relative to the YAML file)."""

    name: str
    type: str
    data: Path
    shots: int = 0
    limit: int | None = None  # examples per subtask (the first ones); None: all
    modes: tuple[str, ...] = CLOZE_MODES  # cloze: how the context is read; infill: both sides, or the left only
    mask: str = "[gMASK]"  # cloze, bidirectional: the blank after the context in Part A
    num_beams: int = 0  # cloze: beams of GLM-130B's protocol (acc_beam, 16 in the paper); 0: not run
    chunk: int | None = None  # lm: tokens predicted per window (default: half the model's context)
    context: int | None = None  # lm: earlier tokens each window sees (default: the rest of the context)
    max_new_tokens: int = 32  # gen
    choice_order: str = "bigbench"  # BIG-bench listed choices: "bigbench" (RandomState(42) per example) or "seeded" (by --seed)
    template: str | None = None  # classification, SQuAD: the query, a str.format of the record's fields
    verbalizers: dict[str, str] = field(default_factory=dict)  # classification: label -> choice text
    label_field: str = "label"  # classification: the record's field holding the label
    source: str = ""  # where the config came from

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.type not in TASK_TYPES:
            raise TaskError(f"{where}: type must be one of {', '.join(TASK_TYPES)}, got {self.type!r}")
        if not isinstance(self.shots, int) or self.shots < 0:
            raise TaskError(f"{where}: shots must be a non-negative integer, got {self.shots!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise TaskError(f"{where}: limit must be a positive integer, got {self.limit!r}")
        bad = [m for m in self.modes if m not in CLOZE_MODES]
        if bad or not self.modes:
            raise TaskError(f"{where}: modes must be a non-empty list of {', '.join(CLOZE_MODES)}, got {list(self.modes)!r}")
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 0:
            raise TaskError(f"{where}: num_beams must be a non-negative integer (0: no acc_beam), got {self.num_beams!r}")
        if self.mask not in ("[MASK]", "[gMASK]"):
            raise TaskError(f"{where}: mask must be [MASK] or [gMASK], got {self.mask!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise TaskError(f"{where}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.choice_order not in CHOICE_ORDERS:
            raise TaskError(f"{where}: choice_order must be one of {', '.join(CHOICE_ORDERS)}, got {self.choice_order!r}")
        if self.template is not None and (not isinstance(self.template, str) or not self.template):
            raise TaskError(f"{where}: template must be a non-empty string, got {self.template!r}")
        if not isinstance(self.verbalizers, dict) or not all(
            isinstance(k, (str, int)) and isinstance(v, str) and v.strip() for k, v in self.verbalizers.items()
        ):
            raise TaskError(f"{where}: verbalizers must map labels to non-empty choice texts, got {self.verbalizers!r}")
        object.__setattr__(self, "verbalizers", {str(k).lower() if isinstance(k, bool) else str(k): v for k, v in self.verbalizers.items()})
        if not isinstance(self.label_field, str) or not self.label_field:
            raise TaskError(f"{where}: label_field must be a non-empty string, got {self.label_field!r}")

    def settings(self) -> dict[str, Any]:
        """What the results record about how the task was run."""
        keys = {
            "lm": ("chunk", "context"),
            "cloze": ("modes", "mask", "num_beams"),
            "mul": ("shots", "choice_order"),
            "gen": ("shots", "max_new_tokens", "choice_order"),
            "bias": (),
            "infill": ("modes",),
        }
        return {"type": self.type, "data": str(self.data), "limit": self.limit} | {k: getattr(self, k) for k in keys[self.type]}


# -- configs --------------------------------------------------------------------------------------


def bundled_task_dir() -> Path:
    return Path(str(files("openglm") / "eval" / "tasks"))


def bundled_task_names() -> list[str]:
    return sorted(p.stem for p in bundled_task_dir().glob("*.yaml"))


def _config_from_yaml(path: Path) -> TaskConfig:
    data = read_mapping(path, "a mapping of task settings")
    known = {f.name for f in dataclasses.fields(TaskConfig)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TaskError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    if "data" not in data:
        raise TaskError(f"{path}: missing required setting 'data'")
    values = dict(data)
    values["data"] = (path.parent / str(data["data"])).resolve()
    values.setdefault("name", path.stem)
    if "type" not in values:
        values["type"] = "mul" if values.get("verbalizers") else detect_type(values["data"])
    if "modes" in values:
        values["modes"] = tuple(values["modes"]) if isinstance(values["modes"], list) else (values["modes"],)
    return TaskConfig(**values, source=str(path))


def detect_type(path: Path) -> str:
    """The task type of a data file or folder, from its format (module docstring)."""
    if path.is_dir():
        if (path / "task.json").is_file() or any(path.glob("*/task.json")):
            return _bigbench_type(path)
        if any(path.glob("*.csv")):
            return "mul"
        raise TaskError(f"{path}: folder holds neither a BIG-bench task.json nor MMLU .csv files")
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "lm"
    if suffix == ".csv":
        return "bias" if _is_crows_pairs(path) else "mul"
    if suffix == ".jsonl":
        first = jsonl_records(path)[0][1]
        if "choices_pretokenized" in first:
            return "mul"
        if "span" in first:
            return "infill"
        if "target" in first or "inputs_pretokenized" in first:
            return "cloze"
        if path.name.lower().startswith("lambada"):
            logger.info("%s: {\"text\"} records in a file named lambada*: read as cloze, the last word the target", path)
            return "cloze"
        return "lm"
    if suffix == ".json":
        return {"squad": "gen", "stereoset": "bias"}.get(_json_kind(path)) or _bigbench_type(path)
    raise TaskError(f"{path}: unrecognised task format (expected .yaml, .txt, .jsonl, .csv, a BIG-bench task.json or folder)")


def _is_crows_pairs(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8-sig") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot be read ({err})") from None
    return "sent_more" in first and "sent_less" in first


def _json_kind(path: Path) -> str:
    """"squad" (a `data` list of articles), "stereoset" (`data.intrasentence`) or "bigbench"."""
    data = read_mapping(path, "a JSON object").get("data")
    if isinstance(data, list):
        return "squad"
    return "stereoset" if isinstance(data, dict) and "intrasentence" in data else "bigbench"


def _bigbench_type(path: Path) -> str:
    files_ = _bigbench_files(path)
    examples = [e for f in files_ for e in read_mapping(f, "a BIG-bench task object").get("examples", [])]
    return "mul" if examples and all(isinstance(e, dict) and "target_scores" in e for e in examples) else "gen"


def resolve_task(spec: str | Path, task_type: str | None = None) -> TaskConfig:
    """A bundled task name, a YAML path, or a data file/folder (its type `task_type`, else detected)."""
    text = str(spec)
    if text in bundled_task_names():
        return _config_from_yaml(bundled_task_dir() / f"{text}.yaml")
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"{path}: no such task config")
        return _config_from_yaml(path)
    if not path.exists():
        raise TaskError(f"{spec}: neither a bundled task ({', '.join(bundled_task_names())}) nor an existing file or folder")
    name = path.parent.name if path.name == "task.json" else path.stem
    return TaskConfig(name=name, type=task_type or detect_type(path), data=path.resolve(), source=str(path))


# -- data formats ---------------------------------------------------------------------------------


def load_subtasks(config: TaskConfig, seed: int) -> list[Subtask]:
    """The task's subtasks with every example checked and formatted; `seed` orders BIG-bench's
    listed choices."""
    path = config.data
    suffix = path.suffix.lower()
    csvs = sorted(path.glob("*.csv")) if path.is_dir() else [path] if suffix == ".csv" else []
    if config.type == "lm":
        subtasks = formats.load_pile(path) if suffix == ".jsonl" and formats.is_pile(jsonl_records(path)[0][1]) else [_load_documents(path)]
    elif config.type == "cloze":
        subtasks = [load_cloze(path)]
    elif config.type == "bias":
        subtasks = formats.load_crows_pairs(path) if suffix == ".csv" else formats.load_stereoset(path)
    elif config.type == "infill":
        subtasks = [formats.load_infill(path)]
    elif config.verbalizers:
        subtasks = [formats.load_classification(path, config.template, config.verbalizers, config.label_field)]
    elif csvs:
        if config.type != "mul":
            raise TaskError(f"{path}: MMLU / C-Eval / CMMLU .csv files are multiple choice (type mul), not {config.type}")
        subtasks = [formats.load_choice_csv(f) for f in csvs]
    elif suffix == ".jsonl" and config.type == "mul":
        subtasks = [formats.load_glm_choices(path)]
    elif suffix == ".json" and _json_kind(path) == "squad":
        subtasks = [formats.load_squad(path, config.template)]
    else:
        subtasks = [_load_bigbench(f, config.type, seed, config.choice_order) for f in _bigbench_files(path)]
        subtasks = [s for s in subtasks if s.examples]  # a parent task.json holds no examples
        if not subtasks:
            raise TaskError(f"{path}: no BIG-bench examples found")
    return [dataclasses.replace(s, limit=config.limit) for s in subtasks]


def _load_documents(path: Path) -> Subtask:
    try:
        documents = [Document(text) for text in iter_documents([path])]
    except (CorpusError, FileNotFoundError) as err:
        raise TaskError(str(err)) from None
    return Subtask("", path, "lm", documents)


def load_cloze(path: Path) -> Subtask:
    """A LAMBADA-style .jsonl in any of its shapes, told apart by the first record's fields:

    - GLM-130B's `{"inputs_pretokenized", "targets_pretokenized"}`: the context, and the target
      (a string, or a list holding one);
    - `{"text", "target"}`: if every text ends with its target, the text is the whole passage (the
      target cut off its end); otherwise each text is the context alone;
    - `{"text"}` alone (lm-evaluation-harness's `lambada_openai`, the GLM repo): the target is the
      text's last word, after its last space.

    A context is stored without the whitespace at its end, which starts the continuation instead
    (so English BPE sees " word", as in running text). A target joined to a context that did not
    hold it gets a space before it, except next to Chinese or Japanese characters.
    """
    records = jsonl_records(path)
    first = records[0][1]
    if "inputs_pretokenized" in first:
        pairs = [(i, string_field(path, i, r, "inputs_pretokenized"), _glm_target(path, i, r)) for i, r in records]
        return Subtask("", path, "cloze", [_cloze_example(path, i, c, t, joined=False) for i, c, t in pairs])
    if "target" not in first:
        examples = []
        for index, record in records:
            context, space, target = string_field(path, index, record, "text").rstrip().rpartition(" ")
            if not space or not context.strip():
                raise TaskError(f"{path}: example {index}: no space before a last word to predict")
            examples.append(_cloze_example(path, index, context + space, target, joined=True))
        return Subtask("", path, "cloze", examples)
    pairs = [(i, string_field(path, i, r, "text"), string_field(path, i, r, "target")) for i, r in records]
    whole = all(text.endswith(target) for _, text, target in pairs)
    if not whole:
        logger.info("%s: a text does not end with its target: every text is read as the context before it", path)
    return Subtask(
        "",
        path,
        "cloze",
        [_cloze_example(path, i, text[: len(text) - len(target)] if whole else text, target, whole) for i, text, target in pairs],
    )


def _glm_target(path: Path, index: int, record: dict[str, Any]) -> str:
    value = record.get("targets_pretokenized")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{path}: example {index}: field 'targets_pretokenized' must be a non-empty string or a list of one")
    return value


def _cloze_example(path: Path, index: int, context: str, target: str, joined: bool) -> ClozeExample:
    """`joined`: the target followed the context in the text (their whitespace is the text's)."""
    word = target.strip()
    stripped = context.rstrip()
    if not stripped:
        raise TaskError(f"{path}: example {index}: no context before the target")
    space = context[len(stripped) :] + target[: len(target) - len(target.lstrip())]
    if not space and not joined:
        space = join_space(stripped[-1], word[0])
    return ClozeExample(stripped, space + word, word)


def _bigbench_files(path: Path) -> list[Path]:
    """A task.json, or a folder's task.json and its subtasks' (subfolder) task.json files, sorted."""
    if path.is_file():
        return [path]
    found = ([path / "task.json"] if (path / "task.json").is_file() else []) + sorted(path.glob("*/task.json"))
    if not found:
        raise TaskError(f"{path}: no task.json in the folder or its subfolders")
    return found


def _bigbench_example(path: Path, index: int, raw: Any, task_type: str) -> tuple[str, dict[str, float] | None, tuple[str, ...]]:
    """(input, target_scores or None, targets) of one example, checked."""
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: example {index}: expected a JSON object")
    text = string_field(path, index, raw, "input")
    scores = raw.get("target_scores")
    if task_type == "mul":
        if scores is None:
            raise TaskError(f"{path}: example {index}: missing field 'target_scores' (needed for multiple choice)")
        if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
            raise TaskError(f"{path}: example {index}: 'target_scores' must map choice texts to numbers")
        if not scores:
            raise TaskError(f"{path}: example {index}: the choice list is empty")
    target = raw.get("target")
    targets = (target,) if isinstance(target, str) else tuple(target) if isinstance(target, list) else ()
    if task_type == "gen" and (not targets or not all(isinstance(t, str) for t in targets)):
        raise TaskError(f"{path}: example {index}: missing field 'target' (a string or a list of strings, needed for generation)")
    return text, scores, targets


def _load_bigbench(path: Path, task_type: str, seed: int, choice_order: str) -> Subtask:
    """BIG-bench's formatting (json_task.py's default_format_fn): input prefix + input (+ the
    choices of an example with `target_scores`, a generative one too) + output prefix; choices
    scored as they are written (no prefix).

    Listed choices are `rng.permutation(sorted(choices))`, `rng` for `choice_order` "bigbench"
    being BIG-bench's: a `numpy.random.RandomState(42)` made afresh for every example (bigbench
    1.0.0's default_format_fn, as lm-evaluation-harness's BIG-bench tasks), so every question with
    the same number of choices lists them in the same permuted order; "seeded": openglm's earlier
    order, a generator seeded with (`seed`, example index). BIG-bench's removal of duplicate
    examples is not applied (of the bundled tasks only `operators` has one).
    """
    data = read_mapping(path, "a BIG-bench task object")
    settings = {k: data.get(k, v) for k, v in BIGBENCH_DEFAULTS.items()}
    raw_examples = data.get("examples", [])
    if not isinstance(raw_examples, list):
        raise TaskError(f"{path}: 'examples' must be a list")
    examples: list[ChoiceExample | GenExample] = []
    for index, raw in enumerate(raw_examples):
        text, scores, targets = _bigbench_example(path, index, raw, task_type)
        query = settings["example_input_prefix"] + text
        if isinstance(scores, dict) and scores and settings["append_choices_to_input"]:
            if choice_order == "bigbench":
                listed = np.random.RandomState(BIGBENCH_SEED).permutation(sorted(scores))
            else:
                listed = np.random.default_rng([seed, index]).permutation(sorted(scores))
            query += settings["choice_prefix"] + settings["choice_prefix"].join(listed)
        if task_type == "gen":
            examples.append(GenExample(query + settings["example_output_prefix"], targets))
            continue
        assert scores is not None
        choices = tuple(scores)
        best = max(scores.values())
        gold = tuple(i for i, c in enumerate(choices) if scores[c] == best)
        examples.append(ChoiceExample(query + settings["example_output_prefix"], choices, gold))
    return Subtask(
        path.parent.name if _is_subtask(path) else "",
        path,
        task_type,
        examples,
        prefix=settings["task_prefix"],
        separator=settings["few_shot_example_separator"],
        stop=data.get("stop_string"),
        output_regex=data.get("output_regex"),
    )


def _is_subtask(path: Path) -> bool:
    return (path.parent.parent / "task.json").is_file()
