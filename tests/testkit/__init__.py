"""Helpers shared by the test folders, importable from any of them (pytest.ini puts tests/ on sys.path).

hf_models: tiny transformers-made checkpoints (the oracles); checkpoints: every family's HF
fixture directories; launch: msrun launching and rank comparisons; train: the tiny training
setup; numpy_models: an independent numpy forward of every family.
"""
