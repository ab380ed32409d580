"""TeleChat2 (3B/7B/35B/115B): presets, config.json fields and HF names."""
from mindport.models.registry import Family
from mindport.research.telechat2 import names, preset

FAMILY = Family(name="telechat2", model_types=preset.MODEL_TYPES, arch=preset.ARCH, hf_fields=preset.HF_FIELDS,
                hf_export=preset.HF_EXPORT, presets=preset.PRESETS, names=names.NAMES)
