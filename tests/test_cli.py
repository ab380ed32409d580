"""The command line: one-line errors with exit 2 for bad input; generate, eval and demo end to end."""
import json
import os
import subprocess
import sys

import pytest

from mindport.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mindport: error: "), err
    return lines[0]


def _save_tiny_model(out: str, vocab_size: int) -> str:
    """A seeded tiny TeleChat2 in mindport format in ``out`` (beside its tokenizer)."""
    import mindspore as ms

    from mindport import AutoConfig, AutoModelForCausalLM
    from mindport.train.checkpoint import write_safetensors

    ms.set_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_preset("telechat2-tiny-gqa", vocab_size=vocab_size))
    model.config.save(os.path.join(out, "config.json"))
    write_safetensors(os.path.join(out, "model.safetensors"), {n: p.asnumpy() for n, p in model.parameters_and_names()})
    return out


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A tiny model saved in mindport format beside a trained sentencepiece tokenizer."""
    from mindport.corpus import pydoc_topics
    from mindport.tokenizer import train_sentencepiece

    out = str(tmp_path_factory.mktemp("tiny_saved"))
    tok = train_sentencepiece(pydoc_topics()[:8], 400, out)
    return _save_tiny_model(out, tok.vocab_size)


@pytest.fixture(scope="module")
def llama_style_saved(tmp_path_factory):
    """A tiny model beside a Llama-style tokenizer.json (Metaspace, byte fallback, post-processor adding <s>)."""
    from mindport.tokenizer import Tokenizer
    from testkit.tokenizers import metaspace_bos

    out = metaspace_bos(str(tmp_path_factory.mktemp("llama_style")))
    return _save_tiny_model(out, Tokenizer.load(out).vocab_size)


def test_bad_inputs_give_one_line_errors(capsys, tmp_path, tiny_saved):
    assert "no such config file" in _error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert "unknown key 'runner_config.bogus'" in _error(
        capsys, ["train", "--config", "configs/telechat2/tiny_train.yaml", "--set", "runner_config.bogus=1"])
    assert "train_dataset.data_dir: not set" in _error(capsys, ["train", "--config", "configs/telechat2/tiny_train.yaml"])
    assert "'amp_level' = 'O3'" in _error(capsys, ["train", "--config", "configs/telechat2/tiny_train.yaml",
                                                   "--set", "runner_config.amp_level=O3"])
    assert "vocab_size = 10" in _error(capsys, ["tokenizer", "train", "--vocab-size", "10", "--out", str(tmp_path / "t")])
    assert "no such input file" in _error(capsys, ["data", "prepare", "--input", str(tmp_path / "none.txt"),
                                                   "--tokenizer", tiny_saved, "--out", str(tmp_path / "d")])
    (tmp_path / "x.csv").write_text("a,b")
    assert "unsupported input" in _error(capsys, ["data", "prepare", "--input", str(tmp_path / "x.csv"),
                                                  "--tokenizer", tiny_saved, "--out", str(tmp_path / "d")])
    assert "not a prepared data directory" in _error(capsys, ["eval", "--load", tiny_saved, "--data", str(tmp_path)])
    assert "--prompt: empty" in _error(capsys, ["generate", "--load", tiny_saved, "--prompt", "  "])
    assert "no such model directory" in _error(capsys, ["generate", "--load", str(tmp_path / "nope"), "--prompt", "x"])
    assert "--temperature" in _error(capsys, ["generate", "--load", tiny_saved, "--prompt", "x", "--temperature", "0"])
    for penalty in ("0", "-1"):
        assert f"--repetition-penalty {float(penalty)}: expected a positive number" in _error(
            capsys, ["generate", "--load", tiny_saved, "--prompt", "x", "--repetition-penalty", penalty])
    (tmp_path / "empty.txt").write_text("")
    assert f"{tmp_path / 'empty.txt'}: empty" in _error(
        capsys, ["data", "prepare", "--input", str(tmp_path / "empty.txt"), "--tokenizer", tiny_saved,
                 "--out", str(tmp_path / "d")])
    (tmp_path / "short.txt").write_text("hi")
    assert f"{tmp_path / 'short.txt'}: 1 documents" in _error(
        capsys, ["data", "prepare", "--input", str(tmp_path / "short.txt"), "--tokenizer", tiny_saved,
                 "--out", str(tmp_path / "d")])


def test_failing_chat_template_is_a_one_line_error(capsys, tmp_path, tiny_saved):
    import json
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_saved, model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    assert f"{model_dir / 'tokenizer_config.json'}: template error: no" in _error(
        capsys, ["generate", "--load", str(model_dir), "--prompt", "hi", "--chat"])


def test_generate_streams_text(capsys, tiny_saved):
    assert main(["generate", "--load", tiny_saved, "--prompt", "The for", "--max-new-tokens", "8", "--greedy"]) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("The for") and len(plain.strip()) > len("The for")
    assert main(["generate", "--load", tiny_saved, "--prompt", "The for", "--max-new-tokens", "8", "--greedy",
                 "--stream"]) == 0
    assert capsys.readouterr().out == plain  # the streamed pieces add up to the same text
    assert main(["generate", "--load", tiny_saved, "--prompt", "hello", "--chat", "--system", "", "--max-new-tokens",
                 "4", "--top-k", "5", "--top-p", "0.9", "--seed", "3"]) == 0


def test_generate_chat_sends_the_template_ids_and_stops_at_the_end_of_turn(capsys, monkeypatch, tiny_saved):
    """--chat: the prompt ids are the chat template's (TeleChat2's, system included), and the reply stops at
    EOS or the template's end-of-turn token <_end>."""
    from mindport.models.causal_lm import CausalLM
    from mindport.tokenizer import Tokenizer

    seen = {}

    def fake_generate(self, input_ids, max_new_tokens, **kwargs):
        seen.update(ids=[int(i) for i in input_ids[0]], stop=kwargs["eos_token_id"])
        return input_ids

    monkeypatch.setattr(CausalLM, "generate", fake_generate)
    assert main(["generate", "--load", tiny_saved, "--prompt", "hello", "--chat", "--system", "S"]) == 0
    tok = Tokenizer.load(tiny_saved)
    assert seen["ids"] == tok.encode("<_system>S\n<_user>hello<_bot>", add_special_tokens=False)
    assert seen["stop"] == [tok.eos_id, tok.token_to_id("<_end>")]


