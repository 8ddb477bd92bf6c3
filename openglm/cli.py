"""The `openglm` command: one thin sub-command per module, no logic of its own."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from openglm.config import MODEL_PRESETS, ConfigError, model_preset, train_preset

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pre-train, run and inspect GLM language models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train or inspect tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
log = logging.getLogger("openglm")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def default_precision() -> str:
    """bf16 where the CPU has native bf16 matmuls (AMX or AVX512-BF16) or on a GPU, else fp32."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported() else "fp32"


@app.command()
def train(
    preset: Annotated[str, typer.Option(help=f"model preset: {', '.join(MODEL_PRESETS)}")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<preset>)")] = None,
    data: Annotated[list[Path] | None, typer.Option(help=".txt/.jsonl files or folders (default: the bundled corpus)")] = None,
    objective: Annotated[str, typer.Option(help="glm (blank infilling) or causal (GPT baseline)")] = "glm",
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (default: bf16 where the hardware has it)")] = None,
    seed: int = 1234,
    max_steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per optimiser step")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="sequences per forward/backward")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    seq_len: Annotated[int | None, typer.Option(help="sequence length (default: the preset's)")] = None,
    mip_data: Annotated[Path | None, typer.Option(help='jsonl of {"prompt", "response"} for multi-task instruction pre-training')] = None,
    mip_share: float = 0.05,
    egs_alpha: Annotated[float, typer.Option(help="Embedding Gradient Shrink factor (1 = off)")] = 0.1,
    eval_every: int | None = None,
    save_every: int | None = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")] = True,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run directory's latest checkpoint")] = False,
) -> None:
    """Pre-train a GLM on the bundled bilingual corpus (or your own text) with blank infilling."""
    from openglm.train.trainer import Trainer

    try:
        overrides = {"objective": objective} | ({"max_seq_len": seq_len} if seq_len else {})
        model_config = model_preset(preset, **overrides)
        chosen = {
            "out_dir": str(out) if out else None,
            "data": [str(p) for p in data] if data else None,
            "precision": precision or default_precision(),
            "seed": seed,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size or (batch_size and min(batch_size, train_preset(preset).micro_batch_size)),
            "lr": lr,
            "mip_data": str(mip_data) if mip_data else None,
            "mip_share": mip_share,
            "egs_alpha": egs_alpha,
            "eval_every": eval_every,
            "save_every": save_every,
            "compile": compile,
            "num_threads": threads,
        }
        config = train_preset(preset, **{k: v for k, v in chosen.items() if v is not None})
        summary = Trainer(model_config, config, resume=resume).fit()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"done: step {summary['step']}, held-out loss {summary.get('val_loss', float('nan')):.4f}, run in {config.out_dir}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help='text with blanks, e.g. "Emma was \\[MASK] happy." or "It is a truth \\[gMASK]"')],
    model: Annotated[Path, typer.Option(help="checkpoint or run directory")] = Path("runs/tiny"),
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> None:
    """Fill the blanks of PROMPT (a prompt without one is continued via \\[gMASK])."""
    from openglm.checkpoint import CheckpointError, load_model
    from openglm.generation import GenerationConfig
    from openglm.generation import generate as run_generation

    try:
        glm, tokenizer = load_model(model)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        typer.echo(run_generation(glm, tokenizer, prompt, config))
    except (CheckpointError, ValueError) as err:
        raise _fail(str(err)) from None


@app.command()
def info(
    preset: Annotated[str | None, typer.Option(help="a model preset")] = None,
    model: Annotated[Path | None, typer.Option(help="a checkpoint or run directory")] = None,
) -> None:
    """Print a model's configuration and parameter count (presets are built on the meta device)."""
    import torch

    from openglm.checkpoint import CheckpointError, load_config, resolve_checkpoint
    from openglm.model import GLM

    try:
        if model is not None:
            config = load_config(resolve_checkpoint(model))
        else:
            config = model_preset(preset or "tiny")
    except (ConfigError, CheckpointError) as err:
        raise _fail(str(err)) from None
    with torch.device("meta"):
        parameters = GLM(config).num_parameters()
    for key, value in config.to_dict().items():
        typer.echo(f"{key:>22}: {value}")
    typer.echo(f"{'parameters':>22}: {parameters:,} ({parameters / 1e9:.2f}B)")


@tokenizer_app.command("train")
def tokenizer_train(
    files: Annotated[list[Path], typer.Argument(help=".txt/.jsonl files or folders")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size including special and byte tokens")] = 16384,
    out: Annotated[Path, typer.Option(help="where to write tokenizer.json")] = Path("tokenizer.json"),
) -> None:
    """Train a byte-level BPE tokenizer with GLM's special tokens."""
    from openglm.tokenizer import train_tokenizer

    try:
        tokenizer = train_tokenizer(list(files), vocab_size, out)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"wrote {out} ({tokenizer.vocab_size} tokens)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
