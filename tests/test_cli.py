"""End-to-end: the `openglm` command as a user runs it (micro preset, bundled corpus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.model import GLM
from openglm.tokenizer import GLMTokenizer
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


# -- openglm generate: modes, options and errors, in process on a saved random micro model -----------


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for in-process micro models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openglm.config import model_preset
    from openglm.io.checkpoint import save_checkpoint
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

    torch.manual_seed(0)
    tokenizer = GLMTokenizer.default()
    config = model_preset("micro", vocab_size=tokenizer.vocab_size, max_seq_len=32)
    return save_checkpoint(tmp_path_factory.mktemp("cli-model"), 1, config, GLM(config).state_dict(), tokenizer, {})


def invoke(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, ["generate", *args], input=stdin)


def assert_clean_error(result: Result, code: int, message: str) -> None:
    """One `error:` line on stderr, the expected exit status, no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_prompt_stream_and_strategy_options(checkpoint: Path) -> None:
    model, tokenizer = openglm.load(checkpoint)
    prompt = "Emma was [MASK] happy."
    result = invoke("--model", str(checkpoint), "--max-new-tokens", "5", prompt)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == openglm.generate(model, tokenizer, prompt, max_new_tokens=5, temperature=0) + "\n"
    streamed = invoke("--model", str(checkpoint), "--max-new-tokens", "5", "--stream", prompt)
    assert streamed.exit_code == 0 and streamed.stdout == result.stdout
    try:  # two threads: PyTorch's op-by-op step instead of the native one-row kernel, the same text
        threaded = invoke("--model", str(checkpoint), "--max-new-tokens", "5", "--threads", "2", prompt)
        assert threaded.exit_code == 0 and threaded.stdout == result.stdout and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    options = ["--num-beams", "2", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2", "--min-new-tokens", "2", "--stop", "X", "--stop", "的"]
    beam = invoke("--model", str(checkpoint), "--max-new-tokens", "6", *options, "曹操[gMASK]")
    expected = openglm.generate(
        model, tokenizer, "曹操[gMASK]", max_new_tokens=6, num_beams=2, length_penalty=0.5, no_repeat_ngram_size=2,
        min_new_tokens=2, stop_strings=("X", "的"), temperature=0,
    )
    assert beam.exit_code == 0 and beam.stdout == expected + "\n"
    sampled = invoke("--model", str(checkpoint), "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "4", "Hi")
    assert sampled.stdout == openglm.generate(model, tokenizer, "Hi", temperature=0.8, top_k=50, top_p=0.9, seed=4, max_new_tokens=8) + "\n"


def test_generate_interactive_reads_stdin_until_eof(checkpoint: Path) -> None:
    model, tokenizer = openglm.load(checkpoint)
    too_long = "a " * 40
    result = invoke("--model", str(checkpoint), "--max-new-tokens", "4", stdin=f"A [MASK] b\n\n{too_long}\n曹操[gMASK]\n")
    expected = [openglm.generate(model, tokenizer, p, max_new_tokens=4, temperature=0) for p in ("A [MASK] b", "曹操[gMASK]")]
    assert result.stdout.splitlines() == expected  # the blank line skipped, the bad one reported
    assert_clean_error(result, 1, "error: line 3: the prompt is 41 tokens")
    streamed = invoke("--model", str(checkpoint), "--max-new-tokens", "4", "--stream", stdin="A [MASK] b\n曹操[gMASK]")
    assert streamed.exit_code == 0 and streamed.stdout.splitlines() == expected


def test_generate_file_mode_writes_jsonl_in_input_order(checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = openglm.load(checkpoint)
    prompts = ["Hello [MASK] there", "", "曹操[gMASK]", "a " * 40, "last", "x [MASK] y [MASK] z"]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    options = ["--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3"]
    result = invoke("--model", str(checkpoint), *options, "--input-file", str(source), "--output-file", str(out), "--batch-size", "2")
    assert result.exit_code == 1, result.stderr  # two lines could not be completed
    assert "6 prompts: 4 completed, 2 failed" in result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["prompt"] for r in records] == prompts
    assert records[1]["error"] == "the prompt is empty" and "longer than the model's context of 32" in records[3]["error"]
    valid = [prompts[i] for i in (0, 2, 4, 5)]
    expected = openglm.generate(model, tokenizer, valid, max_new_tokens=4, temperature=0.8, seed=3)
    assert [records[i]["text"] for i in (0, 2, 4, 5)] == expected
    to_stdout = invoke("--model", str(checkpoint), *options, "--input-file", str(source))
    assert [json.loads(line) for line in to_stdout.stdout.splitlines()] == records


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "2", "hi"], "error: --top-p must be in (0, 1]"),
        (["--num-beams", "0", "hi"], "error: --num-beams must be an integer >= 1"),
        (["--num-beams", "2", "--temperature", "0.5", "hi"], "error: --temperature is a sampling option, but --num-beams=2"),
        (["--min-new-tokens", "9", "--max-new-tokens", "4", "hi"], "error: --min-new-tokens (9) must not exceed"),
        (["--stop", "", "hi"], "error: --stop must be"),
        ([""], "error: the prompt is empty"),
        (["   "], "error: the prompt is empty"),
        (["a " * 40], "error: the prompt is 41 tokens (43 with <sop> and the appended [gMASK]), longer than the model's context of 32"),
        (["--input-file", "x.txt", "hi"], "error: give a PROMPT or --input-file, not both"),
        (["--output-file", "x.jsonl", "hi"], "error: --output-file needs --input-file"),
        (["--input-file", "x.txt", "--stream"], "error: --stream prints one prompt's text"),
        (["--input-file", "does-not-exist.txt"], "does-not-exist.txt: cannot be read"),
        (["--threads", "0", "hi"], "error: --threads must be at least 1"),
    ],
)
def test_generate_bad_input_gives_one_line_errors(checkpoint: Path, args: list[str], message: str) -> None:
    result = invoke("--model", str(checkpoint), *args)
    assert_clean_error(result, 2, message)
    assert result.stdout == ""


