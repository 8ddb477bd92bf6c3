"""3-D parallelism against single-process training (gloo on CPU, `micro` preset, fp32): losses and
parameters after 5 steps, distributed checkpoints resumed under other layouts, layout validation,
and the GLM-130B planner."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from openglm.cli import app
from openglm.config import ConfigError, GLMConfig, TrainConfig, model_preset
from openglm.parallel.launch import spawn
from openglm.parallel.plan import Layout, check_training, pipeline_bubble, plan, stage_layers, validate_layout
from openglm.train.distributed_checkpoint import export_checkpoint, gather_full_state, resolve_distributed
from openglm.train.trainer import Trainer

STEPS = 5
SAVE_AT = 3


def model_config(layers: int = 2) -> GLMConfig:
    return model_preset("micro", max_seq_len=64, num_layers=layers)


def train_config(out: Path) -> TrainConfig:
    # grad_clip below the measured norms (~0.7) so clipping by the global norm acts every step.
    return TrainConfig(
        out_dir=str(out), precision="fp32", batch_size=4, micro_batch_size=2, max_steps=STEPS, warmup_steps=2,
        eval_every=1000, save_every=1000, eval_batches=1, lr=3e-3, grad_clip=0.5, final_eval_tokens=1000,
    )


# ------------------------------------------------------------------------- spawned workers
CASES = {  # name: (tp, pp, dp, options)
    "tp2": (2, 1, 1, {}),
    "pp2": (1, 2, 1, {}),
    "dp2": (1, 1, 2, {}),
    "dp2-replicate": (1, 1, 2, {"dp_mode": "replicate"}),
    "tp2xdp2": (2, 1, 2, {}),
    "pp2xtp2": (2, 2, 1, {"schedule": "gpipe", "activation_checkpointing": True}),
}
SAVED = ("tp2xdp2", "pp2-interleaved")  # cases that save a checkpoint at SAVE_AT
# Interleaved 1F1B: two stages per rank of a 4-layer model (stages 0 and 2 on the first rank).
INTERLEAVED_LAYERS = 4
INTERLEAVED = {
    "pp2-interleaved": (1, 2, 1, {"schedule": "interleaved-1f1b", "virtual_stages": 2}),
    "pp2xtp2-interleaved": (2, 2, 1, {"schedule": "interleaved-1f1b", "virtual_stages": 2}),
    "pp2xdp2-interleaved": (1, 2, 2, {"schedule": "interleaved-1f1b", "virtual_stages": 2, "micro_batch_size": 1}),
}


def _run_cases(names: list[str], tmp: Path, resume_from: str | None, layers: int = 2) -> None:
    """In every rank: train each case for STEPS steps (those in SAVED also save at SAVE_AT); with
    `resume_from`, also resume that case's checkpoint under this layout for one step."""
    for name in names:
        tp, pp, dp, options = (CASES | INTERLEAVED)[name]
        trainer = Trainer(model_config(layers), dataclasses.replace(train_config(tmp / name), tp=tp, pp=pp, dp=dp, **options))
        losses, norms = [], []
        for _ in range(STEPS):
            metrics = trainer.train_step()
            losses.append(metrics["loss"])
            norms.append(metrics["grad_norm"])
            if name in SAVED and trainer.step == SAVE_AT:
                trainer.save()
        state = gather_full_state(trainer.model, trainer.optimizer, trainer.model_config, tp)
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, state)
        result = {"losses": losses, "norms": norms, "params": {k: v for part in parts for k, v in part.items()}}
        if resume_from is not None and name == names[0]:
            config = dataclasses.replace(train_config(tmp / resume_from), max_steps=STEPS, tp=tp, pp=pp, dp=dp, **options)
            resumed = Trainer(model_config(layers), config, resume=True)
            result["resumed"] = (resumed.step, resumed.train_step()["loss"])
        if dist.get_rank() == 0:
            torch.save(result, tmp / f"{name}.pt")


