"""Scale-out: 3-D parallelism (tensor x pipeline x data/FSDP) applied to an unmodified GLM from
outside, pipeline schedules, a local process launcher, and a planner for GLM-130B-sized layouts.
It knows nothing of training policy: the trainer (`openglm.train`, a layer above) brings the loss,
the mixed precision over shards and the distributed checkpoints."""
