"""``mindport chat`` driven through stdin, and ``--quantize int8`` on the command line (generate, eval)."""
import io
import os
import shutil

import numpy as np
import pytest

from mindport.cli import main


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny TeleChat2 beside a byte-level tokenizer with a ChatML template (<|im_start|>/<|im_end|>)."""
    from mindport import AutoModelForCausalLM
    from mindport.tokenizer import Tokenizer
    from testkit.tokenizers import chat_dir

    tok_dir = chat_dir(tmp_path_factory.mktemp("tok"), "qwen_moe")
    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa", vocab_size=Tokenizer.load(tok_dir).vocab_size,
                                             max_position_embeddings=256)
    model.init_weights(0)
    out = str(tmp_path_factory.mktemp("model") / "m")
    model.save_pretrained(out)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), out)
    return out


def test_chat_keeps_the_conversation_in_the_template_and_resets(chat_model, capsys, monkeypatch):
    """The second prompt is transformers' rendering of the first exchange (the reply as printed) plus the
    second message; /reset starts over; end of input leaves with 0."""
    from transformers import AutoTokenizer

    from mindport.commands import chat

    calls = []

    def spy(model, streamer, ids, args):
        reply = real(model, streamer, ids, args)
        calls.append((ids, reply))
        return reply

    real = chat.generate_reply
    monkeypatch.setattr(chat, "generate_reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world\nthe quick fox\n/reset\nOn the other hand\n"))
    assert main(["chat", "--load", chat_model, "--system", "Be brief.", "--greedy", "--max-new-tokens", "5",
                 "--quantize", "int8"]) == 0
    (first, reply1), (second, reply2), (third, _) = calls
    assert capsys.readouterr().out == "".join(reply + "\n" for _, reply in calls)
    theirs = AutoTokenizer.from_pretrained(chat_model)

    def rendered(*contents):
        roles = ["system"] + ["user", "assistant"] * 2
        messages = [{"role": r, "content": c} for r, c in zip(roles, ("Be brief.",) + contents)]
        return list(theirs.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])

    assert reply1 and first == rendered("Hello world")
    assert second == rendered("Hello world", reply1, "the quick fox")
    assert third == rendered("On the other hand")  # /reset forgot the first two exchanges


def test_chat_drops_the_oldest_exchanges_that_do_not_fit(chat_model, capsys, monkeypatch):
    from mindport.commands.chat import fit_history
    from mindport.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_model)
    system = [{"role": "system", "content": "Be brief."}]
    exchanges = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "the quick fox"},
                 {"role": "user", "content": "On the"}, {"role": "assistant", "content": "other hand"}]
    message = {"role": "user", "content": "again"}
    last_only = tok.apply_chat_template(system + exchanges[2:] + [message], add_generation_prompt=True)
    assert fit_history(tok, system, exchanges, message, len(last_only)) == (exchanges[2:], last_only)
    assert fit_history(tok, system, exchanges, message, 1000)[0] == exchanges
    assert "the oldest exchange was dropped" in capsys.readouterr().err
    # a message that cannot fit alone: one error line, and the chat goes on
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world " * 40 + "\n/exit\nnot read\n"))
    assert main(["chat", "--load", chat_model, "--max-new-tokens", "200"]) == 0
    captured = capsys.readouterr()
    assert "mindport: error: message: " in captured.err and "beside --max-new-tokens 200" in captured.err
    assert captured.out == ""


def test_quantize_flag_of_generate_and_eval(chat_model, capsys, tmp_path):
    from testkit.sft_data import write

    assert main(["generate", "--load", chat_model, "--prompt", "Hello", "--greedy", "--max-new-tokens", "4",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    data = write(str(tmp_path / "data"), np.random.default_rng(0).integers(0, 300, (4, 16)), 300)
    losses = []
    for extra in ([], ["--quantize", "int8"]):
        assert main(["eval", "--load", chat_model, "--data", data] + extra) == 0
        losses.append(float(capsys.readouterr().out.split("loss: ")[1].split()[0]))
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.01 * losses[0]
