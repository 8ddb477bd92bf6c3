"""openglm's harness against lm-evaluation-harness on the same model, prompts and tokens: lm-eval's
`local-completions` model talks to an openglm server's `/v1/completions` (echo + logprobs, the
loglikelihood requests), openglm scores in process with `ModelScorer`, and one table puts the two
side by side. They must agree: the same accuracy, every per-choice log-likelihood within 1e-4.

Needs the optional extra `peer` (`pip install openglm[peer]`: lm-eval, never a core dependency);
runs offline (the tasks are local JSON Lines files written from openglm's own examples, so both
harnesses see the same prompts, and the tokenizer is openglm's, exported for lm-eval with
<eos> prepended as its BOS: the causal layout `<eos> context continuation` that `openglm eval`
scores). Causal models only (a GLM reads its prompt bidirectionally, which echo cannot score).

    python bench/peer_lmeval.py                          # a random-weight tiny causal model
    python bench/peer_lmeval.py --model runs/tiny-causal --examples 100 --lambada lambada_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openglm.config import SPECIAL_TOKEN_TEXT, model_preset
from openglm.eval.metrics import choice_accuracy
from openglm.eval.scorer import ModelScorer
from openglm.eval.tasks import load_cloze, load_subtasks, resolve_task
from openglm.io.api import load
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.tokenizer import GLMTokenizer

SUBTASKS = (("hindu_knowledge", ""), ("logical_deduction", "three_objects"))
LAMBADA = Path(__file__).resolve().parents[1] / "openglm/eval/data/cloze_en.jsonl"
SEED = 1234
TOLERANCE = 1e-4


@dataclass
class Task:
    """One task as both harnesses get it: per document a context, its continuations, the gold index."""

    name: str
    kind: str  # "multiple_choice" or "loglikelihood"
    contexts: list[str]
    continuations: list[list[str]]
    gold: list[int]


def tasks(examples: int, lambada: Path) -> list[Task]:
    found = []
    for task, name in SUBTASKS:
        subtask = next(s for s in load_subtasks(resolve_task(task), seed=SEED) if s.name == name)
        chosen = subtask.examples[:examples]
        label = f"{task}_{name}" if name else task
        prompts = [subtask.prompt(i, 0, SEED) for i in range(len(chosen))]
        found.append(Task(label, "multiple_choice", prompts, [list(e.choices) for e in chosen], [e.gold[0] for e in chosen]))
    cloze = load_cloze(lambada).examples[:examples]
    found.append(
        Task("lambada", "loglikelihood", [e.context for e in cloze], [[e.continuation] for e in cloze], [0] * len(cloze))
    )
    return found


def openglm_scores(scorer: ModelScorer, task: Task) -> tuple[dict[str, float], list[list[float]]]:
    """openglm's metrics (as `openglm eval` computes them) and every continuation's log-likelihood."""
    logliks, rows = [], []
    for context, continuations, gold in zip(task.contexts, task.continuations, task.gold, strict=True):
        scores = scorer.loglikelihoods(context, continuations)
        logliks.append([s.loglik for s in scores])
        if task.kind == "multiple_choice":
            rows.append(choice_accuracy(logliks[-1], [gold], [len(c.encode()) for c in continuations]))
        else:
            rows.append((float(scores[0].greedy), scores[0].loglik))
    if task.kind == "multiple_choice":
        metrics = {"acc": sum(r[0] for r in rows) / len(rows), "acc_norm": sum(r[1] for r in rows) / len(rows)}
    else:
        metrics = {"acc": sum(r[0] for r in rows) / len(rows), "perplexity": math.exp(-sum(r[1] for r in rows) / len(rows))}
    return metrics, logliks


def write_lmeval_task(task: Task, folder: Path) -> None:
    """The task as lm-eval's YAML over a local JSON Lines file; an empty target delimiter, since
    openglm's continuations carry their own leading space."""
    data = folder / f"{task.name}.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for context, continuations, gold in zip(task.contexts, task.continuations, task.gold, strict=True):
            out.write(json.dumps({"context": context, "choices": continuations, "gold": gold}, ensure_ascii=False) + "\n")
    metrics = ["acc", "acc_norm"] if task.kind == "multiple_choice" else ["acc", "perplexity"]
    lines = [
        f"task: openglm_{task.name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
        "test_split: test",
        f"output_type: {task.kind}",
        "doc_to_text: context",
        'target_delimiter: ""',
        *(
            ["doc_to_choice: choices", "doc_to_target: gold"]
            if task.kind == "multiple_choice"
            else ["doc_to_target: '{{choices[0]}}'"]
        ),
        "metric_list:",
        *(f"  - metric: {m}" for m in metrics),
    ]
    (folder / f"{task.name}.yaml").write_text("\n".join(lines) + "\n")


