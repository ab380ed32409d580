"""``mindport lm-eval ARGS...``: lm-evaluation-harness's own command line, with mindport models as ``--model mindport``.

lm-eval 0.4 finds model classes only in its registry and has no plugin entry point, so this command
imports :mod:`mindport.evaluation.lm_eval_model` (which registers ``mindport``) and hands ARGS to
lm-eval's CLI unchanged, adding ``--model mindport`` when ARGS name no model::

    mindport lm-eval --model_args pretrained=DIR,adapter=LORA_DIR,batch_size=8 --tasks ceval-valid --num_fewshot 5
    mindport lm-eval ls tasks
"""
from __future__ import annotations

import argparse
import sys

LM_EVAL_COMMANDS = ("run", "ls", "validate")  # lm-eval's subcommands; anything else is `run`'s arguments
HELP_HEADER = ("mindport lm-eval: lm-evaluation-harness's command line, with mindport's model registered as "
               "--model mindport (the default here when no --model is given, not hf); lm-eval's help follows.\n")


def add_parser(sub) -> None:
    # prefix_chars no argument uses: every ARG, options and -h included, goes to lm-eval untouched
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness with a mindport model (its own arguments; "
                       "pip install \"mindport[eval]\")", add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    p.set_defaults(func=run)


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argument list for ``mindport lm-eval ARGS``: ``run`` unless ARGS start with another lm-eval
    subcommand, and ``--model mindport`` unless ARGS name a model."""
    if args and args[0] in LM_EVAL_COMMANDS and args[0] != "run":
        return list(args)
    args = list(args[1:] if args[:1] == ["run"] else args)
    names_model = any(a in ("--model", "-M") or a.startswith("--model=") for a in args)
    return ["run", *([] if names_model else ["--model", "mindport"]), *args]


def run(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "lm_eval":
            raise
        raise ValueError('lm-eval: lm-evaluation-harness (lm_eval) is not installed: pip install "mindport[eval]"') \
            from None
    from lm_eval.__main__ import cli_evaluate

    import mindport.evaluation.lm_eval_model  # noqa: F401  registers lm-eval's `mindport` model class

    lm_eval_args = lm_eval_argv(args.lm_eval_args)
    if "-h" in lm_eval_args or "--help" in lm_eval_args:
        print(HELP_HEADER, flush=True)
    argv = sys.argv
    sys.argv = ["mindport lm-eval", *lm_eval_args]  # lm-eval's CLI parses sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
