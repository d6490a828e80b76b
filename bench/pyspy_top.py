"""Reads py-spy's collapsed stacks (`py-spy record --format raw`): the functions with the most samples, by self
time and by inclusive time, optionally only under stacks that contain --under (a substring of a frame).

    python bench/pyspy_top.py OUT/prefix.pyspy.txt --under timed_chat --top 40
"""
from __future__ import annotations

import argparse
import collections
import re
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--under", default=None, help="only stacks with a frame containing this")
    ap.add_argument("--thread", default=None, help="only stacks whose first frame (the thread, with --threads) "
                                                   "contains this")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    incl: collections.Counter = collections.Counter()
    self_: collections.Counter = collections.Counter()
    total = 0
    for line in open(a.path, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        if a.thread and a.thread not in frames[0]:
            continue
        if a.under:
            idx = next((i for i, f in enumerate(frames) if a.under in f), None)
            if idx is None:
                continue
            frames = frames[idx:]
        k = int(n)
        total += k
        self_[_short(frames[-1])] += k
        for f in set(map(_short, frames)):
            incl[f] += k
    print(f"{total} samples")
    for title, c in (("self", self_), ("inclusive", incl)):
        print(f"\n## by {title}")
        for f, k in c.most_common(a.top):
            print(f"{100 * k / max(1, total):6.1f}%  {f}")
    return 0


def _short(frame: str) -> str:
    return re.sub(r"\(/[^)]*/((?:shared|services|mmpipe|bench|site-packages)/[^)]*)\)", r"(\1)", frame)


if __name__ == "__main__":
    sys.exit(main())
