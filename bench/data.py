"""Corpus preparation throughput: `build_token_shards` with 1 and N tokenizer worker processes.

Writes under --dir (default /tmp) a bilingual `.jsonl.zst` corpus of about --mb MB of text, made of
the bundled corpus's documents (English novels, Chinese prose and poetry) in a seeded random order,
then prepares it with each worker count in a fresh child process (the bundled tokenizer, the
default split and shard settings) and prints one table: seconds for the whole build (both passes:
the language count for the held-out split, then tokenizing and writing), text MB/s (UTF-8 bytes of
the documents), tokens/s, the speed-up over 1 worker on 1 thread, and peak resident memory of the
main process and of the largest worker (ru_maxrss), and the CPU seconds of the main process and of
all workers together, which say what the wall-clock speed-up would be on idle cores. It checks that every build wrote the same files.
1 worker means no worker processes: this process encodes, and the tokenizers library's batch encoding
may use its own threads there; a first row turns those off (`TOKENIZERS_PARALLELISM=false`, as in
every worker process), the baseline the speed-ups divide by.

    python bench/data.py [--mb 20] [--workers 1 2] [--dir /tmp] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openglm.data.documents import bundled_corpus_paths, iter_documents
from openglm.data.encode import default_workers


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A `.jsonl.zst` of the bundled documents in random order, about `megabytes` of text; its text bytes."""
    import zstandard

    documents = list(iter_documents(bundled_corpus_paths()))
    rng = random.Random(seed)
    written = 0
    with path.open("wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < megabytes * 1e6:
            doc = rng.choice(documents)
            out.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode())
            written += len(doc.encode())
    return written


def run_child(corpus: Path, out: Path, workers: int) -> None:
    """Build the shards once and print the measurements as one JSON line."""
    from openglm.data.shards import build_token_shards
    from openglm.tokenizer import GLMTokenizer

    tokenizer = GLMTokenizer.default()
    started = time.perf_counter()
    index = build_token_shards([corpus], tokenizer, out, workers=workers)
    seconds = time.perf_counter() - started
    tokens = sum(split.num_tokens for split in index.splits.values())
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "index.json"):
        digest.update(path.read_bytes())
    digest.update(json.dumps(index.splits["train"].to_json()).encode())
    main, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "workers": workers,
                "main_cpu_seconds": main.ru_utime + main.ru_stime,
                "worker_cpu_seconds": children.ru_utime + children.ru_stime,
                "seconds": seconds,
                "tokens": tokens,
                "digest": digest.hexdigest(),
                "main_rss_mib": main.ru_maxrss / 1024,
                "worker_rss_mib": children.ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text in the generated corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, default_workers()}))
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    work = Path(tempfile.mkdtemp(prefix="openglm-bench-data-", dir=args.dir))
    try:
        corpus = work / "corpus.jsonl.zst"
        text_bytes = write_corpus(corpus, args.mb)
        print(f"corpus: {text_bytes / 1e6:.1f} MB of text, {corpus.stat().st_size / 1e6:.1f} MB as .jsonl.zst", flush=True)
        rows = []
        # 1 worker is this process, whose batch encoding may also use the tokenizers library's own
        # threads; the "1 thread" row turns those off, as every worker process has them off
        for label, workers, env in [("1, 1 thread", 1, {"TOKENIZERS_PARALLELISM": "false"})] + [
            (str(n), n, {}) for n in args.workers
        ]:
            command = [sys.executable, __file__, "--child", str(corpus), str(work / f"shards-{len(rows)}"), str(workers)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ | env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"label": label})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    print(
        "| workers | seconds | text MB/s | tokens/s | speed-up vs 1 thread | CPU s main + workers | peak RSS main | peak RSS worker |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        worker_rss = f"{row['worker_rss_mib']:.0f} MiB" if row["workers"] > 1 else "-"
        print(
            f"| {row['label']} | {row['seconds']:.1f} | {text_bytes / 1e6 / row['seconds']:.2f} | "
            f"{row['tokens'] / row['seconds']:,.0f} | {base / row['seconds']:.2f}x | "
            f"{row['main_cpu_seconds']:.1f} + {row['worker_cpu_seconds']:.1f} | {row['main_rss_mib']:.0f} MiB | {worker_rss} |"
        )
    print(f"same shards with every worker count: {'yes' if len({row['digest'] for row in rows}) == 1 else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"text_bytes": text_bytes, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
