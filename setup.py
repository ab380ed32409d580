"""mindport: MindSpore ports of TeleChat2, XVERSE, Mixtral and Qwen-MoE for Ascend.

The repository keeps the design card's top-level folders (research/, ops/, ckpt_tools/)
but installs them inside the single import namespace ``mindport``:
``mindport.research``, ``mindport.ops`` and ``mindport.ckpt_tools``.
"""
from setuptools import find_packages, setup

CORE = ["mindport"] + [f"mindport.{p}" for p in find_packages("mindport")]
MAPPED = {"research": "mindport.research", "ops": "mindport.ops", "ckpt_tools": "mindport.ckpt_tools"}

SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"]  # `mindport serve`

packages, package_dir = list(CORE), {"mindport": "mindport"}
for folder, namespace in MAPPED.items():
    package_dir[namespace] = folder
    packages.append(namespace)
    packages += [f"{namespace}.{p}" for p in find_packages(folder)]

# `mindport lm-eval`: lm-evaluation-harness, pinned with the datasets/pyarrow that keep numpy < 2 (MindSpore 2.10)
EVAL = ["lm-eval>=0.4.13,<0.5", "datasets>=3.2,<3.3", "pyarrow>=18.1,<19"]

setup(
    name="mindport",
    version="0.1.0",
    description="MindSpore ports of TeleChat2, XVERSE and MoE LLMs, testable on CPU, built for Ascend",
    python_requires=">=3.11,<3.12",
    packages=packages,
    package_dir=package_dir,
    package_data={"mindport.ops": ["*/csrc/*.cc", "csrc/*.h"], "mindport": ["configs/*/*.yaml"],
                  "mindport.research": ["*/chat_template.jinja"], "mindport.plan": ["*.json"],
                  "mindport.serve": ["static/*.html"]},
    install_requires=[
        "jinja2>=3.1.6",  # chat templates, run in its sandbox as transformers runs them
        "mindspore==2.10.0",
        "numpy>=1.26,<2",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tqdm>=4.66",
    ],
    extras_require={
        "serve": SERVE,
        "eval": EVAL,
        # openai: the real client against `mindport serve`; selenium drives the system's chromium (chat page test);
        # accelerate: lm-eval's hf backend, the oracle of the mindport backend
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.45", "peft>=0.17", "openai>=1.40", "selenium>=4.11",
                 "accelerate", *SERVE, *EVAL],
    },
    entry_points={"console_scripts": ["mindport = mindport.cli:main"]},
)
