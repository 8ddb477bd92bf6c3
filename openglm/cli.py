"""The `openglm` command: one thin sub-command per module, no logic of its own."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from openglm.config import MODEL_PRESETS, ConfigError, in_user_terms, model_preset
from openglm.console import fail
from openglm.data.cli import data_app

if TYPE_CHECKING:
    from openglm.generation import GenerationConfig
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pre-train, run and inspect GLM language models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train or inspect tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")

log = logging.getLogger("openglm")

NO_VERIFY_HELP = (
    "do not check each checkpoint file against the sha256 recorded at save time (hashing reads every file once more, "
    "about 1 s per GB on one core): for checkpoints too large to hash at every start"
)
EMBEDDING_BITS_HELP = (
    "with {blocks}: also quantize the word embedding and the output layer (tied: the same table; untied: both) "
    "to 8 or 4 bits, one scale per vocabulary row (default: they stay 16/32-bit)"
)


def default_precision() -> str:
    """bf16 where the CPU has native bf16 matmuls (AMX or AVX512-BF16) or on a GPU, else fp32."""
    from openglm.kernels import native_bf16

    return "bf16" if native_bf16() else "fp32"


# The `train` options that set a config field: option parameter -> (key, option as typed). Each
# defaults to None, "not given", so the preset, --config and the dataclass defaults decide.
TRAIN_OPTIONS = {
    name: (f"{'model' if name == 'objective' else 'train'}.{name}", "--" + name.replace("_", "-"))
    for name in ("objective", "precision", "seed", "max_steps", "batch_size", "micro_batch_size", "lr", "mip_data", "mip_share",
                 "egs_alpha", "eval_every", "val_fraction", "save_every", "data", "tokenizer", "max_bad_steps", "compile", "tp", "pp",
                 "dp", "dp_mode", "activation_checkpointing", "schedule", "virtual_stages")
} | {"seq_len": ("model.max_seq_len", "--seq-len"), "threads": ("train.num_threads", "--threads"), "out": ("train.out_dir", "--out")}


@app.command(context_settings={"allow_extra_args": True})
def train(
    ctx: typer.Context,
    preset: Annotated[str, typer.Option(help=f"model preset: {', '.join(MODEL_PRESETS)}")] = "tiny",
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML or JSON file with `model:` and `train:` sections of config fields")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE for any config field, e.g. model.num_layers=4 or train.lr=3e-4 (repeatable; "
                     "wins over --config and the options)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<preset>)")] = None,
    data: Annotated[list[Path] | None, typer.Option(help=".txt/.jsonl (plain, .gz, .zst), .parquet files or folders (default: the bundled corpus)")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="a tokenizer.json from `openglm tokenizer train` (default: the bundled one)")] = None,
    objective: Annotated[str | None, typer.Option(help="glm (blank infilling) or causal (GPT baseline)")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (default: bf16 where the hardware has it)")] = None,
    seed: int | None = None,
    max_steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per optimiser step")] = None,
    micro_batch_size: Annotated[
        int | None, typer.Option(help="sequences per forward/backward (default: up to 16; with --pp, enough micro-batches for every stage)")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    seq_len: Annotated[int | None, typer.Option(help="sequence length (default: the preset's)")] = None,
    mip_data: Annotated[Path | None, typer.Option(help='jsonl of {"prompt", "response"} for multi-task instruction pre-training')] = None,
    mip_share: float | None = None,
    egs_alpha: Annotated[float | None, typer.Option(help="Embedding Gradient Shrink factor (1 = off)")] = None,
    eval_every: int | None = None,
    val_fraction: Annotated[float | None, typer.Option(help="share of documents held out for evaluation (0: no held-out evaluation)")] = None,
    save_every: int | None = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (default: the preset's)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue the run in --out from its newest complete checkpoint (an error if it has none); "
            "`--resume auto`: continue it if there is one, else start (for requeued jobs)",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over in an --out that holds a run, removing its checkpoints and metrics")] = False,
    max_bad_steps: Annotated[int | None, typer.Option(help="stop as diverged after this many consecutive skipped or non-finite steps")] = None,
    tp: Annotated[int | None, typer.Option(help="tensor-parallel size (divides the heads)")] = None,
    pp: Annotated[int | None, typer.Option(help="pipeline stages (at most the layers)")] = None,
    dp: Annotated[int | None, typer.Option(help="data-parallel size")] = None,
    dp_mode: Annotated[str | None, typer.Option(help="fsdp (ZeRO-3 sharding) | replicate (DDP)")] = None,
    activation_checkpointing: Annotated[
        bool | None, typer.Option("--activation-checkpointing/--no-activation-checkpointing", help="recompute block activations in backward (less memory, one more forward)")
    ] = None,
    schedule: Annotated[str | None, typer.Option(help="pipeline schedule: 1f1b | gpipe | interleaved-1f1b")] = None,
    virtual_stages: Annotated[int | None, typer.Option(help="with --schedule interleaved-1f1b: pipeline stages per rank")] = None,
    nproc: Annotated[int | None, typer.Option(help="start tp*pp*dp local processes (else: run under torchrun)")] = None,
) -> None:
    """Pre-train a GLM on the bundled bilingual corpus (or your own text) with blank infilling.

    Settings apply in order: the preset, then --config, then the options, then --set.

    SIGTERM, SIGUSR1 and Ctrl-C save a checkpoint at the end of the current step and exit with 128 + the signal number.
    """
    from openglm.config import Setting, parse_set, read_config_file, resolve_configs
    from openglm.io.checkpoint import CheckpointError
    from openglm.train.launch import train as run_training
    from openglm.train.rundir import TrainingStopped, process_rank

    if ctx.args and not (resume and ctx.args == ["auto"]):
        raise fail(f"unexpected argument {ctx.args[0]!r} (`--resume auto` is the only option that takes a word)")
    resume_mode: bool | str = "auto" if ctx.args else resume
    rank = process_rank()
    if rank != 0:
        log.setLevel(logging.WARNING)  # under torchrun only rank 0 reports progress
    given = {name: value for name, value in locals().items() if name in TRAIN_OPTIONS and value is not None}
    try:
        settings = [Setting("train.precision", default_precision(), "--precision")]
        settings += read_config_file(config_file) if config_file is not None else []
        for name, value in given.items():
            key, option = TRAIN_OPTIONS[name]
            settings.append(Setting(key, [str(p) for p in value] if name == "data" else value, option))
        settings += [parse_set(text) for text in set_ or ()]
        model_config, config = resolve_configs(preset, settings)
        summary = run_training(model_config, config, resume_mode, overwrite, nproc)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        if rank != 0:  # under torchrun rank 0 says it once
            raise typer.Exit(code=2) from None
        raise fail(in_user_terms(str(err), {key.split(".")[1]: option for key, option in TRAIN_OPTIONS.values()})) from None
    except TrainingStopped as err:
        if rank == 0:
            typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=err.exit_code) from None
    if summary is None:  # another torchrun rank, or --nproc: the spawned ranks logged their progress
        if nproc is not None:
            typer.echo(f"done: run in {config.out_dir}")
        return
    if summary.get("complete"):
        typer.echo(f"the run in {config.out_dir} is complete at step {summary['step']}; nothing to do (raise --max-steps to train further)")
        return
    heldout = "held-out evaluation off" if config.val_fraction == 0 else f"held-out loss {summary.get('val_loss', float('nan')):.4f}"
    typer.echo(f"done: step {summary['step']}, {heldout}, run in {config.out_dir}")


def _option_error(err: Exception) -> str:
    """A GenerationConfig message in the CLI's words: "GenerationConfig.top_p" -> "--top-p"."""
    import dataclasses

    from openglm.generation import GenerationConfig

    options = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(GenerationConfig)} | {"stop_strings": "--stop"}
    return in_user_terms(str(err), options)


