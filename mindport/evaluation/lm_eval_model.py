"""lm-evaluation-harness's ``mindport`` model class: every lm-eval task on a mindport model.

Requests become token ids as lm-eval's ``hf`` backend makes them: its ``TemplateLM`` moves the
context's trailing spaces to the continuation, encodes context + continuation whole and cuts it at
the context's length, and conditions an empty context on the prefix token (BOS, else EOS); contexts,
generation prompts and rolling texts get the tokenizer's special tokens (e.g. BOS) unless they already
start with the prefix token's text. :mod:`mindport.evaluation.scoring` turns the ids into numbers, the
one mechanism ``mindport eval`` uses too. Generation is greedy, stops at the request's ``until`` strings
and at EOS, and gives at most ``max_gen_toks`` tokens (256 when the task sets none, as the ``hf`` backend).

Importing this module registers the class under the name ``mindport`` (lm-eval 0.4 has no plugin
entry point; ``mindport lm-eval`` imports it before handing its arguments to lm-eval's CLI).
``--model_args``: ``pretrained=DIR`` (HF or mindport model directory, or a training checkpoint),
``adapter=DIR`` (LoRA), ``tokenizer=DIR`` (default: the model's), ``batch_size=N``, ``dtype=``,
``add_bos_token=False`` (encode without the tokenizer's special tokens) and ``prefix_token_id=N``.
"""
from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from mindport.evaluation import scoring

DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's
GREEDY_NO_OPS = ("top_k", "top_p", "min_p", "typical_p")  # sampling filters: no effect on greedy decoding


def _positive_int(value, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0 or str(number) != str(value).strip():
        raise ValueError(f"lm-eval model_args: {key}={value!r}: expected a positive integer")
    return number


@register_model("mindport")
class MindportLM(TemplateLM):
    """A mindport causal LM behind lm-eval's ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until`` (batched through :mod:`mindport.evaluation.scoring`)."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, dtype: str | None = None, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, device: str | None = None, **unknown):
        """``device``: lm-eval's CLI always passes one (default ``cuda:0``); MindSpore's device target decides."""
        super().__init__()
        from mindport.models.auto import AutoModelForCausalLM
        from mindport.tokenizer import Tokenizer

        if unknown:
            raise ValueError(f"lm-eval model_args: {', '.join(f'{k}={v!r}' for k, v in unknown.items())}: not an "
                             "argument of the mindport model (pretrained, adapter, tokenizer, batch_size, dtype, "
                             "add_bos_token, prefix_token_id)")
        if not pretrained:
            raise ValueError("lm-eval model_args: no pretrained=DIR: expected the model directory (HF or mindport "
                             "format, or a training checkpoint)")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, adapter=adapter)
        self.tokenizer = Tokenizer.load(tokenizer or pretrained, family=self.model.config.family)
        specials = self.tokenizer.special_tokens()
        self.bos_token_id = self.tokenizer.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
        if "eos_token" not in specials:
            raise ValueError(f"{self.tokenizer.source}: the tokenizer names no eos_token, which lm-eval's requests "
                             "need (stop text, and the prefix token without a BOS)")
        self._eot_token_id = self.tokenizer.token_to_id(specials["eos_token"])
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.prefix_text = self.tokenizer.decode([self.prefix_token_id], skip_special=False)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "MindportLM":
        """As lm-eval's, except that a ``--model_args`` key wins over the same CLI setting (lm-eval's
        CLI always passes ``batch_size``, 1 by default, which would otherwise clash with ``batch_size=N``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MindportLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source.replace("/", "__")

    def adds_special_tokens(self, string: str) -> bool:
        """The hf backend's rule: the tokenizer's special tokens (e.g. BOS), unless ``add_bos_token=False``
        or the text already starts with the prefix token's text."""
        return self.add_bos_token is not False and not string.startswith(self.prefix_text)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.adds_special_tokens(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) text or None, context ids, continuation ids)."""
        results = scoring.loglikelihoods(self.model, [(context, continuation) for _, context, continuation in requests],
                                         self.batch_size, progress=not disable_tqdm)
        for (texts, _, _), result in zip(requests, results):
            if texts is not None:
                self.cache_hook.add_partial("loglikelihood", texts, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's ids (special tokens as ``tok_encode`` adds them) scored whole after the prefix token."""
        texts = [request.args[0] for request in requests]
        sequences = [[self.prefix_token_id, *self.tok_encode(text)] for text in texts]
        results = scoring.rolling_loglikelihoods(self.model, sequences, self.batch_size, progress=not disable_tqdm)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched among the requests with the same ``max_gen_toks`` and special-token rule."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special=False)
        prompts = [request.args[0] for request in requests]
        settings = [self._greedy_settings(request.args[1], eos_text) for request in requests]
        batches = [(max_new, self.adds_special_tokens(prompt)) for prompt, (_, max_new) in zip(prompts, settings)]
        results: list[str | None] = [None] * len(requests)
        for max_new_tokens, add_special_tokens in sorted(set(batches)):
            chosen = [i for i, key in enumerate(batches) if key == (max_new_tokens, add_special_tokens)]
            texts = scoring.generate_until(self.model, self.tokenizer, [prompts[i] for i in chosen],
                                           [settings[i][0] for i in chosen], max_new_tokens, self.batch_size,
                                           progress=not disable_tqdm, add_special_tokens=add_special_tokens)
            for i, text in zip(chosen, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    @staticmethod
    def _greedy_settings(gen_kwargs: dict, eos_text: str) -> tuple[list[str], int]:
        """(stop strings with the EOS text, max_gen_toks) of a request's generation kwargs; anything
        other than greedy decoding fails naming the kwarg."""
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new_tokens = _positive_int(kwargs.pop("max_gen_toks"), "max_gen_toks")
        if kwargs.pop("do_sample"):
            raise ValueError(f"lm-eval generation_kwargs {gen_kwargs}: sampling (do_sample, temperature > 0) is not "
                             "supported by the mindport backend: expected greedy decoding (do_sample: false)")
        kwargs.pop("temperature", None)
        for key, value in kwargs.items():
            if key not in GREEDY_NO_OPS:
                raise ValueError(f"lm-eval generation_kwargs: {key}={value!r} is not supported by the mindport "
                                 f"backend (greedy decoding with until and max_gen_toks; "
                                 f"{', '.join(GREEDY_NO_OPS)} are ignored)")
        return until, max_new_tokens

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the prompt text of ``chat_history`` through the tokenizer's chat template
        (the family's when the tokenizer has none), as the hf backend renders it: a template that fails
        on a system message is rendered without the system messages."""
        from mindport.tokenizer import TokenizerError

        if not add_generation_prompt:
            raise ValueError("lm-eval: a task with gen_prefix continues the assistant's message "
                             "(continue_final_message), which the mindport backend's chat templates do not support")
        try:
            return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=True, tokenize=False)
        except TokenizerError:
            no_system = [message for message in chat_history if message["role"] != "system"]
            return self.tokenizer.apply_chat_template(no_system, add_generation_prompt=True, tokenize=False)