@pytest.mark.parametrize("stream", [False, True])
def test_generate_prints_transformers_decode_of_the_full_ids(capsys, llama_style_saved, stream):
    """Prompt ids are transformers' (with <s>); the printed text is transformers' decode of prompt + reply."""
    from transformers import AutoTokenizer

    from mindport import AutoModelForCausalLM

    theirs = AutoTokenizer.from_pretrained(llama_style_saved)
    prompt = theirs("Hello world").input_ids
    assert prompt[0] == theirs.bos_token_id
    ids = AutoModelForCausalLM.from_pretrained(llama_style_saved).generate(
        [prompt], max_new_tokens=8, eos_token_id=theirs.eos_token_id)[0]
    assert main(["generate", "--load", llama_style_saved, "--prompt", "Hello world", "--max-new-tokens", "8",
                 "--greedy"] + (["--stream"] if stream else [])) == 0
    assert capsys.readouterr().out == theirs.decode(ids, skip_special_tokens=True) + "\n"


def test_streamer_pieces_add_up_to_the_decoded_reply(llama_style_saved):
    """A reply starting a new word keeps its space; 龘's byte tokens are written as one character."""
    from transformers import AutoTokenizer

    from mindport.commands.generate import TextStreamer
    from mindport.tokenizer import Tokenizer

    tok, theirs = Tokenizer.load(llama_style_saved), AutoTokenizer.from_pretrained(llama_style_saved)
    prompt = tok.encode("Hello world")
    reply = tok.encode(" On 龘 done", add_special_tokens=False)
    pieces = []
    streamer = TextStreamer(tok, [tok.eos_id], pieces.append, prompt)
    for i in reply + [tok.eos_id, reply[0]]:
        streamer([i])
    assert "".join(pieces) == streamer.text() == " On 龘 done" and all("\ufffd" not in p for p in pieces)
    assert theirs.decode(prompt + reply, skip_special_tokens=True) == "Hello world" + "".join(pieces)


def test_tokenizer_data_train_eval_commands(capsys, tmp_path):
    tok_dir, data_dir, out = str(tmp_path / "tok"), str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["tokenizer", "train", "--vocab-size", "512", "--out", tok_dir]) == 0
    (tmp_path / "docs.jsonl").write_text("\n".join('{"text": "def f(x): return x + %d"}' % i for i in range(300)))
    assert main(["data", "prepare", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", tok_dir, "--out", data_dir,
                 "--seq-length", "32"]) == 0
    assert "samples of 32" in capsys.readouterr().out
    assert main(["train", "--config", "configs/telechat2/tiny_train.yaml", "--no-progress",
                 "--set", "model.model_config.vocab_size=512", "--set", f"train_dataset.data_dir={data_dir}",
                 "--set", f"output_dir={out}", "--set", "runner_config.seq_length=32", "--set",
                 "runner_config.batch_size=2", "--set", "lr_schedule.total_steps=3", "--set",
                 "runner_config.peak_tflops=1.0"]) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "done: step 3" in printed
    ckpt = os.path.join(out, "checkpoints", "step_00000003")
    assert main(["eval", "--load", ckpt, "--data", data_dir, "--max-samples", "6"]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    import math

    assert float(lines["perplexity"]) == pytest.approx(math.exp(float(lines["loss"])), rel=1e-4)
    assert lines["samples"] == "6"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_demo_smoke(tmp_path, lora):
    """`mindport demo` end to end with reduced step counts, as a user runs it (a subprocess): pretraining,
    chat SFT (full or LoRA) on packed conversations, an answer through the chat template, the export."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mindport.cli", "demo", "--out", str(out), "--steps", "4",
                           "--sft-steps", "3", "--seq-len", "128", "--batch-size", "2", "--vocab-size", "512",
                           "--max-new-tokens", "4"] + (["--lora"] if lora else []),
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, GLOG_v="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for marker in ("[1/7] tokenizer", "[2/7] data", "[3/7] pretrain", "step 4/4", "[4/7] checkpoint", "[5/7] chat data",
                   "[6/7] chat SFT", "step 3/3", "[7/7] chat", "user: Explain", "exported HF format"):
        assert marker in text, text
    index = json.loads((out / "chat_data" / "index.json").read_text())
    assert index["labels"] and index["segments"] and 0 < index["num_supervised_tokens"] < index["num_tokens"]
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    assert (out / "sft" / "loss_curve.png").is_file() and (out / "run" / "metrics.jsonl").is_file()
    sft = sorted((out / "sft" / "checkpoints").iterdir())[-1]
    assert (sft / "adapter_config.json").is_file() == lora  # a LoRA run saves the adapter, merged for the export
    from mindport import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "hf")).config.vocab_size == 512
