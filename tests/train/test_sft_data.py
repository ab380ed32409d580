"""SFT data: chat/alpaca/ShareGPT records -> ids, labels (assistant turns only) and segments, padded or
packed; masks equal transformers' return_assistant_tokens_mask where the template marks generation, and
ids equal transformers' apply_chat_template everywhere."""
import json

import numpy as np
import pytest

from mindport.constants import IGNORE_INDEX
from mindport.tokenizer import Tokenizer
from mindport.train.data import DataError
from mindport.train.sft_data import prepare_sft, read_records
from testkit.tokenizers import CHAT, CHATML_GENERATION, SYSTEM, chat_dir

RECORDS = [[SYSTEM] + CHAT, CHAT[:2], [CHAT[2], CHAT[3]]]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def read_out(out: str):
    index = json.loads(open(f"{out}/index.json").read())
    shape = (index["num_samples"], index["seq_length"])
    tokens = np.fromfile(f"{out}/tokens.bin", dtype=index["dtype"]).reshape(shape).astype(np.int64)
    labels = np.fromfile(f"{out}/labels.bin", dtype=np.int32).reshape(shape)
    segments = np.fromfile(f"{out}/segments.bin", dtype=np.uint16).reshape(shape)
    return index, tokens, labels, segments


def prepare_chat(tmp_path, tok, records, seq_length=96, **kwargs):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in records])
    return prepare_sft(read_records([path], "chat"), tok, str(tmp_path / "out"), seq_length, **kwargs)


def test_generation_template_labels_are_transformers_assistant_mask(tmp_path):
    from transformers import AutoTokenizer

    directory = chat_dir(tmp_path, "qwen_moe", CHATML_GENERATION)
    tok, theirs = Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)
    prepare_chat(tmp_path, tok, RECORDS)
    index, tokens, labels, segments = read_out(str(tmp_path / "out"))
    assert index["labels"] and index["segments"] and index["num_samples"] == len(RECORDS)
    for row, messages in enumerate(RECORDS):
        ref = theirs.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        n = len(ref["input_ids"])
        np.testing.assert_array_equal(tokens[row, :n], ref["input_ids"])
        np.testing.assert_array_equal(labels[row, :n], np.where(ref["assistant_masks"], ref["input_ids"], IGNORE_INDEX))
        assert (segments[row, :n] == 1).all() and (segments[row, n:] == 0).all()
        assert (labels[row, n:] == IGNORE_INDEX).all() and (tokens[row, n:] == tok.pad_id).all()


@pytest.mark.parametrize("name", ["telechat2", "qwen_moe", "mixtral", "xverse"])
def test_prefix_masks_train_each_assistant_turn_and_its_end_of_turn(tmp_path, name):
    """No {% generation %}: ids are still transformers' whole-render ids, and the supervised tokens are
    exactly each assistant reply followed by the template's end-of-turn text."""
    from transformers import AutoTokenizer

    directory = chat_dir(tmp_path, name)
    tok, theirs = Tokenizer.load(directory), AutoTokenizer.from_pretrained(directory)
    prepare_chat(tmp_path, tok, RECORDS[:1], seq_length=160)
    _, tokens, labels, _ = read_out(str(tmp_path / "out"))
    ref = theirs.apply_chat_template(RECORDS[0])["input_ids"]
    np.testing.assert_array_equal(tokens[0, :len(ref)], ref)
    trained = labels[0] != IGNORE_INDEX
    runs = np.split(np.arange(len(trained)), np.flatnonzero(np.diff(trained.astype(int))) + 1)
    replies = [theirs.decode(tokens[0, r]) for r in runs if trained[r[0]]]
    end = {"telechat2": "<_end>\n", "qwen_moe": "<|im_end|>\n", "mixtral": "</s>", "xverse": "</s>"}[name]
    assert [r.strip() for r in replies] == [m["content"] + end.strip() for m in RECORDS[0] if m["role"] == "assistant"]


