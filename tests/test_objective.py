"""The training objective against an independent reference: a plain float64 cross-entropy over the
full `model(input_ids, ...)` logits at target positions written out by hand (GLM MASK, gMASK and
padded MIP samples, and causal samples), and autograd's gradient of that reference. The trainer
computes logits only at target rows (`head_loss`), so a misaligned row there would pass every
"loss goes down" check but not these."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openglm.config import SpecialTokens, TrainConfig, model_preset
from openglm.data.blank_infill import BlankInfillBuilder, build_infill_sample, collate
from openglm.data.mip import MIPDataset, MIPExample
from openglm.model import GLM
from openglm.train.objective import compute_loss, count_targets
from openglm.train.samples import collate_range
from openglm.train.trainer import Trainer

S = SpecialTokens()  # pad 0, eos 1, [MASK] 2, [sMASK] 3, [gMASK] 4, <sop> 5, <eop> 6
SEQ = 16


class WordTokenizer:
    """Each whitespace-separated word is its own id (a word is a decimal number)."""

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]


def glm_samples() -> tuple[list[dict], list[list[tuple[int, int]]]]:
    """A gMASK, a MASK (two spans, Part B not in text order) and a padded MIP sample, each with its
    (input index, target id) pairs written out by hand."""
    window = np.arange(10, 22)  # 12 tokens
    gmask = build_infill_sample(window, [(8, 4)], seq_len=SEQ, special=S, encoding="rope1d", mask_id=S.gmask, mode="gmask")
    mask = build_infill_sample(window, [(7, 2), (2, 1)], seq_len=SEQ, special=S, encoding="rope1d", mask_id=S.mask, mode="mask")
    mip = MIPDataset([MIPExample("30 31 32", "40 41")], WordTokenizer(), SEQ, S).sample(0)
    expected_inputs = [
        [10, 11, 12, 13, 14, 15, 16, 17, 4, 5, 18, 19, 20, 21, 0, 0],
        [10, 11, 2, 13, 14, 15, 16, 2, 19, 20, 21, 5, 17, 18, 5, 12],
        [30, 31, 32, 4, 5, 40, 41, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    targets = [
        [(9, 18), (10, 19), (11, 20), (12, 21), (13, 6)],  # <sop> predicts the span's first token
        [(11, 17), (12, 18), (13, 6), (14, 12), (15, 6)],
        [(4, 40), (5, 41), (6, 6)],
    ]
    samples = [gmask, mask, mip]
    for sample, inputs in zip(samples, expected_inputs, strict=True):
        assert sample["input_ids"].tolist() == inputs
    return samples, targets


def causal_samples() -> tuple[list[dict], list[list[tuple[int, int]]]]:
    builder = BlankInfillBuilder(seq_len=SEQ, special=S)
    samples = [builder.causal(np.arange(10, 27)), builder.causal(np.arange(40, 57)[::-1].copy())]
    assert samples[0]["input_ids"].tolist() == list(range(10, 26))
    targets = [[(i, 11 + i) for i in range(SEQ)], [(i, 55 - i) for i in range(SEQ)]]
    return samples, targets


def reference_loss(model: GLM, batch: dict[str, torch.Tensor], targets: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Mean cross-entropy of the full logits at the given (row, index) -> target, in float64."""
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        block_position_ids=batch["block_position_ids"],
        prefix_len=batch["prefix_len"],
    )
    assert logits.dtype == torch.float64
    terms = [-F.log_softmax(logits[row, index], -1)[target] for row, pairs in enumerate(targets) for index, target in pairs]
    return torch.stack(terms).sum() / len(terms)


def double_copy(model: GLM) -> GLM:
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_loss_and_gradient_equal_a_float64_cross_entropy_at_hand_written_positions(objective: str) -> None:
    samples, targets = glm_samples() if objective == "glm" else causal_samples()
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=64, max_seq_len=SEQ, objective=objective))
    reference_model = double_copy(model)
    batch = collate(samples)
    count = sum(map(len, targets))
    assert int((batch["labels"] != -100).sum()) == count

    loss, n = compute_loss(model, batch, count)
    loss.backward()
    expected = reference_loss(reference_model, batch, targets)
    expected.backward()
    assert n == count
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        reference = grads[name].grad
        torch.testing.assert_close(param.grad.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item(), msg=name)


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_count_targets_counts_the_hand_written_positions(objective: str) -> None:
    """The step normaliser every layout divides by: the Part B targets written out above, over
    batches split any way."""
    samples, targets = glm_samples() if objective == "glm" else causal_samples()
    expected = sum(map(len, targets))
    assert count_targets([collate(samples)]) == expected
    assert count_targets([collate([sample]) for sample in samples]) == expected and count_targets([]) == 0


def test_the_reference_tells_a_shifted_target_row_apart() -> None:
    """The check above is sensitive: predicting each target from the row before it (an
    off-by-one a loss function can make) gives a clearly different loss."""
    samples, targets = glm_samples()
    torch.manual_seed(1)
    model = double_copy(GLM(model_preset("micro", vocab_size=64, max_seq_len=SEQ)))
    batch = collate(samples)
    shifted = [[(index - 1, target) for index, target in pairs] for pairs in targets]
    with torch.no_grad():
        assert abs(reference_loss(model, batch, shifted).item() - reference_loss(model, batch, targets).item()) > 1e-2


def write_mip(path: Path) -> Path:
    lines = [
        {"prompt": "Question: what is two plus two?", "response": "Four."},
        {"prompt": "三国演义的作者是谁？", "response": "罗贯中。"},
    ]
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_train_step_reports_the_reference_loss_and_gradient_norm(objective: str, tmp_path: Path, cache_env: str) -> None:
    """One optimiser step of the real trainer (two micro-batches, MIP samples padded into the GLM
    run): its loss is the reference's mean over all the step's targets, its pre-clipping gradient
    norm the norm of the reference's gradient."""
    mip = {"mip_data": str(write_mip(tmp_path / "mip.jsonl")), "mip_share": 0.5} if objective == "glm" else {}
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        precision="fp32",
        batch_size=4,
        micro_batch_size=2,
        max_steps=1,
        warmup_steps=1,
        egs_alpha=1.0,
        **mip,
    )
    trainer = Trainer(model_preset("micro", max_seq_len=32, objective=objective), config)
    batch = collate_range(trainer.train_data, 0, 4)
    padded = (batch["labels"] == -100).sum(1) > batch["prefix_len"]
    if objective == "glm":
        assert padded.any(), "the step should hold a padded MIP sample"
    labels = batch["labels"].tolist()
    targets = [[(i, t) for i, t in enumerate(row) if t != -100] for row in labels]
    reference_model = double_copy(trainer.model)
    expected = reference_loss(reference_model, batch, targets)
    expected.backward()
    expected_norm = torch.sqrt(sum(p.grad.square().sum() for p in reference_model.parameters())).item()

    metrics = trainer.train_step()
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
