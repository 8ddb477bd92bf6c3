"""Streaming loads: tensors converted on the way in, in row blocks, give exactly what converting the
whole tensor gives, from safetensors and from memory-mapped torch shards; `eval --quantize`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_chatglm_tokenizer import build_ice_text, write_release
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.config import model_preset
from openglm.eval.runner import evaluate_checkpoints
from openglm.io import store
from openglm.io.checkpoint import save_checkpoint
from openglm.model import GLM
from openglm.quant import quantize_model
from openglm.tokenizer import GLMTokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tok: GLMTokenizer) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GLM(model_preset("micro"))
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder, 1, model.config, model.state_dict(), tok, {})
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_converting_load_in_small_blocks_is_exact(run, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, weights = run
    monkeypatch.setattr(store, "_CONVERT_BLOCK_BYTES", 1000)  # many blocks per tensor, a partial last one
    model, _ = openglm.load(folder, dtype)
    state = model.state_dict()
    assert all(state[k].dtype == dtype and torch.equal(state[k], weights[k].to(dtype)) for k in weights)


def test_torch_shards_stream_in_blocks_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "chatglm"
    write_release(folder, build_ice_text(tmp_path), slim=True)
    stored = torch.load(folder / "pytorch_model.bin", weights_only=True)
    monkeypatch.setattr(store, "_CONVERT_BLOCK_BYTES", 1000)
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = openglm.load(folder, dtype)
        for name, value in model.state_dict().items():
            source = stored["lm_head.weight" if name == "lm_head.weight" else f"transformer.{name}"]
            assert value.dtype == dtype and torch.equal(value, source.to(dtype)), name


def test_eval_quantizes_on_load(run, tmp_path: Path) -> None:
    folder, weights = run
    results = evaluate_checkpoints([folder], ["bpb_en"], limit=1, progress=False, quantize=8)
    assert results["quantize"] == 8
    reference = GLM(model_preset("micro"))
    reference.load_state_dict(weights)
    quantize_model(reference, 8)
    loaded, _ = openglm.load(folder, quantize=8)  # what eval ran: INT8 blocks, bf16 where native
    got, want = loaded.state_dict(), reference.to(next(loaded.parameters()).dtype).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    result = CliRunner().invoke(app, ["eval", "--model", str(folder), "--group-size", "32"])
    assert result.exit_code == 2 and "--group-size needs --quantize" in result.output
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        app, ["eval", "--model", str(folder), "--task", "bpb_en", "--limit", "1", "--quantize", "4", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["quantize"] == 4
