"""Tokenizer training, encode/decode, special ids and chat templates (sentencepiece and HF json);
encoding, decoding and streamed decoding against transformers' AutoTokenizer."""
import json
import os

import pytest

from mindport.tokenizer import StreamDecoder, Tokenizer, TokenizerError, train_sentencepiece
from testkit import tokenizers


def test_trained_sentencepiece_round_trips_and_has_telechat_ids(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)  # TeleChat2's bos / eos / pad
    for text in ["The for statement\n    x = [1, 2]  # ok", "naïve — ünïcödé ✓", "  two  spaces\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x")[0] == 1 and tok.encode("x", add_special_tokens=False)[0] != 1  # add_bos_token
    assert tok.decode(tok.encode("hi") + [2]) == "hi"  # control tokens skipped


def test_telechat_chat_template(tok_dir):
    """A trained tokenizer carries TeleChat2's template; its end of turn <_end> stops a chat reply."""
    tok = Tokenizer.load(tok_dir)
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<_system>S\n<_user>Q<_bot>A<_end>\n<_user>Q2<_bot>"
    ids = tok.encode("<_user>hi<_bot>", add_special_tokens=False)  # as a chat prompt is encoded
    assert ids[0] == tok.token_to_id("<_user>") and ids[-1] == tok.token_to_id("<_bot>")
    assert tok.stop_ids(chat=True) == [tok.eos_id, tok.token_to_id("<_end>")] and tok.stop_ids() == [tok.eos_id]


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
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_template_errors_are_one_line_naming_the_template_file(tmp_path):
    """A template that raises, or does not compile, fails in one line naming the file it came from."""
    directory = _hf_tokenizer_dir(tmp_path, "{{ raise_exception('only user messages') }}")
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'tokenizer_config.json'}: template error: only user") as err:
        Tokenizer.load(directory).apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'chat_template.jinja'}: template syntax error at line 1"):
        Tokenizer.load(directory).apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: no chat template"):
        Tokenizer.load(directory).apply_chat_template([{"role": "user", "content": "hi"}])
    assert Tokenizer.load(directory, family="qwen_moe").apply_chat_template(  # the family default
        [{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>system\n")


def test_named_templates(tmp_path):
    named = [{"name": "default", "template": CHATML}, {"name": "plain", "template": "{{ messages[0].content }}"}]
    tok = Tokenizer.load(_hf_tokenizer_dir(tmp_path, named))
    hi = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(hi, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.apply_chat_template(hi, tokenize=False, chat_template="plain") == "hi"
    with pytest.raises(TokenizerError, match="chat template 'other' not found"):
        tok.apply_chat_template(hi, chat_template="other")


def test_bad_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size = 10"):
        train_sentencepiece(["some text"], 10, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        Tokenizer.load(str(tmp_path))


PROMPTS = ["Hello world", "你好世界 the fox 龘", "The for statement\n  x = 1", "On the"]


@pytest.fixture(scope="module", params=tokenizers.KINDS)
def built(request, tmp_path_factory):
    """(kind, our Tokenizer, transformers' AutoTokenizer) over one locally built tokenizer directory."""
    from transformers import AutoTokenizer

    directory = tokenizers.build(request.param, str(tmp_path_factory.mktemp(request.param)))
    return request.param, Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)


def test_encode_and_decode_equal_transformers(built):
    kind, ours, theirs = built
    for prompt in PROMPTS:
        ids = ours.encode(prompt)
        assert ids == theirs(prompt).input_ids, (kind, prompt)
        assert ours.encode_batch([prompt, prompt], add_special_tokens=False)[1] == \
            theirs(prompt, add_special_tokens=False).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    if kind != "byte_level":  # Llama-style and TeleChat2-style prompts start with BOS
        assert ours.encode("Hello")[0] == ours.bos_id == theirs.bos_token_id


def test_streamed_reply_concatenates_to_decode_of_the_full_ids(built):
    """A continuation starting a new word keeps its space after the prompt (Metaspace), and a Chinese
    character whose bytes are split over tokens is never written half (no U+FFFD piece)."""
    kind, ours, theirs = built
    prompt = ours.encode("Hello world")
    reply = ours.encode(" On the 龘 你好", add_special_tokens=False)
    split = [k for k in range(len(reply)) if ours.decode(prompt + reply[:k + 1]).endswith("\ufffd")]
    assert split, "龘 should be split over byte tokens"
    stream = StreamDecoder(ours, prompt)
    pieces = [stream.push(i) for i in reply] + [stream.flush()]
    full = theirs.decode(prompt + reply, skip_special_tokens=True)
    assert full == "Hello world On the 龘 你好", kind
    assert stream.prompt_text + "".join(pieces) == full and stream.reply == " On the 龘 你好"
    assert all("\ufffd" not in p for p in pieces)
    cut = StreamDecoder(ours, prompt)  # generation stopped inside 龘: flush writes what its bytes decode to
    pieces = [cut.push(i) for i in reply[:split[0] + 1]] + [cut.flush()]
    assert cut.prompt_text + "".join(pieces) == theirs.decode(cut.ids, skip_special_tokens=True)


def test_stream_goes_on_past_bytes_that_never_form_a_character(built):
    """A model may emit byte tokens that are not UTF-8 (a character's lead byte, then a word): the
    stream writes them as U+FFFD, as decode does, and keeps writing what follows."""
    kind, ours, theirs = built
    prompt = ours.encode("Hello world")
    word = ours.encode(" On the", add_special_tokens=False)
    split = ours.encode(" 龘", add_special_tokens=False)
    lead = [i for k, i in enumerate(split) if ours.decode(split[:k + 1]).endswith("\ufffd")][:1]
    assert lead, "龘 should be split over byte tokens"
    reply = word + lead + word + lead + lead + word
    stream = StreamDecoder(ours, prompt)
    pieces = [stream.push(i) for i in reply] + [stream.flush()]
    full = theirs.decode(prompt + reply, skip_special_tokens=True)
    assert stream.prompt_text + "".join(pieces) == full, kind
    assert stream.reply == full[len(stream.prompt_text):] and stream.reply.endswith("On the")


def test_chat_template_jinja_is_read_and_saved(tmp_path):
    """transformers 5 saves the template as chat_template.jinja; it wins over tokenizer_config.json's."""
    from transformers import AutoTokenizer

    (tmp_path / "src").mkdir()
    directory = _hf_tokenizer_dir(tmp_path / "src", "{{ bos }}[INST] {{ m }} [/INST]")
    (tmp_path / "src" / "chat_template.jinja").write_text(CHATML)
    tok = Tokenizer.load(directory)
    assert tok.chat_template == AutoTokenizer.from_pretrained(directory).chat_template == CHATML
    assert tok.chat_template_source == str(tmp_path / "src" / "chat_template.jinja")
    tok.save(str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "chat_template.jinja").read_text() == CHATML
    assert Tokenizer.load(str(tmp_path / "copy")).chat_template == CHATML


def test_empty_input_files_are_named(tmp_path):
    from mindport.tokenizer import read_texts

    for name, text in [("empty.txt", " \n"), ("empty.jsonl", "\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(TokenizerError, match=f"{tmp_path / name}: empty"):
            list(read_texts([str(tmp_path / name)]))