def _single_reference(out: Path, layers: int) -> dict[str, list]:
    """STEPS single-process steps (the reference every layout is held to)."""
    reference = Trainer(model_config(layers), train_config(out))
    result: dict[str, Any] = {"losses": [], "norms": [], "fp32_norms": []}
    fp32_norms = reference.precision._grad_norms

    def exact_norms(grads: list[torch.Tensor]) -> tuple[float, float]:
        """Clip by the float64 norm, as the parallel trainer does: single-process training's fp32
        norm is up to 1e-4 off (the sparse embedding gradient), which would move the clipped
        steps by more than the parallelism under test."""
        total, embedding = fp32_norms(grads)
        exact = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt().item()
        result["fp32_norms"].append(total)
        return exact, embedding

    reference.precision._grad_norms = exact_norms  # type: ignore[method-assign]
    for _ in range(STEPS):
        metrics = reference.train_step()
        result["losses"].append(metrics["loss"])
        result["norms"].append(metrics["grad_norm"])
    result["params"] = {k: v.detach().clone() for k, v in reference.model.named_parameters()}
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shard_cache: str) -> dict[str, dict]:
    """Single-process reference, then one 4-process job and one 2-process job for all layouts."""
    tmp = tmp_path_factory.mktemp("parallel")
    patch = pytest.MonkeyPatch()
    patch.setenv("OPENGLM_CACHE", shard_cache)
    try:
        results: dict[str, dict] = {"single": _single_reference(tmp / "single", 2)}
        spawn(_run_cases, 4, ["tp2xdp2", "pp2xtp2"], tmp, None)
        spawn(_run_cases, 2, ["pp2", "tp2", "dp2", "dp2-replicate"], tmp, "tp2xdp2")
    finally:
        patch.undo()
    results |= {name: torch.load(tmp / f"{name}.pt") for name in CASES}
    results["tmp"] = {"path": tmp}
    return results


@pytest.fixture(scope="module")
def interleaved_runs(tmp_path_factory: pytest.TempPathFactory, shard_cache: str) -> dict[str, dict]:
    """The 4-layer reference, then the interleaved layouts."""
    tmp = tmp_path_factory.mktemp("interleaved")
    patch = pytest.MonkeyPatch()
    patch.setenv("OPENGLM_CACHE", shard_cache)
    try:
        results = {"single": _single_reference(tmp / "single", INTERLEAVED_LAYERS)}
        spawn(_run_cases, 2, ["pp2-interleaved"], tmp, None, INTERLEAVED_LAYERS)
        spawn(_run_cases, 4, ["pp2xtp2-interleaved", "pp2xdp2-interleaved"], tmp, "pp2-interleaved", INTERLEAVED_LAYERS)
    finally:
        patch.undo()
    return results | {name: torch.load(tmp / f"{name}.pt") for name in INTERLEAVED}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _key_bias_free(name: str, tensor: torch.Tensor, config: GLMConfig) -> torch.Tensor:
    """The QKV bias without its key part: softmax ignores a constant added to every score, so the
    key bias's true gradient is exactly zero and Adam (which divides by the gradient's own size)
    turns rounding noise into full-size steps there, in single-process training too."""
    if not name.endswith("query_key_value.bias"):
        return tensor
    return tensor.view(config.num_heads, 3, config.head_dim)[:, [0, 2]]


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_process(runs: dict[str, dict], name: str) -> None:
    _assert_matches(runs["single"], runs[name], model_config())


@pytest.mark.parametrize("name", list(INTERLEAVED))
def test_interleaved_1f1b_matches_single_process(interleaved_runs: dict[str, dict], name: str) -> None:
    _assert_matches(interleaved_runs["single"], interleaved_runs[name], model_config(INTERLEAVED_LAYERS))


def test_checkpoint_from_interleaved_resumes_under_another_layout(interleaved_runs: dict[str, dict]) -> None:
    """Saved under interleaved pp2 (stages 0, 2 | 1, 3) at step 3, resumed under interleaved pp2 x tp2."""
    step, loss = interleaved_runs["pp2xtp2-interleaved"]["resumed"]
    assert step == SAVE_AT and loss == pytest.approx(interleaved_runs["single"]["losses"][SAVE_AT], rel=1e-5)


def _assert_matches(single: dict, parallel: dict, config: GLMConfig) -> None:
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert parallel["norms"] == pytest.approx(single["norms"], rel=1e-5)  # the global norm across every shard
    assert single["fp32_norms"] == pytest.approx(single["norms"], rel=2e-4)
    assert set(parallel["params"]) == set(single["params"])
    for key, expected in single["params"].items():
        got = parallel["params"][key]
        assert got.shape == expected.shape, key
        assert _relative(_key_bias_free(key, got, config), _key_bias_free(key, expected, config)) < 1e-5, key
        assert _relative(got, expected) < 1e-4, key  # the key bias too, whose steps are noise (see above)


