"""Data pipeline: corpus files as documents (`documents`), tokenized once into shards (`shards`) read back as a token stream (`stream`), and the GLM training objectives."""
