"""Peak memory and time of `openglm convert` on synthetic multi-shard checkpoints of >= 2 GB.

Builds, under --dir (default /tmp), a ChatGLM-6B-layout Hugging Face directory (fp16 `.bin` shards
with an index) and a GLM-130B-layout SAT folder (tensor-parallel `mp_rank_XX_model_states.pt`),
then converts each in a fresh child process and reads that process's peak resident memory
(VmHWM): ChatGLM -> openglm, SAT -> openglm (merge), and openglm -> SAT (split). The
target: peak RSS at most 1.5x the largest shard (the conversion streams shard by shard, so it
never holds the model). Everything it writes is deleted at the end unless --keep.

    python bench/convert.py [--gb 2.2] [--shards 2] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, HEADS, VOCAB = 2048, 16, 32000
TOKENS = {"mask_token_id": 31990, "gmask_token_id": 31991, "bos_token_id": 31994, "eos_token_id": 31995, "pad_token_id": 3}


def _layer_count(gb: float, per_layer: int, fixed: int) -> int:
    return max(2, math.ceil((gb * 1e9 / 2 - fixed) / per_layer))


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).mul_(0.02).half()


def build_chatglm(folder: Path, gb: float, shards: int) -> None:
    inner = 4 * HIDDEN
    layers = _layer_count(gb, 4 * HIDDEN * HIDDEN + 2 * HIDDEN * inner, 2 * VOCAB * HIDDEN)
    folder.mkdir(parents=True)
    config = {
        "model_type": "chatglm", "hidden_size": HIDDEN, "inner_hidden_size": inner, "num_layers": layers,
        "num_attention_heads": HEADS, "vocab_size": VOCAB, "layernorm_epsilon": 1e-5, "max_sequence_length": 2048,
        "position_encoding_2d": True, **TOKENS,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    names: list[tuple[str, tuple[int, ...]]] = [("transformer.word_embeddings.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"transformer.layers.{i}."
        names += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "input_layernorm.bias", (HIDDEN,))]
        names += [(p + "attention.query_key_value.weight", (3 * HIDDEN, HIDDEN)), (p + "attention.query_key_value.bias", (3 * HIDDEN,))]
        names += [(p + "attention.dense.weight", (HIDDEN, HIDDEN)), (p + "attention.dense.bias", (HIDDEN,))]
        names += [(p + "post_attention_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.bias", (HIDDEN,))]
        names += [(p + "mlp.dense_h_to_4h.weight", (inner, HIDDEN)), (p + "mlp.dense_h_to_4h.bias", (inner,))]
        names += [(p + "mlp.dense_4h_to_h.weight", (HIDDEN, inner)), (p + "mlp.dense_4h_to_h.bias", (HIDDEN,))]
    names += [("transformer.final_layernorm.weight", (HIDDEN,)), ("transformer.final_layernorm.bias", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    per_shard = math.ceil(sum(math.prod(s) for _, s in names) / shards)
    weight_map: dict[str, str] = {}
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for item in names:
        if sum(math.prod(s) for _, s in groups[-1]) >= per_shard:
            groups.append([])
        groups[-1].append(item)
    for k, group in enumerate(groups, 1):
        file = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
        torch.save({name: _rand(*shape) for name, shape in group}, folder / file)
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_sat(folder: Path, gb: float, tp: int) -> None:
    inner = 5504  # GeGLU width near 8/3 * hidden, divisible by tp
    layers = _layer_count(gb, 4 * HIDDEN * HIDDEN + 3 * HIDDEN * inner, VOCAB * HIDDEN)
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1")
    config = {
        "model_class": "GLM130B", "num_layers": layers, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "vocab_size": VOCAB, "inner_hidden_size": inner, "max_sequence_length": 2048, "model_parallel_size": tp,
        "special_tokens": {"pad": 3, "eos": 31995, "mask": 31990, "smask": 31992, "gmask": 31991, "sop": 31994, "eop": 31995},
    }  # fmt: skip
    (folder / "model_config.json").write_text(json.dumps(config))
    h, k = HIDDEN, HIDDEN // tp
    for rank in range(tp):
        module = {"transformer.word_embeddings.weight": _rand(VOCAB // tp, h)}
        for i in range(layers):
            p = f"transformer.layers.{i}."
            module |= {
                p + "input_layernorm.weight": _rand(h), p + "input_layernorm.bias": _rand(h),
                p + "attention.query_key_value.weight": _rand(3 * k, h), p + "attention.query_key_value.bias": _rand(3 * k),
                p + "attention.dense.weight": _rand(h, k), p + "attention.dense.bias": _rand(h),
                p + "post_attention_layernorm.weight": _rand(h), p + "post_attention_layernorm.bias": _rand(h),
                p + "mlp.dense_h_to_4h.weight": _rand(2 * inner // tp, h), p + "mlp.dense_h_to_4h.bias": _rand(2 * inner // tp),
                p + "mlp.dense_4h_to_h.weight": _rand(h, inner // tp), p + "mlp.dense_4h_to_h.bias": _rand(h),
            }  # fmt: skip
        module |= {"transformer.final_layernorm.weight": _rand(h), "transformer.final_layernorm.bias": _rand(h)}
        torch.save({"module": module}, folder / "1" / f"mp_rank_{rank:02d}_model_states.pt")
        del module


def child(args: list[str]) -> None:
    """Run one conversion and print its seconds and this process's peak RSS as JSON."""
    from openglm.io.convert import convert

    src, out, source_format, target_format, tp = args
    start = time.perf_counter()
    convert(Path(src), Path(out), source_format, target_format, tp=int(tp) if tp != "-" else None)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident bytes. Linux's VmHWM belongs to the process image, whereas
    ru_maxrss survives exec and so would count the parent's memory at fork time."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(src: Path, out: Path, source_format: str, target_format: str, tp: int | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(src), str(out), source_format, target_format, str(tp or "-")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _largest(files: list[Path]) -> int:
    return max(f.stat().st_size for f in files)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.2, help="size of each synthetic checkpoint")
    parser.add_argument("--shards", type=int, default=2, help="shards (ChatGLM) and tensor-parallel ranks (SAT)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    args = parser.parse_args()
    free = shutil.disk_usage(args.dir).free
    if free < 6 * args.gb * 1e9:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, this run needs about {6 * args.gb:.1f} GB")
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="openglm-convert-bench-"))
    rows = []
    try:
        started = time.perf_counter()
        build_chatglm(work / "chatglm", args.gb, args.shards)
        build_sat(work / "sat", args.gb, args.shards)
        print(f"built synthetic checkpoints in {time.perf_counter() - started:.0f} s under {work}", file=sys.stderr)
        runs = [
            ("ChatGLM HF -> openglm", work / "chatglm", work / "from-chatglm", "chatglm-hf", "openglm", None, sorted((work / "chatglm").glob("*.bin"))),
            ("SAT -> openglm (merge)", work / "sat", work / "from-sat", "glm130b-sat", "openglm", None, sorted((work / "sat" / "1").glob("*.pt"))),
        ]
        for label, src, out, source_format, target_format, tp, files in runs:
            result = measure(src, out, source_format, target_format, tp)
            rows.append((label, sum(f.stat().st_size for f in files), len(files), _largest(files), result))
        result = measure(work / "from-sat", work / "to-sat", "openglm", "glm130b-sat", args.shards)
        written = sorted((work / "to-sat" / "1").glob("*.pt"))
        rows.append(("openglm -> SAT (split)", (work / "from-sat" / "model.safetensors").stat().st_size, len(written), _largest(written), result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("| conversion | checkpoint | shards | largest shard | seconds | peak RSS | peak RSS / largest shard (target <= 1.5) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, total, count, largest, result in rows:
        ratio = result["peak_rss"] / largest
        print(f"| {label} | {total / 1e9:.2f} GB | {count} | {largest / 1e9:.2f} GB | {result['seconds']:.1f} | {result['peak_rss'] / 1e9:.2f} GB | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
