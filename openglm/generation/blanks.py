"""GLM-130B blank filling: one blank per prompt per round, each filling written back into the
context before the next blank; `generate`, `infill`, `infill_batch`, `stream`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import overload

import torch

from openglm.config import SPECIAL_TOKEN_TEXT, GLMConfig, SpecialTokens
from openglm.generation.options import GenerationConfig, Tokenizer
from openglm.generation.rules import Rules, make_generator
from openglm.generation.search import Job, run
from openglm.generation.text import Text, TextPiece
from openglm.model import GLM
from openglm.positions import find_blank

logger = logging.getLogger(__name__)


class Prompt:
    """One prompt being completed: its context cut at the blanks, each blank's filling as it is
    made, and how much of the completed text has been handed out.

    The completed text is the context pieces with the fillings between them, each decoded on its
    own, so that streaming it piece by piece gives exactly the same text.
    """

    def __init__(
        self, index: int, ids: list[int], model_config: GLMConfig, tokenizer: Tokenizer, generator: torch.Generator
    ) -> None:
        self.index, self.generator = index, generator
        self.special = model_config.special_tokens
        self.causal = model_config.objective == "causal"
        if self.causal:  # one "blank": the continuation after the text
            self.pieces, self.marks = [ids, []], [-1]
        else:
            ids, cuts = prompt_layout(tokenizer, ids, self.special)
            self.pieces = [ids[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(ids)], strict=True)]
            self.marks = [ids[i] for i in cuts]
        self.piece_texts = [tokenizer.decode(piece) for piece in self.pieces]
        self.fills: list[Text | None] = [None] * len(self.marks)
        self.order: list[int] = []
        self._segment = 0  # next segment to hand out: 2i is piece i, 2i + 1 is blank i
        self._sent = 0  # characters of that segment already handed out

    def next_blank(self) -> int | None:
        if self.causal:
            return 0 if self.fills[0] is None else None
        return find_blank([m if f is None else -1 for m, f in zip(self.marks, self.fills, strict=True)], self.special)

    def start(self, blank: int, text: Text) -> Job:
        """The job that fills `blank` into `text`. Its Part A has the earlier fillings written in and
        the blanks not yet filled still masks, and it names where `blank` is in it."""
        ids = list(self.pieces[0])
        at = None
        for index, (mark, fill, piece) in enumerate(zip(self.marks, self.fills, self.pieces[1:], strict=True)):
            if fill is not None and fill.finished:
                ids += fill.ids()
            elif not self.causal:
                at = len(ids) if index == blank else at
                ids.append(mark)
            ids += piece
        self.fills[blank] = text
        self.order.append(blank)
        return Job(ids, text, self.generator, at)

    def completed(self) -> str:
        return self.piece_texts[0] + "".join(f.text + p for f, p in zip(self.finished_fills(), self.piece_texts[1:], strict=True))

    def fillings(self) -> list[str]:
        """Each blank's filling in the order they were filled."""
        fills = self.finished_fills()
        return [fills[b].text for b in self.order]

    def finished_fills(self) -> list[Text]:
        if not all(f is not None and f.finished for f in self.fills):
            raise RuntimeError("the prompt still has unfilled blanks")
        return [f for f in self.fills if f is not None]

    def emit(self) -> Iterator[TextPiece]:
        """The completed text's next pieces, as far as it is already final (left to right: a
        filling that waits for an earlier blank is held back until that blank is done)."""
        last = 2 * len(self.marks)
        while self._segment <= last:
            if self._segment % 2 == 0:
                text, whole, generated = self.piece_texts[self._segment // 2], True, False
            else:
                fill = self.fills[self._segment // 2]
                if fill is None:
                    return
                text, whole, generated = fill.safe(), fill.finished, True
            done = self._segment == last
            if len(text) > self._sent or done:
                yield TextPiece(self.index, text[self._sent :], generated, done)
                self._sent = len(text)
            if not whole:
                return
            self._segment += 1
            self._sent = 0


def prompt_layout(tokenizer: Tokenizer, ids: list[int], tokens: SpecialTokens) -> tuple[list[int], list[int]]:
    """A GLM prompt's ids as the model reads them before <sop>, and the indices of its blanks in
    filling order: the tokenizer's own rule when it has one (`prompt_layout`, ChatGLM-6B's
    releases), else GLM-130B's: [gMASK] appended when there is no blank, every mask token a blank."""
    own = getattr(tokenizer, "prompt_layout", None)
    if own is not None:
        return own(ids)
    if find_blank(ids, tokens) is None:
        ids = [*ids, tokens.gmask]
    return ids, [i for i, t in enumerate(ids) if t in tokens.mask_ids]


def check_prompt(model: GLM, tokenizer: Tokenizer, text: str | list[int]) -> list[int]:
    """The prompt's token ids, or ValueError saying why it cannot be completed: empty, unknown
    token ids, masks for a causal model, or longer than the model's context (max_seq_len). A
    list of ints is a prompt already tokenized (as OpenAI's API takes one)."""
    tokenized = isinstance(text, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in text)
    if not (isinstance(text, str) or tokenized):
        raise TypeError(f"expected a str prompt or a list of token ids, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty; give a prompt (a GLM model continues it, or fills its [MASK] blanks)")
    model_config = model.config
    tokens = model_config.special_tokens
    if tokenizer.special_tokens != tokens:
        raise ValueError(f"tokenizer special tokens {tokenizer.special_tokens} differ from the model's {tokens}")
    ids = list(text) if isinstance(text, list) else tokenizer.encode(text)
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    if max(ids) >= model_config.vocab_size or min(ids) < 0:
        bad = max(ids) if max(ids) >= model_config.vocab_size else min(ids)
        source = "in the prompt" if tokenized else "from the tokenizer"
        raise ValueError(f"token id {bad} {source} is outside the model's vocab_size {model_config.vocab_size}")
    if model_config.objective == "causal":
        if any(i in tokens.mask_ids for i in ids):
            raise ValueError("a causal model cannot fill [MASK]/[sMASK]/[gMASK] blanks; remove them from the text")
        needed, extra = len(ids), ""
    else:
        laid_out = prompt_layout(tokenizer, ids, tokens)[0]
        needed = len(laid_out) + 1
        names = {getattr(tokens, name): text for name, text in SPECIAL_TOKEN_TEXT.items()}
        appended = " ".join(names.get(i, f"token {i}") for i in laid_out[len(ids) :])
        extra = " with <sop>" + (f" and the appended {appended}" if appended else "")
    if needed > model_config.max_seq_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens ({needed}{extra}), longer than the model's context of "
            f"{model_config.max_seq_len} tokens (max_seq_len); shorten it"
        )
    return ids


def _check_prompts(model: GLM, tokenizer: Tokenizer, texts: Sequence[str | list[int]], config: GenerationConfig, named: bool) -> list[Prompt]:
    """Every prompt checked before any is generated (errors name the prompt's index in a list)."""
    device = model.device
    prompts = []
    for index, text in enumerate(texts):
        try:
            ids = check_prompt(model, tokenizer, text)
        except (TypeError, ValueError) as err:
            if not named:
                raise
            raise type(err)(f"texts[{index}]: {err}") from None
        seed = None if config.seed is None else config.seed + index
        prompts.append(Prompt(index, ids, model.config, tokenizer, make_generator(seed, device)))
    return prompts


def fill(model: GLM, prompts: Sequence[Prompt], config: GenerationConfig, rules: Rules, incremental: bool) -> Iterator[None]:
    """Fill every blank of every prompt: per round, the next blank of each prompt that has one, in
    one batch; yields after each decoding step."""
    while True:
        jobs = []
        for prompt in prompts:
            blank = prompt.next_blank()
            if blank is None:
                continue
            jobs.append(prompt.start(blank, Text(rules, incremental)))
        if not jobs:
            return
        logger.debug("filling %d blanks in one batch", len(jobs))
        yield from run(model, jobs, config, rules)


def _chunks(prompts: list[Prompt], size: int) -> Iterator[list[Prompt]]:
    for start in range(0, len(prompts), size):
        yield prompts[start : start + size]


def prepare(
    model: GLM, tokenizer: Tokenizer, texts: Sequence[str | list[int]], config: GenerationConfig | None, named: bool
) -> tuple[GenerationConfig, Rules, list[Prompt]]:
    config = config or GenerationConfig()
    config.validate()
    rules = Rules(model.config, config, tokenizer, model.device)
    return config, rules, _check_prompts(model, tokenizer, texts, config, named)


def infill_batch(
    model: GLM, tokenizer: Tokenizer, texts: Sequence[str], config: GenerationConfig | None = None
) -> list[tuple[str, list[str]]]:
    """`infill` for many prompts, `config.batch_size` decoded together; one result per prompt."""
    if isinstance(texts, str):
        raise TypeError("infill_batch takes a list of prompts; use infill for one")
    config, rules, prompts = prepare(model, tokenizer, texts, config, named=True)
    for chunk in _chunks(prompts, config.batch_size):
        for _ in fill(model, chunk, config, rules, incremental=bool(config.stop_strings)):
            pass
    return [(p.completed(), p.fillings()) for p in prompts]


def infill(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> tuple[str, list[str]]:
    """Fill every blank of `text`; return the completed text and each blank's filling in order.

    As GLM-130B's generate.py: a text without a mask token gets a [gMASK] appended (continue the
    text). Blanks are filled one at a time, [MASK]/[sMASK] left to right, then [gMASK]: Part A is
    the current ids (earlier fillings written in, later blanks still masks), and the generated
    tokens replace the mask token (with beam search, the best beam's). A causal model cannot fill
    blanks; it continues the text, and the continuation is the only filling. The model runs in
    eval mode; each module's training flag is restored after every step.
    """
    config, rules, prompts = prepare(model, tokenizer, [text], config, named=False)
    for _ in fill(model, prompts, config, rules, incremental=bool(config.stop_strings)):
        pass
    return prompts[0].completed(), prompts[0].fillings()


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> str: ...


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: Sequence[str], config: GenerationConfig | None = None) -> list[str]: ...


def generate(
    model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None
) -> str | list[str]:
    """The completed text: `text` with its blanks filled, or followed by its continuation; for a
    list of prompts, a list of completed texts (decoded in batches)."""
    if isinstance(text, str):
        return infill(model, tokenizer, text, config)[0]
    return [completed for completed, _ in infill_batch(model, tokenizer, text, config)]


def stream(
    model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None
) -> Iterator[TextPiece]:
    """The completed text of each prompt as pieces, handed out as soon as they are final.

    Joining a prompt's pieces gives exactly what `generate` returns. A piece never holds part of a
    character (byte-level BPE may spread one over several tokens) nor text that a stop string may
    still cut off; with beam search a filling comes in one piece when its search ends. The prompt
    text comes out too (`generated=False`), so a server can echo or skip it. Prompts are checked
    here, before the first piece; the model runs only while the iterator is advanced.
    """
    single = isinstance(text, str)
    texts = [text] if isinstance(text, str) else list(text)
    config, rules, prompts = prepare(model, tokenizer, texts, config, named=not single)

    def pieces() -> Iterator[TextPiece]:
        for chunk in _chunks(prompts, config.batch_size):
            for prompt in chunk:  # the prompt text before the first blank, before any decoding
                yield from prompt.emit()
            for _ in fill(model, chunk, config, rules, incremental=True):
                for prompt in chunk:
                    yield from prompt.emit()
            for prompt in chunk:
                yield from prompt.emit()

    return pieces()
