"""Mixture transform: keep input and output, with missing fields as empty strings."""

import random


def transform(data: dict, num_sample: int, r: random.Random) -> dict:
    return {"input": data.get("input", ""), "output": data.get("output", "")}
