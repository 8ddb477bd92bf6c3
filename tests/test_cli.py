"""End-to-end: the `openglm` command as a user runs it (micro preset, bundled corpus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openglm
from openglm.train.metrics import read_metrics


def run_cli(*args: str, env_cache: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENGLM_CACHE=env_cache)
    return subprocess.run([sys.executable, "-m", "openglm", *args], capture_output=True, text=True, env=env, timeout=300)


def test_train_resume_generate_info(tmp_path, shard_cache):
    out = tmp_path / "run"
    first = run_cli("train", "--preset", "micro", "--max-steps", "5", "--out", str(out), "--no-compile", "--precision", "fp32", env_cache=shard_cache)
    assert first.returncode == 0, first.stderr
    assert "done: step 5" in first.stdout
    assert "held-out bits per byte" in first.stderr and "train:" in first.stderr  # log + progress bar
    assert (out / "latest").read_text().strip() == "checkpoint-0000005"

    resumed = run_cli("train", "--preset", "micro", "--max-steps", "8", "--out", str(out), "--no-compile", "--precision", "fp32", "--resume", env_cache=shard_cache)
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7]

    generated = run_cli("generate", "--model", str(out), "--max-new-tokens", "5", "Emma was [MASK] happy.", env_cache=shard_cache)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Emma was ") and generated.stdout.rstrip().endswith("happy.")
    assert "[MASK]" not in generated.stdout

    model, tokenizer = openglm.load(out)
    text = openglm.generate(model, tokenizer, "三国 [gMASK]", max_new_tokens=4, temperature=0.8, top_p=0.9, seed=3)
    assert text.startswith("三国")
    assert json.loads((out / "checkpoint-0000008" / "config.json").read_text())["hidden_size"] == 64

    info = run_cli("info", "--preset", "glm-130b", env_cache=shard_cache)
    assert info.returncode == 0 and "128,697,794,560" in info.stdout


def test_bad_input_gives_clear_errors(tmp_path, shard_cache):
    missing = run_cli("train", "--preset", "micro", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "r"), env_cache=shard_cache)
    assert missing.returncode == 2 and "nothing.txt" in missing.stderr
    preset = run_cli("train", "--preset", "huge", "--out", str(tmp_path / "r"), env_cache=shard_cache)
    assert preset.returncode == 2 and "unknown preset 'huge'" in preset.stderr
    no_model = run_cli("generate", "--model", str(tmp_path / "absent"), "hello", env_cache=shard_cache)
    assert no_model.returncode == 2 and "no such checkpoint" in no_model.stderr
