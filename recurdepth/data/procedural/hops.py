"""`hops`: follow the arrows of a random permutation k times (pointer chasing).

The prompt lists a random *cyclic* permutation of the first `nodes` letters (one cycle through all of them,
drawn with Sattolo's algorithm) as arrows in alphabetical order and asks where k hops from a start letter
lead; the answer is one letter. Every hop is one lookup that depends on the previous one, and with a single
cycle no k < nodes leads back to the start (no fixed points or short cycles to shortcut through), so the
number of sequential steps is k: a graded-depth task for looped models (train on few hops, test on more).
"""

from __future__ import annotations

import re
from typing import Optional

from recurdepth.data.procedural.base import ANSWER, Sample, Task, match_prompt
from recurdepth.errors import DataError

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def parse_arrows(listing: str) -> Optional[dict]:
    """`{a: b}` of an arrow listing `a>b c>d ...` (letters, in the listing's order); None when a letter has two
    arrows. The listing is the first group of the tasks' prompt patterns, so its shape is already checked."""
    arrow = {}
    for pair in listing.split():
        a, b = pair.split(">")
        if a in arrow:
            return None
        arrow[a] = b
    return arrow


class HopsTask(Task):
    name = "hops"
    description = "where k hops along the arrows of a cyclic permutation lead (pointer chasing)"
    default_difficulty = {"min_hops": 1, "max_hops": 4, "nodes": 8}
    difficulty_keys = {"min_hops": "fewest hops", "max_hops": "most hops",
                       "nodes": "letters in the permutation (2-26, a..)"}
    _re = re.compile(r"((?:[a-z]>[a-z] )*[a-z]>[a-z])\. (\d+) hops? from ([a-z])\?" + re.escape(ANSWER))

    def check_difficulty(self, d):
        super().check_difficulty(d)
        if d["min_hops"] < 1:
            raise DataError(f"difficulty min_hops={d['min_hops']} for task 'hops' must be >= 1")
        if not 2 <= d["nodes"] <= 26:
            raise DataError(f"difficulty nodes={d['nodes']} for task 'hops' must be 2-26")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        letters = LETTERS[:d["nodes"]]
        order = list(letters)
        for i in range(len(order) - 1, 0, -1):  # Sattolo: a uniformly random single cycle
            j = rng.randrange(i)
            order[i], order[j] = order[j], order[i]
        arrow = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        arrow = dict(sorted(arrow.items()))
        k = rng.randint(d["min_hops"], d["max_hops"])
        start = rng.choice(letters)
        path = [start]
        for _ in range(k):
            path.append(arrow[path[-1]])
        edges = " ".join(f"{a}>{b}" for a, b in arrow.items())
        prompt = f"{edges}. {k} hop{'s' if k > 1 else ''} from {start}?{ANSWER}"
        return Sample(self.name, prompt, path[-1], tuple(path[1:]))

    def solve(self, prompt):
        m = match_prompt(prompt, self._re)
        arrow = parse_arrows(m.group(1)) if m else None
        if arrow is None:
            return None
        node, k = m.group(3), int(m.group(2))
        if k < 1 or k > 10_000:
            return None
        for _ in range(k):
            if node not in arrow:
                return None
            node = arrow[node]
        return node

    def size(self, prompt):
        m = match_prompt(prompt, self._re)
        return int(m.group(2)) if m else None  # hops

    def corrupt(self, sample, rng):
        letters = sorted(parse_arrows(self._re.fullmatch(sample.prompt).group(1)))
        return rng.choice([x for x in letters if x != sample.answer])


