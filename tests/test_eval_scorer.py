"""Model-side scoring and the runner: stub models with known log-probabilities give exactly the
hand-calculated metrics; a random `micro` GLM checks the KV-cache and batching paths against
plain full-sequence forwards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_chatglm_tokenizer import build_ice_text, write_release
from torch import nn
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.config import model_preset
from openglm.eval import glm130b
from openglm.eval.lm import LMScore
from openglm.eval.metrics import is_punctuation
from openglm.eval.runner import evaluate_task, first_word_matches, markdown_table, word_decided
from openglm.eval.scorer import ModelScorer, move_trailing_space
from openglm.eval.tasks import TaskConfig, resolve_task
from openglm.generation import GenerationConfig, infill
from openglm.io.checkpoint import save_checkpoint
from openglm.model import GLM
from openglm.tokenizer import GLMTokenizer

YES, NO = 2582, 495  # " yes" and " no" are one token each in the bundled tokenizer


class StubModel(nn.Module):
    """Every position predicts the same distribution: p(" yes") = 0.5, p(" no") = 0.2, the rest
    spread evenly (uniform over the vocabulary when `uniform`), whatever the input."""

    def __init__(self, objective: str = "glm", uniform: bool = False) -> None:
        super().__init__()
        self.config = model_preset("micro", objective=objective)
        self.word_embeddings = nn.Embedding(1, 1)
        vocab = self.config.vocab_size
        probs = torch.full((vocab,), 1.0 / vocab if uniform else 0.3 / (vocab - 2), dtype=torch.float64)
        if not uniform:
            probs[YES], probs[NO] = 0.5, 0.2
        self.register_buffer("log_probs", probs.log().float())

    @property
    def dtype(self) -> torch.dtype:  # as GLM.dtype / GLM.device, which generation asks
        return self.log_probs.dtype

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def forward(self, input_ids: torch.Tensor, *args: object, return_hidden: bool = False, **kwargs: object) -> torch.Tensor:
        hidden = torch.ones(*input_ids.shape, 1)
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.log_probs


@pytest.fixture(scope="module")
def micro_glm() -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro")).eval()


def write_bigbench(folder: Path, examples: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"name": folder.name, "examples": examples, "append_choices_to_input": False}))
    return folder


def rows_by_metric(results: list) -> dict[tuple[str, str], float]:
    return {(r.subtask, r.metric): r.value for r in results}


def test_mul_acc_and_acc_norm_from_known_log_probs(tok: GLMTokenizer, tmp_path: Path) -> None:
    # The prompt ends in "A: ", whose space starts each choice: " yes yes yes" is 3 ln 0.5 = -2.079
    # (11 bytes: -0.189/byte); " no": ln 0.2 = -1.609 (2 bytes: -0.805/byte). acc picks "no",
    # acc_norm "yes yes yes".
    examples = [
        {"input": "q1", "target_scores": {"yes yes yes": 1, "no": 0}},  # acc 0, acc_norm 1
        {"input": "q2", "target_scores": {"yes yes yes": 0, "no": 1}},  # acc 1, acc_norm 0
        {"input": "q3", "target_scores": {"no no": 0, "yes": 1}},  # 2 ln 0.2 vs ln 0.5: both pick "yes"
    ]
    config = TaskConfig(name="t", type="mul", data=write_bigbench(tmp_path / "t", examples))
    scorer = ModelScorer(StubModel(), tok)
    assert [s.loglik for s in scorer.loglikelihoods("q", [" yes yes yes", " no"])] == pytest.approx(
        [3 * math.log(0.5), math.log(0.2)], rel=1e-4
    )
    values = rows_by_metric(evaluate_task(config, scorer, seed=0, progress=False))
    assert values == {("", "acc"): pytest.approx(2 / 3), ("", "acc_norm"): pytest.approx(2 / 3)}
    # The same for a causal model (context then choice, left to right).
    causal = ModelScorer(StubModel("causal"), tok)
    assert rows_by_metric(evaluate_task(config, causal, seed=0, progress=False)) == values


def test_cloze_accuracy_generation_and_perplexity_from_known_log_probs(tok: GLMTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [{"text": "They said yes and yes", "target": "yes"}, {"text": "They said no and no", "target": "no"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = evaluate_task(resolve_task(path), ModelScorer(StubModel(), tok), seed=0, progress=False)
    # " yes" is the argmax (acc 1, greedy generation writes " yes yes yes"), " no" is not;
    # ppl = exp(-(ln 0.5 + ln 0.2) / 2) = sqrt(10).
    for mode in ("bidirectional", "unidirectional"):
        values = rows_by_metric([r for r in results if r.subtask == mode])
        assert values == {(mode, "acc"): 0.5, (mode, "acc_generate"): 0.5, (mode, "ppl"): pytest.approx(math.sqrt(10), rel=1e-4)}
    causal = evaluate_task(resolve_task(path), ModelScorer(StubModel("causal"), tok), seed=0, progress=False)
    assert {r.subtask for r in causal} == {"unidirectional"}  # no bidirectional context in a causal model


def test_bits_per_byte_and_perplexity_of_a_uniform_model(tok: GLMTokenizer, tmp_path: Path) -> None:
    text = "It is a truth universally acknowledged. 曹操引兵。"
    (tmp_path / "doc.txt").write_text(text)
    scorer = ModelScorer(StubModel(uniform=True), tok)
    values = rows_by_metric(evaluate_task(resolve_task(tmp_path / "doc.txt"), scorer, seed=0, progress=False))
    vocab = scorer.config.vocab_size
    # Each token costs ln V nats: bits per byte = tokens * log2 V / bytes, perplexity = V.
    assert values[("", "bits_per_byte")] == pytest.approx(len(tok.encode(text)) * math.log2(vocab) / len(text.encode()), rel=1e-4)
    assert values[("", "perplexity")] == pytest.approx(vocab, rel=1e-4)


class FixedGenerations:
    """A scorer that "generates" given texts, to test the gen metrics alone."""

    causal = False
    truncated = 0
    batch_size = 16

    def __init__(self, outputs: list[str]) -> None:
        self.outputs = outputs
        self.prompts: list[str] = []

    def generate(self, contexts: list[str], max_new_tokens: int, stop: str | None) -> list[str]:
        self.prompts += contexts
        return [self.outputs.pop(0) for _ in contexts]

    def score_document(self, text: str, chunk: int | None, context: int | None) -> LMScore:
        raise NotImplementedError


def test_gen_exact_match_and_f1_after_stop_string_and_regex(tmp_path: Path) -> None:
    folder = tmp_path / "ops"
    folder.mkdir()
    examples = [{"input": "1+1", "target": "2"}, {"input": "2*3", "target": ["6", "six"]}, {"input": "10-1", "target": "9"}]
    (folder / "task.json").write_text(json.dumps({"examples": examples, "output_regex": r"[-+]?\d+", "stop_string": "\n"}))
    scorer = FixedGenerations([" 2\n3", "7 6", "nine"])  # the regex keeps the first number: "2", "7", ""
    values = rows_by_metric(evaluate_task(resolve_task(folder), scorer, seed=0, progress=False))
    assert values == {("", "exact_match"): pytest.approx(1 / 3), ("", "f1"): pytest.approx(1 / 3)}
    assert scorer.prompts[0] == "\nQ: 1+1\nA: "


def test_first_word_matches() -> None:
    assert not word_decided(" Dar", "Darcy") and not word_decided(" Darcy", "Darcy") and not word_decided("孔\ufffd", "孔明")
    assert word_decided(" Darcy,", "Darcy") and word_decided(" Bing", "Darcy")
    assert first_word_matches(" Darcy, said", "Darcy")
    assert first_word_matches(" Darcy's", "Darcy")
    assert not first_word_matches(" Darcyish", "Darcy")
    assert first_word_matches("孔明曰", "孔明")


def manual_logliks(model: GLM, prefix: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prefix + continuation[:-1]])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids)[0].float(), -1)
    return sum(logprobs[len(prefix) - 1 + i, t].item() for i, t in enumerate(continuation))


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_shared_prefix_cache_and_batching_equal_full_forwards(objective: str, tok: GLMTokenizer) -> None:
    torch.manual_seed(0)
    model = GLM(model_preset("micro", objective=objective)).eval()
    scorer = ModelScorer(model, tok)
    context, choices = "Elizabeth looked at her sister and said", [" yes", " no no", " perhaps not today"]
    ctx = tok.encode(context)
    special = model.config.special_tokens
    modes = [False] if objective == "causal" else [False, True]
    for unidirectional in modes:
        if objective == "causal":
            prefix = [special.eos, *ctx]
        else:
            prefix = [special.gmask, special.sop, *ctx] if unidirectional else [*ctx, special.gmask, special.sop]
        expected = [manual_logliks(model, prefix, tok.encode(c)) for c in choices]
        for batching in ("shared", "batched", "single"):
            got = [s.loglik for s in scorer.loglikelihoods(context, choices, unidirectional, batching=batching)]
            assert got == pytest.approx(expected, abs=1e-4), (unidirectional, batching)
        # Greedy decoding with the cache = argmax re-decoding with full forwards.
        ids = list(prefix)
        for _ in range(4):
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0, -1]
            logits[[special.pad, *special.mask_ids, special.sop]] = float("-inf")
            ids.append(int(logits.argmax()))
        if not {special.eop, special.eos} & set(ids[len(prefix) :]):
            assert scorer.greedy_continuations([context], [4], unidirectional) == [tok.decode(ids[len(prefix) :])]


def test_long_contexts_are_cut_from_the_left(micro_glm: GLM, tok: GLMTokenizer) -> None:
    scorer = ModelScorer(micro_glm, tok)
    long_context = "word " * 300
    scores = scorer.loglikelihoods(long_context, [" yes"])
    assert scorer.truncated == 1 and math.isfinite(scores[0].loglik)


def test_eval_cli_writes_results_and_compares_models(tmp_path: Path, micro_glm: GLM, tok: GLMTokenizer) -> None:
    save_checkpoint(tmp_path / "glm", 1, micro_glm.config, micro_glm.state_dict(), tok, {})
    causal = GLM(model_preset("micro", objective="causal"))
    save_checkpoint(tmp_path / "causal", 1, causal.config, causal.state_dict(), tok, {})
    task = write_bigbench(
        tmp_path / "yesno", [{"input": f"q{i}", "target_scores": {" yes": i % 2, " no": 1 - i % 2}} for i in range(4)]
    )
    out = tmp_path / "results.json"
    models = ["--model", str(tmp_path / "glm"), "--model", str(tmp_path / "causal")]
    args = ["eval", *models, "--task", str(task), "--task", "cloze_zh", "--limit", "2", "--threads", "1", "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    glm_rows, causal_rows = (data["runs"][str(tmp_path / name)]["results"] for name in ("glm", "causal"))
    assert {(r["task"], r["subtask"], r["metric"]) for r in glm_rows} >= {
        ("yesno", "", "acc"),
        ("cloze_zh", "bidirectional", "acc"),
    }
    assert [r["n"] for r in glm_rows if r["task"] == "yesno"] == [2, 2] and data["seed"] == 1234
    assert not [r for r in causal_rows if r["subtask"] == "bidirectional"]
    # The micro model's 128 positions cut the Chinese passages; the results say so.
    assert {r["settings"]["truncated_contexts"] for r in glm_rows if r["task"] == "cloze_zh"} == {4}
    # One line per (task, subtask, metric), a column per model; "-" where a model has no value.
    assert "| task | subtask | metric | n | glm | causal |" in result.output
    assert "| cloze_zh | bidirectional | acc | 2 | 0.0000 ± 0.0000 | - |" in result.output
    assert markdown_table(data["runs"]).count("\n") == len(glm_rows) + 1


def test_eval_cli_reports_a_bad_task_file_without_a_traceback(tmp_path: Path) -> None:
    task = tmp_path / "bad.jsonl"
    task.write_text('{"text": "a b", "target": "b"}\n{"text": "a b"}\n')
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--task", str(task)])
    assert result.exit_code == 2
    assert "bad.jsonl: example 1: missing field 'target'" in result.output and "Traceback" not in result.output


def test_whitespace_at_the_context_end_starts_each_continuation(tok: GLMTokenizer, micro_glm: GLM) -> None:
    """lm-evaluation-harness's (context, continuation) encoding: after "A: " the choice "yes" is
    scored as the one token " yes" (id 2582), not a lone space and then "yes"."""
    assert move_trailing_space("Q: q\nA: ", ["yes", "no"]) == ("Q: q\nA:", [" yes", " no"])
    assert move_trailing_space("line\n", ["next"]) == ("line", ["\nnext"])
    assert tok.encode(" yes") == [YES] and tok.encode("q\nA: ")[-1] != tok.encode("q\nA:")[-1]
    scorer = ModelScorer(StubModel(), tok)
    (moved,) = scorer.loglikelihoods("q\nA: ", ["yes"])
    assert moved.tokens == 1 and moved.loglik == pytest.approx(math.log(0.5), rel=1e-4)
    glm = ModelScorer(micro_glm, tok)
    assert glm.loglikelihoods("q\nA: ", ["yes", "no"]) == glm.loglikelihoods("q\nA:", [" yes", " no"])
    # a generation prompt drops it: the answer is generated with its own leading space
    assert glm.generate(["q\nA: "], 3, None) == glm.generate(["q\nA:"], 3, None)


def test_a_chatglm_checkpoint_scores_choices_with_its_own_tokenizer(tmp_path: Path) -> None:
    """ChatGLM-6B's sentencepiece tokenizer has no lookup of a token by its text: the blank's id
    comes from the model config, and the scores equal full forwards of `context [gMASK] <sop> choice`."""
    folder = tmp_path / "chatglm-6b"
    write_release(folder, build_ice_text(tmp_path), slim=True)
    model, tokenizer = openglm.load(folder, torch.float32)
    assert not hasattr(tokenizer, "token_to_id")
    special = model.config.special_tokens
    scorer = ModelScorer(model, tokenizer)
    context, choices = "问题：天下大势", ["分久必合", "合久必分"]
    for mask, mask_id in (("[gMASK]", special.gmask), ("[MASK]", special.mask)):
        prefix = [*tokenizer.encode(context), mask_id, special.sop]
        expected = [manual_logliks(model, prefix, tokenizer.encode(c)) for c in choices]
        got = [s.loglik for s in scorer.loglikelihoods(context, choices, mask=mask)]
        assert got == pytest.approx(expected, abs=1e-4), mask
    with pytest.raises(ValueError, match="mask must be one of"):
        scorer.loglikelihoods(context, choices, mask="<sop>")
    # GLM-130B's LAMBADA protocol over the sentencepiece vocabulary: no beam starts with punctuation
    config = glm130b.beam_config(tokenizer, num_beams=4)
    assert tokenizer.encode("，")[-1] in config.banned_ids
    (beams,) = scorer.beam_continuations([context], config)
    assert beams and not any(is_punctuation(b.strip()[:1] or "x") for b in beams)


def test_acc_beam_from_known_log_probs(tok: GLMTokenizer, tmp_path: Path) -> None:
    """The stub model prefers " yes" everywhere: the best texts of 5 tokens with no 3-gram repeated
    are the three with one " no" (4 ln 0.5 + ln 0.2), all starting with " yes", so acc_beam is 1
    for target "yes", 0 for "no"."""
    path = tmp_path / "c.jsonl"
    lines = [{"text": "They said yes and yes", "target": "yes"}, {"text": "They said no and no", "target": "no"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = TaskConfig(name="c", type="cloze", data=path, num_beams=4)
    scorer = ModelScorer(StubModel(), tok)
    (beams,) = scorer.beam_continuations(["They said yes and"], GenerationConfig(max_new_tokens=5, num_beams=4, no_repeat_ngram_size=3))
    assert beams[:3] == [" yes yes yes no yes", " yes yes no yes yes", " yes no yes yes yes"] and len(beams) == 4
    for mode in ("bidirectional", "unidirectional"):
        values = rows_by_metric([r for r in evaluate_task(config, scorer, seed=0, progress=False) if r.subtask == mode])
        assert values[(mode, "acc_beam")] == 0.5 and values[(mode, "acc")] == 0.5
    assert {r.settings["num_beams"] for r in evaluate_task(config, scorer, seed=0, progress=False)} == {4}


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_beam_continuations_use_the_scoring_row_layouts(objective: str, tok: GLMTokenizer) -> None:
    """One beam is greedy decoding (checked against full forwards above); more beams after a
    [gMASK] context are what blank filling's beam search gives for `context [gMASK]`."""
    torch.manual_seed(0)
    model = GLM(model_preset("micro", objective=objective)).eval()
    scorer = ModelScorer(model, tok)
    context = "Elizabeth looked at her sister and said"
    for unidirectional in [False] if objective == "causal" else [False, True]:
        (one,) = scorer.beam_continuations([context], GenerationConfig(max_new_tokens=4, num_beams=1), unidirectional)
        assert one == scorer.greedy_continuations([context], [4], unidirectional)
    config = GenerationConfig(max_new_tokens=4, num_beams=4)
    (beams,) = scorer.beam_continuations([context], config)
    prompt = context if objective == "causal" else context + "[gMASK]"
    assert beams[0] == infill(model, tok, prompt, config)[1][-1] and len(beams) == 4