def test_generate_error_from_a_real_process_has_no_traceback(checkpoint: Path, shard_cache: str) -> None:
    result = run_cli("generate", "--model", str(checkpoint), "a " * 40, env_cache=shard_cache)
    assert result.returncode == 2 and "error: the prompt is 41 tokens" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# -- openglm quantize, and openglm generate --quantize ---------------------------------------------


def quantized_generation_model(path: Path) -> tuple[GLM, GLMTokenizer]:
    """A quantized checkpoint as `openglm generate` runs it: bf16 where the CPU has native bf16."""
    from openglm.cli import default_precision

    return openglm.load(path, torch.bfloat16 if default_precision() == "bf16" else torch.float32)


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32)])
def test_quantize_writes_a_checkpoint_that_generate_runs(checkpoint: Path, tmp_path: Path, bits: int, group_size: int | None) -> None:
    out = tmp_path / f"int{bits}"
    grouping = ["--group-size", str(group_size)] if group_size else []
    result = CliRunner().invoke(app, ["quantize", "--model", str(checkpoint), "--bits", str(bits), *grouping, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: INT{bits}")
    record = json.loads((out / "quantization.json").read_text())
    assert (record["bits"], record["group_size"]) == (bits, group_size)

    prompt = "Emma was [MASK] happy."
    from_checkpoint = invoke("--model", str(out), "--max-new-tokens", "5", prompt)
    model, tokenizer = quantized_generation_model(out)
    assert from_checkpoint.exit_code == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout == openglm.generate(model, tokenizer, prompt, max_new_tokens=5, temperature=0) + "\n"
    # Quantizing on load computes exactly what the quantized checkpoint computes.
    on_load = invoke("--model", str(checkpoint), "--quantize", str(bits), *grouping, "--max-new-tokens", "5", prompt)
    assert on_load.exit_code == 0, on_load.stderr
    assert on_load.stdout == from_checkpoint.stdout


def test_quantize_never_overwrites(checkpoint: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me too")
    for out in (taken, a_file):
        result = CliRunner().invoke(app, ["quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(out)])
        assert_clean_error(result, 2, f"{out}: exists and is not an empty directory; refusing to overwrite it")
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"] and (taken / "notes.txt").read_text() == "keep me"
    assert a_file.read_text() == "keep me too"
    empty = tmp_path / "empty"
    empty.mkdir()
    done = CliRunner().invoke(app, ["quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(empty)])
    assert done.exit_code == 0, done.stderr
    again = CliRunner().invoke(app, ["quantize", "--model", str(empty), "--bits", "4", "--out", str(tmp_path / "twice")])
    assert_clean_error(again, 2, "already quantized")
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "3"], "error: --bits must be 8 or 4, got 3"),
        (["--bits", "4", "--group-size", "48"], "group_size 48 must be a positive divisor of in_features (64); group sizes dividing every layer divide 64"),
        (["--bits", "4", "--group-size", "0"], "error: --group-size must be a positive integer, got 0"),
    ],
)
def test_quantize_bad_options_give_one_line_errors(checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", "--model", str(checkpoint), *args, "--out", str(out)])
    assert_clean_error(result, 2, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_quantize_missing_model_gives_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "absent"), "--bits", "8", "--out", str(tmp_path / "q")])
    assert_clean_error(result, 2, "absent: no such checkpoint or run directory")
    assert not (tmp_path / "q").exists()


def test_generate_quantize_bad_options_give_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    assert_clean_error(invoke("--model", str(checkpoint), "--quantize", "3", "hi"), 2, "error: --quantize must be 8 or 4, got 3")
    assert_clean_error(invoke("--model", str(checkpoint), "--group-size", "32", "hi"), 2, "error: --group-size needs --quantize")
    assert_clean_error(invoke("--model", str(checkpoint), "--quantize", "4", "--group-size", "48", "hi"), 2, "group_size 48 must be a positive divisor")
    assert_clean_error(invoke("--model", str(tmp_path / "absent"), "--quantize", "4", "hi"), 2, "no such checkpoint")
    quantized = tmp_path / "q8"
    assert CliRunner().invoke(app, ["quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(quantized)]).exit_code == 0
    assert_clean_error(invoke("--model", str(quantized), "--quantize", "4", "hi"), 2, "already quantized; drop --quantize")


def test_quantize_from_a_real_process_exits_cleanly(checkpoint: Path, tmp_path: Path, shard_cache: str) -> None:
    result = run_cli("quantize", "--model", str(checkpoint), "--bits", "5", "--out", str(tmp_path / "q"), env_cache=shard_cache)
    assert result.returncode == 2 and "error: --bits must be 8 or 4, got 5" in result.stderr and "Traceback" not in result.stderr
