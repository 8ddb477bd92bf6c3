"""Decoding one Part B per context as a batch: greedy, sampling (`sample`) and beam search (`beam`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from openglm.generation.batch import Batch, prefill
from openglm.generation.options import GenerationConfig
from openglm.generation.rules import Rules, make_generator, sample_next
from openglm.generation.text import Text
from openglm.model import GLM

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One Part B to decode: its Part A, where its tokens go, its random generator, and the index
    in Part A of the blank it fills (None: `find_blank`'s). Beam search leaves every finished
    hypothesis's tokens in `hypotheses`, best first (the text holds the first)."""

    context: list[int]
    text: Text
    generator: torch.Generator | None
    blank: int | None = None
    hypotheses: list[list[int]] = field(default_factory=list)


def run(model: GLM, jobs: Sequence[Job], config: GenerationConfig, rules: Rules) -> Iterator[None]:
    """Decode one Part B for every job as one batch, yielding after each step. When it ends every
    job's text is finished."""
    model_config = model.config
    prefills = [prefill(model_config, job.context, job.blank) for job in jobs]
    needed = max(len(p.tokens) for p in prefills) + config.max_new_tokens - 1
    if needed > model_config.max_seq_len:
        logger.warning(
            "generating up to %d positions, past max_seq_len %d; RoPE extrapolates beyond the trained length",
            needed,
            model_config.max_seq_len,
        )
    batch = Batch(model, prefills, config.max_new_tokens)
    logits = batch.step(batch.first)
    yield from choose_strategy(config)(batch, jobs, logits, config, rules)


def pick(logits: torch.Tensor, jobs: Sequence[Job], config: GenerationConfig, rules: Rules) -> list[int]:
    """The next token of each job (one row of `logits` each), within the rules."""
    histories = [job.text.tokens for job in jobs]
    if config.is_greedy and rules.only_never_ids(histories):
        chosen = logits.argmax(-1).tolist()
        if rules.never_ids.isdisjoint(chosen):
            return chosen  # each row's argmax is allowed, so it is also the argmax of the constrained row
    scores = rules.constrain(logits, histories)
    return sample_next(scores, config, [job.generator for job in jobs]).tolist()


def ends(job: Job, token: int, config: GenerationConfig, rules: Rules) -> bool:
    """Add `token` to the job's text; True (and the text finished) when the Part B ends with it:
    a stop token (not kept), a stop string, or max_new_tokens."""
    text = job.text
    if token in rules.stop_ids or text.push(token) or len(text.tokens) == config.max_new_tokens:
        text.finish()
        return True
    return False


def sample(batch: Batch, jobs: Sequence[Job], logits: torch.Tensor, config: GenerationConfig, rules: Rules) -> Iterator[None]:
    """Greedy decoding or sampling; each row stops on its own (stop token, stop string, length)."""
    rows = list(range(len(jobs)))  # the job of each batch row
    while True:
        chosen = pick(logits, [jobs[j] for j in rows], config, rules)
        keep = [row for row, (j, token) in enumerate(zip(rows, chosen, strict=True)) if not ends(jobs[j], token, config, rules)]
        yield
        if not keep:
            return
        if len(keep) < len(rows):
            batch.select(keep)
            rows = [rows[r] for r in keep]
        logits = batch.step(torch.tensor([[chosen[r]] for r in keep], device=logits.device))


def _keep_best(hypotheses: list[tuple[float, list[int]]], score: float, tokens: list[int], size: int) -> None:
    hypotheses.append((score, tokens))
    hypotheses.sort(key=lambda h: h[0], reverse=True)
    del hypotheses[size:]


