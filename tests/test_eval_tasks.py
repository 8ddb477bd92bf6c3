"""Task configs, data formats, few-shot prompts and the bundled evaluation sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openglm.cli import app
from openglm.data.documents import bundled_corpus_paths, iter_documents
from openglm.eval import heldout
from openglm.eval.tasks import (
    ChoiceExample,
    ClozeExample,
    TaskConfig,
    TaskError,
    bundled_task_names,
    load_subtasks,
    resolve_task,
)


def write_bigbench(folder: Path, examples: list[dict], **settings: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "task.json"
    path.write_text(json.dumps({"name": folder.name, "examples": examples, **settings}))
    return path


def test_every_bundled_task_parses_with_its_subtasks() -> None:
    counts = {}
    for name in bundled_task_names():
        config = resolve_task(name)
        counts[name] = {s.name: len(s.examples) for s in load_subtasks(config, seed=1)}
    # Example counts as the data pack's README lists them.
    assert counts["logical_deduction"] == {"five_objects": 500, "seven_objects": 700, "three_objects": 300}
    assert counts["strange_stories"] == {"boolean": 53, "multiple_choice": 121}
    assert counts["conceptual_combinations"] == {
        "contradictions": 16,
        "emergent_properties": 40,
        "fanciful_fictional_combinations": 12,
        "homonyms": 9,
        "invented_words": 14,
        "surprising_uncommon_combinations": 12,
    }
    assert counts["hindu_knowledge"] == {"": 175}
    assert counts["operators"] == {"": 211}
    assert resolve_task("operators").type == "gen" and resolve_task("hindu_knowledge").type == "mul"
    assert {resolve_task(n).type for n in ("cloze_en", "cloze_zh")} == {"cloze"}
    assert {resolve_task(n).type for n in ("bpb_en", "bpb_zh")} == {"lm"}


def test_bigbench_few_shot_prompt_golden(tmp_path: Path) -> None:
    examples = [
        {"input": "2+2?", "target_scores": {"4": 1, "5": 0}},
        {"input": "3+3?", "target_scores": {"7": 0, "6": 1}},
    ]
    path = write_bigbench(tmp_path / "sums", examples, task_prefix="Add.\n", append_choices_to_input=False)
    (subtask,) = load_subtasks(resolve_task(path), seed=1)
    assert subtask.examples[1] == ChoiceExample("\nQ: 3+3?\nA: ", ("7", "6"), (1,))
    # 1 shot: the only other example, with its gold answer, BIG-bench's default "\n" between.
    assert subtask.prompt(1, shots=1, seed=1) == "Add.\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA: "
    assert subtask.prompt(0, shots=0, seed=1) == "Add.\n\nQ: 2+2?\nA: "
    with pytest.raises(TaskError, match="2 shots asked, but only 1"):
        subtask.prompt(0, shots=2, seed=1)


def test_bigbench_lists_choices_in_a_seeded_order_and_demonstrations_are_seeded(tmp_path: Path) -> None:
    examples = [{"input": f"q{i}", "target_scores": {"a": 1, "b": 0, "c": 0}} for i in range(6)]
    path = write_bigbench(tmp_path / "t", examples, example_input_prefix="", example_output_prefix=" A:", choice_prefix=" | ")
    (first,) = load_subtasks(resolve_task(path), seed=3)
    (again,) = load_subtasks(resolve_task(path), seed=3)
    query = first.examples[0].query
    assert query.startswith("q0 | ") and query.endswith(" A:") and sorted(query[5:-3].split(" | ")) == ["a", "b", "c"]
    assert [first.prompt(i, 2, seed=3) for i in range(6)] == [again.prompt(i, 2, seed=3) for i in range(6)]
    prompt = first.prompt(4, 2, seed=3)
    assert prompt.endswith(first.examples[4].query) and prompt.count(" A:a") == 2 and "q4 |" not in prompt[: -len(query)]
    assert {first.prompt(4, 2, seed=s) for s in range(10)} != {prompt}  # another seed, other demonstrations


def test_mmlu_csv_prompt_golden(tmp_path: Path) -> None:
    path = tmp_path / "high_school_math_test.csv"
    path.write_text('What is 1+1?,1,2,3,4,B\n"Zero, times 5?",0,5,10,50,a\n')
    (subtask,) = load_subtasks(resolve_task(path), seed=0)
    assert subtask.name == "high_school_math" and subtask.examples[1].gold == (0,)
    assert subtask.examples[0].choices == (" A", " B", " C", " D")
    assert subtask.prompt(1, shots=1, seed=0) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Zero, times 5?\nA. 0\nB. 5\nC. 10\nD. 50\nAnswer:"
    )


def test_cloze_moves_the_space_before_the_target_into_the_continuation(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"text": "He saw Emma and said Emma", "target": "Emma"})
        + "\n"
        + json.dumps({"text": "曹操见曹操", "target": "曹操"})
        + "\n"
    )
    config = resolve_task(path)
    assert config.type == "cloze"
    (subtask,) = load_subtasks(config, seed=0)
    assert subtask.examples == [ClozeExample("He saw Emma and said", " Emma", "Emma"), ClozeExample("曹操见", "曹操", "曹操")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"bad[/\\]task.json: not valid JSON \(line 1"),
        (
            json.dumps({"examples": [{"input": "a", "target_scores": {"x": 1}}, {"target_scores": {"x": 1}}]}),
            "example 1: missing field 'input'",
        ),
        (json.dumps({"examples": [{"input": "a", "target_scores": {}}]}), "example 0: the choice list is empty"),
        (json.dumps({"examples": [{"input": "a", "target_scores": {"x": "high"}}]}), "example 0: 'target_scores' must map"),
    ],
)
def test_bad_bigbench_files_name_the_file_and_example(tmp_path: Path, content: str, message: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "task.json").write_text(content)
    with pytest.raises(TaskError, match=message):
        load_subtasks(TaskConfig(name="bad", type="mul", data=folder), seed=0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", '{"text": "a b", "target": "b"}\n{"text": "a b"', "c.jsonl: example 1: invalid JSON"),
        ("c.jsonl", '{"text": "a b", "target": "b"}\n{"target": "b"}\n', "c.jsonl: example 1: missing field 'text'"),
        ("c.jsonl", '{"text": " ", "target": "c"}\n', "c.jsonl: example 0: field 'text' must be a non-empty string"),
        ("lambada_x.jsonl", '{"text": "a b"}\n{"text": "word"}\n', "lambada_x.jsonl: example 1: no space before a last word"),
        ("g.jsonl", '{"inputs_pretokenized": "a", "targets_pretokenized": ["b", "c"]}\n', "g.jsonl: example 0: field 'targets_pretokenized' must be"),
        ("m.csv", "q,1,2,3,4,E\n", "m.csv: example 0: answer must be one of A, B, C, D"),
        ("m.csv", "q,1,2,A\n", "m.csv: example 0: expected 6 columns"),
    ],
)
def test_bad_data_files_name_the_file_and_example(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_subtasks(resolve_task(path), seed=0)


def test_bad_task_configs(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="neither a bundled task"):
        resolve_task("no_such_task")
    config = tmp_path / "t.yaml"
    config.write_text("type: cloze\ndata: x.jsonl\nshots: 1\nmodez: [bidirectional]\n")
    with pytest.raises(TaskError, match=r"t.yaml: unknown setting\(s\) modez"):
        resolve_task(config)
    config.write_text("type: cloze\nmodes: [sideways]\ndata: x.jsonl\n")
    with pytest.raises(TaskError, match="modes must be"):
        resolve_task(config)
    config.write_text("type: mul\n")
    with pytest.raises(TaskError, match="missing required setting 'data'"):
        resolve_task(config)


def test_bundled_sets_are_rebuilt_exactly_from_held_out_text_only(tmp_path: Path) -> None:
    counts = heldout.build(tmp_path)
    bundled = Path(heldout.__file__).parent / "data"
    for name in counts:
        assert (tmp_path / name).read_text(encoding="utf-8") == (bundled / name).read_text(encoding="utf-8"), name
    assert counts["cloze_en.jsonl"] >= 100 and counts["cloze_zh.jsonl"] >= 100
    held_out = {d for lang in ("en", "zh") for d in heldout.heldout_documents(lang)}
    training = [d for d in iter_documents(bundled_corpus_paths()) if d not in held_out]
    for lang in ("en", "zh"):
        for line in (bundled / f"cloze_{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert any(record["text"] in d for d in held_out)
            assert not any(record["text"] in d for d in training)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_lambada_in_its_three_shapes_joins_english_with_a_space_and_chinese_without(tmp_path: Path) -> None:
    duty = ClozeExample("He was sure it was his", " duty", "duty")
    fen = ClozeExample("分久必合，合久必", "分", "分")
    # lm-evaluation-harness's lambada_openai and the GLM repo: {"text"} alone, the last word the target
    openai = write_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "He was sure it was his duty"}])
    assert resolve_task(openai).type == "cloze" and load_subtasks(resolve_task(openai), seed=0)[0].examples == [duty]
    documents = write_jsonl(tmp_path / "docs.jsonl", [{"text": "He was sure it was his duty"}])
    assert resolve_task(documents).type == "lm"  # the same records under another name stay documents
    config = tmp_path / "as_cloze.yaml"
    config.write_text("type: cloze\ndata: docs.jsonl\n")
    assert load_subtasks(resolve_task(config), seed=0)[0].examples == [duty]
    assert load_subtasks(resolve_task(documents, "cloze"), seed=0)[0].examples == [duty]  # --task-type cloze
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--task", str(documents), "--task-type", "lambada"])
    assert result.exit_code == 2 and "task type must be one of lm, cloze, mul, gen, got 'lambada'" in result.output
    # {"text", "target"} with the text before the target; a file mixing in a text that ends with its
    # target reads every text as the context (so "said Emma" + "Emma" is "said Emma Emma")
    without = write_jsonl(
        tmp_path / "without.jsonl",
        [{"text": "He was sure it was his", "target": "duty"}, {"text": "分久必合，合久必", "target": "分"}, {"text": "said Emma", "target": "Emma"}],
    )
    assert load_subtasks(resolve_task(without), seed=0)[0].examples == [duty, fen, ClozeExample("said Emma", " Emma", "Emma")]
    # GLM-130B's own files: the target a string (its own leading space kept) or a list of one
    glm = write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"inputs_pretokenized": "He was sure it was his", "targets_pretokenized": ["duty"]},
            {"inputs_pretokenized": "分久必合，合久必", "targets_pretokenized": "分"},
            {"inputs_pretokenized": "He was sure it was his\n", "targets_pretokenized": " duty"},
        ],
    )
    assert resolve_task(glm).type == "cloze"
    assert load_subtasks(resolve_task(glm), seed=0)[0].examples == [duty, fen, ClozeExample("He was sure it was his", "\n duty", "duty")]


def test_bigbench_lists_choices_in_bigbench_own_order(tmp_path: Path) -> None:
    """A fresh numpy RandomState(42) per example, `permutation(sorted(choices))`, as bigbench
    1.0.0's json_task.py (default_format_fn) formats an example, read from that package. The
    orders below were worked out once with numpy: [b, d, a, c] for four choices, [y, x] for two,
    [one, three, two] for three (one RandomState(42) drawn from example after example would give
    [three, two, one] for the last)."""
    examples = [
        {"input": "q0", "target_scores": {"d": 1, "a": 0, "c": 0, "b": 0}, "target": "d"},
        {"input": "q1", "target_scores": {"y": 0, "x": 1}, "target": "x"},
        {"input": "q2", "target": "no choices: nothing drawn"},
        {"input": "q3", "target_scores": {"three": 0, "one": 1, "two": 0}, "target": "one"},
    ]
    path = write_bigbench(tmp_path / "order", examples)
    (subtask,) = load_subtasks(TaskConfig(name="order", type="gen", data=path), seed=5)
    assert [e.query for e in subtask.examples] == [
        "\nQ: q0\n  choice: b\n  choice: d\n  choice: a\n  choice: c\nA: ",
        "\nQ: q1\n  choice: y\n  choice: x\nA: ",
        "\nQ: q2\nA: ",
        "\nQ: q3\n  choice: one\n  choice: three\n  choice: two\nA: ",
    ]
    mul = write_bigbench(tmp_path / "mul", [examples[0], examples[1], examples[3]])
    (chosen,) = load_subtasks(resolve_task(mul), seed=5)
    assert [e.query for e in chosen.examples] == [subtask.examples[i].query for i in (0, 1, 3)]
    assert resolve_task(mul).settings()["choice_order"] == "bigbench"
    # the earlier order stays available: a generator seeded with (seed, example index)
    (seeded,) = load_subtasks(TaskConfig(name="mul", type="mul", data=mul, choice_order="seeded"), seed=5)
    import numpy as np

    listed = [str(c) for c in np.random.default_rng([5, 0]).permutation(["a", "b", "c", "d"])]
    assert seeded.examples[0].query == "\nQ: q0" + "".join(f"\n  choice: {c}" for c in listed) + "\nA: "
    with pytest.raises(TaskError, match="choice_order must be one of bigbench, seeded"):
        TaskConfig(name="x", type="mul", data=mul, choice_order="random")


def test_bundled_infill_sets_cut_one_sentence_out_of_held_out_passages() -> None:
    held_out = {d for lang in ("en", "zh") for d in heldout.heldout_documents(lang)}
    training = [d for d in iter_documents(bundled_corpus_paths()) if d not in held_out]
    for lang in ("en", "zh"):
        (subtask,) = load_subtasks(resolve_task(f"infill_{lang}"), seed=0)
        assert len(subtask.examples) >= 30
        for example in subtask.examples:
            passage = example.left + example.span + example.right
            assert any(passage in d for d in held_out) and not any(passage in d for d in training)
            assert len(example.left) >= heldout.INFILL_SIDE[lang] and len(example.right) >= heldout.INFILL_SIDE[lang]
