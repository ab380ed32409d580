"""Tokenizer training, encode/decode, special ids and chat templates (sentencepiece and HF json)."""
import json
import os

import pytest

from mindport.tokenizer import Tokenizer, TokenizerError, train_sentencepiece


def test_trained_sentencepiece_round_trips_and_has_telechat_ids(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)  # TeleChat2's bos / eos / pad
    for text in ["The for statement\n    x = [1, 2]  # ok", "naïve — ünïcödé ✓", "  two  spaces\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x", add_bos=True, add_eos=True)[::len(tok.encode("x")) + 1] == [1, 2]
    assert tok.decode([1] + tok.encode("hi") + [2]) == "hi"  # control tokens skipped


def test_telechat_chat_template(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert tok.chat_format() == "telechat2"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}])
    assert text == "<_system>S<_user>Q<_bot>A<_end><_user>Q2<_bot>"
    ids = tok.encode("<_user>hi<_bot>")
    assert ids[0] == tok.token_to_id("<_user>") and ids[-1] == tok.token_to_id("<_bot>")
    assert tok.token_to_id("<_end>") in tok.stop_ids() and tok.eos_id in tok.stop_ids()


def _hf_tokenizer_dir(tmp_path, chat_template):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers, decoders

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_hf_tokenizer_json_and_chatml(tmp_path):
    tok = Tokenizer.load(_hf_tokenizer_dir(tmp_path, CHATML))
    assert tok.kind == "hf" and tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.chat_format() == "chatml"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_unknown_chat_template_is_one_clear_line(tmp_path):
    tok = Tokenizer.load(_hf_tokenizer_dir(tmp_path, "{{ bos }}[INST] {{ m }} [/INST]"))
    with pytest.raises(TokenizerError, match="unknown chat template") as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)


def test_bad_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size = 10"):
        train_sentencepiece(["some text"], 10, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        Tokenizer.load(str(tmp_path))