@app.command()
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(help='text with blanks, e.g. "Emma was \\[MASK] happy." or "It is a truth \\[gMASK]"; none: read prompts from stdin, one per line'),
    ] = None,
    model: Annotated[Path, typer.Option(help="checkpoint or run directory")] = Path("runs/tiny"),
    max_new_tokens: Annotated[int, typer.Option(help="tokens per blank at most")] = 64,
    min_new_tokens: Annotated[int, typer.Option(help="no <eop>/<eos> or stop string before this many tokens")] = 0,
    temperature: Annotated[
        float | None, typer.Option(help="sampling temperature (0: greedy); default: greedy, or 1 with --top-k/--top-p/--seed")
    ] = None,
    top_k: Annotated[int, typer.Option(help="sample among the k most likely tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(help="sample within this probability mass (1: all)")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (the i-th valid prompt of a file, from 0, uses seed + i)")] = None,
    num_beams: Annotated[int, typer.Option(help="beam search with this many beams (1: greedy or sampling)")] = 1,
    length_penalty: Annotated[float, typer.Option(help="beam score = sum log p / length^this (> 0 favours longer text)")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="never repeat an n-gram of this size in a filling (0: off)")] = 0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable): the text ends before it")] = None,
    input_file: Annotated[Path | None, typer.Option(help="prompts, one per line (UTF-8)")] = None,
    output_file: Annotated[Path | None, typer.Option(help="with --input-file: where the JSON lines go (default: stdout)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts of --input-file decoded together")] = 8,
    stream: Annotated[bool, typer.Option("--stream", help="print the text as it is generated")] = False,
    quantize_bits: Annotated[
        int | None, typer.Option("--quantize", help="quantize the block linears to 8 or 4 bits on load (a float checkpoint)")
    ] = None,
    group_size: Annotated[int | None, typer.Option(help="with --quantize: one scale per this many inputs (default: per channel)")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help=EMBEDDING_BITS_HELP.format(blocks="--quantize"))] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads; with 1, one prompt at a time decodes through the native kernel")
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help=NO_VERIFY_HELP)] = False,
) -> None:
    """Fill the blanks of PROMPT (a prompt without one is continued via \\[gMASK]).

    Without PROMPT, prompts are read from stdin one per line until EOF (blank lines are skipped) and each result is printed as soon as it is done.

    With --input-file, results are written as JSON lines in input order as they complete, one per input line: {"line", "prompt", "text"}, or {"line", "prompt", "error"} for a prompt that cannot be completed (an empty line, one longer than the model's context).

    A prompt that fails in those two modes makes the exit status 1 at the end.

    A quantized model (a checkpoint from `openglm quantize`, or --quantize) runs in bf16 where the CPU has native bf16, else fp32; a float one in fp32.
    """
    from openglm.generation import GenerationConfig

    try:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            num_beams=num_beams,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            stop_strings=tuple(stop or ()),
            batch_size=batch_size,
        )
    except ConfigError as err:
        raise fail(_option_error(err)) from None
    if prompt is not None and input_file is not None:
        raise fail("give a PROMPT or --input-file, not both")
    if threads is not None:
        if threads < 1:
            raise fail("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    if output_file is not None and input_file is None:
        raise fail("--output-file needs --input-file")
    if stream and input_file is not None:
        raise fail("--stream prints one prompt's text as it is made; --input-file writes whole results")
    if prompt is not None and not prompt.strip():
        raise fail('the prompt is empty; give text to continue or to fill, e.g. "It is a truth [MASK]."')
    glm, tokenizer = _load_for_generation(model, quantize_bits, group_size, verify=not no_verify, embedding_bits=embedding_bits)
    if prompt is not None:
        try:
            _print_result(glm, tokenizer, prompt, config, stream)
        except ValueError as err:
            raise fail(str(err)) from None
    elif input_file is not None:
        _generate_file(glm, tokenizer, input_file, output_file, config)
    else:
        _generate_interactive(glm, tokenizer, config, stream)


def _check_bits(bits: int, option: str, group_size: int | None) -> None:
    """Option errors found before a model is loaded (whether a group size divides every layer is
    known only after)."""
    from openglm.quant import SUPPORTED_BITS

    if bits not in SUPPORTED_BITS:
        raise fail(f"{option} must be {' or '.join(map(str, sorted(SUPPORTED_BITS, reverse=True)))}, got {bits}")
    if group_size is not None and group_size <= 0:
        raise fail(f"--group-size must be a positive integer, got {group_size}")


def _check_embedding_bits(embedding_bits: int | None, bits: int | None, blocks: str) -> None:
    """--embedding-bits is 8 or 4 and comes with the blocks quantized (`blocks`: that option)."""
    if embedding_bits is None:
        return
    _check_bits(embedding_bits, "--embedding-bits", None)
    if bits is None:
        raise fail(f"--embedding-bits needs {blocks}")


def _load_for_generation(
    path: Path, bits: int | None, group_size: int | None, verify: bool, embedding_bits: int | None = None
) -> tuple[GLM, GLMTokenizer]:
    """The model and tokenizer `generate` and `serve` run: --quantize options checked, then `openglm.load` (hashes checked
    unless `verify` is False, dtype "auto": its one policy), quantized as it streams in when `bits` is given; errors exit with a message."""
    from openglm.io.api import load
    from openglm.io.checkpoint import QUANT_FILE, CheckpointError, resolve_checkpoint

    if bits is not None:
        _check_bits(bits, "--quantize", group_size)
    elif group_size is not None:
        raise fail("--group-size needs --quantize")
    _check_embedding_bits(embedding_bits, bits, "--quantize")
    try:
        if bits is not None and (resolve_checkpoint(path) / QUANT_FILE).is_file():
            raise fail(f"{path}: already quantized; drop --quantize")
        return load(path, "auto", bits, group_size, embedding_bits=embedding_bits, verify=verify)
    except (CheckpointError, ValueError) as err:
        raise fail(str(err)) from None


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="checkpoint or run directory")] = Path("runs/tiny"),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    quantize_bits: Annotated[int | None, typer.Option("--quantize", help="quantize the block linears to 8 or 4 bits on load")] = None,
    group_size: Annotated[int | None, typer.Option(help="with --quantize: one scale per this many inputs")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help=EMBEDDING_BITS_HELP.format(blocks="--quantize"))] = None,
    model_name: Annotated[str | None, typer.Option(help="the model's name in the API (default: the directory name)")] = None,
    max_batch: Annotated[int, typer.Option(help="rows decoded together (1: no batching)")] = 64,
    max_queue: Annotated[int, typer.Option(help="requests that may wait before 429")] = 256,
    timeout: Annotated[float, typer.Option(help="seconds per request before 504")] = 60.0,
    no_verify: Annotated[bool, typer.Option("--no-verify", help=NO_VERIFY_HELP)] = False,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body accepted; larger ones get 413")] = 4 * 2**20,
) -> None:
    """Serve the model over HTTP: OpenAI-compatible /v1/completions, /v1/infill, a playground at /, /metrics."""
    from openglm.serve import create_app
    from openglm.serve import serve as run_server

    if max_batch < 1 or max_queue < 1 or max_body_bytes < 1 or timeout <= 0:
        raise fail("--max-batch, --max-queue and --max-body-bytes must be >= 1 and --timeout > 0")
    glm, tokenizer = _load_for_generation(model, quantize_bits, group_size, verify=not no_verify, embedding_bits=embedding_bits)
    name = model_name or model.resolve().name
    app = create_app(glm, tokenizer, model_name=name, max_batch=max_batch, max_queue=max_queue, timeout=timeout, max_body_bytes=max_body_bytes)
    run_server(app, host, port)


