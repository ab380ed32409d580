"""``mindport serve``'s one-line errors (before any model loads) and the stop-string cutter."""
from __future__ import annotations

import socket

import pytest

from mindport.cli import main
from mindport.serve.text import StopStrings


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mindport: error: "), lines
    return lines[0]


def test_bad_arguments_are_one_line_errors(capsys, monkeypatch, tmp_path):
    from mindport.commands import serve

    assert "no such model directory" in _error(capsys, ["serve", "--load", str(tmp_path / "none")])
    assert "--max-batch 0: expected a positive integer" in _error(
        capsys, ["serve", "--load", str(tmp_path), "--max-batch", "0"])
    assert "--timeout -1.0" in _error(capsys, ["serve", "--load", str(tmp_path), "--timeout", "-1"])
    assert "expected NAME=DIR" in _error(capsys, ["serve", "--load", str(tmp_path), "--adapter", "lonely"])
    assert "no such adapter directory" in _error(capsys, ["serve", "--load", str(tmp_path), "--adapter",
                                                          f"a={tmp_path / 'none'}"])
    assert "--port 99999: expected a port number up to 65535" in _error(
        capsys, ["serve", "--load", str(tmp_path), "--port", "99999"])
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use fails before any model loads
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: cannot listen there: Address already in use"):
            serve._check_address("127.0.0.1", port)
    monkeypatch.setattr(serve, "_importable", lambda name: name != "fastapi")
    assert _error(capsys, ["serve", "--load", str(tmp_path)]).endswith(
        "mindport serve needs fastapi: pip install 'mindport[serve]'")


@pytest.mark.parametrize("pieces, stops, expected", [
    (["hello a", "b", "d ", "x", "z", "ab", "c", "more"], ["abc", "xy"], ["hello ", "", "abd ", "", "xz", "", "", ""]),
    (["fooE", "N", "D bar"], ["END"], ["foo", "", ""]),  # a stop string split over three pieces
    (["no", " stop"], [], ["no", " stop"]),
])
def test_stop_strings_hold_back_only_what_may_begin_a_stop(pieces, stops, expected):
    cutter = StopStrings(stops)
    assert [cutter.push(p) for p in pieces] == expected
    assert cutter.stopped == bool(stops) and cutter.flush() == ""


def test_text_held_back_is_released_when_the_reply_ends():
    cutter = StopStrings(["END"])
    assert (cutter.push("the EN"), cutter.flush()) == ("the ", "EN")


def test_ids_past_the_tokenizers_vocabulary_have_no_text(tmp_path):
    """A model vocabulary padded past the tokenizer's may generate such ids: they add no text."""
    from mindport.serve.text import ReplyText
    from mindport.tokenizer import Tokenizer
    from testkit.tokenizers import sentencepiece

    tok = Tokenizer.load(sentencepiece(str(tmp_path)))  # its decode refuses unknown ids
    ids = tok.encode("the quick fox", add_special_tokens=False)
    reply = ReplyText(tok, [], stop_ids=[], stop_strings=[])
    pieces = [reply.push(i) for i in (ids[0], tok.vocab_size + 3, *ids[1:])]
    assert "".join(pieces) + reply.flush() == "the quick fox" and pieces[1] == ""