class RootTask(Task):
    """`root`: follow the arrows from a letter until a letter that points to itself.

    The prompt lists, in alphabetical order, one arrow per letter of the first `nodes` letters. They form
    `trees` chains of equal length (so no chain stands out by its size): each chain ends in a letter that points
    to itself, its root. The question asks for the root of a letter `depth` arrows above it; the answer is one
    letter. Unlike `hops` nothing needs counting: one more arrow from a root stays there, so a looped model that
    takes one arrow (or doubles its reach) per iteration reaches a fixed point and extra iterations cannot hurt.
    With a fixed `nodes` every prompt has the same length (4 nodes + 19 characters), whatever the depth asked:
    harder questions differ only in how far the answer is -- the depth sweep's task (docs/evaluation.md).

    `questions` q > 1 asks about q distinct letters of the same arrows (in random order, each `min_depth` to
    `max_depth` arrows up): the prompt asks for the first, the answer is its root followed by the others as
    ` x? r` (e.g. `c e? c g? h`). Trained with the answer-only loss, every root in the answer is a target:
    q lookups' worth of signal from one listing of the arrows, where a one-question sample gives one.
    """

    name = "root"
    description = "which self-pointing letter the arrows lead to from a letter (equal-length chains)"
    default_difficulty = {"min_depth": 1, "max_depth": 4, "nodes": 15, "trees": 3, "questions": 1}
    difficulty_keys = {"min_depth": "fewest arrows from the queried letter to its root",
                       "max_depth": "most arrows from the queried letter to its root",
                       "nodes": "letters (2-26, a..), a multiple of trees", "trees": "chains (roots)",
                       "questions": "letters asked about in one sample (the first in the prompt, the rest "
                                    "answered in the answer)"}
    _more = re.compile(r"([a-z])\? ([a-z])")
    _re = re.compile(r"((?:[a-z]>[a-z] )*[a-z]>[a-z])\. root of ([a-z])\?" + re.escape(ANSWER))

    def check_difficulty(self, d):
        super().check_difficulty(d)
        if d["min_depth"] < 1 or d["trees"] < 1:
            raise DataError(f"difficulty min_depth={d['min_depth']}, trees={d['trees']} for task 'root' must be >= 1")
        if not 2 <= d["nodes"] <= 26 or d["nodes"] % d["trees"] or d["max_depth"] >= d["nodes"] // d["trees"]:
            raise DataError(f"difficulty nodes={d['nodes']} for task 'root' must be 2-26, a multiple of trees="
                            f"{d['trees']}, with chains longer than max_depth={d['max_depth']} arrows")
        eligible = d["trees"] * (d["max_depth"] - d["min_depth"] + 1)
        if not 1 <= d["questions"] <= eligible:
            raise DataError(f"difficulty questions={d['questions']} for task 'root' must be 1-{eligible} (the "
                            f"letters {d['min_depth']}-{d['max_depth']} arrows above a root in {d['trees']} chains)")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        letters = list(LETTERS[:d["nodes"]])
        rng.shuffle(letters)
        size = d["nodes"] // d["trees"]
        chains = [letters[i:i + size] for i in range(0, len(letters), size)]  # each: top ... root
        arrow = {}
        for chain in chains:
            arrow.update(zip(chain, chain[1:]))
            arrow[chain[-1]] = chain[-1]
        edges = " ".join(f"{a}>{arrow[a]}" for a in sorted(arrow))
        if d["questions"] == 1:  # the original draw (same samples for the same seed)
            k = rng.randint(d["min_depth"], d["max_depth"])
            chain = rng.choice(chains)
            path = chain[len(chain) - 1 - k:]
            return Sample(self.name, f"{edges}. root of {path[0]}?{ANSWER}", path[-1], tuple(path[1:]))
        paths = [chain[len(chain) - 1 - k:] for chain in chains for k in range(d["min_depth"], d["max_depth"] + 1)]
        asked = rng.sample(paths, d["questions"])
        answer = asked[0][-1] + "".join(f" {p[0]}? {p[-1]}" for p in asked[1:])
        return Sample(self.name, f"{edges}. root of {asked[0][0]}?{ANSWER}", answer, tuple(asked[0][1:]))

    def eval_difficulty(self, difficulty):
        return {**difficulty, "questions": 1}  # one question per prompt: accuracy per depth, no answers to lean on

    def _arrows(self, prompt):
        m = match_prompt(prompt, self._re)
        arrow = parse_arrows(m.group(1)) if m else None
        return (None, None) if arrow is None else (arrow, m.group(2))

    @staticmethod
    def _root(arrow, node):
        for _ in range(len(arrow) + 1):
            if node not in arrow:
                return None
            if arrow[node] == node:
                return node
            node = arrow[node]
        return None  # a cycle without a root

    def solve(self, prompt):
        arrow, node = self._arrows(prompt)
        return None if arrow is None else self._root(arrow, node)

    def size(self, prompt):
        """Arrows from the asked letter to its root."""
        arrow, node = self._arrows(prompt)
        if arrow is None or self._root(arrow, node) is None:
            return None
        steps = 0
        while arrow[node] != node:
            node, steps = arrow[node], steps + 1
        return steps

    def verify(self, prompt, answer):
        """The first word is the asked letter's root; whatever follows must be further questions about these
        arrows, each answered right (`x? r`). A last question without its answer (generation cut at a token
        limit) is ignored; one with a wrong answer, or any other text, is not."""
        if not isinstance(answer, str):
            return False
        arrow, node = self._arrows(prompt)
        words = answer.split()
        if arrow is None or not words or words[0] != self._root(arrow, node):
            return False
        rest = " ".join(words[1:])
        for m in self._more.finditer(rest):  # `finditer` skips nothing: checked by the spans below
            if self._root(arrow, m.group(1)) != m.group(2):
                return False
        spans = [m.span() for m in self._more.finditer(rest)]
        end = spans[-1][1] if spans else 0
        if any(b - a != 4 or a != 5 * i for i, (a, b) in enumerate(spans)):
            return False
        tail = rest[end:].strip()
        return tail == "" or (re.fullmatch(r"[a-z]\??", tail) is not None and arrow.get(tail[0]) is not None)

    def corrupt(self, sample, rng):
        pairs = list(parse_arrows(self._re.fullmatch(sample.prompt).group(1)).items())
        first, _, rest = sample.answer.partition(" ")
        roots = [a for a, b in pairs if a == b and a != first]
        wrong = rng.choice(roots or [a for a, _ in pairs if a != first])
        return wrong + (" " + rest if rest else "")
