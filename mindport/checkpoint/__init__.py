"""The checkpoint file library: safetensors I/O, HF checkpoint reading, name maps, the one tensor
check, the one shard writer and the non-weight files of a model directory."""
