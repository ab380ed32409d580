"""Model families: presets, HF config fields and HF tensor-name maps (data only)."""
