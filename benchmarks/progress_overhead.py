"""What progress reporting costs the loop, side by side in one run (docs/benchmarks.md).

Every candidate dreamed and every optimizer step calls the daemon's `_on_progress`; it shows the
value (STATUS=, status.json, the terminal line) at most every PROGRESS_SPACING_S and otherwise
only remembers it. This prints, per call: building the Progress value alone, `_on_progress` as the
loop calls it (rate-limited), one full `publish` (status file written, STATUS= off: no
$NOTIFY_SOCKET) and the status file write alone, and the worst-case share of a second that the
shown updates take. No torch work is timed; torch is pinned to one thread anyway.

    PYTHONPATH=$PWD python benchmarks/progress_overhead.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from dreamd.config import Config
    from dreamd.daemon import PROGRESS_SPACING_S, Daemon
    from dreamd.log import Progress
    from dreamd.status import write_status

    state = Path(tempfile.mkdtemp(prefix="dreamd-progress-bench-"))
    cfg = Config()
    cfg.run.state_dir = state
    daemon = Daemon(cfg)
    n, m = args.calls, max(200, args.calls // 10)
    alone = per_call(lambda i: Progress("accepted", i, n, note=f"written {i}"), n)
    limited = per_call(lambda i: daemon._on_progress(Progress("accepted", i, n, note=f"written {i}")), n)
    shown = per_call(lambda i: daemon.publish(progress=Progress("accepted", i, m)), m)
    written = per_call(lambda i: write_status(state, pid=1, phase="dream", step=i), m)
    print(f"Progress value alone          {alone * 1e6:8.2f} us")
    print(f"_on_progress (rate-limited)   {limited * 1e6:8.2f} us  ({limited / alone:.1f}x the value alone)")
    print(f"publish (shown)               {shown * 1e6:8.0f} us  (status file write alone {written * 1e6:.0f} us)")
    print(f"worst case: {1 / PROGRESS_SPACING_S:.0f} shown per second = {shown / PROGRESS_SPACING_S:.2%} of the loop's time")


if __name__ == "__main__":
    main()