def _print_result(model: GLM, tokenizer: GLMTokenizer, prompt: str, config: GenerationConfig, stream: bool) -> None:
    from openglm.generation import generate
    from openglm.generation import stream as stream_pieces

    if not stream:
        typer.echo(generate(model, tokenizer, prompt, config))
        return
    for piece in stream_pieces(model, tokenizer, prompt, config):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _generate_interactive(model: GLM, tokenizer: GLMTokenizer, config: GenerationConfig, stream: bool) -> None:
    interactive = sys.stdin.isatty()
    failed, number = 0, 0
    while True:
        if interactive:
            typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        number += 1
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            _print_result(model, tokenizer, text, config, stream)
        except ValueError as err:
            typer.secho(f"error: line {number}: {err}", fg=typer.colors.RED, err=True)
            failed += 1
    if failed:
        raise typer.Exit(code=1)


def _generate_file(model: GLM, tokenizer: GLMTokenizer, input_file: Path, output_file: Path | None, config: GenerationConfig) -> None:
    """Results in input order as soon as they (and all before them) are done, flushed each time,
    so an interrupted run keeps everything finished so far."""
    from openglm.generation import check_prompt, stream

    try:
        lines = input_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"{input_file}: cannot be read ({err})") from None
    records: dict[int, dict[str, Any]] = {}
    valid: list[int] = []  # line indices of the prompts to generate
    for index, text in enumerate(lines):
        try:
            if not text.strip():
                raise ValueError("the prompt is empty")
            check_prompt(model, tokenizer, text)
            valid.append(index)
        except ValueError as err:
            records[index] = {"line": index + 1, "prompt": text, "error": str(err)}
    try:
        out = output_file.open("w", encoding="utf-8") if output_file is not None else sys.stdout
    except OSError as err:
        raise fail(f"{output_file}: cannot be written ({err})") from None
    written = 0

    def flush() -> None:
        nonlocal written
        while written < len(lines) and written in records:
            out.write(json.dumps(records.pop(written), ensure_ascii=False) + "\n")
            written += 1
        out.flush()

    try:
        flush()
        texts: dict[int, list[str]] = {}
        for piece in stream(model, tokenizer, [lines[i] for i in valid], config):
            texts.setdefault(piece.index, []).append(piece.text)
            if piece.done:
                index = valid[piece.index]
                records[index] = {"line": index + 1, "prompt": lines[index], "text": "".join(texts.pop(piece.index))}
                flush()
    finally:
        if out is not sys.stdout:
            out.close()
    failed = len(lines) - len(valid)
    where = f" to {output_file}" if output_file is not None else ""
    typer.echo(f"{len(lines)} prompts: {len(valid)} completed, {failed} failed; results written{where}", err=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def quantize(
    model: Annotated[Path, typer.Option(help="float checkpoint or run directory")],
    bits: Annotated[int, typer.Option(help="8 or 4")],
    out: Annotated[Path, typer.Option(help="new checkpoint directory (must not exist, or be empty)")],
    group_size: Annotated[int | None, typer.Option(help="one scale per this many inputs (default: per output channel)")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help=EMBEDDING_BITS_HELP.format(blocks="--bits"))] = None,
) -> None:
    """Quantize a checkpoint's block linears to INT8/INT4 (weight-only, GLM-130B style; with --embedding-bits
    the embedding and output layer too) into a new checkpoint directory that `openglm generate --model OUT` runs.

    The source's files are always checked against the sha256 recorded at save time (there is no --no-verify here): the new checkpoint records fresh hashes, so damage must be caught first."""
    from openglm.io.api import quantize_checkpoint
    from openglm.io.checkpoint import WEIGHTS_FILE, CheckpointError, resolve_checkpoint

    _check_bits(bits, "--bits", group_size)
    _check_embedding_bits(embedding_bits, bits, "--bits")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise fail(f"{out}: exists and is not an empty directory; refusing to overwrite it (choose a new --out)")
    try:
        source = resolve_checkpoint(model)
        path = quantize_checkpoint(source, out, bits, group_size, embedding_bits)
    except (CheckpointError, ValueError) as err:
        raise fail(str(err)) from None
    before, after = (source / WEIGHTS_FILE).stat().st_size, (path / WEIGHTS_FILE).stat().st_size
    layout = f"groups of {group_size}" if group_size else "per channel"
    layout += f"; embedding and output layer INT{embedding_bits}" if embedding_bits else ""
    typer.echo(f"wrote {path}: INT{bits} ({layout}), {WEIGHTS_FILE} {after / 1e6:.1f} MB (was {before / 1e6:.1f} MB)")


