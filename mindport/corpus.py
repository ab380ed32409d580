"""The embedded default corpus: CPython's ``pydoc_data.topics`` (~465 KB of English text)."""
from __future__ import annotations


def pydoc_topics() -> list[str]:
    """One document per pydoc topic, in a stable (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]
