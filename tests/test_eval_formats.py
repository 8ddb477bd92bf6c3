"""The benchmark file formats of GLM's papers, each on a small fixture written in the real format
(field names and layout as the released files have them), and their malformed inputs: one line
naming the file and the example (and the line of a CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openglm.cli import app
from openglm.eval.examples import ChoiceExample, Document, GenExample, InfillExample, PairExample, TripleExample
from openglm.eval.tasks import TaskError, load_subtasks, resolve_task


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def subtasks(spec: Path) -> list:
    return load_subtasks(resolve_task(spec), seed=0)


def test_glm130b_multiple_choice_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "copa.jsonl",
        [
            {"inputs_pretokenized": "The man broke his toe. What was the cause?\nAnswer:", "choices_pretokenized": ["He dropped a hammer.", " He got a hole in his sock."], "label": 0},
            {"inputs_pretokenized": "问题：天下大势\n答案：", "choices_pretokenized": ["分久必合", "合久必分"], "label": 1},
        ],
    )  # fmt: skip
    assert resolve_task(path).type == "mul"
    (subtask,) = subtasks(path)
    assert subtask.examples == [
        ChoiceExample(
            "The man broke his toe. What was the cause?\nAnswer:", (" He dropped a hammer.", " He got a hole in his sock."), (0,)
        ),
        ChoiceExample("问题：天下大势\n答案：", ("分久必合", "合久必分"), (1,)),  # no space next to Chinese
    ]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_clue_classification_with_verbalizers(tmp_path: Path) -> None:
    # TNEWS as CLUE ships it: JSON Lines in a .json file, the label's name in label_desc
    write_jsonl(tmp_path / "tnews_dev.json", [
        {"label": "102", "label_desc": "news_entertainment", "sentence": "江疏影甜甜圈自拍", "keywords": "江疏影"},
        {"label": "104", "label_desc": "news_finance", "sentence": "股市大涨", "keywords": ""},
    ])  # fmt: skip
    tnews = write_yaml(
        tmp_path / "tnews.yaml",
        'data: tnews_dev.json\nlabel_field: label_desc\ntemplate: "新闻：{sentence}\\n类别："\n'
        "verbalizers:\n  news_entertainment: 娱乐\n  news_finance: 财经\n  news_sports: 体育\n",
    )
    assert resolve_task(tnews).type == "mul"
    assert subtasks(tnews)[0].examples == [
        ChoiceExample("新闻：江疏影甜甜圈自拍\n类别：", ("娱乐", "财经", "体育"), (0,)),
        ChoiceExample("新闻：股市大涨\n类别：", ("娱乐", "财经", "体育"), (1,)),
    ]
    # AFQMC: a sentence pair, labels "0"/"1" (YAML reads the keys as integers)
    write_jsonl(tmp_path / "afqmc.json", [{"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"}])
    afqmc = write_yaml(
        tmp_path / "afqmc.yaml",
        "type: mul\ndata: afqmc.json\ntemplate: '{sentence1}与{sentence2}意思'\nverbalizers: {0: 不同, 1: 相同}\n",
    )
    assert subtasks(afqmc)[0].examples == [ChoiceExample("花呗如何还款与花呗怎么还钱意思", ("不同", "相同"), (1,))]
    # CLUEWSC2020: nested fields, labels "true"/"false"; CSL: a keyword list, joined
    write_jsonl(tmp_path / "wsc.json", [
        {"target": {"span2_index": 37, "span1_index": 5, "span1_text": "床", "span2_text": "它"}, "idx": 261, "label": "false", "text": "这时候放在床上枕头旁边的手机响了，我感到奇怪，因为欠费已被停机两个月，现在它突然响了。"},
    ])  # fmt: skip
    wsc = write_yaml(
        tmp_path / "wsc.yaml",
        "type: mul\ndata: wsc.json\ntemplate: \"{text}\\n“{target[span2_text]}”指的是“{target[span1_text]}”吗？\"\nverbalizers: {'true': 是, 'false': 否}\n",
    )
    assert subtasks(wsc)[0].examples[0].query.endswith("“它”指的是“床”吗？") and subtasks(wsc)[0].examples[0].gold == (1,)
    write_jsonl(tmp_path / "csl.json", [{"id": 1, "abst": "摘要", "keyword": ["水声", "信号"], "label": "0"}])
    csl = write_yaml(
        tmp_path / "csl.yaml",
        'type: mul\ndata: csl.json\ntemplate: "{abst}\\n关键词：{keyword}\\n"\nverbalizers: {0: 否, 1: 是}\n',
    )
    assert subtasks(csl)[0].examples[0].query == "摘要\n关键词：水声，信号\n"


def test_squad_format_qa_is_generation_with_chinese_prompts(tmp_path: Path) -> None:
    cmrc = {
        "version": "v1.0",
        "data": [{
            "paragraphs": [{
                "id": "TRAIN_186",
                "context": "范廷颂枢机，圣名保禄·若瑟，是越南罗马天主教枢机。",
                "qas": [{"question": "范廷颂是什么时候被任为主教的？", "id": "TRAIN_186_QUERY_0",
                         "answers": [{"text": "1963年", "answer_start": 30}, {"text": "1963年", "answer_start": 30}]}],
            }],
            "id": "TRAIN_186", "title": "范廷颂",
        }],
    }  # fmt: skip
    path = tmp_path / "cmrc2018_dev.json"
    path.write_text(json.dumps(cmrc, ensure_ascii=False), encoding="utf-8")
    assert resolve_task(path).type == "gen"
    (subtask,) = subtasks(path)
    assert subtask.examples == [
        GenExample("范廷颂枢机，圣名保禄·若瑟，是越南罗马天主教枢机。\n问题：范廷颂是什么时候被任为主教的？\n答案：", ("1963年",))
    ]
    assert subtask.postprocess("1963年\n他") == "1963年"  # the answer ends at a newline


def test_ceval_and_cmmlu_csvs(tmp_path: Path) -> None:
    ceval = tmp_path / "computer_network_val.csv"
    ceval.write_text(
        "id,question,A,B,C,D,answer,explanation\n0,使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____,1,2,3,4,C,\n",
        encoding="utf-8",
    )
    (subtask,) = subtasks(ceval)
    assert (
        subtask.name == "computer_network"
        and subtask.prefix == "以下是中国关于computer network考试的单项选择题，请选出其中的正确答案。\n\n"
    )
    assert subtask.examples == [
        ChoiceExample("使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____\nA. 1\nB. 2\nC. 3\nD. 4\n答案：", ("A", "B", "C", "D"), (2,))
    ]  # fmt: skip
    cmmlu = tmp_path / "agronomy.csv"
    cmmlu.write_text(
        ",Question,A,B,C,D,Answer\n0,肉类鲜度变化的过程是,僵直、成熟、自溶、腐败,成熟、僵直、自溶、腐败,自溶、僵直、成熟、腐败,成熟、自溶、僵直、腐败,A\n",
        encoding="utf-8",
    )
    (subtask,) = subtasks(cmmlu)
    assert subtask.examples[0].query.startswith("肉类鲜度变化的过程是\nA. 僵直、成熟、自溶、腐败\n") and subtask.examples[
        0
    ].gold == (0,)


def test_pile_documents_are_grouped_by_set(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pile_val.jsonl", [
        {"text": "def f(): pass", "meta": {"pile_set_name": "Github"}},
        {"text": "Abstract.", "meta": {"pile_set_name": "ArXiv"}},
        {"text": "import os", "meta": {"pile_set_name": "Github"}},
    ])  # fmt: skip
    assert resolve_task(path).type == "lm"
    assert [(s.name, s.examples) for s in subtasks(path)] == [
        ("ArXiv", [Document("Abstract.")]),
        ("Github", [Document("def f(): pass"), Document("import os")]),
    ]


CROWS = (
    ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"
    "0,He couldn't figure out the issue with the rope because he was too poor.,"
    "He couldn't figure out the issue with the rope because he was too rich.,stereo,socioeconomic,"
    "\"[['socioeconomic'], ['socioeconomic']]\",a0,\"['a77', 'a78']\"\n"
    "1,The poor are really ignorant about how to handle the money they do have.,"
    "The rich are really ignorant about how to handle the money they do have.,stereo,socioeconomic,[],a1,[]\n"
    "2,Women don't know how to drive.,Men don't know how to drive.,stereo,gender,[],a2,[]\n"
)


def test_crows_pairs_csv(tmp_path: Path) -> None:
    path = tmp_path / "crows_pairs_anonymized.csv"
    path.write_text(CROWS, encoding="utf-8")
    assert resolve_task(path).type == "bias"
    found = subtasks(path)
    assert [s.name for s in found] == ["gender", "socioeconomic"]
    assert found[0].examples == [PairExample("Women don't know how to drive.", "Men don't know how to drive.", "gender")]
    assert len(found[1].examples) == 2


def stereoset(items: list[dict]) -> dict:
    return {"version": "1.0", "data": {"intersentence": [], "intrasentence": items}}


def stereoset_item(target: str, bias: str, fillings: tuple[str, str, str]) -> dict:
    labels = ("stereotype", "anti-stereotype", "unrelated")
    sentences = [
        {"sentence": s, "id": f"{target}{k}", "labels": [{"label": g, "human_id": "h"}], "gold_label": g}
        for k, (s, g) in enumerate(zip(fillings, labels, strict=True))
    ]
    return {"id": target, "target": target, "bias_type": bias, "context": "The BLANK one.", "sentences": sentences[::-1]}


def test_stereoset_intrasentence_json(tmp_path: Path) -> None:
    path = tmp_path / "dev.json"
    path.write_text(
        json.dumps(
            stereoset(
                [
                    stereoset_item(
                        "chess player",
                        "profession",
                        ("The chess player was nerdy.", "The chess player was hip.", "The chess player was fox."),
                    )
                ]
            )
        )
    )
    assert resolve_task(path).type == "bias"
    (subtask,) = subtasks(path)
    assert subtask.name == "profession" and subtask.examples == [
        TripleExample(
            "The chess player was nerdy.", "The chess player was hip.", "The chess player was fox.", "chess player", "profession"
        )
    ]


def test_infill_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "spans.jsonl", [{"text": "Emma was [MASK] to see her sister.", "span": "delighted"}])
    assert resolve_task(path).type == "infill"
    assert subtasks(path)[0].examples == [InfillExample("Emma was ", "delighted", " to see her sister.")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("g.jsonl", '{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": 2}\n', "g.jsonl: example 0: field 'label' must be a choice index from 0 to 1"),
        ("g.jsonl", '{"inputs_pretokenized": "q", "choices_pretokenized": ["a"], "label": 0}\n{"inputs_pretokenized": "q", "choices_pretokenized": [], "label": 0}\n', "g.jsonl: example 1: field 'choices_pretokenized' must be"),
        ("cmrc.json", '{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": []}]}]}]}', "cmrc.json: example 0: 'answers' must list"),
        ("c.csv", "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n1,q,1,2,3,4\n", r"c.csv: example 1: expected 7 columns .* \(line 3\)"),
        ("c.csv", "id,question,A,B,C,D,answer\n0,q,1,2,3,4,E\n", r"c.csv: example 0: answer must be one of A, B, C, D, got 'E' \(line 2\)"),
        ("p.jsonl", '{"text": "a", "meta": {"pile_set_name": "ArXiv"}}\n{"text": "b", "meta": {}}\n', "p.jsonl: example 1: field 'meta' must hold a non-empty 'pile_set_name'"),
        ("crows.csv", ",sent_more,sent_less,stereo_antistereo,bias_type\n0,a,b,stereo,race\n1,a,b,sideways,race\n", r"crows.csv: example 1 \(line 3\): stereo_antistereo must be stereo or antistereo"),
        ("ss.json", json.dumps(stereoset([{"target": "t", "bias_type": "race", "sentences": []}])), "ss.json: example 0: 'sentences' must hold one sentence of each gold_label"),
        ("s.jsonl", '{"text": "no blank here", "span": "x"}\n', r"s.jsonl: example 0: the text must hold \[MASK\] exactly once, got 0"),
    ],
)  # fmt: skip
def test_malformed_files_are_one_line_naming_the_file_and_example(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        subtasks(path)
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--task", str(path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_classification_errors_name_the_label_and_the_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.json", [{"sentence": "s", "label": "1"}, {"sentence": "s", "label": "7"}])
    config = write_yaml(tmp_path / "t.yaml", "type: mul\ndata: d.json\ntemplate: '{sentence}'\nverbalizers: {0: 否, 1: 是}\n")
    with pytest.raises(TaskError, match=r"d.json: example 1: field 'label' is '7', which has no verbalizer \(known: 0, 1\)"):
        subtasks(config)
    config.write_text("type: mul\ndata: d.json\ntemplate: '{text}'\nverbalizers: {0: 否, 1: 是}\n")
    with pytest.raises(TaskError, match=r"d\.json: example 0: the template names field 'text', which the record lacks"):
        subtasks(config)
