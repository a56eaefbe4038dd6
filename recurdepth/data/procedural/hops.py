"""`hops`: follow the arrows of a random permutation k times (pointer chasing).

The prompt lists a random *cyclic* permutation of the first `nodes` letters (one cycle through all of them,
drawn with Sattolo's algorithm) as arrows in alphabetical order and asks where k hops from a start letter
lead; the answer is one letter. Every hop is one lookup that depends on the previous one, and with a single
cycle no k < nodes leads back to the start (no fixed points or short cycles to shortcut through), so the
number of sequential steps is k: a graded-depth task for looped models (train on few hops, test on more).
"""

from __future__ import annotations

import re

from recurdepth.data.procedural.base import Sample, Task
from recurdepth.errors import DataError

ANSWER = "\nAnswer:"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


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
        m = self._re.fullmatch(prompt) if isinstance(prompt, str) else None
        if not m:
            return None
        arrow = {}
        for pair in m.group(1).split():
            a, b = pair.split(">")
            if a in arrow:
                return None
            arrow[a] = b
        node, k = m.group(3), int(m.group(2))
        if k < 1 or k > 10_000:
            return None
        for _ in range(k):
            if node not in arrow:
                return None
            node = arrow[node]
        return node

    def corrupt(self, sample, rng):
        letters = sorted({p.split(">")[0] for p in self._re.fullmatch(sample.prompt).group(1).split()})
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
    """

    name = "root"
    description = "which self-pointing letter the arrows lead to from a letter (equal-length chains)"
    default_difficulty = {"min_depth": 1, "max_depth": 4, "nodes": 15, "trees": 3}
    difficulty_keys = {"min_depth": "fewest arrows from the queried letter to its root",
                       "max_depth": "most arrows from the queried letter to its root",
                       "nodes": "letters (2-26, a..), a multiple of trees", "trees": "chains (roots)"}
    _re = re.compile(r"((?:[a-z]>[a-z] )*[a-z]>[a-z])\. root of ([a-z])\?" + re.escape(ANSWER))

    def check_difficulty(self, d):
        super().check_difficulty(d)
        if d["min_depth"] < 1 or d["trees"] < 1:
            raise DataError(f"difficulty min_depth={d['min_depth']}, trees={d['trees']} for task 'root' must be >= 1")
        if not 2 <= d["nodes"] <= 26 or d["nodes"] % d["trees"] or d["max_depth"] >= d["nodes"] // d["trees"]:
            raise DataError(f"difficulty nodes={d['nodes']} for task 'root' must be 2-26, a multiple of trees="
                            f"{d['trees']}, with chains longer than max_depth={d['max_depth']} arrows")

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
        k = rng.randint(d["min_depth"], d["max_depth"])
        chain = rng.choice(chains)
        path = chain[len(chain) - 1 - k:]
        edges = " ".join(f"{a}>{arrow[a]}" for a in sorted(arrow))
        return Sample(self.name, f"{edges}. root of {path[0]}?{ANSWER}", path[-1], tuple(path[1:]))

    def solve(self, prompt):
        m = self._re.fullmatch(prompt) if isinstance(prompt, str) else None
        if not m:
            return None
        arrow = {}
        for pair in m.group(1).split():
            a, b = pair.split(">")
            if a in arrow:
                return None
            arrow[a] = b
        node = m.group(2)
        for _ in range(len(arrow) + 1):
            if node not in arrow:
                return None
            if arrow[node] == node:
                return node
            node = arrow[node]
        return None  # a cycle without a root

    def corrupt(self, sample, rng):
        pairs = [p.split(">") for p in self._re.fullmatch(sample.prompt).group(1).split()]
        roots = [a for a, b in pairs if a == b and a != sample.answer]
        return rng.choice(roots or [a for a, _ in pairs if a != sample.answer])