def test_prefix_masks_equal_transformers_mask_of_the_same_template_with_generation_blocks(tmp_path):
    """Qwen1.5's ChatML template has no {% generation %}; with the blocks added around each reply and its
    end of turn it renders the same text, and transformers' mask of it equals the prefix-rendered labels."""
    from transformers import AutoTokenizer

    tok = Tokenizer.load(chat_dir(tmp_path, "qwen_moe"))
    theirs = AutoTokenizer.from_pretrained(chat_dir(tmp_path / "marked", "qwen_moe", CHATML_GENERATION))
    records = [[SYSTEM] + CHAT, [SYSTEM] + CHAT[:2]]
    prepare_chat(tmp_path, tok, records, seq_length=128)
    _, tokens, labels, _ = read_out(str(tmp_path / "out"))
    for row, messages in enumerate(records):
        ref = theirs.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        n = len(ref["input_ids"])
        assert tok.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
        np.testing.assert_array_equal(tokens[row, :n], ref["input_ids"])
        np.testing.assert_array_equal(labels[row, :n], np.where(ref["assistant_masks"], ref["input_ids"], IGNORE_INDEX))


def test_packing_keeps_conversations_whole_and_in_order(tmp_path):
    tok = Tokenizer.load(chat_dir(tmp_path, "qwen_moe", CHATML_GENERATION))
    prepare_chat(tmp_path, tok, RECORDS * 3, seq_length=96)
    _, single_tokens, single_labels, _ = read_out(str(tmp_path / "out"))
    lengths = [int((s > 0).sum()) for s in read_out(str(tmp_path / "out"))[3]]
    index = prepare_chat(tmp_path, tok, RECORDS * 3, seq_length=96, pack=True, overwrite=True)
    _, tokens, labels, segments = read_out(str(tmp_path / "out"))
    assert index["packed"] and index["num_samples"] < len(RECORDS) * 3
    conv = 0
    for row in range(len(tokens)):
        k = int(segments[row].max())
        assert list(np.unique(segments[row][segments[row] > 0])) == list(range(1, k + 1))
        for seg in range(1, k + 1):
            at = segments[row] == seg
            np.testing.assert_array_equal(tokens[row, at], single_tokens[conv, :lengths[conv]])
            np.testing.assert_array_equal(labels[row, at], single_labels[conv, :lengths[conv]])
            conv += 1
        assert (labels[row, segments[row] == 0] == IGNORE_INDEX).all()
    assert conv == len(RECORDS) * 3  # none lost, none split


def test_overflow_truncates_whole_turns_or_drops(tmp_path):
    tok = Tokenizer.load(chat_dir(tmp_path, "qwen_moe", CHATML_GENERATION))
    full = tok.apply_chat_template(RECORDS[0])
    first = tok.apply_chat_template(RECORDS[0][:3])  # system, user, assistant
    seq = len(first) + 4  # the first exchange fits, the second does not
    long_first = [{"role": "user", "content": "fox " * seq}, {"role": "assistant", "content": "ok"}]
    index = prepare_chat(tmp_path, tok, [RECORDS[0], long_first], seq_length=seq)
    assert len(full) > seq and (index["truncated_records"], index["dropped_records"]) == (1, 1)
    _, tokens, labels, segments = read_out(str(tmp_path / "out"))
    np.testing.assert_array_equal(tokens[0, :len(first)], first)
    assert index["num_samples"] == 1 and (segments[0, len(first):] == 0).all()
    index = prepare_chat(tmp_path, tok, [RECORDS[0], RECORDS[1]], seq_length=seq, overflow="drop", overwrite=True)
    assert (index["dropped_records"], index["truncated_records"], index["num_samples"]) == (1, 0, 1)


