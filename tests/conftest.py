from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One token-shard cache for the whole session (the bundled corpus tokenizes in seconds)."""
    return str(tmp_path_factory.mktemp("openglm-cache"))


@pytest.fixture
def cache_env(shard_cache: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENGLM_CACHE", shard_cache)
    return shard_cache
