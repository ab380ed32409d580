"""A small Chinese corpus for vocabulary extension tests (tokenizer extend, resize-vocab, stats)."""
from __future__ import annotations

import os

CHINESE = ["中华人民共和国是一个历史悠久的国家。我们的国家有很多美丽的城市和乡村。",
           "人民生活在一个和平的国家里，每个城市都有自己的历史和文化。",
           "北京是中国的首都，上海是中国最大的城市。中国的历史非常悠久，文化非常丰富。",
           "我们学习语言模型，语言模型可以理解中文，也可以生成中文文本。"] * 5
SENTENCE = "北京是中国的首都，我们的国家历史悠久。"  # not in the corpus verbatim


def write_corpus(directory: str) -> str:
    """CHINESE as a .txt file (one document; paragraphs at blank lines)."""
    path = os.path.join(directory, "zh.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(CHINESE))
    return path
