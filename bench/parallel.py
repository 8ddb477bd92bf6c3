"""Step time, tokens/s and communication volume of each parallel layout on this machine.

Each layout runs `Trainer.train_step()` in its own group of local gloo processes (CPU;
on 2 cores this measures overhead and correctness, not speed-up). The last step runs under the
profiler, whose `gloo:*` events give every collective's tensor: the bytes those put on the wire
(ring model, the group size known from the kind of collective) are summed over ranks and set
against `openglm.parallel.plan.communication_bytes` for the same layout.

    python bench/parallel.py                      # micro preset, all layouts, ~3 minutes on 2 cores
    python bench/parallel.py --layouts tp2 dp2 --steps 4 --json bench/results/parallel.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from openglm.config import GLMConfig, TrainConfig, model_preset
from openglm.parallel.launch import spawn
from openglm.parallel.plan import Layout, communication_bytes
from openglm.train.trainer import Trainer

LAYOUTS = {  # name: (tp, pp, dp)
    "tp2": (2, 1, 1),
    "pp2": (1, 2, 1),
    "dp2": (1, 1, 2),
    "tp2xdp2": (2, 1, 2),
    "pp2xtp2": (2, 2, 1),
    "pp2xdp2": (1, 2, 2),
}
SCALAR_BYTES = 64  # all-reduces this small are bookkeeping (norms, target counts, losses)


def wire_bytes(events: list[tuple[str, int]], layout: Layout, tied_numel: int) -> dict[str, float]:
    """Ring-model bytes this rank sent, by kind, from (gloo op, input elements) pairs (fp32)."""
    out: dict[str, float] = defaultdict(float)
    for op, numel in events:
        size = 4 * numel
        if op == "all_reduce":
            if size <= SCALAR_BYTES:
                out["other"] += size * 2 * (dist.get_world_size() - 1) / dist.get_world_size()
            elif layout.pp > 1 and numel == tied_numel:
                out["pp"] += size  # the tied embedding gradient, between two ranks
            else:
                out["tp"] += size * 2 * (layout.tp - 1) / layout.tp
        elif op == "all_gather":  # FSDP: the input is this rank's shard
            out["dp"] += size * (layout.dp - 1)
        elif op == "reduce_scatter":
            out["dp"] += size * (layout.dp - 1) / layout.dp
        elif op in ("send", "isend"):
            out["pp"] += size
        elif op not in ("recv", "irecv", "barrier"):
            out["other"] += size
    return dict(out)


def collective_events(events: Any) -> list[tuple[str, int]]:
    """(collective, input elements) of every `gloo:*` profiler event. gloo has no reduce-scatter:
    FSDP's runs as an all-reduce of the whole input, recognised by the `c10d::_reduce_scatter_base_`
    op of the same size that issued it."""
    scatters = Counter(torch.Size(e.input_shapes[1]).numel() for e in events if e.name == "c10d::_reduce_scatter_base_")
    out = []
    for event in events:
        if not event.name.startswith("gloo:") or not event.input_shapes or not event.input_shapes[0]:
            continue
        op, numel = event.name.removeprefix("gloo:"), torch.Size(event.input_shapes[0]).numel()
        if op == "all_reduce" and scatters[numel] > 0:
            scatters[numel] -= 1
            op = "reduce_scatter"
        out.append((op, numel))
    return out


def _worker(layout: Layout, model_config: GLMConfig, config: TrainConfig, steps: int, out: Path) -> None:
    trainer = Trainer(model_config, dataclasses.replace(config, tp=layout.tp, pp=layout.pp, dp=layout.dp))
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.train_step()
    events = collective_events(prof.events())
    tied = model_config.vocab_size * model_config.hidden_size // layout.tp // layout.dp
    mine = wire_bytes(events, layout, tied)
    everyone: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        total: dict[str, float] = defaultdict(float)
        for part in everyone:
            for kind, value in part.items():
                total[kind] += value
        out.write_text(json.dumps({"times": times, "measured": total}))


def run_single(model_config: GLMConfig, config: TrainConfig, steps: int) -> list[float]:
    """Single-process steps with one thread, the share each spawned rank gets on 2 cores."""
    torch.set_num_threads(1)
    trainer = Trainer(model_config, config)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (the first is warm-up, the last profiled)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    os.environ.setdefault("OPENGLM_CACHE", str(Path(__file__).parent / ".cache"))
    model_config = model_preset(args.preset, max_seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            out_dir=str(Path(tmp) / "run"), precision="fp32", batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
            max_steps=1000, warmup_steps=2, eval_every=1000, save_every=1000, lr=1e-3,
        )
        tokens = args.batch_size * args.seq_len
        single = statistics.median(run_single(model_config, config, args.steps)[1:])
        rows: list[dict[str, Any]] = [{"layout": "single", "procs": 1, "step_s": single, "tokens_per_s": tokens / single}]
        for name in args.layouts:
            layout = Layout(*LAYOUTS[name])
            result_file = Path(tmp) / f"{name}.json"
            spawn(_worker, layout.world_size, layout, model_config, config, args.steps, result_file)
            result = json.loads(result_file.read_text())
            step = statistics.median(result["times"][1:])
            micro = args.batch_size // layout.dp // args.micro_batch_size
            planned = communication_bytes(model_config, layout, micro, args.micro_batch_size, 4, fsdp=layout.dp > 1)
            rows.append({"layout": name, "procs": layout.world_size, "step_s": step, "tokens_per_s": tokens / step,
                         "measured_mb": {k: v / 1e6 for k, v in result["measured"].items()},
                         "planned_mb": {k: v / 1e6 for k, v in planned.items()}})
    print(f"{args.preset} preset, seq {args.seq_len}, {args.batch_size} sequences per step in micro-batches of "
          f"{args.micro_batch_size}, fp32, gloo, 1 thread per process, torch {torch.__version__}; wire MB per step, "
          "all ranks, ring model")
    print(f"{'layout':>10} {'procs':>5} {'step s':>7} {'tok/s':>7}   {'tp meas/plan':>15} {'pp meas/plan':>15} {'dp meas/plan':>15} {'other':>6}")
    for row in rows:
        comm = ""
        if "measured_mb" in row:
            m, p = row["measured_mb"], row["planned_mb"]
            comm = " ".join(f"{m.get(k, 0.0):7.2f}/{p[k]:<7.2f}" for k in ("tp", "pp", "dp")) + f" {m.get('other', 0.0):6.3f}"
        print(f"{row['layout']:>10} {row['procs']:>5} {row['step_s']:7.3f} {row['tokens_per_s']:7.0f}   {comm}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
