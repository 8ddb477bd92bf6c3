from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from openglm.data.documents import bundled_corpus_paths
from openglm.tokenizer import GLMTokenizer


@pytest.fixture(scope="module")
def tok() -> GLMTokenizer:
    return GLMTokenizer.default()


@pytest.fixture(scope="module")
def bundled() -> dict[str, Path]:
    return {p.name: p for p in bundled_corpus_paths()}


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One token-shard cache for the whole session (the bundled corpus tokenizes in seconds)."""
    return str(tmp_path_factory.mktemp("openglm-cache"))


@pytest.fixture
def cache_env(shard_cache: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENGLM_CACHE", shard_cache)
    return shard_cache


@pytest.fixture(scope="module")
def tokenizer() -> GLMTokenizer:
    return GLMTokenizer.default()


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module's in-process micro models: their threads only add
    synchronisation (seconds per test on a busy machine). Restored for the other modules;
    subprocesses are not affected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
