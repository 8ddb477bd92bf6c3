"""Readers of the benchmark files GLM's papers evaluate on, each into one or more `Subtask`s.

- multiple-choice CSVs: MMLU (`question, A, B, C, D, answer`, no header), C-Eval
  (`id, question, A, B, C, D, answer[, explanation]`) and CMMLU (`, Question, A, B, C, D,
  Answer`), told apart by their header; a Chinese question gets C-Eval's prompt;
- GLM-130B's multiple-choice `.jsonl`: `{"inputs_pretokenized", "choices_pretokenized", "label"}`;
- CLUE / FewCLUE classification (TNEWS, IFLYTEK, AFQMC, CMNLI, OCNLI, CSL, CLUEWSC, EPRSTMT ...):
  JSON Lines (CLUE names them `.json`), a task YAML's `template` making the query from a
  record's fields and its `verbalizers` naming each label's choice text;
- SQuAD-format extractive QA (CMRC 2018, DRCD, SQuAD): `gen`, one example per question;
- the Pile's `{"text", "meta": {"pile_set_name"}}`: `lm`, one subtask per set;
- CrowS-Pairs CSV and StereoSet intrasentence JSON (`bias`);
- infilling `.jsonl` `{"text", "span"}`, the text holding `[MASK]` where the span was.

A choice or target that does not start with whitespace is joined to its context with a space,
except next to Chinese or Japanese characters (`join_space`), as the cloze files are.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from openglm.eval.examples import (
    ChoiceExample,
    Document,
    GenExample,
    InfillExample,
    PairExample,
    Subtask,
    TaskError,
    TripleExample,
    join_space,
    jsonl_records,
    read_mapping,
    string_field,
)

MMLU_LETTERS = ("A", "B", "C", "D")
CEVAL_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"  # C-Eval's zero-shot prompt
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
SQUAD_TEMPLATES = {"zh": "{context}\n问题：{question}\n答案：", "en": "{context}\nQuestion: {question}\nAnswer:"}
INFILL_MARK = "[MASK]"
_CJK_TEXT = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]")


def _csv_rows(path: Path) -> list[list[str]]:
    try:
        return list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TaskError(f"{path}: cannot be read as CSV ({err})") from None


def load_choice_csv(path: Path) -> Subtask:
    """An MMLU, C-Eval or CMMLU subject file. MMLU's prompt (Hendrycks et al., as
    lm-evaluation-harness): a header naming the subject, "question\\nA. ...\\nD. ...\\nAnswer:",
    choices " A" ... " D"; a Chinese subject C-Eval's ("以下是中国关于<subject>考试的单项选择题，
    请选出其中的正确答案。", "question\\nA. ...\\nD. ...\\n答案：", choices "A" ... "D"). Example
    indices count data rows from 0; errors name the file line too."""
    rows = _csv_rows(path)
    header = [c.strip().lower() for c in rows[0]] if rows else []
    named = {"question", "answer", "a", "b", "c", "d"} <= set(header)
    columns = [header.index(name) for name in ("question", "a", "b", "c", "d", "answer")] if named else list(range(6))
    start = 1 if named or header[-1:] == ["answer"] else 0
    width = len(header) if named else 6
    parsed = []
    for line, row in enumerate(rows[start:], start=start + 1):
        if not any(c.strip() for c in row):
            continue
        where, at = f"{path}: example {len(parsed)}", f"(line {line})"
        if len(row) != width:
            raise TaskError(
                f"{where}: expected {width} columns ({', '.join(header) if named else 'question, A, B, C, D, answer'}), got {len(row)} {at}"
            )
        question, *options, answer = (row[c].strip() for c in columns)
        if answer.upper() not in MMLU_LETTERS:
            raise TaskError(f"{where}: answer must be one of A, B, C, D, got {answer!r} {at}")
        if not question:
            raise TaskError(f"{where}: the question is empty {at}")
        parsed.append((question, options, MMLU_LETTERS.index(answer.upper())))
    if not parsed:
        raise TaskError(f"{path}: holds no examples")
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
    chinese = bool(_CJK_TEXT.search(parsed[0][0]))
    answer_prompt, choices = ("\n答案：", MMLU_LETTERS) if chinese else ("\nAnswer:", tuple(f" {c}" for c in MMLU_LETTERS))
    examples = [
        ChoiceExample(
            question + "".join(f"\n{c}. {o}" for c, o in zip(MMLU_LETTERS, options, strict=True)) + answer_prompt,
            choices,
            (gold,),
        )
        for question, options, gold in parsed
    ]
    prefix = (CEVAL_HEADER if chinese else MMLU_HEADER).format(subject=subject.replace("_", " "))
    return Subtask(subject, path, "mul", examples, prefix=prefix, separator="\n\n")


def _joined(context: str, choice: str) -> str:
    """`choice` as it continues `context`: with a space unless either side has one or is CJK."""
    if choice[:1].isspace() or context[-1:].isspace() or not context:
        return choice
    return join_space(context[-1], choice[0]) + choice


def load_glm_choices(path: Path) -> Subtask:
    """GLM-130B's multiple-choice `.jsonl`: the prompt, its choices and the gold index."""
    examples = []
    for index, record in jsonl_records(path):
        query = string_field(path, index, record, "inputs_pretokenized")
        choices = record.get("choices_pretokenized")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip() for c in choices):
            raise TaskError(
                f"{path}: example {index}: field 'choices_pretokenized' must be a non-empty list of non-empty strings"
            )
        label = record.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise TaskError(
                f"{path}: example {index}: field 'label' must be a choice index from 0 to {len(choices) - 1}, got {label!r}"
            )
        examples.append(ChoiceExample(query, tuple(_joined(query, c) for c in choices), (label,)))
    return Subtask("", path, "mul", examples)


