"""Centre refresh: the K nearest other centres of every centre, our blocked torch search
against faiss's exact flat index (and faiss IVF with its recall), side by side.

Each search runs in a fresh subprocess so its peak resident memory can be reported
beside its time; the centres themselves take N x D x 4 bytes, an N x N matrix would
take N^2 x 4 bytes.

    python benchmarks/refresh_speed.py --sizes 50000,200000 --dim 128 --k 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(n: int, dim: int, k: int, backend: str) -> None:
    import torch

    from mbdml.neighbours import knn_search

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(n, dim, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = knn_search(centres, centres, k, exclude=torch.arange(n), backend=backend)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(res.indices, f"/tmp/mbdml_refresh_{backend}_{n}.pt")
    print(json.dumps({"seconds": seconds, "extra_peak_mb": (peak - base) / 1024}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50000,200000")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--backends", default="torch,faiss,faiss-ivf")
    args = p.parse_args()
    import torch

    print(f"training-neighbour refresh, K {args.k}, dim {args.dim}, threads {torch.get_num_threads()}")
    print("| centres | backend | seconds | extra peak MB | N x K x 12 bytes MB | N x N x 4 bytes MB | time / faiss flat | recall@K |")
    print("|---|---|---|---|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        rows = {}
        for backend in args.backends.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(args.dim), str(args.k), backend], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {n} | {backend} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            rows[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        exact = torch.load(f"/tmp/mbdml_refresh_torch_{n}.pt") if "torch" in rows else None
        for backend, r in rows.items():
            recall = "-"
            if exact is not None and backend != "torch":
                got = torch.load(f"/tmp/mbdml_refresh_{backend}_{n}.pt")
                hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got[:2000], exact[:2000]))
                recall = f"{hits / exact[:2000].numel():.3f}"
            ratio = f"{r['seconds'] / rows['faiss']['seconds']:.2f}" if "faiss" in rows else "-"
            print(f"| {n} | {backend} | {r['seconds']:.1f} | {r['extra_peak_mb']:.0f} | {n * args.k * 12 / 2**20:.0f} | {n * n * 4 / 2**20:.0f} | {ratio} | {recall} |", flush=True)


if __name__ == "__main__":
    main()
