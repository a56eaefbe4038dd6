"""Graph tasks: `shortest_path` (breadth-first search in a small undirected graph). The pointer-chasing
tasks over arrows between letters (`hops`, `root`) are in `hops.py`."""

from __future__ import annotations

import re
from collections import deque
from typing import Optional

from recurdepth.data.procedural.base import ANSWER, Sample, Task, change_digit, match_prompt, require_at_least
from recurdepth.errors import DataError


# ---------------------------------------------------------------------------------------------------------
def bfs_path(n: int, edges: list[tuple[int, int]], src: int, dst: int) -> Optional[list[int]]:
    """A shortest path src..dst in the undirected graph (lowest-numbered neighbours first), or None."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    parent = {src: src}
    queue = deque([src])
    while queue:
        u = queue.popleft()
        if u == dst:
            path = [u]
            while path[-1] != src:
                path.append(parent[path[-1]])
            return path[::-1]
        for v in sorted(adj[u]):
            if v not in parent:
                parent[v] = u
                queue.append(v)
    return None


class ShortestPathTask(Task):
    name = "shortest_path"
    description = "shortest path length in a small undirected graph, or 'unreachable'"
    default_difficulty = {"min_nodes": 5, "max_nodes": 10, "edge_ratio": 1.0}
    difficulty_keys = {"min_nodes": "fewest nodes", "max_nodes": "most nodes",
                       "edge_ratio": "edges per node (edges = round(ratio * nodes), capped at a complete graph)"}
    _re = re.compile(r"An undirected graph has nodes 0 to (\d+) and edges: ((?:\d+-\d+(?:, \d+-\d+)*)?)\. "
                     r"What is the length of the shortest path from node (\d+) to node (\d+)\? "
                     r"Answer 'unreachable' if there is no path\." + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        require_at_least(self, d, "min_nodes", minimum=2)
        if d["edge_ratio"] < 0:
            raise DataError(f"difficulty edge_ratio={d['edge_ratio']} for task 'shortest_path' must be >= 0")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        n = rng.randint(d["min_nodes"], d["max_nodes"])
        n_edges = min(n * (n - 1) // 2, round(d["edge_ratio"] * n))
        edges: set[tuple[int, int]] = set()
        while len(edges) < n_edges:
            u, v = rng.sample(range(n), 2)
            edges.add((min(u, v), max(u, v)))
        edge_list = sorted(edges)
        rng.shuffle(edge_list)
        src, dst = rng.sample(range(n), 2)
        path = bfs_path(n, edge_list, src, dst)
        text = ", ".join(f"{u}-{v}" for u, v in edge_list)
        prompt = (f"An undirected graph has nodes 0 to {n - 1} and edges: {text}. What is the length of the "
                  f"shortest path from node {src} to node {dst}? Answer 'unreachable' if there is no path.{ANSWER}")
        if path is None:
            return Sample(self.name, prompt, "unreachable", (f"no path from {src}",))
        return Sample(self.name, prompt, str(len(path) - 1), tuple(map(str, path)))

    def normalize(self, answer):
        return answer.strip().lower()

    def solve(self, prompt):
        m = match_prompt(prompt, self._re)
        if not m:
            return None
        n = int(m.group(1)) + 1
        edges = [tuple(map(int, e.split("-"))) for e in m.group(2).split(", ")] if m.group(2) else []
        src, dst = int(m.group(3)), int(m.group(4))
        if any(not (0 <= x < n) for e in edges for x in e) or not (0 <= src < n and 0 <= dst < n):
            return None
        path = bfs_path(n, edges, src, dst)
        return "unreachable" if path is None else str(len(path) - 1)

    def corrupt(self, sample, rng):
        if sample.answer == "unreachable":
            return str(rng.randint(1, 9))
        return change_digit(sample.answer, rng) if rng.random() < 0.8 else "unreachable"
