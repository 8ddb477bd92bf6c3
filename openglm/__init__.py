"""openglm: pre-train, run and study GLM language models, from one CPU to a cluster."""

__version__ = "0.1.0"
