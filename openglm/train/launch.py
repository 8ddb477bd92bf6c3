"""`openglm train`'s one entry point: check the run's layout, then train in this process (one
process, or one rank under torchrun) or in `nproc` local processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from openglm.config import GLMConfig, TrainConfig
from openglm.parallel.launch import spawn
from openglm.parallel.plan import check_training
from openglm.parallel.ranks import job_world_size
from openglm.train import rundir
from openglm.train.distributed_checkpoint import check_distributed, resolve_distributed
from openglm.train.rundir import ResumeMode, TrainingStopped
from openglm.train.trainer import Trainer


def fit(model_config: GLMConfig, config: TrainConfig, resume: ResumeMode, overwrite: bool) -> dict[str, Any]:
    """Train in this process (in a process group: as its rank); the summary of the run."""
    return Trainer(model_config, config, resume=resume, overwrite=overwrite).fit()


def train(
    model_config: GLMConfig, config: TrainConfig, resume: ResumeMode = False, overwrite: bool = False, nproc: int | None = None
) -> dict[str, Any] | None:
    """Train as `config` says: `nproc` local processes, else this process (alone, or as one rank
    of a job torchrun started). The layout is checked before any process starts or any rank builds
    anything (a ConfigError saying what to change). The summary comes back in a single process and
    on torchrun's rank 0; None elsewhere and with `nproc` (the spawned ranks logged their progress)."""
    check_training(model_config, config, nproc if nproc is not None else job_world_size())
    if nproc is None:
        summary = fit(model_config, config, resume, overwrite)
        return summary if not dist.is_initialized() or dist.get_rank() == 0 else None
    run_dir = Path(config.out_dir)
    checkpoint = resolve_distributed(run_dir)
    # errors before any process starts: a run that would be lost, a refused or damaged checkpoint
    if rundir.check_start(run_dir, resume, overwrite, checkpoint is not None) and checkpoint is not None:
        check_distributed(checkpoint)
    try:
        spawn(fit, nproc, model_config, config, resume, overwrite, errors=(TrainingStopped,))
    except mp.ProcessExitedException as err:  # a rank died without saying why (killed: out of memory, SIGKILL)
        raise TrainingStopped(f"training process {err.error_index} exited with code {err.exit_code}", err.exit_code) from None
    return None
