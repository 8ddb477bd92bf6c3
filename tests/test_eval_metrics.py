"""Metrics of the evaluation harness against hand calculation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openglm.eval import glm130b, metrics
from openglm.eval.metrics import (
    bits_per_byte_statistic,
    choice_accuracy,
    column_mean,
    estimate,
    exact_match,
    f1_score,
    normalize_answer,
    perplexity_statistic,
)


def test_acc_and_acc_norm_can_disagree() -> None:
    # loglik -4.0 over 20 bytes = -0.2 per byte; -3.0 over 5 bytes = -0.6 per byte.
    assert choice_accuracy([-4.0, -3.0], (0,), [20, 5]) == (0.0, 1.0)
    assert choice_accuracy([-4.0, -3.0], (1,), [20, 5]) == (1.0, 0.0)
    # Several gold choices (equal top target scores): either counts.
    assert choice_accuracy([-1.0, -2.0, -0.5], (0, 2), [1, 1, 1]) == (1.0, 1.0)
    # Ties go to the first choice, as numpy's argmax.
    assert choice_accuracy([-1.0, -1.0], (1,), [4, 4]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least one choice"):
        choice_accuracy([], (0,), [])


def test_exact_match_normalises_case_punctuation_articles_and_full_width() -> None:
    assert exact_match("The Cat sat.", ["cat sat"]) == 1.0
    assert exact_match("cat", ["dog", "a cat!"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    # Full-width letters, digits and punctuation fold to ASCII (NFKC); Chinese spacing is ignored.
    assert normalize_answer("ＧＬＭ－１３０Ｂ，好！") == "glm130b好"
    assert exact_match("ＧＬＭ－１３０Ｂ，好！", ["GLM-130B 好"]) == 1.0
    assert exact_match("北京，中国。", ["北京 中国"]) == 1.0


def test_f1_english_words_and_chinese_characters() -> None:
    # pred tokens [cat, sat, on, mat] (articles dropped), ref [cat, on, hat]: 2 common,
    # precision 2/4, recall 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7.
    assert f1_score("the cat sat on the mat", ["a cat on a hat"]) == pytest.approx(4 / 7)
    # CJK characters are tokens of their own: [曹 操 引 兵] vs [曹 操 大 军] share 2 of 4.
    assert f1_score("曹操引兵", ["曹操大军"]) == pytest.approx(0.5)
    assert f1_score("曹操引兵", ["刘备", "曹操引兵"]) == 1.0  # the best reference counts
    assert f1_score("", ["x"]) == 0.0
    assert f1_score("，", ["。"]) == 1.0  # both normalise to nothing


def test_bits_per_byte_and_perplexity_are_ratios_of_totals() -> None:
    # Two documents (nll nats, tokens, bytes): 8 and 4 bits over 4 + 4 bytes -> 12 / 8 = 1.5
    # bits per byte; 12 ln 2 nats over 6 tokens -> perplexity exp(2 ln 2) = 4.
    docs = np.array([[8 * math.log(2), 4, 4], [4 * math.log(2), 2, 4]])
    assert estimate(docs, bits_per_byte_statistic, seed=0)[0] == pytest.approx(1.5)
    assert estimate(docs, perplexity_statistic, seed=0)[0] == pytest.approx(4.0)


def test_bootstrap_stderr_is_seeded_and_matches_the_binomial_formula() -> None:
    correct = np.array([1.0, 0.0] * 200)[:, None]
    value, stderr = estimate(correct, column_mean(0), seed=7)
    assert value == 0.5
    assert stderr == estimate(correct, column_mean(0), seed=7)[1]  # same seed, same number
    assert stderr != estimate(correct, column_mean(0), seed=8)[1]
    assert stderr == pytest.approx(math.sqrt(0.25 / 400), rel=0.1)  # sqrt(p(1-p)/n)
    assert math.isnan(estimate(np.array([[1.0]]), column_mean(0), seed=0)[1])  # one example: no spread
    with pytest.raises(ValueError, match="no examples"):
        estimate(np.zeros((0, 1)), column_mean(0), seed=0)


def test_glm130b_lambada_bans_punctuation_tokens_and_punctuation_starts(tok) -> None:
    """Golden ids of the bundled tokenizer: "." (20), "," (18), ' "' (488), " '" (2325), " (" (2261)
    and "。" (283) are one punctuation character, never generated; "'t" (3317) and "'s" (431) start
    with one, never first; " " (227) and "\\n" (205) are neither, nor are word pieces."""
    never, first = glm130b.banned_tokens(tok)
    assert {20, 18, 488, 2325, 2261, 283} <= set(never) <= set(first)
    assert {3317, 431} <= set(first) - set(never)
    assert not {227, 205, *tok.encode(" Hello world")} & set(first)
    config = glm130b.beam_config(tok)
    assert (config.num_beams, config.max_new_tokens, config.no_repeat_ngram_size) == (16, 5, 3)
    assert config.banned_ids == never and config.banned_first_ids == first


def test_glm130b_lambada_answer_is_the_first_word_of_the_chosen_beam() -> None:
    # the first beam whose second word is punctuation, else the best
    assert glm130b.chosen_text([" duty and", " dutiful .", " duty !"]) == " dutiful ."
    assert glm130b.chosen_text([" duty and", " dutiful"]) == " duty and"
    assert glm130b.chosen_text([]) == ""
    assert glm130b.beam_answer_matches([" duty and the", " dutiful"], "duty")
    assert not glm130b.beam_answer_matches([" duty.", " duty"], "duty")  # the word is "duty.", as the reference splits it
    assert not glm130b.beam_answer_matches([" dutiful and"], "duty")
    assert glm130b.beam_answer_matches(["孔明曰"], "孔明")  # Chinese: no space ends the word


def test_bootstrap_in_chunks_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resamples are gathered a bounded number of floats at a time (StereoSet has 3 columns per
    target term); the chunking changes nothing."""
    samples = np.random.default_rng(0).random((50, 6))
    whole = estimate(samples, column_mean(4), seed=3)
    monkeypatch.setattr(metrics, "RESAMPLE_CELLS", 50 * 6 * 7)  # 7 resamples at a time
    assert estimate(samples, column_mean(4), seed=3) == whole