@app.command("eval")
def eval_(
    model: Annotated[list[Path], typer.Option(help="checkpoint or run directory (repeat to compare models side by side)")],
    task: Annotated[
        list[str] | None,
        typer.Option(help="bundled task name, task YAML, or a data file/folder (repeatable; default: the bundled suite)"),
    ] = None,
    shots: Annotated[int | None, typer.Option(help="demonstrations per multiple-choice/generation prompt (default: each task's)")] = None,
    seed: Annotated[int, typer.Option(help="seeds demonstrations, listed choice order and bootstrap")] = 1234,
    limit: Annotated[int | None, typer.Option(help="at most this many examples per subtask")] = None,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass (sliding windows, generation)")] = 16,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    output: Annotated[Path | None, typer.Option(help="write the results JSON here")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help=NO_VERIFY_HELP)] = False,
    quantize_bits: Annotated[int | None, typer.Option("--quantize", help="quantize each float model's block linears to 8 or 4 bits on load")] = None,
    group_size: Annotated[int | None, typer.Option(help="with --quantize: one scale per this many inputs")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help=EMBEDDING_BITS_HELP.format(blocks="--quantize"))] = None,
    task_type: Annotated[str | None, typer.Option(help="read every --task data file or folder as lm, cloze, mul or gen")] = None,
) -> None:
    """Evaluate models on lm (bits per byte), cloze (LAMBADA), mul (BIG-bench, MMLU) and gen tasks; print a Markdown table."""
    from openglm.eval.runner import evaluate_checkpoints, markdown_table
    from openglm.io.checkpoint import CheckpointError

    if quantize_bits is not None:
        _check_bits(quantize_bits, "--quantize", group_size)
    elif group_size is not None:
        raise fail("--group-size needs --quantize")
    _check_embedding_bits(embedding_bits, quantize_bits, "--quantize")
    try:
        results = evaluate_checkpoints(
            model, task or (), seed, shots, limit, batch_size, threads, verify=not no_verify, quantize=quantize_bits,
            group_size=group_size, embedding_bits=embedding_bits, task_type=task_type,
        )
    except (CheckpointError, ValueError) as err:
        raise fail(str(err)) from None
    if output is not None:
        try:
            output.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as err:
            raise fail(f"{output}: cannot be written ({err})") from None
    if results["runs"]:
        typer.echo(markdown_table(results["runs"]))
    for path, run in results["runs"].items():
        typer.echo(f"{path}: {run['wall_seconds']:.1f} s", err=True)
    failed = results.get("failed", {})
    if failed:
        for path, message in failed.items():
            typer.secho(f"error: {path}: not evaluated: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="checkpoint directory to convert")],
    out: Annotated[Path, typer.Option(help="new directory (must not exist, or be empty)")],
    source_format: Annotated[str | None, typer.Option("--from", help="openglm | chatglm-hf | glm130b-sat (default: detected)")] = None,
    target_format: Annotated[str, typer.Option("--to", help="openglm | chatglm-hf | glm130b-sat")] = "openglm",
    tp: Annotated[int | None, typer.Option(help="with --to glm130b-sat: tensor-parallel shards to write")] = None,
    bits: Annotated[int | None, typer.Option(help="with --to openglm: quantize the block linears to 8 or 4 bits")] = None,
    group_size: Annotated[int | None, typer.Option(help="with --bits: one scale per this many inputs")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help=EMBEDDING_BITS_HELP.format(blocks="--bits"))] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json or ice_text.model to put into the openglm checkpoint")] = None,
    safetensors: Annotated[bool, typer.Option("--safetensors", help="with --to chatglm-hf: safetensors shards instead of .bin")] = False,
) -> None:
    """Convert real GLM checkpoints: a ChatGLM-6B Hugging Face directory or GLM-130B SAT shards into
    an openglm checkpoint (optionally INT8/INT4), an openglm checkpoint back into either, or SAT
    shards to another tensor-parallel size. Streams shard by shard.

    An openglm source is always checked against the sha256 of its files recorded at save time (there is no --no-verify here)."""
    from openglm.io.checkpoint import CheckpointError
    from openglm.io.convert import convert as run_convert

    if bits is not None:
        _check_bits(bits, "--bits", group_size)
    _check_embedding_bits(embedding_bits, bits, "--bits")
    try:
        path = run_convert(src, out, source_format, target_format, tp, bits, group_size, tokenizer, safetensors, embedding_bits)
    except (CheckpointError, ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {path} ({target_format})")


@app.command()
def info(
    preset: Annotated[str | None, typer.Option(help="a model preset")] = None,
    model: Annotated[Path | None, typer.Option(help="a checkpoint or run directory")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="do not check config.json against its recorded sha256")] = False,
) -> None:
    """Print a model's configuration and parameter count (presets are built on the meta device).

    With --model only config.json is read, checked against the sha256 recorded at save time; the
    weights are neither read nor checked (`openglm generate` and `eval` check every file)."""
    import torch

    from openglm.io.checkpoint import CONFIG_FILE, CheckpointError, load_config, resolve_checkpoint, verify_checkpoint
    from openglm.model import GLM

    try:
        if model is not None:
            checkpoint = resolve_checkpoint(model)
            if not no_verify:
                verify_checkpoint(checkpoint, (CONFIG_FILE,))
            config = load_config(checkpoint)
        else:
            config = model_preset(preset or "tiny")
    except (ConfigError, CheckpointError) as err:
        raise fail(str(err)) from None
    with torch.device("meta"):
        parameters = GLM(config).num_parameters()
    for key, value in config.to_dict().items():
        typer.echo(f"{key:>22}: {value}")
    typer.echo(f"{'parameters':>22}: {parameters:,} ({parameters / 1e9:.2f}B)")