def test_checkpoint_from_tp2xdp2_resumes_under_other_layouts(runs: dict[str, dict]) -> None:
    """Saved under tp2 x dp2 at step 3: resumed under pp2 (2 processes) and, exported to the
    single-file format, by the single-process trainer; both give the uninterrupted step-4 loss."""
    expected = runs["single"]["losses"][SAVE_AT]
    step, loss = runs["pp2"]["resumed"]
    assert step == SAVE_AT and loss == pytest.approx(expected, rel=1e-5)
    tmp = runs["tmp"]["path"]
    source = resolve_distributed(tmp / "tp2xdp2")
    assert source is not None and source.name.endswith(f"{SAVE_AT:07d}")
    exported = export_checkpoint(source, tmp / "exported")
    trainer = Trainer(model_config(), train_config(tmp / "exported"), resume=True)
    assert trainer.step == SAVE_AT and exported.name == f"checkpoint-{SAVE_AT:07d}"
    assert trainer.train_step()["loss"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("layout", "world", "message"),
    [
        (Layout(tp=3), 3, "does not divide the 4 attention heads; choose --tp from [1, 2, 4]"),
        (Layout(pp=3), 3, "--pp 3 is larger than the 2 layers; use --pp 2 or less"),
        (Layout(tp=2, dp=2), 2, "2 processes but tp*pp*dp = 2*1*2 = 4"),
    ],
)
def test_bad_layouts_fail_before_any_work(layout: Layout, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("[", r"\[").replace("]", r"\]")):
        validate_layout(layout, model_config(), world)


def test_cli_rejects_bad_layout_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--preset", "micro", "--tp", "3", "--nproc", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not divide the 4 attention heads" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["train", "--preset", "micro", "--tp", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "1 processes but tp*pp*dp" in result.output


def test_batch_must_split_over_data_parallel_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before joining a group
    config = dataclasses.replace(train_config(tmp_path), batch_size=3, micro_batch_size=3, dp=2)
    with pytest.raises(ConfigError, match="--batch-size 3 is not divisible by --dp 2"):
        Trainer(model_config(), config)


# -------------------------------------------------------------------------------- planner
def test_plan_reproduces_glm_130b() -> None:
    report = plan(model_preset("glm-130b"), gpus=768, gpu="a100-40g", tp=4, pp=8, micro_batches=176)
    assert report.layout == Layout(4, 8, 24)
    assert round(report.bubble, 3) == 0.038 and report.bubble == pipeline_bubble(8, 176)
    assert report.parameters == 128_697_794_560  # the model's own count (`openglm info`): "130B"
    assert report.global_batch == 4224  # the paper's batch size
    assert report.step_seconds == pytest.approx(88.5, rel=0.01)  # paper: 88.5 s/iter at 32.5% MFU
    assert not report.fits(checkpointing=False) and report.fits(checkpointing=True)
    assert stage_layers(70, 8)[0] == range(0, 9) and sum(len(r) for r in stage_layers(70, 8)) == 70


def test_plan_cli_says_when_a_layout_does_not_fit() -> None:
    result = CliRunner().invoke(app, ["plan", "--preset", "glm-130b", "--gpus", "768", "--tp", "1", "--pp", "8"])
    assert result.exit_code == 0
    assert "does NOT fit in 40 GiB" in result.output and "raise --tp or --pp" in result.output
    result = CliRunner().invoke(app, ["plan", "--preset", "glm-130b", "--gpus", "768", "--gpu", "a100-40g", "--tp", "4", "--pp", "8",
                                      "--micro-batches", "176"])
    assert result.exit_code == 0 and "pipeline bubble   3.8%" in result.output and "128.7B" in result.output
    result = CliRunner().invoke(app, ["plan", "--tp", "5"])
    assert result.exit_code == 2 and "--tp 5 does not divide the 96 attention heads" in result.output


def test_plan_interleaved_bubble() -> None:
    """Narayanan et al. (2021): v stages per GPU cut the bubble's time from (p-1) to (p-1)/v
    micro-batch slots, next to the m slots of work: written out for GLM-130B's p=8, m=176."""
    for v in (1, 2, 4):
        report = plan(model_preset("glm-130b"), gpus=768, tp=4, pp=8, micro_batches=176, virtual_stages=v)
        assert report.bubble == pytest.approx((7 / v) / (176 + 7 / v), rel=1e-12)
    assert pipeline_bubble(8, 176, 2) < pipeline_bubble(8, 176) and pipeline_bubble(1, 4, 3) == 0
    result = CliRunner().invoke(app, ["plan", "--preset", "glm-130b", "--micro-batches", "176", "--virtual-stages", "2"])
    assert result.exit_code == 0 and "pipeline bubble   1.9%  (interleaved: (p-1)/(v*m+p-1), p=8, v=2, m=176)" in result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pp": 2, "virtual_stages": 2}, "--virtual-stages 2 needs --schedule interleaved-1f1b"),
        ({"schedule": "interleaved-1f1b"}, "--schedule interleaved-1f1b needs --pp 2 or more"),
        ({"pp": 2, "virtual_stages": 2, "schedule": "interleaved-1f1b"}, "--pp 2 x --virtual-stages 2 = 4 stages, more than the 2 layers"),
    ],
)
def test_interleaved_layouts_are_checked(tmp_path: Path, overrides: dict, message: str) -> None:
    config = dataclasses.replace(train_config(tmp_path), **overrides)
    with pytest.raises(ConfigError, match=message):
        check_training(model_config(), config, config.pp)