def _fill(path: Path, index: int, template: str, record: dict[str, Any]) -> str:
    """`template` formatted with the record's fields (a list of strings joined with "，")."""
    fields = {k: "，".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v for k, v in record.items()}
    try:
        return template.format(**fields)
    except KeyError as err:
        raise TaskError(f"{path}: example {index}: the template names field {err}, which the record lacks") from None
    except (IndexError, ValueError, AttributeError, TypeError) as err:
        raise TaskError(f"{path}: example {index}: the template does not apply to the record ({err})") from None


def load_classification(path: Path, template: str | None, verbalizers: dict[str, str], label_field: str) -> Subtask:
    """CLUE / FewCLUE classification: the query is `template` filled from the record; the choices
    are the verbalizers' texts (in the YAML's order), the gold one the record's label's."""
    if not template:
        raise TaskError(f"{path}: a classification task needs a 'template' making the query from each record")
    texts = list(dict.fromkeys(verbalizers.values()))
    examples = []
    for index, record in jsonl_records(path):
        label = record.get(label_field)
        if isinstance(label, (int, bool)):
            label = str(label).lower() if isinstance(label, bool) else str(label)
        if not isinstance(label, str) or label not in verbalizers:
            raise TaskError(
                f"{path}: example {index}: field {label_field!r} is {label!r}, which has no verbalizer (known: {', '.join(verbalizers)})"
            )
        query = _fill(path, index, template, record)
        examples.append(ChoiceExample(query, tuple(_joined(query, t) for t in texts), (texts.index(verbalizers[label]),)))
    return Subtask("", path, "mul", examples)


def load_squad(path: Path, template: str | None) -> Subtask:
    """SQuAD-format QA (CMRC 2018, DRCD): one `gen` example per question, its answers the targets;
    the prompt `template` (fields context, question, title), by default SQUAD_TEMPLATES for the
    passage's language; the answer ends at a newline."""
    data = read_mapping(path, "a SQuAD-format object").get("data")
    if not isinstance(data, list):
        raise TaskError(f"{path}: 'data' must be a list of articles")
    examples = []
    for article in data:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TaskError(f"{path}: example {len(examples)}: an article without a 'paragraphs' list")
        for paragraph in paragraphs:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise TaskError(f"{path}: example {len(examples)}: a paragraph needs a 'context' string and a 'qas' list")
            for qa in paragraph["qas"]:
                index = len(examples)
                question = string_field(path, index, qa, "question") if isinstance(qa, dict) else None
                answers = qa.get("answers") if isinstance(qa, dict) else None
                targets = tuple(dict.fromkeys(a.get("text") for a in answers or [] if isinstance(a, dict)))
                if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
                    raise TaskError(f"{path}: example {index}: 'answers' must list objects with a non-empty 'text'")
                fields = {"context": context, "question": question, "title": article.get("title", "")}
                chosen = template or SQUAD_TEMPLATES["zh" if _CJK_TEXT.search(context) else "en"]
                examples.append(GenExample(_fill(path, index, chosen, fields), targets))
    if not examples:
        raise TaskError(f"{path}: holds no questions")
    return Subtask("", path, "gen", examples, stop="\n")


def is_pile(record: dict[str, Any]) -> bool:
    return isinstance(record.get("meta"), dict) and "pile_set_name" in record["meta"]