@app.command()
def plan(
    preset: Annotated[str, typer.Option(help="a model preset")] = "glm-130b",
    gpus: Annotated[int, typer.Option(help="GPUs in all")] = 768,
    gpu: Annotated[str, typer.Option(help="a100-40g | a100-80g | h100-80g | h200-141g | v100-32g")] = "a100-40g",
    tp: Annotated[int, typer.Option(help="tensor-parallel size")] = 4,
    pp: Annotated[int, typer.Option(help="pipeline stages")] = 8,
    micro_batches: Annotated[int, typer.Option(help="micro-batches per step and pipeline")] = 176,
    micro_batch_size: Annotated[int, typer.Option(help="sequences per micro-batch")] = 1,
    mfu: Annotated[float, typer.Option(help="model FLOPs utilisation assumed for the step time")] = 0.325,
    virtual_stages: Annotated[int, typer.Option(help="pipeline stages per GPU (interleaved 1F1B)")] = 1,
) -> None:
    """Memory per GPU, pipeline bubble, communication and step time of a tp x pp x dp layout
    (defaults: GLM-130B's 768 A100s, tp4 x pp8 x dp24, 176 micro-batches)."""
    from openglm.parallel.plan import format_report
    from openglm.parallel.plan import plan as make_plan

    try:
        report = make_plan(model_preset(preset), gpus, gpu, tp, pp, micro_batches, micro_batch_size, mfu, virtual_stages)
    except ConfigError as err:
        raise fail(str(err)) from None
    typer.echo(format_report(report))


@tokenizer_app.command("train")
def tokenizer_train(
    files: Annotated[list[Path], typer.Argument(help=".txt/.jsonl (plain, .gz, .zst) or .parquet files, or folders")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size including special and byte tokens")] = 16384,
    out: Annotated[Path, typer.Option(help="where to write tokenizer.json")] = Path("tokenizer.json"),
    text_field: Annotated[str, typer.Option(help="the .jsonl field or Parquet column holding the text")] = "text",
) -> None:
    """Train a byte-level BPE tokenizer with GLM's special tokens."""
    from openglm.data.documents import iter_documents
    from openglm.tokenizer import train_tokenizer

    try:
        tokenizer = train_tokenizer(iter_documents(files, text_field), vocab_size, out)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {out} ({tokenizer.vocab_size} tokens)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()