def test_bias_metrics_from_known_log_probs(tok: GLMTokenizer, tmp_path: Path) -> None:
    """CrowS-Pairs: "x yes" beats "x no" (ln 0.5 > ln 0.2), so the first pair counts and the second
    not: pct_stereotype 0.5. StereoSet, a sentence scored by its mean token log-likelihood: term a
    prefers the stereotype twice (SS 100, LM 50: one of its two meaningful sentences beats the
    unrelated one each time, a tie counting as not), term b once the anti-stereotype (SS 0, LM
    50), so SS = 50 averaged over the terms (not 66.7 over examples), LM = 50, ICAT = 50."""
    crows = tmp_path / "crows.csv"
    crows.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nx yes,x no,stereo,race\nx no,x yes,antistereo,gender\n")
    scorer = ModelScorer(StubModel(), tok)
    values = rows_by_metric(evaluate_task(resolve_task(crows), scorer, seed=0, progress=False))
    assert values == {("gender", "pct_stereotype"): 0.0, ("race", "pct_stereotype"): 1.0, ("all", "pct_stereotype"): 0.5}
    items = [
        {"target": "a", "bias_type": "race", "sentences": [(" yes", "stereotype"), (" no", "anti-stereotype"), (" yes no", "unrelated")]},
        {"target": "a", "bias_type": "race", "sentences": [(" yes yes", "stereotype"), (" no", "anti-stereotype"), (" no no", "unrelated")]},
        {"target": "b", "bias_type": "gender", "sentences": [(" no", "stereotype"), (" yes", "anti-stereotype"), (" no no", "unrelated")]},
    ]
    for item in items:
        item["sentences"] = [{"sentence": s, "gold_label": g} for s, g in item["sentences"]]
    stereoset = tmp_path / "dev.json"
    stereoset.write_text(json.dumps({"data": {"intrasentence": items}}))
    values = rows_by_metric(evaluate_task(resolve_task(stereoset), scorer, seed=0, progress=False))
    assert values[("all", "ss_score")] == pytest.approx(50.0) and values[("race", "ss_score")] == pytest.approx(100.0)
    assert values[("all", "lm_score")] == pytest.approx(50.0) and values[("all", "icat_score")] == pytest.approx(50.0)
    assert values[("race", "icat_score")] == pytest.approx(0.0) and values[("gender", "lm_score")] == pytest.approx(50.0)


