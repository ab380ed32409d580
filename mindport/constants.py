"""Constants every layer shares."""

IGNORE_INDEX = -100  # a label the loss skips (padding, context-parallel edges), as torch and transformers use it
QUANTIZATIONS = ("int8",)  # weight-only quantizations mindport.models.quantize applies (--quantize)
