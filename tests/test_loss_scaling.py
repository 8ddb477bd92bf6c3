"""fp16 dynamic loss scaling as Megatron-LM's DynamicGradScaler defines it: gradients unscaled
before the norm, clipping and the step (so an fp16 step moves the weights as the fp32 step does),
an overflow restarting the clean-step window, hysteresis, growth, and a resumed run continuing with
the saved scale and skipping the same steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openglm.config import SpecialTokens, TrainConfig, model_preset
from openglm.data.blank_infill import build_infill_sample, collate
from openglm.model import GLM
from openglm.train.metrics import read_metrics
from openglm.train.objective import compute_loss
from openglm.train.precision import DynamicLossScaler, MixedPrecision
from openglm.train.trainer import Trainer

S = SpecialTokens()


def test_scale_follows_megatron_window_hysteresis_and_growth() -> None:
    """One event at a time (C clean, I overflow), the scale after each, worked out by hand from
    Megatron's rules: window 3, hysteresis 2."""
    scaler = DynamicLossScaler(scale=64.0, window=3, min_scale=1.0, hysteresis=2)
    events = "CCICCCIIICCCI"
    expected = [
        64,  # C: 1 clean
        64,  # C: 2 clean
        64,  # I: window restarts; first overflow of the hysteresis
        64,  # C: 1 clean (not 3: the overflow reset the window)
        64,  # C: 2 clean
        128,  # C: 3 clean -> grow, hysteresis restored
        128,  # I: first overflow since the growth
        64,  # I: second -> halve
        32,  # I: hysteresis used up since the last growth -> halve again
        32,  # C
        32,  # C
        64,  # C: grow, hysteresis restored
        64,  # I: first overflow again only uses up hysteresis
    ]
    scales = []
    for event in events:
        scaler.update(found_inf=event == "I")
        scales.append(scaler.scale)
    assert scales == expected
    floor = DynamicLossScaler(scale=4.0, window=100, min_scale=2.0, hysteresis=1)
    for _ in range(4):
        floor.update(found_inf=True)
    assert floor.scale == 2.0


def test_restored_scaler_continues_the_same_sequence() -> None:
    events = [True, False, False, True, True, False, False, False, True, True, False] * 3
    whole = DynamicLossScaler(scale=1024.0, window=3, hysteresis=2)
    first = DynamicLossScaler(scale=1024.0, window=3, hysteresis=2)
    for found_inf in events[:10]:
        whole.update(found_inf)
        first.update(found_inf)
    resumed = DynamicLossScaler(scale=2.0**16, window=3, hysteresis=2)
    resumed.load_state_dict(first.state_dict())
    for found_inf in events[10:]:
        whole.update(found_inf)
        resumed.update(found_inf)
        assert resumed.state_dict() == whole.state_dict()


