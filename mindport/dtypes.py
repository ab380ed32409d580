"""The one dtype table: mindport's dtype names (``float32``, ``float16``, ``bfloat16``, as configs
and transformers' ``torch_dtype`` spell them), their safetensors codes, numpy types and item sizes,
and the MindSpore type of a name."""
from __future__ import annotations

import numpy as np

SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # dtype name -> safetensors code
DTYPE_NAMES = {code: name for name, code in SAFETENSORS_CODES.items()}  # safetensors code -> dtype name
NUMPY_DTYPES = {  # safetensors code -> numpy type (bfloat16 as its raw 16 bits)
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
ITEMSIZE = {code: np.dtype(dt).itemsize for code, dt in NUMPY_DTYPES.items()}  # safetensors code -> bytes
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # code -> torch.<name>


def itemsize(name: str) -> int:
    """Bytes per element of dtype ``name`` (``float32``: 4)."""
    return ITEMSIZE[SAFETENSORS_CODES[name]]


def dtype_of(name: str):
    """The MindSpore type of dtype ``name``."""
    import mindspore as ms

    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]
