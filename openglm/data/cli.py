"""`openglm data`: corpus preparation on its own, so that a cluster job tokenizes once and every
rank of the training run reuses the shards (`openglm train` finds them by the same cache key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from openglm.config import TrainConfig, cache_dir
from openglm.console import fail

data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")


@data_app.command("prepare")
def prepare(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help=".txt/.jsonl (plain, .gz, .zst) or .parquet files, or folders (default: the bundled corpus)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="the openglm cache folder the shards go under, in shards/ (default: $OPENGLM_CACHE, else ~/.cache/openglm); "
            "`openglm train` reuses them with OPENGLM_CACHE set to this folder"
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="tokenizer processes (default: the CPUs this process may use)")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="a tokenizer.json from `openglm tokenizer train` (default: the bundled one)")
    ] = None,
    text_field: Annotated[str, typer.Option(help="the .jsonl field or Parquet column holding the text")] = TrainConfig.text_field,
    val_fraction: Annotated[float, typer.Option(help="share of documents held out for evaluation")] = TrainConfig.val_fraction,
    seed: Annotated[int, typer.Option(help="the seed of the held-out split (the training run's --seed)")] = TrainConfig.seed,
) -> None:
    """Tokenize a corpus into train/val token shards, with the split `openglm train` makes from the same settings."""
    from openglm.data.documents import bundled_corpus_paths
    from openglm.data.encode import default_workers
    from openglm.data.shards import ShardIndex, prepare_corpus
    from openglm.tokenizer import GLMTokenizer

    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise fail(f"--workers must be at least 1, got {workers}")
    try:
        chosen = GLMTokenizer.from_file(tokenizer) if tokenizer else GLMTokenizer.default()
        root = prepare_corpus(
            files or bundled_corpus_paths(),
            chosen,
            (out or cache_dir()) / "shards",
            val_fraction=val_fraction,
            seed=seed,
            text_field=text_field,
            workers=workers,
        )
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    splits = ShardIndex.load(root).splits
    counts = ", ".join(
        f"{name} {split.num_tokens:,} tokens ({len(split.documents):,} documents)" for name, split in splits.items()
    )
    typer.echo(f"token shards in {root}: {counts}")