def test_train_on_prompt_labels_every_real_token(tmp_path):
    tok = Tokenizer.load(chat_dir(tmp_path, "qwen_moe", CHATML_GENERATION))
    prepare_chat(tmp_path, tok, RECORDS[:1], train_on_prompt=True)
    _, tokens, labels, segments = read_out(str(tmp_path / "out"))
    real = segments[0] > 0
    np.testing.assert_array_equal(labels[0, real], tokens[0, real])
    assert (labels[0, ~real] == IGNORE_INDEX).all()


def test_alpaca_and_sharegpt_records_are_the_same_conversations(tmp_path):
    tok = Tokenizer.load(chat_dir(tmp_path, "qwen_moe", CHATML_GENERATION))
    alpaca = {"system": "Be brief.", "history": [["Hello world", "the quick fox"]], "instruction": "你好",
              "input": "again", "output": "On the other hand 龘"}
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello world"},
                                  {"from": "gpt", "value": "the quick fox"}, {"from": "human", "value": "你好\nagain"},
                                  {"from": "gpt", "value": "On the other hand 龘"}]}
    a = list(read_records([write_jsonl(tmp_path / "a.jsonl", [alpaca])], "alpaca"))
    (tmp_path / "s.json").write_text(json.dumps([sharegpt]))
    s = list(read_records([str(tmp_path / "s.json")], "chat"))
    assert a[0][1] == s[0][1] == [SYSTEM, CHAT[0], CHAT[1], {"role": "user", "content": "你好\nagain"}, CHAT[3]]
    assert s[0][0] == f"{tmp_path / 's.json'}:#1"


BAD = [
    ({"text": "x"}, "key 'messages' missing"),
    ({"messages": [{"role": 3, "content": "x"}]}, "messages[0].role = 3: expected a string"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role = 'bot': expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "messages[1]: empty assistant content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
     "messages[0] content = None: expected a string"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from = 'bot'"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_a_bad_record_fails_naming_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT[:2]}, record])
    with pytest.raises(DataError) as err:
        list(read_records([path], "chat"))
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_record_the_template_refuses_is_named(tmp_path):
    tok = Tokenizer.load(chat_dir(tmp_path, "mixtral"))  # roles must alternate
    with pytest.raises(DataError, match=r"chat.jsonl:2: .*chat_template.jinja: template error: Mixtral-Instruct"):
        prepare_chat(tmp_path, tok, [CHAT[:2], [CHAT[0], CHAT[0], CHAT[1]]])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_alpaca_missing_output_is_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=f"^{path}:1: key 'output' missing"):
        list(read_records([path], "alpaca"))


def test_cli_prepares_chat_data_and_reports_counts(tmp_path, capsys):
    from mindport.cli import main

    directory = chat_dir(tmp_path, "telechat2")
    # a system message each: TeleChat2's default system prompt is long in this small vocabulary
    records = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [SYSTEM] + m[-2:]} for m in RECORDS] +
                          [{"messages": [SYSTEM, {"role": "user", "content": "fox " * 200}, CHAT[1]]}])
    args = ["data", "prepare", "--format", "chat", "--input", records, "--tokenizer", directory,
            "--out", str(tmp_path / "out"), "--seq-length", "128", "--pack"]
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "4 chat records (0 truncated, 1 dropped" in line and "packed" in line
    assert main(args) == 2 and "destination exists" in capsys.readouterr().err  # nothing replaced by accident
    assert main(args + ["--overwrite"]) == 0
    index, tokens, labels, segments = read_out(str(tmp_path / "out"))
    assert index["num_conversations"] == 3 and index["dropped_records"] == 1 and index["input_format"] == "chat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "out", "telechat2"]  # no staging left over
    assert Tokenizer.load(str(tmp_path / "out" / "tokenizer")).chat_template == Tokenizer.load(directory).chat_template
    assert main(["data", "prepare", "--format", "alpaca", "--tokenizer", directory, "--out", str(tmp_path / "x")]) == 2
    assert "--format alpaca: needs --input" in capsys.readouterr().err
