"""Tokenizer directories built locally with the ``tokenizers`` library, in the shapes the families
publish, for parity tests against transformers' ``AutoTokenizer``.

metaspace_bos: Llama/Mixtral-style BPE with Metaspace, byte fallback and a ``<s> $A`` post-processor;
byte_level: Qwen-style byte-level BPE without BOS; sentencepiece: mindport's own trained model.
"""
from __future__ import annotations

import json
import os

TEXTS = ["Hello world, the quick brown fox jumps over the lazy dog. On the other hand",
         "The for statement iterates; 你好世界，快速的棕色狐狸跳过了懒狗"] * 20
KINDS = ("metaspace_bos", "byte_level", "sentencepiece")


def metaspace_bos(directory: str) -> str:
    """BPE over Metaspace pieces; unseen characters fall back to ``<0xNN>`` byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # ordinary (non-special) tokens, as in Llama's vocabulary
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _save(tok, directory, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def byte_level(directory: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _save(tok, directory, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None})


def sentencepiece(directory: str) -> str:
    from mindport.tokenizer import train_sentencepiece

    train_sentencepiece(TEXTS, 400, directory)
    return directory


def build(kind: str, directory: str) -> str:
    return {"metaspace_bos": metaspace_bos, "byte_level": byte_level, "sentencepiece": sentencepiece}[kind](directory)


def _save(tok, directory: str, config: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return directory


def with_chat_template(directory: str, template: str, special_tokens: tuple[str, ...] = (), **config) -> str:
    """Give a built tokenizer directory ``template`` (as chat_template.jinja), extra special tokens
    (added to its tokenizer.json) and tokenizer_config.json entries."""
    if special_tokens:
        from tokenizers import Tokenizer

        path = os.path.join(directory, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        tok.add_special_tokens(list(special_tokens))
        tok.save(path)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        merged = {**json.load(f), **config}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(merged, f)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    return directory


# Conversations and templates for the chat-template and SFT-data tests
SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "你好 again"}, {"role": "assistant", "content": "On the other hand 龘"}]

# tokenizer shape and the special tokens its template writes
DIRS = {"telechat2": ("sentencepiece", (), {}), "mixtral": ("metaspace_bos", (), {}),
        "xverse": ("metaspace_bos", (), {}),
        "qwen_moe": ("byte_level", ("<|im_start|>", "<|im_end|>"), {"eos_token": "<|im_end|>"})}

# ChatML with {% generation %} around each assistant reply and its end of turn
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# TeleChat2-like, for a sentencepiece tokenizer (byte-fallback pieces inside the marked replies)
TELECHAT_GENERATION = (
    "{% for message in messages %}{% if message.role == 'assistant' %}{{ '<_bot>' }}{% generation %}"
    "{{ message.content + '<_end>' }}{% endgeneration %}{% else %}{{ '<_user>' + message.content }}{% endif %}"
    "{% endfor %}")


def chat_dir(tmp_path, name: str, template: str | None = None) -> str:
    """A tokenizer directory shaped like family ``name``'s, with ``template`` or that family's default."""
    from mindport.models.registry import family

    kind, specials, config = DIRS[name]
    directory = build(kind, str(tmp_path / name))
    return with_chat_template(directory, template or family(name).chat_template, specials, **config)