def load_pile(path: Path) -> list[Subtask]:
    """Pile-style documents grouped by `meta.pile_set_name`, one subtask per set (sorted)."""
    groups: dict[str, list[Document]] = defaultdict(list)
    for index, record in jsonl_records(path):
        name = record.get("meta", {}).get("pile_set_name") if isinstance(record.get("meta"), dict) else None
        if not isinstance(name, str) or not name:
            raise TaskError(f"{path}: example {index}: field 'meta' must hold a non-empty 'pile_set_name'")
        groups[name].append(Document(string_field(path, index, record, "text")))
    return [Subtask(name, path, "lm", groups[name]) for name in sorted(groups)]


CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def load_crows_pairs(path: Path) -> list[Subtask]:
    """CrowS-Pairs (Nangia et al. 2020): one subtask per bias type (sorted). `sent_more` is the
    more stereotypical sentence in both directions, as the paper's metric.py reads the file."""
    rows = _csv_rows(path)
    header = rows[0] if rows else []
    missing = [c for c in CROWS_COLUMNS if c not in header]
    if missing:
        raise TaskError(
            f"{path}: line 1: a CrowS-Pairs header needs the columns {', '.join(CROWS_COLUMNS)} (missing {', '.join(missing)})"
        )
    at = {c: header.index(c) for c in CROWS_COLUMNS}
    groups: dict[str, list[PairExample]] = defaultdict(list)
    index = 0
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}: example {index} (line {line})"
        if len(row) < len(header):
            raise TaskError(f"{where}: expected {len(header)} columns, got {len(row)}")
        more, less, direction, bias = (row[at[c]].strip() for c in CROWS_COLUMNS)
        if direction not in ("stereo", "antistereo"):
            raise TaskError(f"{where}: stereo_antistereo must be stereo or antistereo, got {direction!r}")
        if not more or not less or not bias:
            raise TaskError(f"{where}: sent_more, sent_less and bias_type must be non-empty")
        groups[bias].append(PairExample(more, less, bias))
        index += 1
    if not groups:
        raise TaskError(f"{path}: holds no examples")
    return [Subtask(name, path, "bias", groups[name]) for name in sorted(groups)]


STEREOSET_LABELS = ("stereotype", "anti-stereotype", "unrelated")


def load_stereoset(path: Path) -> list[Subtask]:
    """StereoSet's intrasentence examples (Nadeem et al. 2021), one subtask per bias type (sorted)."""
    data = read_mapping(path, "a StereoSet object").get("data")
    items = data.get("intrasentence") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise TaskError(f"{path}: expected 'data.intrasentence', a non-empty list of examples")
    groups: dict[str, list[TripleExample]] = defaultdict(list)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise TaskError(f"{path}: example {index}: expected a JSON object")
        target, bias = string_field(path, index, item, "target"), string_field(path, index, item, "bias_type")
        sentences = item.get("sentences")
        by_label = {s.get("gold_label"): s.get("sentence") for s in sentences or [] if isinstance(s, dict)}
        if not isinstance(sentences, list) or sorted(map(str, by_label)) != sorted(STEREOSET_LABELS) or len(sentences) != 3:
            raise TaskError(
                f"{path}: example {index}: 'sentences' must hold one sentence of each gold_label {', '.join(STEREOSET_LABELS)}"
            )
        if not all(isinstance(by_label[k], str) and by_label[k].strip() for k in STEREOSET_LABELS):
            raise TaskError(f"{path}: example {index}: every sentence must be a non-empty string")
        groups[bias].append(TripleExample(*(by_label[k] for k in STEREOSET_LABELS), target=target, group=bias))
    return [Subtask(name, path, "bias", groups[name]) for name in sorted(groups)]


def load_infill(path: Path) -> Subtask:
    """`{"text", "span"}` records: the text holds `[MASK]` once, where the span was."""
    examples = []
    for index, record in jsonl_records(path):
        text, span = string_field(path, index, record, "text"), string_field(path, index, record, "span")
        if text.count(INFILL_MARK) != 1:
            raise TaskError(
                f"{path}: example {index}: the text must hold {INFILL_MARK} exactly once, got {text.count(INFILL_MARK)}"
            )
        left, right = text.split(INFILL_MARK)
        if not left.strip() or not right.strip():
            raise TaskError(f"{path}: example {index}: {INFILL_MARK} must have text on both sides")
        examples.append(InfillExample(left, span, right))
    return Subtask("", path, "infill", examples)
