"""A run's training and held-out samples: the corpus tokenized into the shared shard cache, cut into
blank-infilling windows (mixed with multi-task instruction samples when asked)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from openglm.config import GLMConfig, TrainConfig, cache_dir
from openglm.data.blank_infill import BlankInfillingDataset, TooFewTokens, collate
from openglm.data.documents import CorpusError, bundled_corpus_paths
from openglm.data.mip import MIPDataset, MixedDataset
from openglm.data.shards import prepare_corpus
from openglm.data.stream import TokenStream
from openglm.tokenizer import GLMTokenizer


class SampleSource(Protocol):
    def sample(self, index: int) -> dict[str, Any]: ...


def collate_range(source: SampleSource, start: int, count: int) -> dict[str, torch.Tensor]:
    """Samples `start` .. `start + count - 1` of `source` as one batch."""
    return collate([source.sample(i) for i in range(start, start + count)])


def build_samples(
    config: TrainConfig, model_config: GLMConfig, tokenizer: GLMTokenizer
) -> tuple[SampleSource, SampleSource | None, TokenStream]:
    """Training samples, held-out samples (None with `val_fraction` 0: no held-out evaluation) and
    the held-out token stream (for bits per byte)."""
    paths = [Path(p) for p in config.data] or bundled_corpus_paths()
    shards = prepare_corpus(
        paths, tokenizer, cache_dir() / "shards", val_fraction=config.val_fraction, seed=config.seed, text_field=config.text_field
    )
    train: SampleSource = _samples(TokenStream(shards, "train"), model_config, config, paths)
    if config.mip_data:
        mip = MIPDataset.from_jsonl(
            config.mip_data, tokenizer, model_config.max_seq_len, model_config.special_tokens, model_config.position_encoding
        )
        train = MixedDataset(train, mip, share=config.mip_share, seed=config.seed)
    val_stream = TokenStream(shards, "val")
    if config.val_fraction == 0:
        return train, None, val_stream
    val = _samples(val_stream, model_config, dataclasses.replace(config, seed=config.seed + 1), paths)
    return train, val, val_stream


def _samples(stream: TokenStream, model_config: GLMConfig, config: TrainConfig, paths: list[Path]) -> BlankInfillingDataset:
    """Blank-infilling samples of one split; a split shorter than one window is an error naming the
    corpus and what to do."""
    try:
        return BlankInfillingDataset.from_config(stream, model_config, config)
    except TooFewTokens as err:
        names = ", ".join(map(str, paths))
        if stream.split == "val" and stream.num_documents == 0:
            raise CorpusError(
                f"{names}: no document can be held out for validation (the corpus has only one); "
                "add documents or pass --val-fraction 0 to train without held-out evaluation"
            ) from None
        split = "validation" if stream.split == "val" else "training"
        advice = (
            "add text, raise --val-fraction, or pass --val-fraction 0 to train without held-out evaluation"
            if stream.split == "val"
            else "add text or lower --seq-len"
        )
        raise CorpusError(
            f"{names}: the {split} split has {err.tokens} tokens ({stream.num_documents} documents), "
            f"too few for one sequence of --seq-len {model_config.max_seq_len} ({err.needed} tokens); {advice}"
        ) from None
