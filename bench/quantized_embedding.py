"""What an INT8/INT4 embedding and output layer (`--embedding-bits`) saves and what it costs.

1. Bytes one decode step reads (every weight once: block linears, the output layer, one embedding
   row, norms; quantized weights in the checkpoint layout, ints plus one bf16 scale per row or
   group), computed on the meta device for a preset (default chatglm-6b: vocabulary 130,528 x
   4096, untied), block linears INT4 (groups of 64) with the embedding and output layer in bf16,
   INT8 or INT4 (a bf16 scale per row).
2. With --run DIR (a float run or checkpoint): the held-out bits per byte (`openglm eval`'s bpb_en
   and bpb_zh, bundled held-out documents) and the model.safetensors size of the quantized
   checkpoint, for each setting, on top of INT4 (groups of --group-size) and INT8 blocks.

    python bench/quantized_embedding.py [--preset chatglm-6b] [--run runs/tiny] [--group-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from openglm.config import model_preset
from openglm.io.checkpoint import WEIGHTS_FILE
from openglm.model import GLM
from openglm.quant import quantize_layout

SETTINGS = {"bf16": None, "INT8": 8, "INT4": 4}


def decode_bytes(preset: str, group_size: int) -> None:
    config = model_preset(preset)
    print(f"{preset}: vocabulary {config.vocab_size} x {config.hidden_size}, tied {config.tie_word_embeddings}")
    print("| embedding / output layer | bytes a decode step reads | of which the output layer | saved | their bytes in the file | saved |")
    print("|---|---:|---:|---:|---:|---:|")
    baseline = stored_baseline = None
    for label, bits in SETTINGS.items():
        with torch.device("meta"):
            model = quantize_layout(GLM(config).to(torch.bfloat16), 4, group_size, embedding_bits=bits)
        head = model.word_embeddings if model.lm_head is None else model.lm_head
        total = 0
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            size = tensor.numel() * tensor.element_size()
            if name.startswith("word_embeddings.") and model.lm_head is not None:
                size = size // config.vocab_size  # one row is gathered (the scale too)
            total += size
        tables = [model.word_embeddings, *([model.lm_head] if model.lm_head is not None else [])]
        head_size, stored = (sum(t.numel() * t.element_size() for m in ms for t in [*m.parameters(), *m.buffers()]) for ms in ([head], tables))
        baseline, stored_baseline = baseline or total, stored_baseline or stored
        print(f"| {label} | {total / 1e9:.3f} GB | {head_size / 1e9:.3f} GB ({head_size / total:.0%}) | {(baseline - total) / 1e9:.3f} GB "
              f"| {stored / 1e9:.3f} GB | {(stored_baseline - stored) / 1e9:.3f} GB |")


def measure(run: Path, group_size: int) -> None:
    from openglm.eval.runner import evaluate_checkpoints
    from openglm.io.api import quantize_checkpoint

    print(f"{run}: held-out bits per byte (bpb_en / bpb_zh) and {WEIGHTS_FILE}")
    print("| blocks | embedding / output layer | bpb en | bpb zh | file |")
    print("|---|---|---:|---:|---:|")
    for bits, group in ((4, group_size), (8, None)):
        for label, embedding_bits in SETTINGS.items():
            results = evaluate_checkpoints([run], ["bpb_en", "bpb_zh"], progress=False, quantize=bits, group_size=group,
                                           embedding_bits=embedding_bits)
            bpb = {r["task"]: r["value"] for r in next(iter(results["runs"].values()))["results"] if r["metric"] == "bits_per_byte"}
            with tempfile.TemporaryDirectory() as tmp:
                path = quantize_checkpoint(run, Path(tmp) / "q", bits, group, embedding_bits)
                size = (path / WEIGHTS_FILE).stat().st_size
            blocks = f"INT{bits}" + (f" g{group}" if group else "")
            kind = label if embedding_bits is not None else "float (fp32 file, bf16 run)"
            print(f"| {blocks} | {kind} | {bpb['bpb_en']:.5f} | {bpb['bpb_zh']:.5f} | {size / 1e6:.2f} MB |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="chatglm-6b")
    parser.add_argument("--run", type=Path, help="a float run or checkpoint to measure bits per byte and file sizes on")
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    decode_bytes(args.preset, args.group_size)
    if args.run is not None:
        measure(args.run, args.group_size)


if __name__ == "__main__":
    main()
