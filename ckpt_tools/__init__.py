"""HF <-> MindSpore checkpoint conversion, streaming one tensor at a time."""