def glm_batch() -> dict[str, torch.Tensor]:
    window = np.arange(10, 40)
    samples = [
        build_infill_sample(window, [(20, 10)], seq_len=32, special=S, encoding="rope1d", mask_id=S.gmask, mode="gmask"),
        build_infill_sample(
            window[:28][::-1].copy(), [(4, 3), (15, 2)], seq_len=32, special=S, encoding="rope1d", mask_id=S.mask, mode="mask"
        ),
    ]
    return collate(samples)


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_fp16_step_unscales_gradients_before_norm_clip_and_step(max_norm: float) -> None:
    """The same weights and batch stepped in fp32 and in fp16 (loss scale 2^10): the fp16 report's
    gradient norm and the weights after one SGD step equal fp32's within fp16 rounding, with and
    without clipping."""
    torch.manual_seed(0)
    config = model_preset("micro", vocab_size=64, max_seq_len=32)
    models = {precision: GLM(config) for precision in ("fp32", "fp16")}
    models["fp16"].load_state_dict(models["fp32"].state_dict())
    batch = glm_batch()
    targets = int((batch["labels"] != -100).sum())
    results = {}
    for name, model in models.items():
        precision = MixedPrecision(model, name, DynamicLossScaler(scale=2.0**10))
        optimizer = torch.optim.SGD(precision.master_params, lr=1.0)
        before = {k: v.clone() for k, v in precision.master_state_dict().items()}
        loss, _ = compute_loss(model, batch, targets)
        precision.backward(loss)
        report = precision.step(optimizer, max_norm)
        assert not report.skipped
        update = {k: v - before[k] for k, v in precision.master_state_dict().items()}
        results[name] = (report, update)
    (report32, update32), (report16, update16) = results["fp32"], results["fp16"]
    assert report16.loss_scale == 2.0**10
    assert report16.grad_norm == pytest.approx(report32.grad_norm, rel=2e-2)
    assert report16.embedding_grad_norm == pytest.approx(report32.embedding_grad_norm, rel=2e-2)
    norm32 = torch.sqrt(sum(u.square().sum() for u in update32.values())).item()
    norm16 = torch.sqrt(sum(u.square().sum() for u in update16.values())).item()
    assert norm16 == pytest.approx(norm32, rel=2e-2)
    if max_norm:
        assert report32.grad_norm > max_norm and norm32 == pytest.approx(max_norm, rel=1e-4)
    else:
        assert norm32 == pytest.approx(report32.grad_norm, rel=1e-5)  # SGD, lr 1: the update is the gradient
    for name in update32:
        scale = update32[name].abs().max().item()
        torch.testing.assert_close(update16[name], update32[name], rtol=0, atol=2e-2 * scale + 1e-6, msg=name)


def fp16_config(out: Path, **overrides) -> TrainConfig:
    """An fp16 run whose first loss scale overflows fp16 and whose window is short, so the scale
    falls, grows and overflows again within a few steps (2^20: steps 0-3, 7 and 10 overflow)."""
    base = {
        "out_dir": str(out),
        "precision": "fp16",
        "batch_size": 2,
        "micro_batch_size": 2,
        "max_steps": 12,
        "warmup_steps": 2,
        "eval_every": 1000,
        "save_every": 6,
        "eval_batches": 1,
        "final_eval_tokens": 200,
        "loss_scale_init": 2.0**20,
        "loss_scale_window": 2,
        "loss_scale_hysteresis": 2,
    }
    return TrainConfig(**{**base, **overrides})


def scale_history(run: Path) -> dict[int, tuple[float, bool, float]]:
    return {r["step"]: (r["loss_scale"], r["skipped"], r["loss"]) for r in read_metrics(run / "metrics.jsonl", "train")}


def test_resumed_fp16_run_keeps_the_loss_scale_and_skips_the_same_steps(tmp_path: Path, cache_env: str) -> None:
    model_config = model_preset("micro", max_seq_len=32)
    full = tmp_path / "full"
    Trainer(model_config, fp16_config(full)).fit()
    expected = scale_history(full)
    skipped = [step for step, (_, skip, _) in expected.items() if skip]
    assert skipped[:2] == [0, 1] and any(step >= 6 for step in skipped), expected  # overflows before and after the checkpoint
    assert len({scale for scale, _, _ in expected.values()}) > 3
    assert expected[5][0] != 2.0**20

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-0000006", resumed / "checkpoint-0000006")
    (resumed / "latest").write_text("checkpoint-0000006\n")
    trainer = Trainer(model_config, fp16_config(resumed), resume=True)
    assert trainer.precision.scaler.scale == expected[5][0]  # the scale after step 5, not loss_scale_init
    trainer.fit()
    history = scale_history(resumed)
    assert sorted(history) == list(range(6, 12))
    for step in range(6, 12):
        assert history[step][:2] == expected[step][:2], step
        assert history[step][2] == pytest.approx(expected[step][2], rel=1e-6, nan_ok=True), step
