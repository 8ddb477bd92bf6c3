"""Data pipeline: corpus reading and token shards (`corpus`), and the GLM training objectives."""
