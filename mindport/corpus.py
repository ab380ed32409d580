"""The embedded default corpus: CPython's ``pydoc_data.topics`` (~465 KB of English text)."""
from __future__ import annotations


def pydoc_topics() -> list[str]:
    """One document per pydoc topic, in a stable (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


SYSTEM_PROMPT = "You answer questions about the Python language from its reference manual."
QUESTIONS = ("What does the reference manual say about {}?", "Explain {}.", "Tell me about {}.")


def _topic_summary(doc: str, max_chars: int = 240) -> tuple[str, str]:
    """(title, the first prose paragraph (not code, not a heading) of a pydoc topic cut at a sentence end within ``max_chars``;
    "" if it has none)."""
    title, _, body = doc.partition("\n")
    for block in body.lstrip("*=\n").split("\n\n"):
        paragraph = " ".join(block.split())
        if block.startswith(" ") or any(rule in block for rule in ("===", "***", "---")) or len(paragraph) < 40 or "::=" in paragraph or not paragraph[0].isalpha() or paragraph.startswith(
                ("New in", "Changed in", "Added in", "Deprecated")):
            continue
        if len(paragraph) > max_chars:
            cut = paragraph[:max_chars]
            paragraph = cut[:cut.rfind(". ") + 1] if ". " in cut else cut.rsplit(" ", 1)[0] + "..."
        return title.strip(), paragraph[:-1] + "." if paragraph.endswith(":") else paragraph
    return title.strip(), ""


def chat_examples() -> list[dict]:
    """Synthetic conversations built from the corpus (the demo's SFT set), as ``{"messages": [...]}``
    records: a system prompt, each topic asked about in three phrasings and answered with its first
    prose paragraph; every fifth record goes on to a second topic. (Every record has a system prompt:
    TeleChat2's template adds a long default one to a conversation without.)"""
    topics, seen = [], set()
    for doc in pydoc_topics():
        title, answer = _topic_summary(doc)
        if title not in seen and answer:
            seen.add(title)
            subject = title[0].lower() + title[1:] if title[1:2].islower() else title
            topics.append((subject, answer))
    records = []
    for k, (question, (subject, answer)) in enumerate((q, t) for q in QUESTIONS for t in topics):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.format(subject)},
                    {"role": "assistant", "content": answer}]
        if k % 5 == 0:
            other_subject, other_answer = topics[(k * 7 + 1) % len(topics)]
            messages += [{"role": "user", "content": QUESTIONS[1].format(other_subject)},
                         {"role": "assistant", "content": other_answer}]
        records.append({"messages": messages})
    return records
