"""`openglm train --config FILE --set KEY=VALUE`: every GLMConfig and TrainConfig field settable,
values parsed by the field's type, the documented precedence, one-line errors naming the key as the
user gave it; the CLI's options have no defaults of their own; pipeline runs choose their
micro-batch size and impossible layouts are refused before any process starts."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from openglm import cli
from openglm.config import (
    ConfigError,
    GLMConfig,
    Setting,
    SpecialTokens,
    TrainConfig,
    model_preset,
    parse_set,
    read_config_file,
    resolve_configs,
    train_preset,
)
from openglm.parallel.plan import check_training, micro_batch_size
from openglm.train.metrics import read_metrics


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.app, ["train", *args], env=env)


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == f"error: {message}\n", result.stderr


def as_text(value: object) -> str:
    """A value written as a user writes it after `--set KEY=`."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def sample_value(hint: object, current: object) -> object:
    """A valid value of type `hint` that differs from `current` where the type allows it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return next(a for a in args if a != current)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return sample_value(inner, current) if current is None else None
    if origin is list:
        return ["a.txt", "b.txt"]
    if origin is tuple:
        return (0.8, 0.9)
    if hint is bool:
        return not current
    if hint is int:
        return int(current or 0) + 1
    if hint is float:
        return float(current or 0.0) / 2 + 0.25 if current != 0.25 else 0.5
    return "runs/elsewhere"


FIELDS = [("model", f.name) for f in dataclasses.fields(GLMConfig)] + [("train", f.name) for f in dataclasses.fields(TrainConfig)]
# Values that other fields constrain, so sample_value's generic choice would be invalid.
SPECIFIC = {
    ("model", "vocab_size"): 8192, ("model", "ffn_hidden_size"): 256, ("model", "hidden_size"): 128, ("model", "num_heads"): 2, ("model", "special_tokens"): None,
    ("train", "mip_share"): 0.5, ("train", "val_fraction"): 0.5, ("train", "mask_ratio"): 0.5, ("train", "min_gmask_ratio"): 0.5,
    ("train", "egs_alpha"): 0.5, ("train", "gmask_prob"): 0.5, ("train", "min_lr_ratio"): 0.5,
}  # fmt: skip


@pytest.mark.parametrize(("section", "name"), FIELDS)
def test_every_field_can_be_set_on_the_command_line(section: str, name: str) -> None:
    cls = GLMConfig if section == "model" else TrainConfig
    hint = typing.get_type_hints(cls)[name]
    base = model_preset("micro") if section == "model" else train_preset("micro")
    if name == "special_tokens":
        model, _ = resolve_configs("micro", [parse_set("model.special_tokens.pad=7"), parse_set("model.special_tokens.eop=0")])
        assert model.special_tokens == dataclasses.replace(SpecialTokens(), pad=7, eop=0)
        return
    value = SPECIFIC.get((section, name), sample_value(hint, getattr(base, name)))
    model, train = resolve_configs("micro", [parse_set(f"{section}.{name}={as_text(value)}")])
    got = getattr(model if section == "model" else train, name)
    assert got == value and type(got) is type(value), (got, value)


def test_config_file_then_options_then_set(tmp_path: Path) -> None:
    """Precedence: preset < file < explicit options < --set; YAML and JSON alike."""
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  num_layers: 3\n  hidden_size: 128\ntrain:\n  lr: 1.0e-3\n  seed: 7\n  batch_size: 8\n")
    json_file = tmp_path / "run.json"
    json_file.write_text(
        json.dumps({"model": {"num_layers": 3, "hidden_size": 128}, "train": {"lr": 1e-3, "seed": 7, "batch_size": 8}})
    )
    for path in (yaml_file, json_file):
        settings = [
            *read_config_file(path),
            Setting("train.lr", 2e-3, "--lr"),
            Setting("train.seed", 8, "--seed"),
            parse_set("train.lr=3e-3"),
        ]
        model, train = resolve_configs("micro", settings)
        assert (model.num_layers, model.hidden_size, model.num_heads) == (3, 128, 4)  # the preset's heads stay
        assert model.ffn_hidden_size == 384  # derived from the new hidden size, not the preset's 192
        assert (train.lr, train.seed, train.batch_size, train.max_steps) == (3e-3, 8, 8, train_preset("micro").max_steps)
    assert (
        model_preset("chatglm-6b").ffn_hidden_size == resolve_configs("chatglm-6b", [])[0].ffn_hidden_size
    )  # explicit widths stay


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lrr=1"], "--set train.lrr: unknown key; did you mean train.lr?"),
        (["--set", "model.num_layers=four"], "--set model.num_layers must be an integer, got 'four'"),
        (["--set", "model.num_layers=2.5"], "--set model.num_layers must be an integer, got '2.5'"),
        (["--set", "train.lr=-1"], "--set train.lr must be > 0.0, got -1.0"),
        (["--set", "train.compile=maybe"], "--set train.compile must be true or false, got 'maybe'"),
        (["--set", "train.lr"], "--set train.lr: expected KEY=VALUE, e.g. --set model.num_layers=4 or --set train.lr=3e-4"),
        (["--set", "optim.lr=1"], "--set optim.lr: unknown key; keys are model.FIELD or train.FIELD"),
        (["--set", "model.objective=gpt"], "--set model.objective must be one of ('glm', 'causal'), got 'gpt'"),
        (["--lr", "-1"], "--lr must be > 0.0, got -1.0"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("--preset", "micro", "--out", str(tmp_path / "run"), *args)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "{path}: config file not found"),
        ("bad.yaml", "model: [1, 2\n", "{path}: not valid YAML"),
        ("bad.json", "{", "{path}: not valid JSON"),
        ("list.yaml", "- 1\n", "{path}: expected a mapping with sections model and train"),
        ("section.yaml", "optim:\n  lr: 1\n", "{path}: unknown section 'optim'; a config file has sections model and train"),
        ("key.yaml", "train:\n  lrr: 1\n", "{path}: train.lrr: unknown key; did you mean train.lr?"),
        ("value.yaml", "train:\n  seed: [1]\n", "{path}: train.seed must be an integer, got [1]"),
        ("range.json", '{"train": {"max_steps": 0}}', "{path}: train.max_steps must be a positive integer, got 0"),
    ],
)
def test_bad_config_files_give_one_line_naming_the_file(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = run("--preset", "micro", "--out", str(tmp_path / "run"), "--config", str(path))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.stderr
    assert result.stderr.startswith("error: " + message.format(path=path)) and result.stderr.count("\n") == 1, result.stderr


def test_cli_options_have_no_defaults_of_their_own() -> None:
    """Each config option defaults to "not given" and names a real field, so the dataclasses (and
    presets) alone decide defaults: `compile` is False in TrainConfig, on in the `tiny` preset."""
    parameters = inspect.signature(cli.train).parameters
    fields = {
        "model": {f.name for f in dataclasses.fields(GLMConfig)},
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
    }
    for name, (key, option) in cli.TRAIN_OPTIONS.items():
        section, field = key.split(".")
        assert field in fields[section], key
        assert parameters[name].default is None, f"{option} has a default of its own"
    assert TrainConfig().compile is False and train_preset("tiny").compile is True and train_preset("micro").compile is False


def test_a_custom_model_size_trains_from_the_command_line(tmp_path: Path, cache_env: str) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  hidden_size: 32\n  num_heads: 2\n  num_layers: 3\n  max_seq_len: 48\ntrain:\n  max_steps: 2\n")
    out = tmp_path / "run"
    args = ["--preset", "micro", "--config", str(config), "--out", str(out), "--precision", "fp32", "--val-fraction", "0"]
    result = run(*args, "--set", "model.ffn_hidden_size=96", "--set", "train.batch_size=2", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "checkpoint-0000002" / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_heads"], saved["num_layers"], saved["ffn_hidden_size"], saved["max_seq_len"]) == (
        32,
        2,
        3,
        96,
        48,
    )
    state = json.loads((out / "checkpoint-0000002" / "trainer_state.json").read_text())
    assert state["train_config"]["batch_size"] == 2 and (state["train_config"]["tp"], state["train_config"]["pp"]) == (1, 1)
    assert [r["batch_size"] for r in read_metrics(out / "metrics.jsonl", "train")] == [2, 2]


# ------------------------------------------------------------------------- pipeline defaults
@pytest.mark.parametrize(
    ("batch", "pp", "dp", "expected"),
    [(4, 1, 1, 4), (32, 1, 1, 16), (8, 1, 2, 4), (4, 2, 1, 2), (16, 4, 1, 4), (6, 4, 1, 1), (64, 2, 2, 16), (12, 3, 2, 2)],
)
def test_pipeline_runs_pick_enough_micro_batches(batch: int, pp: int, dp: int, expected: int) -> None:
    config = TrainConfig(batch_size=batch, pp=pp, dp=dp)
    micro = micro_batch_size(config)
    assert micro == expected
    per_rank = batch // dp
    assert per_rank % micro == 0 or pp == 1
    assert per_rank // micro >= pp


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"batch_size": 1, "pp": 2},
            "--batch-size 1 gives each of the 1 data-parallel ranks 1 sequences per step, fewer than the 2 "
            "pipeline stages: raise --batch-size to at least 2 or lower --pp",
        ),
        (
            {"batch_size": 4, "micro_batch_size": 4, "pp": 2},
            "--micro-batch-size 4 gives 1 micro-batches of a step of 4 sequences per "
            "data-parallel rank, fewer than the 2 pipeline stages the 1f1b schedule needs",
        ),
        (
            {"batch_size": 4, "micro_batch_size": 1, "pp": 2, "eval_batches": 1},
            "held-out evaluation gives each data-parallel rank 1 sequences, fewer than "
            "the 2 pipeline stages: set train.eval_batches to at least 2",
        ),
    ],
)
def test_impossible_pipeline_layouts_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_training(model_preset("micro"), TrainConfig(**overrides), world_size=overrides["pp"])
    if overrides.get("micro_batch_size") == 4:  # GPipe runs fewer micro-batches than stages
        assert check_training(model_preset("micro"), TrainConfig(**{**overrides, "schedule": "gpipe"}), world_size=2) == 4


def test_impossible_layout_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    args = ["--preset", "micro", "--out", str(tmp_path / "run"), "--pp", "2", "--batch-size", "1"]
    message = ("--batch-size 1 gives each of the 1 data-parallel ranks 1 sequences per step, fewer than the 2 pipeline stages: "
               "raise --batch-size to at least 2 or lower --pp")  # fmt: skip
    assert_one_line_error(run(*args, "--nproc", "2"), message)
    # Launched by torchrun: rank 0 says it once, the others exit quietly, before any process group or model.
    assert_one_line_error(run(*args, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}), message)
    other = run(*args, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert other.exit_code == 2 and other.stderr == ""
    assert not (tmp_path / "run").exists()


def test_pipeline_run_without_micro_batch_size_trains(tmp_path: Path, cache_env: str) -> None:
    """The micro preset's 4 sequences per step over 2 stages: 2 micro-batches of 2 (before: 1 of 4,
    which torch's 1F1B refused)."""
    out = tmp_path / "run"
    args = [
        "--preset",
        "micro",
        "--seq-len",
        "64",
        "--precision",
        "fp32",
        "--no-compile",
        "--max-steps",
        "2",
        "--eval-every",
        "1000",
    ]
    result = run(*args, "--threads", "1", "--pp", "2", "--nproc", "2", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    state = json.loads((out / "dist-checkpoint-0000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["train_config"]["pp"] == 2 and state["train_config"]["micro_batch_size"] is None