def test_pile_sets_and_their_byte_weighted_average(tok: GLMTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "pile.jsonl"
    records = [("ab", "A"), ("abcd efgh", "B"), ("xyz", "A")]
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": s}}) + "\n" for t, s in records))
    results = evaluate_task(resolve_task(path), ModelScorer(StubModel(uniform=True), tok), seed=0, progress=False)
    bpb = {r.subtask: r.value for r in results if r.metric == "bits_per_byte"}
    tokens = {name: sum(len(tok.encode(t)) for t, s in records if s == name) for name in "AB"}
    nbytes = {"A": 5, "B": 9}
    bits = {name: tokens[name] * math.log2(tok.vocab_size) for name in "AB"}  # a uniform model: log2 V bits a token
    assert bpb == pytest.approx({"A": bits["A"] / 5, "B": bits["B"] / 9, "all": (bits["A"] + bits["B"]) / 14})
    assert bpb["all"] == pytest.approx(sum(bpb[n] * nbytes[n] for n in "AB") / 14)  # the sets weighted by their bytes


def test_infill_scores_the_span_with_both_sides_or_the_left_only(tok: GLMTokenizer, micro_glm: GLM, tmp_path: Path) -> None:
    """Both sides: `left [MASK] right <sop> span`, Part A at positions 0.., Part B at the blank's
    position (GLM-130B's [MASK] under 1-D RoPE), by a forward with those positions written out;
    left only: `[gMASK] <sop> left span`, all causal."""
    left, span, right = "Emma was", " delighted", " to see her sister."
    left_ids, span_ids, right_ids = tok.encode(left), tok.encode(span), tok.encode(right)
    special = micro_glm.config.special_tokens
    shared = [*left_ids, special.mask, *right_ids]
    ids = torch.tensor([[*shared, special.sop, *span_ids[:-1]]])
    positions = torch.tensor([[*range(len(shared)), *[len(left_ids)] * len(span_ids)]])
    with torch.no_grad():
        logits = micro_glm(ids, positions, torch.zeros_like(positions), torch.tensor([len(shared)]))[0]
    logprobs = F.log_softmax(logits.float(), -1)
    both = sum(logprobs[len(shared) + i, t].item() for i, t in enumerate(span_ids))
    scorer = ModelScorer(micro_glm, tok)
    assert scorer.infill_loglikelihood(left + " ", span.strip(), right).loglik == pytest.approx(both, abs=1e-4)
    left_only = manual_logliks(micro_glm, [special.gmask, special.sop, *left_ids], span_ids)
    path = tmp_path / "spans.jsonl"
    path.write_text(json.dumps({"text": f"{left} [MASK]{right}", "span": span.strip()}) + "\n")
    results = rows_by_metric(evaluate_task(resolve_task(path), scorer, seed=0, progress=False))
    span_bits = 8 * math.log(2)  # "delighted": 9 bytes
    assert results == {
        ("bidirectional", "bits_per_byte"): pytest.approx(-both / span_bits * 8 / 9, rel=1e-4),
        ("unidirectional", "bits_per_byte"): pytest.approx(-left_only / span_bits * 8 / 9, rel=1e-4),
    }
    causal = evaluate_task(resolve_task(path), ModelScorer(StubModel("causal"), tok), seed=0, progress=False)
    assert {r.subtask for r in causal} == {"unidirectional"}
