"""Example transform for a mixture entry: called once per line with the decoded JSON,
an in-context sample count and a seeded random.Random; returns {"input", "output"}."""

import random


def transform(data: dict, num_sample: int, r: random.Random) -> dict:
    return {"input": data.get("input", ""), "output": data.get("output", "")}
