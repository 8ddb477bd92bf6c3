"""Checkpoint I/O, one layer with no cycles; each module imports only those above it in this list.

    atomic       atomic file and directory writes (`write_text_atomic`, `write_dir_atomic`), no torch
    checkpoint   the directory layout, sha256 verification,
                 training checkpoints, quantization.json / checksums.json records
    store        tensor files read and written one tensor at a time (safetensors, torch files)
    loading      streaming, precision-aware filling of a model (`empty_model`, `ModelFiller`)
    quantized    quantized checkpoints: the record, writing a quantized model, reading one back
    convert/     the foreign formats: ChatGLM-6B Hugging Face directories and tokenizer, GLM-130B
                 SAT shards, and `convert` between them and openglm
    api          `load` (every directory openglm reads, with the one dtype policy), `check_model`,
                 `quantize_checkpoint`

The quantization math and layers are `openglm.quant`'s, below this layer; the distributed (DCP)
checkpoints of a sharded run are `openglm.train.distributed_checkpoint`'s.
"""
