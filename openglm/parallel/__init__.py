"""Scale-out: 3-D parallelism (tensor x pipeline x data/FSDP) applied to an unmodified GLM from
outside, reshardable distributed checkpoints, and a planner for GLM-130B-sized layouts."""
