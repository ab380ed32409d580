"""``mindport serve``: an OpenAI-compatible HTTP server and a browser chat page (:mod:`mindport.serve`)."""
from __future__ import annotations

import os
import signal

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def add_parser(sub) -> None:
    from mindport.commands.generate import add_quantize_argument

    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a chat page at /",
                       description="OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions, "
                                   "/health, /metrics) with continuous batching; the chat page is at /.")
    p.add_argument("--load", required=True, help="model directory (checkpoint, mindport or HF format)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME (repeatable)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the base model's name in requests (default: the --load directory's name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model directory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting; more are answered 429")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="prompt + completion tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="per-request time limit in seconds (graph compiles excluded)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="parameter and compute dtype (default float32; bfloat16 needs Ascend)")
    add_quantize_argument(p)
    p.add_argument("--model-parallel", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes (launch with msrun); rank 0 serves HTTP")
    p.set_defaults(func=run)


def _adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--adapter {spec!r}: {directory}: no such adapter directory")
        if name in adapters:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = directory
    return adapters


def _check(args) -> None:
    missing = [name for name in SERVE_PACKAGES if not _importable(name)]
    if missing:
        raise ValueError(f"mindport serve needs {', '.join(missing)}: pip install 'mindport[serve]'")
    if not os.path.isdir(args.load):
        raise FileNotFoundError(f"{args.load}: no such model directory")
    for flag in ("max_batch", "max_queue", "max_len", "port"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout}: expected a positive number of seconds")
    if args.port > 65535:
        raise ValueError(f"--port {args.port}: expected a port number up to 65535")


def _check_address(host: str, port: int) -> None:
    """Fail in one line, before any model loads, if the server could not listen on ``host:port``."""
    import socket

    try:
        socket.create_server((host, port)).close()  # SO_REUSEADDR, as uvicorn binds
    except OSError as err:
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {err.strerror or err}") from None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _load_models(args, adapters: dict[str, str], base_name: str) -> dict:
    """The engine's models by name: the base, and the base with each adapter attached (merged first when
    ``--quantize`` is set), each quantized as ``--quantize`` says."""
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.models.quantize import quantize_weights

    models = {base_name: AutoModelForCausalLM.from_pretrained(args.load, dtype=args.dtype)}
    for name, directory in adapters.items():
        models[name] = AutoModelForCausalLM.from_pretrained(args.load, dtype=args.dtype, adapter=directory)
    if args.quantize:
        for model in models.values():
            quantize_weights(model, args.quantize)
    return models


def run(args) -> int:
    _check(args)
    from mindport.infer.engine import Engine
    from mindport.models.auto import AutoConfig
    from mindport.tokenizer import Tokenizer

    adapters = _adapters(args.adapter)
    base_name = args.served_model_name or os.path.basename(os.path.normpath(args.load))
    if base_name in adapters:
        raise ValueError(f"--adapter {base_name}=...: the name is the base model's (--served-model-name)")
    config = AutoConfig.from_pretrained(args.load)
    max_len = args.max_len or config.max_position_embeddings
    tok = Tokenizer.load(args.tokenizer or args.load, family=config.family)
    rank = 0
    if args.model_parallel > 1:  # every rank holds 1/N of each layer; rank 0 schedules and serves
        from mindport.config import ParallelConfig
        from mindport.parallel.state import init_parallel

        rank = init_parallel(ParallelConfig(model_parallel=args.model_parallel)).global_rank
    if rank == 0:
        _check_address(args.host, args.port)
    models = _load_models(args, adapters, base_name)
    engine = Engine(models, max_batch=args.max_batch, max_queue=args.max_queue, max_len=max_len)
    if rank:  # steps with rank 0 until it shuts down; a SIGTERM is rank 0's to handle (it drains first)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine.run_follower()
        return 0
    import uvicorn

    from mindport.serve.app import Server, build_app

    app = build_app(Server(engine, tok, list(models), max_len, args.timeout))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=None))
    # uvicorn finishes the running requests on SIGTERM/SIGINT, then re-raises the signal under the handler
    # found at start: ignoring it there makes a clean shutdown exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    print(f"mindport serve: {', '.join(models)} on http://{args.host}:{args.port} (chat page at /)", flush=True)
    server.run()
    return 0