def export_tokenizer(tokenizer: GLMTokenizer, folder: Path) -> None:
    """openglm's tokenizer as a transformers tokenizer whose special tokens are <eos> first."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    eos_text, eos = SPECIAL_TOKEN_TEXT["eos"], tokenizer.special_tokens.eos
    tokenizer.save(folder / "raw.json")
    raw = Tokenizer.from_file(str(folder / "raw.json"))
    raw.post_processor = TemplateProcessing(single=f"{eos_text} $A", special_tokens=[(eos_text, eos)])
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_text, bos_token=eos_text).save_pretrained(folder / "tokenizer")


def lmeval_scores(url: str, folder: Path, names: list[str], max_length: int) -> dict[str, Any]:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {
        "base_url": f"{url}/v1/completions",
        "model": "openglm",
        "tokenizer": str(folder / "tokenizer"),
        "tokenizer_backend": "huggingface",
        "add_bos_token": True,
        "max_length": max_length,
        "batch_size": 8,
        "num_concurrent": 1,
        "max_retries": 1,
    }
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=[f"openglm_{n}" for n in names],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/tiny-causal"))
    parser.add_argument("--examples", type=int, default=40, help="documents per task")
    parser.add_argument("--lambada", type=Path, default=LAMBADA, help="a LAMBADA .jsonl file in any shape `openglm eval` reads")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    label = str(args.model)
    if args.model.exists():
        model, tokenizer = load(args.model)
    else:
        label = "random-weight tiny"
        print(f"{args.model} not found: a random-weight tiny causal model (agreement only; accuracies are chance)")
        torch.manual_seed(0)
        tokenizer = GLMTokenizer.default()
        model = GLM(model_preset("tiny", objective="causal", vocab_size=tokenizer.vocab_size)).eval()
    if model.config.objective != "causal":
        print(
            f"error: {args.model} is a GLM; the comparison needs a causal model (echo scores the prompt left to right)",
            file=sys.stderr,
        )
        return 2
    found = tasks(args.examples, args.lambada)
    scorer = ModelScorer(model, tokenizer)
    ours = {task.name: openglm_scores(scorer, task) for task in found}
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(create_app(model, tokenizer, model_name="openglm")) as url:
        folder = Path(tmp)
        export_tokenizer(tokenizer, folder)
        for task in found:
            write_lmeval_task(task, folder)
        theirs = lmeval_scores(url, folder, [t.name for t in found], model.config.max_seq_len)
    agree = True
    print(f"model {label} (causal), {args.examples} documents per task, lm-eval {theirs.get('lm_eval_version', '?')}")
    print("| task | documents | metric | openglm | lm-eval | max abs diff of a log-likelihood |")
    print("|---|---:|---|---:|---:|---:|")
    for task in found:
        metrics, logliks = ours[task.name]
        results = theirs["results"][f"openglm_{task.name}"]
        samples = sorted(theirs["samples"][f"openglm_{task.name}"], key=lambda s: s["doc_id"])
        peer = [
            [float(r[0]) for r in s["filtered_resps"]] if task.kind == "multiple_choice" else [float(s["filtered_resps"][0][0])]
            for s in samples
        ]
        drift = max(abs(a - b) for mine, other in zip(logliks, peer, strict=True) for a, b in zip(mine, other, strict=True))
        agree &= drift <= TOLERANCE
        for name, value in metrics.items():
            other = float(results[f"{name},none"])
            agree &= math.isclose(value, other, rel_tol=TOLERANCE) if name == "perplexity" else value == other
            print(f"| {task.name} | {len(task.contexts)} | {name} | {value:.4f} | {other:.4f} | {drift:.2e} |")
    print("agree" if agree else f"DISAGREE (accuracies must be equal, log-likelihoods within {TOLERANCE})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
