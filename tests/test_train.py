"""Trainer, mixed precision, loss scaling, schedules and checkpoints, on the `micro` preset with the
bundled corpus."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from openglm.config import GLMConfig, TrainConfig, model_preset
from openglm.io.api import load
from openglm.io.checkpoint import CheckpointError
from openglm.model import GLM
from openglm.train.metrics import SpikeDetector, read_metrics
from openglm.train.objective import compute_loss
from openglm.train.optim import learning_rate
from openglm.train.precision import DynamicLossScaler, MixedPrecision
from openglm.train.samples import collate_range
from openglm.train.trainer import Trainer


def micro_train_config(out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        out_dir=str(out), precision="fp32", batch_size=4, micro_batch_size=4, max_steps=6, warmup_steps=2,
        eval_every=1000, save_every=3, eval_batches=1, lr=3e-3, final_eval_tokens=1000,
    )
    return dataclasses.replace(base, **overrides)


def micro_config(**overrides) -> GLMConfig:
    return model_preset("micro", max_seq_len=64, **overrides)


def train_losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path / "metrics.jsonl", "train")}


# ----------------------------------------------------------------------------- loss scaling
def test_loss_scaler_halves_after_hysteresis_and_grows_after_window():
    scaler = DynamicLossScaler(scale=1024.0, window=3, min_scale=1.0, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 1024.0  # first overflow only uses up hysteresis
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 1024.0
    floor = DynamicLossScaler(scale=2.0, hysteresis=1, min_scale=1.0)
    for _ in range(5):
        floor.update(found_inf=True)
    assert floor.scale == 1.0


def test_fp16_step_with_injected_inf_is_skipped_and_lowers_the_scale():
    torch.manual_seed(0)
    model = GLM(micro_config(vocab_size=64))
    precision = MixedPrecision(model, "fp16", DynamicLossScaler(scale=2.0**16, hysteresis=1))
    optimizer = torch.optim.AdamW(precision.master_params, lr=1e-2)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    before = {k: v.clone() for k, v in precision.master_state_dict().items()}
    ids = torch.randint(7, 64, (2, 16))
    logits = model(ids)
    precision.backward(logits.float().square().mean() * 1e-6)
    model.layers[0].mlp.dense_h_to_4h.weight.grad[0, 0] = float("inf")
    report = precision.step(optimizer, max_norm=1.0)
    assert report.skipped and report.loss_scale == 2.0**15
    for name, value in precision.master_state_dict().items():
        assert torch.equal(value, before[name]), name
    # the next clean step goes through and moves the weights
    logits = model(ids)
    precision.backward(logits.float().square().mean() * 1e-6)
    report = precision.step(optimizer, max_norm=1.0)
    assert not report.skipped and math.isfinite(report.grad_norm)
    assert any(not torch.equal(v, before[k]) for k, v in precision.master_state_dict().items())


def test_bf16_keeps_fp32_master_weights_and_rounds_model_copy():
    torch.manual_seed(0)
    model = GLM(micro_config(vocab_size=64))
    precision = MixedPrecision(model, "bf16")
    optimizer = torch.optim.AdamW(precision.master_params, lr=1e-3)
    ids = torch.randint(7, 64, (2, 16))
    precision.backward(model(ids).float().logsumexp(-1).mean())
    precision.step(optimizer, max_norm=1.0)
    for name, master in precision.master_state_dict().items():
        param = dict(model.named_parameters())[name]
        assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
        assert torch.equal(param, master.to(torch.bfloat16)), name


def test_clipping_scales_the_update_to_max_norm():
    torch.manual_seed(0)
    model = GLM(micro_config(vocab_size=64))
    precision = MixedPrecision(model, "fp32")
    optimizer = torch.optim.SGD(precision.master_params, lr=1.0)
    before = {k: v.clone() for k, v in precision.master_state_dict().items()}
    precision.backward(model(torch.randint(7, 64, (2, 16))).sum())
    report = precision.step(optimizer, max_norm=0.5)
    assert report.grad_norm > 0.5
    moved = torch.sqrt(sum(((v - before[k]) ** 2).sum() for k, v in precision.master_state_dict().items()))
    assert moved.item() == pytest.approx(0.5, rel=1e-4)


# ------------------------------------------------------------------------------- schedules
def test_learning_rate_warmup_then_cosine_to_ten_percent():
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, config) == pytest.approx(0.1)
    assert learning_rate(500, config) == pytest.approx(0.1)


def test_batch_size_ramp_up():
    config = TrainConfig(batch_size=4224, batch_rampup_start=192, batch_rampup_steps=100)
    assert config.batch_size_at(0) == 192
    assert config.batch_size_at(50) == 2208
    assert config.batch_size_at(100) == 4224
    assert TrainConfig(batch_size=8).batch_size_at(10) == 8


def test_spike_detector_flags_norm_far_above_median():
    detector = SpikeDetector(factor=5.0, warmup=5)
    assert all(detector.observe(1.0 + 0.01 * i) is None for i in range(10))
    assert detector.observe(50.0) == pytest.approx(1.045)
    assert detector.observe(float("nan")) is not None
    assert detector.observe(1.0) is None


# ------------------------------------------------------------------------------- training
def test_egs_alpha_reaches_the_model(tmp_path, cache_env):
    trainer = Trainer(micro_config(), micro_train_config(tmp_path, egs_alpha=0.1))
    assert trainer.model.embedding_grad_scale == 0.1


def test_activation_checkpointing_recomputes_each_block_to_the_same_gradients(tmp_path, cache_env, monkeypatch):
    """Single-process training is the 1x1x1 layout: --activation-checkpointing applies there too,
    running each block under torch.utils.checkpoint, with the gradients of plain backward."""
    import openglm.model

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(openglm.model, "checkpoint", counted)
    grads = []
    for recompute in (False, True):
        trainer = Trainer(micro_config(), micro_train_config(tmp_path / str(recompute), activation_checkpointing=recompute))
        assert trainer.model.checkpoint_layers is recompute
        trainer.model.train()
        loss, _ = compute_loss(trainer.model, collate_range(trainer.train_data, 0, 4), 100)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert len(calls) == micro_config().num_layers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-9, msg=name)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, cache_env):
    grads = []
    for micro in (4, 1):
        trainer = Trainer(micro_config(), micro_train_config(tmp_path / str(micro), micro_batch_size=micro))
        batch = collate_range(trainer.train_data, 0, 4)
        targets = int((batch["labels"] != -100).sum())
        for start in range(0, 4, micro):
            part = {k: v[start : start + micro] for k, v in batch.items()}
            loss, _ = compute_loss(trainer.model, part, targets)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_micro_training_lowers_loss_and_writes_metrics(tmp_path, cache_env):
    config = micro_train_config(tmp_path, max_steps=30, save_every=30, eval_every=30, batch_size=8, micro_batch_size=8)
    summary = Trainer(micro_config(), config).fit()
    losses = train_losses(tmp_path)
    assert len(losses) == 30
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 1.0
    records = read_metrics(tmp_path / "metrics.jsonl", "train")
    for key in ("lr", "grad_norm", "embedding_grad_norm", "loss_scale", "skipped", "tokens_per_s", "mfu"):
        assert key in records[0]
    assert set(summary["bits_per_byte"]) == {"en", "zh"}
    assert all(0 < v < 10 for v in summary["bits_per_byte"].values())
    assert any((tmp_path / "tensorboard").iterdir())


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, cache_env):
    """A run resumed from its step-3 checkpoint reproduces the uninterrupted run's losses exactly."""
    full = tmp_path / "full"
    Trainer(micro_config(), micro_train_config(full)).fit()
    expected = train_losses(full)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-0000003", interrupted / "checkpoint-0000003")
    (interrupted / "latest").write_text("checkpoint-0000003\n")
    trainer = Trainer(micro_config(), micro_train_config(interrupted), resume=True)
    assert trainer.step == 3 and trainer.data_position == 12
    trainer.fit()
    resumed = train_losses(interrupted)
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    a = load(full)[0].state_dict()
    b = load(interrupted)[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved_run(tmp_path, cache_env) -> Path:
    Trainer(micro_config(), micro_train_config(tmp_path / "run", max_steps=1, save_every=1)).fit()
    return tmp_path / "run"


def test_checkpoint_round_trips_the_model(saved_run):
    model, tokenizer = load(saved_run)
    checkpoint = saved_run / (saved_run / "latest").read_text().strip()
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "model.safetensors")
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name])
    assert not model.training and tokenizer.vocab_size <= model.config.vocab_size


def test_damaged_weights_file_is_named(saved_run):
    weights = saved_run / "checkpoint-0000001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged"):
        Trainer(micro_config(), micro_train_config(saved_run), resume=True)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load(saved_run)


def test_mismatched_config_names_the_tensor(saved_run):
    config_path = saved_run / "checkpoint-0000001" / "config.json"
    config = json.loads(config_path.read_text())
    config["ffn_hidden_size"] = 256
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: damaged \(sha256"):
        load(saved_run)
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.weight has shape"):
        load(saved_run, verify=False)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load(saved_run, verify=False)


def test_missing_checkpoint_and_truncated_optimizer(saved_run, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "nowhere")
    optimizer = saved_run / "checkpoint-0000001" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: damaged"):
        Trainer(micro_config(), micro_train_config(saved_run), resume=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 0.0), ("egs_alpha", 1.5), ("batch_size", 0), ("precision", "fp8"), ("mip_share", 1.0), ("grad_clip", -1.0)],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    from openglm.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})
