"""Generate the tiny example corpus: Chinese and English sentences composed from small
word lists with a fixed seed.  The text is the project's own; its regular structure lets
a tiny model lower its loss visibly within a few hundred steps on a laptop CPU.

The pretraining text also holds the QUESTIONS, each followed by its answer, so that the
example prompts (prompts.jsonl, and the demo's summary) are text the model has seen.
A prompt with a character the corpus lacks is encoded as byte-fallback pieces (<0xE4>
...) the model never saw; the tied embeddings of all never-seen pieces drift the same
way under Adam, so one of them in the prompt makes the model answer with more of them
(NUL bytes and stray fragments).  A tiny model knows its corpus and nothing else.

    python examples/tiny/make_corpus.py      # rewrites examples/tiny/data/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ZH_SUBJECTS = ["小明", "老师", "我的朋友", "这位工程师", "研究人员", "学生们", "一只猫", "农民", "医生", "妈妈"]
ZH_VERBS = ["喜欢", "正在学习", "每天阅读", "认真研究", "经常讨论", "想要了解", "写了一篇关于", "画了一幅"]
ZH_OBJECTS = ["数学", "历史", "天气", "大模型", "长江", "春天的花", "计算机", "音乐", "北京的胡同", "围棋", "茶叶"]
ZH_TAILS = ["。", "，觉得很有意思。", "，并且做了笔记。", "，一直到晚上。", "，然后去散步了。"]
ZH_FACTS = [
    "中国的首都是北京。",
    "长江是中国最长的河流。",
    "一年有十二个月。",
    "水在零度时会结冰。",
    "太阳从东方升起。",
    "九格是一个大语言模型。",
    "熊猫喜欢吃竹子。",
    "月亮绕着地球转。",
]

EN_SUBJECTS = [
    "The engineer",
    "My friend",
    "A small cat",
    "The teacher",
    "Every student",
    "The old farmer",
    "A researcher",
    "The pilot",
    "Our neighbour",
    "The doctor",
]
EN_VERBS = ["likes", "is studying", "reads about", "writes about", "talks about", "dreams of", "paints", "teaches"]
EN_OBJECTS = [
    "mathematics",
    "the weather",
    "large language models",
    "the river",
    "spring flowers",
    "computers",
    "music",
    "old maps",
    "the game of go",
    "green tea",
]
EN_TAILS = [".", " every morning.", " after dinner.", " with great care.", " on quiet weekends."]
EN_FACTS = [
    "The capital of France is Paris.",
    "Water freezes at zero degrees Celsius.",
    "A week has seven days.",
    "The sun rises in the east.",
    "Cats like to sleep in warm places.",
    "Two plus two equals four.",
]

QUESTIONS = [
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一年有几个月？", "一年有十二个月。"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("熊猫喜欢吃什么？", "熊猫喜欢吃竹子。"),
    ("What do cats like?", "Cats like to sleep in warm places."),
]


ZH_QUESTIONS = [pair for pair in QUESTIONS if not pair[0].isascii()]
EN_QUESTIONS = [pair for pair in QUESTIONS if pair[0].isascii()]


def zh_line(rng: random.Random) -> str:
    parts = [
        f"{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}{rng.choice(ZH_TAILS)}"
        for _ in range(rng.randint(2, 5))
    ]
    if rng.random() < 0.4:
        parts.append(rng.choice(ZH_FACTS))
    if rng.random() < 0.3:
        parts.insert(0, "".join(rng.choice(ZH_QUESTIONS)))  # a line may open with a question and its answer
    return "".join(parts)


def en_line(rng: random.Random) -> str:
    parts = [
        f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)}{rng.choice(EN_TAILS)}"
        for _ in range(rng.randint(2, 5))
    ]
    if rng.random() < 0.4:
        parts.append(rng.choice(EN_FACTS))
    if rng.random() < 0.3:
        parts.insert(0, " ".join(rng.choice(EN_QUESTIONS)))
    return " ".join(parts)


def main(out_dir: Path = Path(__file__).parent / "data", lines: int = 1500, seed: int = 9) -> None:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Chinese as raw text (the guide's txt -> jsonl -> index path), with blank lines to skip.
    zh = []
    for i in range(lines):
        zh.append(zh_line(rng))
        if i % 50 == 49:
            zh.append("")
    (out_dir / "zh.txt").write_text("\n".join(zh) + "\n", encoding="utf-8")
    # English as jsonl (the jsonl -> index path).
    with open(out_dir / "en.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(lines):
            handle.write(json.dumps({"input": "", "output": en_line(rng)}, ensure_ascii=False) + "\n")
    # Question/answer pairs for sft.
    with open(out_dir / "qa.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(lines // 3):
            question, answer = rng.choice(QUESTIONS)
            handle.write(json.dumps({"input": question, "output": answer}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
