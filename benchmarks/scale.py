"""`make scale`: the retrieval stage across catalogue sizes and index types.

For each catalogue size (synthetic clustered unit vectors, as `hyperrec synth-bundle` makes) and each index type
the product supports (exact, IVF-Flat, HNSW, IVF-PQ), through the same `AnnIndex` the server uses: build time,
index size, single-query search latency on one thread (p50, p99) and recall against exact search, at 100, 500 and
1,000 candidates. Results go to `<out>/scale.json`, a plot to `--plot`, and a markdown table is printed for
docs/benchmarks.md.

    python -m benchmarks.scale --sizes 10000,100000,1000000,5000000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from hyperrec import index as ann
from hyperrec.index import FLAT, HNSW, IVF, IVFPQ, AnnIndex, IndexParams, set_threads
from hyperrec.training.synth_bundle import clustered_unit_vectors


def configs(n: int, hnsw_max: int) -> list[tuple[str, IndexParams]]:
    """The index settings compared at catalogue size n (HNSW only up to `hnsw_max`: its build is the slowest)."""
    nlist = int(4 * np.sqrt(n))
    out = [("exact", IndexParams(FLAT))]
    if n >= 39 * nlist:  # FAISS wants ~39 training points per list
        out += [
            (f"ivf-flat nprobe {max(8, nlist // 32)}", IndexParams(IVF, nlist=nlist, nprobe=max(8, nlist // 32))),
            (f"ivf-flat nprobe {max(4, nlist // 128)}", IndexParams(IVF, nlist=nlist, nprobe=max(4, nlist // 128))),
            (f"ivf-pq16 nprobe {max(8, nlist // 32)}", IndexParams(IVFPQ, nlist=nlist, nprobe=max(8, nlist // 32))),
        ]
    if n <= hnsw_max:
        out.append(("hnsw M32", IndexParams(HNSW, hnsw_m=32, ef_construction=80, ef_search=64)))
    return out


def queries_near(items: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """User-like query vectors: random items, perturbed and renormalised."""
    picked = items[rng.integers(0, len(items), size=count)] + rng.normal(0, 0.3, (count, items.shape[1]))
    out: np.ndarray = (picked / np.linalg.norm(picked, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_top(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth: exact inner-product top-k rows per query (a flat index, searched on all threads)."""
    flat = ann.build(items, IndexParams(FLAT))
    set_threads(os.cpu_count() or 1)
    _, rows = flat.search(queries, k)
    return rows


def measure(index: AnnIndex, queries: np.ndarray, truth: np.ndarray, n: int) -> dict[str, float]:
    """One query at a time on one thread, as the server searches: latency percentiles and recall@n."""
    set_threads(1)
    latencies, hits = [], 0
    for q, exact in zip(queries, truth, strict=True):
        started = time.perf_counter()
        _, rows = index.search(q[None, :], n)
        latencies.append((time.perf_counter() - started) * 1e3)
        hits += len(set(rows[0].tolist()) & set(exact[:n].tolist()))
    arr = np.asarray(latencies)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "recall": hits / (n * len(queries)),
    }


def run(sizes: list[int], candidates: list[int], n_queries: int, hnsw_max: int, dim: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rng = np.random.default_rng(n)
        items = clustered_unit_vectors(n, dim, max(16, int(np.sqrt(n))), rng)
        queries = queries_near(items, n_queries, rng)
        truth = exact_top(items, queries, max(candidates))
        for name, params in configs(n, hnsw_max):
            set_threads(os.cpu_count() or 1)  # builds use every core
            started = time.perf_counter()
            index = ann.build(items, params)
            build_s = time.perf_counter() - started
            size_mb = index.nbytes / 2**20
            for c in candidates:
                found = measure(index, queries, truth, c)
                row = {"items": n, "index": name, "params": params.to_json(), "candidates": c}
                row |= {"build_s": build_s, "index_mb": size_mb} | found
                rows.append(row)
                print(
                    f"{n:>9,} {name:<22} c={c:<5} p50 {found['p50_ms']:7.3f} ms  p99 {found['p99_ms']:7.3f} ms  "
                    f"recall {found['recall']:.3f}  {size_mb:8.1f} MB  build {build_s:6.1f} s",
                    flush=True,
                )
            del index
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| items | index | candidates | p50 ms | p99 ms | recall | index MB | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['items']:,} | {r['index']} | {r['candidates']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['recall']:.3f} | {r['index_mb']:.1f} | {r['build_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, candidates: int = 500) -> None:
    """Latency against recall at `candidates`, one panel per catalogue size, one point per index setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["items"] for r in rows})
    figure, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for r in (r for r in rows if r["items"] == n and r["candidates"] == candidates):
            ax.scatter(r["recall"], r["p50_ms"], s=30)
            ax.annotate(r["index"], (r["recall"], r["p50_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{n:,} items, {candidates} candidates", fontsize=9)
        ax.set_xlabel("recall against exact search")
        ax.set_ylabel("p50 search latency, ms (1 thread)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000,5000000")
    parser.add_argument("--candidates", default="100,500,1000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest catalogue HNSW is built for")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/scale-curve.png"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    candidates = [int(c) for c in args.candidates.split(",")]
    rows = run(sizes, candidates, args.queries, args.hnsw_max, args.dim)
    result = {
        "rows": rows,
        "dim": args.dim,
        "queries": args.queries,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.plot)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
