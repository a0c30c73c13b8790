"""The parser at another commit against this working tree, in one process, alternating.

    python bench/_parser_ab.py REV [--repeats 21]

The `dsml` package at REV (`git show`) is written to a temporary folder under another name
(`dsml_at_rev`) and imported beside this tree's `dsml`. Both parse the tool-call corpus of
bench/parser.py token by token, in alternating order, with the append-only loop between;
best of `--repeats`. Before timing, every completion of the corpus must give the same events
and result from both (ids made deterministic), so a speed-up cannot hide a change of output.

bench/parser.py runs minutes apart when comparing two versions, and this machine's speed
drifts by more than most changes: the append-only loop alone has measured 0.028-0.050 us a
delta on different runs. Here both versions see the same moments.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import parser as bench_parser  # bench/parser.py: this folder is first on sys.path

REPO = Path(__file__).resolve().parent.parent


def import_at(rev: str, folder: Path) -> type:
    """`dsml.parser.StreamParser` as of `rev`, imported as `dsml_at_rev`."""
    package = folder / "dsml_at_rev"
    package.mkdir()
    names = subprocess.check_output(["git", "-C", str(REPO), "ls-tree", "--name-only", rev,
                                     "dsml/"], text=True).split()
    for name in names:
        source = subprocess.check_output(["git", "-C", str(REPO), "show", f"{rev}:{name}"],
                                         text=True)
        source = re.sub(r"\bdsml\.", "dsml_at_rev.", source)
        source = source.replace("from dsml import", "from dsml_at_rev import")
        (package / Path(name).name).write_text(source, encoding="utf-8")
    sys.path.insert(0, str(folder))
    from dsml_at_rev.parser import StreamParser  # type: ignore[import-not-found]

    return StreamParser


def outputs(parser_cls: type, case: bench_parser.Case) -> tuple[list[str], str]:
    ids = itertools.count()
    parser = parser_cls(case.tools, case.thinking, id_factory=lambda: f"call_{next(ids)}")
    events = [repr(e) for delta in case.deltas for e in parser.feed(delta)]
    events += [repr(e) for e in parser.finish()]
    return events, repr(parser.result)


def run(parser_cls: type, cases: list[bench_parser.Case]) -> float:
    gc.collect()
    start = time.perf_counter()
    bench_parser.run_parser(cases, parser_cls)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the commit to compare with (e.g. HEAD, c0302b5)")
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()

    from dsml.parser import StreamParser as Current

    corpus = bench_parser.load_corpus()
    cases = [c for c in corpus if c.num_calls]
    num_deltas = sum(len(c.deltas) for c in cases)
    with tempfile.TemporaryDirectory() as tmp:
        Old = import_at(args.rev, Path(tmp))
        for case in corpus:
            if outputs(Old, case) != outputs(Current, case):
                raise SystemExit(f"{case.name}: the two versions give different output")
        old, new, base = [], [], []
        for i in range(args.repeats):
            for cls, acc in ((Old, old), (Current, new))[:: 1 if i % 2 == 0 else -1]:
                acc.append(run(cls, cases))
            gc.collect()
            start = time.perf_counter()
            bench_parser.run_baseline(cases)
            base.append(time.perf_counter() - start)

    def us(times: list[float]) -> float:
        return min(times) * 1e6 / num_deltas

    print(f"load {os.getloadavg()[0]:.2f}, {num_deltas:,} deltas, best of {args.repeats}: "
          f"{args.rev} {us(old):.3f} us/delta, working tree {us(new):.3f} "
          f"({100 * (min(new) / min(old) - 1):+.1f}%); append-only loop {us(base):.3f} "
          f"(working tree {min(new) / min(base):.1f}x)")


if __name__ == "__main__":
    main()
