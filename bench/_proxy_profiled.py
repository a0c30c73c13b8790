"""`python -m bench._proxy_profiled STATS serve ...`: the proxy's CLI under cProfile, CPU clock.

`python -m cProfile` times functions by the wall clock. On a shared two-core machine that
charges a loopback send() with the time this process spends preempted after waking its
reader, which makes socket writes look like the whole cost. `time.process_time` counts only
this process's CPU, which is what the benchmark's CPU-per-chunk figure measures too.
The stats are written when the server exits (SIGINT: aiohttp's graceful exit).
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from proxy.cli import main as proxy_main

    profiler = cProfile.Profile(time.process_time)
    try:
        return profiler.runcall(proxy_main, argv)
    finally:
        profiler.dump_stats(out)


if __name__ == "__main__":
    raise SystemExit(main())
