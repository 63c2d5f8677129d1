"""Long-context retrieval tasks, generated offline from local text (RULER-style).

A haystack of real sentences is cut to a target length in tokens, a needle is put at a chosen depth
(0.0: the start, 1.0: just before the question) and the model must say it back. Everything comes from
a seeded `random.Random`, so a (task, length, depth, seed) always gives the same prompt and answer.

    samples = make_samples(tok, haystack_text, tasks=["passkey", "niah_multikey"],
                           lengths=[256, 1024], depths=[0.0, 0.5, 1.0], per_cell=2, seed=0)
    outs = engine.generate([s.prompt_ids for s in samples], SamplingParams(max_tokens=MAX_ANSWER_TOKENS))
    acc = [score(s, o.text) for s, o in zip(samples, outs)]

Tasks
    passkey          a 5-digit pass key said twice, in real prose (after Mohtashami & Jaggi's test)
    niah_single      one "special magic number for <word>" (7 digits); asked for by its word
    niah_multikey    the same among 3 distractor needles with other words and numbers
    variable_track   a chain of 4 assignments VAR X = 12345, VAR Y = VAR X, ...; name every variable
                     holding the value (score: the share of them named)
Scoring is containment of the answer string in the greedy continuation (RULER's string match).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

TASKS = ("passkey", "niah_single", "niah_multikey", "variable_track")
MAX_ANSWER_TOKENS = 16
_WORDS = ("apple", "river", "candle", "violin", "harbor", "meadow", "lantern", "falcon", "pepper", "marble",
          "willow", "thunder", "saddle", "orchid", "copper", "glacier", "velvet", "compass", "ember", "quartz")


@dataclass
class Sample:
    task: str
    length: int  # the prompt's length in tokens (close to the asked one: whole sentences are kept)
    depth: float  # where the needle sits in the haystack, 0..1
    prompt: str
    answers: list[str]  # every one must appear in the output (variable_track: the share that does)
    prompt_ids: list[int] = field(default_factory=list)
    target: int = 0  # the length asked for


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace normalised (Project Gutenberg line breaks removed)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if len(s) > 1]


def _needle(task: str, rng: random.Random) -> tuple[list[str], str, list[str]]:
    """(needle sentences, question, answers)."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        return ([f"The pass key is {key}. Remember it. {key} is the pass key."],
                "What is the pass key? The pass key is", [key])
    if task in ("niah_single", "niah_multikey"):
        words = rng.sample(_WORDS, 4)
        values = [str(rng.randint(1000000, 9999999)) for _ in words]
        n = 1 if task == "niah_single" else 4
        needles = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(words[:n], values[:n])]
        return (needles, f"What is the special magic number for {words[0]} mentioned in the provided text? "
                         f"The special magic number for {words[0]} mentioned in the provided text is", [values[0]])
    if task == "variable_track":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (chain, f"Find all variables that are assigned the value {value} in the text above. "
                       f"Answer: the variables assigned the value {value} are:", names)
    raise ValueError(f"unknown retrieval task {task!r}; known: {', '.join(TASKS)}")


def make_sample(tok, hay: list[str], task: str, length: int, depth: float, rng: random.Random) -> Sample:
    """One prompt of about `length` tokens: instruction, haystack with the needle(s) at `depth`, question.

    The haystack starts at a random sentence of `hay` (wrapping around) and takes whole sentences until
    the token budget is spent; multi-sentence needles (distractors, variable chains) are spread from
    `depth` towards the end, in order."""
    needles, question, answers = _needle(task, rng)
    head = ("Some important information is hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it.\n\n")
    n_tok = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    budget = length - n_tok(head) - n_tok("\n\n" + question) - sum(n_tok(" " + x) for x in needles)
    if budget < 8:
        raise ValueError(f"length {length} is too short for the {task} task")
    # Whole sentences from a random start; one that does not fit is skipped for a shorter one, so
    # the prompt ends within a few tokens of `length`.
    start, body, costs, used = rng.randrange(len(hay)), [], [], 0
    for j in range(len(hay)):
        if budget - used < 4 or j - len(body) > 200:
            break
        s = hay[(start + j) % len(hay)]
        cost = n_tok(" " + s)
        if used + cost <= budget:
            body.append(s)
            costs.append(cost)
            used += cost
    if task == "niah_multikey":  # the asked needle at `depth`, distractors anywhere
        spots = [depth] + [rng.random() for _ in needles[1:]]
    else:  # a chain keeps its order, spread between depth and the end
        spots = [depth + (1 - depth) * i / max(len(needles), 1) for i in range(len(needles))]
    # sentence boundary k sits after sum(costs[:k]) tokens: put each needle at the nearest one
    bounds = [sum(costs[:k]) for k in range(len(body) + 1)]
    at = [min(range(len(bounds)), key=lambda k: abs(bounds[k] - spot * used)) for spot in spots]
    for k, needle in sorted(zip(at, needles), key=lambda x: -x[0]):  # back to front: indices hold
        body.insert(k, needle)
    prompt = head + " ".join(body) + "\n\n" + question
    ids = tok.encode(prompt, add_special_tokens=True)
    return Sample(task, len(ids), depth, prompt, answers, ids, length)


def make_samples(tok, text: str, tasks=TASKS, lengths=(256, 512, 1024, 2048), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                 per_cell: int = 2, seed: int = 0) -> list[Sample]:
    """per_cell samples for every (task, length, depth), reproducibly from `seed`."""
    hay = sentences(text)
    out = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(per_cell):
                    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{i}")
                    out.append(make_sample(tok, hay, task, length, depth, rng))
    return out


def score(sample: Sample, output: str) -> float:
    """1.0 when the answer is in the output (variable_track: the share of the variables named)."""
    found = [a in output for a in sample.answers]
    if sample.task == "variable_track":
        return sum(found) / len(found)
    return float(all(found))


def answer(model, tok, info, make_policy, samples: list[Sample], batch: int) -> tuple[list[dict], dict]:
    """Answer every sample greedily, one engine per asked length (its rows sized for it).

    info: the model's ModelInfo (adore.models.load_model); make_policy() gives a fresh policy for
    each engine. Returns the mean score of each (task, asked length, depth) as records {"task",
    "length", "depth", "acc", "n"}, and the engines' summed counters (steps, released, rebuilt)."""
    from collections import defaultdict

    from .config import SamplingParams
    from .engine import Engine

    cells: dict[tuple, list[float]] = defaultdict(list)
    stats = {"steps": 0, "released": 0, "rebuilt": 0}
    for n in sorted({s.target for s in samples}):
        group = [s for s in samples if s.target == n]
        engine = Engine(model, tok, make_policy(), info=info, max_batch=min(batch, len(group)),
                        max_seq_len=max(len(s.prompt_ids) for s in group) + MAX_ANSWER_TOKENS)
        outs = engine.generate([s.prompt_ids for s in group], SamplingParams(max_tokens=MAX_ANSWER_TOKENS))
        for s, o in zip(group, outs):
            cells[(s.task, n, s.depth)].append(score(s, o.text))
        for k in stats:
            stats[k] += engine.stats.get(k, 0)
    records = [{"task": t, "length": n, "depth": d, "acc": sum(v) / len(v), "n": len(v)}
               for (t, n, d), v in sorted(cells.items())]
    return records, stats


def mean_accuracy(records: list[dict]) -> float:
    """The mean score over every sample behind the records."""
    n = sum(r["n"] for r in records)
    return sum(r["acc"] * r["n"] for r in records) / n if n else 0.0
