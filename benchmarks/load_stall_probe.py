"""How long loading a bundle holds up an asyncio event loop running beside it.

The server loads a new model version on a loader thread while its event loop serves calls; any step of the load
that keeps the GIL for long stalls every call in flight. This probe loads one bundle directory the way the model
manager does (`load_without_gc_pauses`, on another thread) while the loop wakes every millisecond, and reports the
load time and the loop's gaps: the longest, how many exceeded 10 ms, and the time lost to gaps over 5 ms.

    .venv/bin/python -m benchmarks.load_stall_probe /tmp/hyperrec-bench/bench-1000000x64/1 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from hyperrec.core.model_manager import load_without_gc_pauses
from hyperrec.core.ranker import RankerOptions


async def probe(directory: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    loading = loop.run_in_executor(None, load_without_gc_pauses, directory, RankerOptions(), "auto")
    gaps, last = [], time.perf_counter()
    while not loading.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append((now - last) * 1e3)
        last = now
    bundle = await loading
    load_ms = (time.perf_counter() - started) * 1e3
    del bundle
    return {
        "load_ms": round(load_ms, 1),
        "worst_gap_ms": round(max(gaps, default=0.0), 1),
        "gaps_over_10_ms": sum(1 for g in gaps if g > 10),
        "ms_lost_to_gaps_over_5_ms": round(sum(g for g in gaps if g > 5), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a version directory, e.g. model_repo/<model>/<version>")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps(asyncio.run(probe(args.bundle))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
