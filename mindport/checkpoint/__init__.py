"""The checkpoint file library: safetensors I/O, HF checkpoint reading, name maps, parameter shapes,
the shard writer and the non-weight files of a model directory."""
