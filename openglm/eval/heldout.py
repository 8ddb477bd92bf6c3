"""The bundled evaluation sets built from the held-out split of the bundled corpus.

The trainer holds out documents of the bundled corpus (by document, stratified by language, the
default `val_fraction` and `seed` of `TrainConfig`); this module selects the same documents and
writes, deterministically:

- `heldout_{en,zh}.jsonl`: the held-out documents (`{"text"}`), for bits per byte;
- `infill_{en,zh}.jsonl`: passages with one sentence cut out (`{"text", "span"}`, the text
  holding `[MASK]` where the sentence was), at least `INFILL_SIDE` characters of whole sentences
  on each side, every `INFILL_EVERY`-th sentence of a document that has them;
- `cloze_{en,zh}.jsonl`: LAMBADA-style passages (`{"text", "target"}`) whose last word is to be
  predicted. As in LAMBADA, the target is a word the passage already used, so broad context
  helps: English, a word of 3+ letters (not a stopword) that ends a clause; Chinese, which has no
  spaces, a two-character word (often a name: 孔明, 玄德) before punctuation. A passage starts at a
  sentence boundary and has at least `MIN_CONTEXT` characters of context.

Only held-out text is used (never training text; tested). Rebuild with
`python -m openglm.eval.heldout openglm/eval/data`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openglm.config import TrainConfig
from openglm.data.documents import bundled_corpus_paths, document_language, iter_documents
from openglm.data.shards import choose_validation


@dataclass(frozen=True)
class ClozeRule:
    target: re.Pattern[str]  # the word to predict, followed by punctuation (a lookahead)
    sentence_end: re.Pattern[str]  # a passage starts right after one of these
    max_context: int  # characters before the target to search for a sentence start in
    min_context: int
    min_gap: int  # characters between one example's target and the next
    excluded: frozenset[str]


_EN_STOPWORDS = frozenset(
    "the and that with this have from they them their there then than what when which will would were been "
    "could should shall must your you she her him his its our who whom whose not but for are was all any "
    "can one two out now how very much more most such some only own same into upon said say mrs".split()
)
RULES = {
    "en": ClozeRule(
        re.compile(r"\b[A-Za-z]{3,}(?=[.,;:!?])"), re.compile(r"(?:[.!?][\"']?\s+|\n)"), 600, 200, 150, _EN_STOPWORDS
    ),
    # Two Han characters before punctuation, neither of them a particle (之乎者也 ...), which would
    # make the "word" a grammatical ending rather than a word.
    "zh": ClozeRule(
        re.compile(r"[\u4e00-\u9fff]{2}(?=[，。！？：；、”])"),
        re.compile(r"[。！？\n]”?"),
        200,
        60,
        40,
        frozenset("之乎者也矣哉耳焉而曰道云了的是不其于以"),
    ),
}


def heldout_documents(language: str) -> list[str]:
    """The trainer's held-out documents of one language, in corpus order."""
    defaults = TrainConfig(out_dir="unused")
    documents = list(iter_documents(bundled_corpus_paths()))
    languages = [document_language(d) for d in documents]
    held_out = choose_validation(languages, defaults.val_fraction, defaults.seed)
    return [d for d, lang, val in zip(documents, languages, held_out, strict=True) if val and lang == language]


def cloze_examples(document: str, rule: ClozeRule) -> Iterator[dict[str, str]]:
    last = -rule.min_gap
    for match in rule.target.finditer(document):
        word = match.group()
        if match.start() - last < rule.min_gap or word.lower() in rule.excluded or set(word) & rule.excluded:
            continue
        window = match.start() - rule.max_context
        if window <= 0:
            start = 0  # the document's start is a sentence start
        else:
            boundary = rule.sentence_end.search(document, window, match.start())
            if boundary is None:
                continue  # no sentence starts in the window
            start = boundary.end()
        context = document[start : match.start()].lstrip()
        if len(context.strip()) < rule.min_context or word not in context:
            continue
        last = match.start()
        yield {"text": context + word, "target": word}


INFILL_SIDE = {"en": 300, "zh": 100}  # characters of context on each side, at least
INFILL_SPAN = {"en": (30, 200), "zh": (8, 60)}  # characters of the sentence cut out
INFILL_EVERY = 6


def infill_examples(document: str, language: str) -> Iterator[dict[str, str]]:
    """Sentences of `document` (split after RULES' sentence ends) cut out with whole sentences
    around them: `{"text": left + "[MASK]" + right, "span": sentence}`."""
    ends = [m.end() for m in RULES[language].sentence_end.finditer(document)]
    starts = [0, *ends]
    side, (shortest, longest) = INFILL_SIDE[language], INFILL_SPAN[language]
    for k in range(0, len(starts) - 1, INFILL_EVERY):
        begin, end = starts[k], starts[k + 1]
        span = document[begin:end].strip()
        if not shortest <= len(span) <= longest or "[MASK]" in document:
            continue
        left_start = max((s for s in starts if s <= begin - side), default=None)
        right_end = min((s for s in ends if s >= end + side), default=None)
        if left_start is None or right_end is None:
            continue
        cut = begin + document[begin:end].index(span)
        yield {"text": document[left_start:cut] + "[MASK]" + document[cut + len(span) : right_end], "span": span}


def build(out_dir: Path) -> dict[str, int]:
    """Write the six files into `out_dir`; returns each file's record count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for language, rule in RULES.items():
        documents = heldout_documents(language)
        sets = {
            f"heldout_{language}.jsonl": [{"text": d} for d in documents],
            f"cloze_{language}.jsonl": [e for d in documents for e in cloze_examples(d, rule)],
            f"infill_{language}.jsonl": [e for d in documents for e in infill_examples(d, language)],
        }
        for name, records in sets.items():
            (out_dir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            counts[name] = len(records)
    return counts


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "openglm/eval/data")))