def beam(batch: Batch, jobs: Sequence[Job], logits: torch.Tensor, config: GenerationConfig, rules: Rules) -> Iterator[None]:
    """Beam search as HF's BeamSearchScorer (and GLM-130B's BeamSearchStrategy, whose stop rule
    would make one beam differ from greedy): each job keeps `num_beams` live beams; of the best
    2 * num_beams candidates, one that ends (a stop token, or its text reaching a stop string) is a
    finished hypothesis if it ranks among the first num_beams, the others continue until
    num_beams beams are live. A job is done when it has num_beams hypotheses and its best live
    beam, scored at its current length, does not beat the worst of them, or at max_new_tokens
    (live beams then count as hypotheses). Score: sum log p / length ** length_penalty."""
    beams, vocab, penalty = config.num_beams, logits.shape[-1], config.length_penalty
    batch.select(torch.arange(len(jobs)).repeat_interleave(beams))
    logits = logits.repeat_interleave(beams, 0)
    groups = list(range(len(jobs)))  # jobs still searching, `beams` batch rows each, in batch order
    sums = torch.full((len(jobs), beams), float("-inf"), device=logits.device)
    sums[:, 0] = 0.0  # all beams start identical: only the first may expand
    sequences: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in jobs]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in jobs]  # (score, tokens), best first
    for step in range(1, config.max_new_tokens + 1):
        logprobs = rules.constrain(logits, [seq for g in groups for seq in sequences[g]]).log_softmax(-1)
        totals = (sums.view(-1, 1) + logprobs).view(len(groups), beams * vocab)
        top_totals, top_index = totals.topk(min(2 * beams, beams * vocab), dim=-1)
        feed_rows, feed_tokens, next_sums, searching = [], [], [], []
        for a, g in enumerate(groups):
            live: list[tuple[float, int, int]] = []  # (sum, beam, token)
            for rank, (total, index) in enumerate(zip(top_totals[a].tolist(), top_index[a].tolist(), strict=True)):
                if total == float("-inf"):
                    break
                beam, token = divmod(index, vocab)
                extended = [*sequences[g][beam], token]
                if token in rules.stop_ids or rules.stop_string_at(extended) is not None:
                    if rank < beams:
                        kept = sequences[g][beam] if token in rules.stop_ids else extended
                        _keep_best(finished[g], total / step**penalty, kept, beams)
                    continue
                live.append((total, beam, token))
                if len(live) == beams:
                    break
            if step == config.max_new_tokens:
                for total, beam, token in live:
                    _keep_best(finished[g], total / step**penalty, [*sequences[g][beam], token], beams)
            elif live and (len(finished[g]) < beams or live[0][0] / step**penalty > finished[g][-1][0]):
                live += [(float("-inf"), live[0][1], live[0][2])] * (beams - len(live))  # dead filler beams
                sequences[g] = [[*sequences[g][beam], token] for _, beam, token in live]
                feed_rows += [a * beams + beam for _, beam, _ in live]
                feed_tokens += [token for _, _, token in live]
                next_sums.append([total for total, _, _ in live])
                searching.append(g)
                continue
            jobs[g].hypotheses = [tokens for _, tokens in finished[g]]
            text = jobs[g].text
            for token in finished[g][0][1] if finished[g] else []:
                text.push(token)
            text.finish()
        yield
        if not searching:
            return
        groups = searching
        sums = torch.tensor(next_sums, device=logits.device)
        batch.select(feed_rows)
        logits = batch.step(torch.tensor(feed_tokens, device=logits.device)[:, None])


_Strategy = Callable[[Batch, Sequence[Job], torch.Tensor, GenerationConfig, Rules], Iterator[None]]


def choose_strategy(config: GenerationConfig) -> _Strategy:
    """`beam` for num_beams > 1, else `sample` (a function of its own so tests can run beam
    search with one beam)."""
    return beam if config.num_beams > 1 else sample


def generate_tokens(
    model: GLM,
    context_ids: Sequence[int],
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Decode one Part B with a KV cache, yielding each new token id as soon as it is chosen (beam
    search: all at the end). Token level: no tokenizer, so no stop strings, and of the ids past a
    tokenizer's vocabulary none is known to mask (`never_generated_ids` without one).

    For a GLM model `context_ids` is Part A and must hold the blank being filled (see
    `find_blank`); other unfilled blanks may stay in it. <sop> is appended and Part A + <sop> is
    prefilled in one forward; then each token is fed alone with explicit positions equal to what
    `derive_positions` gives for the full sequence (but see `find_blank` on mixed masks). A causal
    model just continues `context_ids`. Stops before a stop token (which is not yielded) or after
    `max_new_tokens`. Past `model.config.max_seq_len` a warning is logged but generation goes on:
    RoPE has no learned position table, so it extrapolates, with quality the model was never
    trained for.
    """
    config = config or GenerationConfig()
    config.validate()
    device = model.device
    rules = Rules(model.config, config, None, device)
    job = Job(list(context_ids), Text(rules, incremental=False), generator or make_generator(config.seed, device))
    sent = 0
    for _ in run(model, [job], config, rules):
        new = job.text.tokens[sent:]
        sent += len(new)
        yield from new
