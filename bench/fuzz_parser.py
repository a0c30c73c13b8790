"""Fuzz the streaming parser with generated damage (dsml.md 6.1, issue 13).

Grammar-based: each input is a well-formed tool-call turn broken by up to three damage
operations (`tests.dsml.damage.completion`: forgotten closers, tags without `>`, doubled
tags, stray prose, partial closers, other bar spellings, think tags, fences, a lone
surrogate, empty names, a cut stream). Every input is checked against the four
invariants (`tests.dsml.damage.check`); the first failure is minimised and printed.

    PYTHONPATH=. python bench/fuzz_parser.py --inputs 10000000 --seed 1

Input n depends only on the seed and n, so a long run can be split across cores or
machines: `--first 5000001 --inputs 5000000` is the second half of the run above.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from tests.dsml.damage import check, completion, minimise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=1, help="number of the first input (to split a run)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    args = ap.parse_args()
    start = time.perf_counter()
    n = done = 0
    for n in range(args.first, args.first + args.inputs):
        done += 1
        rnd = random.Random(args.seed * 1_000_003 + n)
        pieces, thinking = completion(rnd)
        text = "".join(pieces)
        failure = check(text, thinking, random.Random(n))
        if failure is not None:
            small = minimise(text, thinking, n)
            print(f"FAIL after {n} inputs: {failure}\nthinking={thinking}\ninput={text!r}\nminimised={small!r}")
            print(f"minimised failure: {check(small, thinking, random.Random(n))}")
            return 1
        elapsed = time.perf_counter() - start
        if done % 10_000 == 0:
            print(f"{done} inputs (last {n}), {done / elapsed:.0f}/s", file=sys.stderr, flush=True)
        if args.seconds and elapsed > args.seconds:
            break
    elapsed = time.perf_counter() - start
    print(
        f"OK: inputs {args.first}..{n} (seed {args.seed}), {done} in {elapsed:.0f} s "
        f"({done / elapsed:.0f} inputs/s), no invariant failed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
