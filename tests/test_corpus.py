"""The embedded corpus and the demo's synthetic conversations built from it."""
from mindport.corpus import SYSTEM_PROMPT, chat_examples, pydoc_topics


def test_chat_examples_are_well_formed_conversations_answered_from_the_corpus():
    records = chat_examples()
    corpus = " ".join(" ".join(doc.split()) for doc in pydoc_topics())
    assert len(records) > 150
    assert all(r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for r in records)
    assert sum(len(r["messages"]) >= 4 for r in records) > len(records) // 8  # multi-turn records
    for record in records:
        turns = [m for m in record["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        for answer in (m["content"] for m in turns if m["role"] == "assistant"):
            assert len(answer) >= 40 and "::=" not in answer
            assert answer.rstrip(".") in corpus  # the topic's own words
    assert chat_examples() == records  # deterministic
