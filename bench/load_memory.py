"""Peak memory of `openglm.load(path, quantize=...)`: fp32, bf16, INT8 and INT4 loads of an fp16 checkpoint.

Builds under --dir (default /tmp) a synthetic fp16 ChatGLM-6B-layout Hugging Face directory (`.bin`
shards with an index, ~1.5 GB; `bench/convert.py`'s builder) and the openglm checkpoint converted
from it (fp16 model.safetensors), then loads each in a fresh child process per precision and reads
that process's peak resident memory (VmHWM), next to its resident memory before loading (torch and
openglm imported: the runtime's fixed cost). Targets (issue 21): INT4 peak <= 0.9x the fp16
checkpoint's bytes and bf16 <= 1.15x, plus the fixed cost.

`--tree DIR` runs the children against another openglm source tree (e.g. an older commit checked
out in a temporary worktree); where its `openglm.load` takes no `quantize`, a quantized load is
what `openglm generate --quantize` did there: load, `quantize_model`, cast to bf16.

    python bench/load_memory.py [--gb 1.5] [--dir /tmp] [--tree DIR] [--keep]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

LOADS = {"fp32": (None, "float32"), "bf16": (None, "bfloat16"), "INT8": (8, "bfloat16"), "INT4": (4, "bfloat16")}
TARGETS = {"bf16": 1.15, "INT4": 0.9}


def write_ice_text(folder: Path, tokens: dict[str, int]) -> None:
    """A small ice_text.model whose special pieces sit where `tokens` (config.json's ids, offset by
    the default 20000 image tokens) says: a tiny trained model padded with unused pieces."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from openglm.data.documents import bundled_corpus_paths

    lines = [line for line in bundled_corpus_paths()[0].read_text().splitlines() if line.strip()][:2000]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=400, minloglevel=2)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    control = model_pb2.ModelProto.SentencePiece.CONTROL
    first = tokens["mask_token_id"] - 20000
    for k in range(len(proto.pieces), first):
        proto.pieces.add(piece=f"<unused_piece_{k}>", score=0.0, type=control)
    for text in ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>"):
        proto.pieces.add(piece=text, score=0.0, type=control)
    (folder / "ice_text.model").write_bytes(proto.SerializeToString())


def first_module(*names: str) -> ModuleType:
    """The first of `names` the tree imports: a `--tree` may be from before a module moved
    (openglm.io.convert was openglm.convert, openglm.quant openglm.quantize)."""
    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    return importlib.import_module(names[-1])


def child(path: str, label: str) -> None:
    """Load `path` as `label` says and print the peak RSS and the RSS before loading as JSON."""
    import inspect

    import torch
    from convert import peak_rss  # bench/convert.py

    import openglm

    if label == "convert --bits 4":
        convert = first_module("openglm.io.convert", "openglm.convert").convert
        before = peak_rss()
        convert(path, Path(path).parent / "int4", "chatglm-hf", bits=4)
        print(json.dumps({"peak_rss": peak_rss(), "before": before, "model_bytes": 0}))
        return
    bits, dtype_name = LOADS[label]
    dtype = getattr(torch, dtype_name)
    before = peak_rss()
    if "quantize" in inspect.signature(openglm.load).parameters:
        model, _ = openglm.load(path, dtype, quantize=bits)
    else:  # an openglm from before streaming loads: what `generate --quantize` did
        quantize_model = first_module("openglm.quant", "openglm.quantize").quantize_model
        model, _ = openglm.load(path, torch.float32 if bits else dtype)
        if bits:
            model = quantize_model(model, bits).to(dtype)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(json.dumps({"peak_rss": peak_rss(), "before": before, "model_bytes": held}))


def measure(path: Path, label: str, tree: Path) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(Path(__file__).parent)]))
    command = [sys.executable, __file__, "--child", str(path), label]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{label} load of {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.5, help="size of the synthetic fp16 checkpoint")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="openglm source tree to load with")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()
    from convert import TOKENS, build_chatglm  # bench/convert.py

    free = shutil.disk_usage(args.dir).free
    if free < 2.5 * args.gb * 1e9:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, this run needs about {2.5 * args.gb:.1f} GB")
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="openglm-load-bench-"))
    rows = []
    try:
        build_chatglm(work / "chatglm", args.gb, 2)
        write_ice_text(work / "chatglm", TOKENS)
        from openglm.io.convert import convert

        convert(work / "chatglm", work / "openglm", "chatglm-hf")
        sources = {
            "ChatGLM HF (.bin shards)": (work / "chatglm", sum(f.stat().st_size for f in (work / "chatglm").glob("*.bin"))),
            "openglm (safetensors)": (work / "openglm", (work / "openglm" / "model.safetensors").stat().st_size),
        }
        for source, (path, size) in sources.items():
            for label in LOADS:
                rows.append((source, label, size, measure(path, label, args.tree)))
        path, size = sources["ChatGLM HF (.bin shards)"]
        rows.append(("ChatGLM HF (.bin shards)", "convert --bits 4", size, measure(path, "convert --bits 4", args.tree)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"openglm tree: {args.tree}")
    print(
        "| checkpoint | load | fp16 checkpoint | model held | RSS before load | peak RSS | peak / checkpoint | (peak - before) / checkpoint | target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for source, label, size, result in rows:
        peak, before = result["peak_rss"], result["before"]
        target = TARGETS.get(label)
        verdict = "" if target is None else f"<= {target} + fixed: {'PASS' if peak - before <= target * size else 'FAIL'}"
        print(
            f"| {source} | {label} | {size / 1e9:.2f} GB | {result['model_bytes'] / 1e9:.2f} GB | {before / 1e9:.2f} GB | "
            f"{peak / 1e9:.2f} GB | {peak / size:.2f}x | {(peak - before) / size:.2f}x | {verdict} |"
        )


if __name__ == "__main__":
    main()
