"""Centre refresh: the K nearest other centres of every centre, our exact torch search
against faiss's exact flat index (IndexFlatL2), with faiss IVF and HNSW as approximate
options and their recall@K, side by side.

Each search runs in a fresh subprocess so its peak resident memory can be reported
beside its time (on a GPU: the peak of torch's allocator); the centres themselves take
N x D x 4 bytes, an N x N matrix N^2 x 4 bytes. Recall@K is measured against an exact
search (faiss flat, or our generic torch search without faiss) of a seeded sample of rows.

Full refresh (``torch`` is :func:`mbdml.neighbours.self_knn`, the symmetric search used
by ``NNGKClassifier.set_centres``; ``faiss`` is IndexFlatL2 with the own index
excluded; ``faiss-ivf`` is the library's IVF backend; ``faiss-hnsw`` is IndexHNSWFlat,
built here)::

    python benchmarks/refresh_speed.py --sizes 50000 --repeats 3
    python benchmarks/refresh_speed.py --sizes 200000 --backends torch,faiss,faiss-ivf

Where a full exact search takes too long (a million centres: most of an hour for faiss
on two cores), ``--sample-queries Q`` times the generic search (``knn_search``) of Q
sampled centres against all N for the exact backends and extrapolates to the full
refresh: the set-up paid once (timed as the search of one query) plus N / Q times the
rest; the approximate ones still run the whole refresh::

    python benchmarks/refresh_speed.py --sizes 1000000 --sample-queries 4096

faiss flat does the same work for every query, so its sample extrapolates well; our
symmetric search does not (each pair is computed once, thresholds tighten as it goes),
so ``--full-torch`` runs the whole of it at that size and only faiss is sampled::

    python benchmarks/refresh_speed.py --sizes 1000000 --sample-queries 4096 --full-torch --backends torch,faiss

``--clustered`` draws the centres around 1,000 Gaussian cluster means (closer to real
embeddings than structureless Gaussian data, on which IVF's recall is at its worst).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

APPROXIMATE = ("faiss-ivf", "faiss-hnsw")


def make_centres(n: int, dim: int, clustered: bool, seed: int = 0):
    """Seeded float32 centres: standard Gaussian, or around 1,000 cluster means."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if not clustered:
        return torch.randn(n, dim, generator=g)
    means = torch.randn(1000, dim, generator=g) * 2.0
    which = torch.randint(0, 1000, (n,), generator=g)
    x = torch.randn(n, dim, generator=g).mul_(0.5)
    for s in range(0, n, 1 << 16):  # in place, so the resident high-water mark stays at the data
        x[s : s + (1 << 16)] += means[which[s : s + (1 << 16)]]
    return x


def sample_rows(n: int, count: int, seed: int = 1):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, count)].sort().values


def _hnsw(centres, queries, k: int, own, m: int, ef_search: int):
    """IndexHNSWFlat search with the own index excluded (one extra neighbour asked for)."""
    import faiss
    import numpy as np
    import torch

    index = faiss.IndexHNSWFlat(centres.shape[1], m)
    index.hnsw.efConstruction = 40
    t0 = time.perf_counter()
    index.add(np.ascontiguousarray(centres.numpy()))
    build = time.perf_counter() - t0
    index.hnsw.efSearch = max(ef_search, k + 1)
    _, idx = index.search(np.ascontiguousarray(queries.numpy()), k + 1)
    idx = torch.from_numpy(idx).long()
    bad = idx == own.unsqueeze(1)
    rank = torch.where(bad | (idx < 0), k + 2, torch.arange(k + 1).expand_as(idx))
    keep = rank.argsort(dim=1, stable=True)[:, :k]
    return idx.gather(1, keep), build


def child(spec: dict) -> None:
    import torch

    from mbdml.neighbours import knn_search, self_knn

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
        try:
            import faiss

            faiss.omp_set_num_threads(spec["threads"])
        except ImportError:
            pass
    n, dim, k, backend = spec["n"], spec["dim"], spec["k"], spec["backend"]
    device = torch.device(spec["device"] if backend == "torch" else "cpu")
    centres = make_centres(n, dim, spec["clustered"])
    sample = sample_rows(n, spec["sample_queries"], seed=2) if spec["sample_queries"] else None
    # Recall rows: the first sampled queries, or a seeded sample of all rows.
    rows = sample[: spec["recall_rows"]] if sample is not None else sample_rows(n, spec["recall_rows"])
    # Approximate indexes always run the whole refresh; with --full-torch so does ours.
    full = sample is None or backend in APPROXIMATE or (backend == "torch" and spec["full_torch"])
    if device.type == "cuda":
        centres = centres.to(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    build = 0.0
    t0 = time.perf_counter()
    if full:
        if backend == "torch":
            res = self_knn(centres, k, block=spec["block"], first_block=spec["first_block"], pending=spec["pending"])
            idx = res.indices
        elif backend == "faiss-hnsw":
            idx, build = _hnsw(centres, centres, k, torch.arange(n), spec["hnsw_m"], spec["ef_search"])
        else:
            idx = knn_search(centres, centres, k, exclude=torch.arange(n), backend=backend, nprobe=spec["nprobe"]).indices
        idx = idx[rows.to(idx.device)]
    else:  # Q sampled queries against all N centres, own index excluded
        q = centres[sample.to(centres.device)]
        own = sample.to(centres.device)
        kwargs = {}
        if backend == "torch":
            kwargs = dict(query_block=spec["query_block"], centre_block=spec["centre_block"])
        # The set-up paid once per refresh (faiss: filling the index; ours: the augmented
        # centres, the shuffle), timed with one query, must not be multiplied by N / Q.
        knn_search(q[:1], centres, k, exclude=own[:1], backend=backend, **kwargs)  # warm-up (threads, allocator)
        t0 = time.perf_counter()
        knn_search(q[:1], centres, k, exclude=own[:1], backend=backend, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx = knn_search(q, centres, k, exclude=own, backend=backend, **kwargs).indices[: len(rows)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra_mb = (peak - base) / 1024
    if device.type == "cuda":
        extra_mb = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    torch.save(idx.cpu(), spec["out"])
    print(json.dumps({"seconds": seconds, "build_s": build, "extra_peak_mb": extra_mb, "full": full}))


def exact_reference(n: int, dim: int, k: int, clustered: bool, rows) -> "object":
    """Exact K nearest other centres of the given rows (faiss flat, else our generic search)."""
    import importlib.util

    from mbdml.neighbours import knn_search

    centres = make_centres(n, dim, clustered)
    backend = "faiss" if importlib.util.find_spec("faiss") is not None else "torch"
    return knn_search(centres[rows], centres, k, exclude=rows, backend=backend).indices


def recall(got, exact) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact))
    return hits / max(1, exact.numel())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50000", help="comma-separated numbers of centres")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--backends", default="torch,faiss,faiss-ivf,faiss-hnsw", help="torch, faiss, faiss-ivf, faiss-hnsw")
    p.add_argument("--clustered", action="store_true", help="centres around 1,000 Gaussian cluster means")
    p.add_argument("--sample-queries", type=int, default=0, metavar="Q", help="time Q sampled queries against all centres and extrapolate")
    p.add_argument("--full-torch", action="store_true", help="with --sample-queries: run our whole symmetric refresh (measured), only faiss flat is sampled")
    p.add_argument("--recall-rows", type=int, default=2000, help="rows whose neighbours are checked against exact search (with --sample-queries: the first sampled queries)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all backends, run in alternation")
    p.add_argument("--device", default="cpu", help="device of the torch backend (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch and faiss threads in the children (0: their defaults)")
    p.add_argument("--nprobe", type=int, default=16, help="faiss-ivf inverted lists visited per query")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=256, help="faiss-hnsw efSearch (at least K + 1)")
    p.add_argument("--block", type=int, default=None, help="self_knn tile side (default: the library's)")
    p.add_argument("--first-block", type=int, default=None)
    p.add_argument("--pending", type=int, default=None)
    p.add_argument("--query-block", type=int, default=None, help="generic search block sizes (--sample-queries; default: the library's)")
    p.add_argument("--centre-block", type=int, default=None)
    args = p.parse_args()
    import torch

    try:
        import faiss

        faiss_threads = args.threads or faiss.omp_get_max_threads()
    except ImportError:
        faiss_threads = "-"
    backends = args.backends.split(",")
    data = "clustered (1,000 Gaussian clusters)" if args.clustered else "Gaussian"
    what = f"generic search of {args.sample_queries} sampled centres against all" if args.sample_queries else "full training-neighbour refresh"
    print(f"{what}, K {args.k}, dim {args.dim}, {data} data, torch on {args.device}, "
          f"torch threads {args.threads or torch.get_num_threads()}, faiss threads {faiss_threads}, "
          f"IVF nprobe {args.nprobe}, HNSW M {args.hnsw_m} efSearch {max(args.ef_search, args.k + 1)}")
    if args.sample_queries:
        print("| centres | run | backend | measured s | queries | extrapolated full refresh s | extra peak MB | time / faiss flat | recall@K |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| centres | run | backend | seconds | extra peak MB | N x K x 12 bytes MB | N x N x 4 bytes MB | time / faiss flat | recall@K |")
        print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            if args.sample_queries:  # recall on the first sampled queries
                rows = sample_rows(n, args.sample_queries, seed=2)[: args.recall_rows]
            else:
                rows = sample_rows(n, args.recall_rows)
            exact = exact_reference(n, args.dim, args.k, args.clustered, rows)
            for run in range(1, args.repeats + 1):
                results = {}
                for backend in backends:
                    out = os.path.join(tmp, f"{backend}_{n}_{run}.pt")
                    spec = dict(n=n, dim=args.dim, k=args.k, backend=backend, clustered=args.clustered, recall_rows=args.recall_rows,
                                sample_queries=args.sample_queries, device=args.device, threads=args.threads, nprobe=args.nprobe,
                                hnsw_m=args.hnsw_m, ef_search=args.ef_search, block=args.block, first_block=args.first_block,
                                pending=args.pending, full_torch=args.full_torch, query_block=args.query_block, centre_block=args.centre_block, out=out)
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
                    if proc.returncode != 0:
                        lines = (proc.stderr.strip() or "no output").splitlines()
                        results[backend] = {"failed": lines[-1]}
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    r["recall"] = recall(torch.load(out)[: len(rows)], exact)
                    if r["full"]:
                        r["total"] = r["seconds"]
                    else:  # set-up once, plus the search of the Q queries less its set-up, N / Q times
                        per_query = max(0.0, r["seconds"] - r["build_s"]) / args.sample_queries
                        r["total"] = r["build_s"] + per_query * n
                    results[backend] = r
                flat = results.get("faiss")
                flat = flat if flat and "failed" not in flat else None
                for backend, r in results.items():
                    if "failed" in r:
                        print(f"| {n:,} | {run} | {backend} | failed: {r['failed']} |", flush=True)
                        continue
                    ratio = f"{r['total'] / flat['total']:.2f}" if flat else "-"
                    if args.sample_queries:
                        if r["full"]:
                            build = f" (graph build {r['build_s']:.0f} s)" if r["build_s"] else ""
                            print(f"| {n:,} | {run} | {backend} | {r['seconds']:.1f}{build} | all {n:,} | {r['total']:.1f} (measured, whole refresh) | "
                                  f"{r['extra_peak_mb']:.0f} | {ratio} | {r['recall']:.3f} |", flush=True)
                        else:
                            print(f"| {n:,} | {run} | {backend} | {r['seconds']:.2f} (one-query set-up {r['build_s']:.2f}) | {args.sample_queries} | "
                                  f"{r['total']:.1f} (extrapolated from {args.sample_queries} queries) | {r['extra_peak_mb']:.0f} | {ratio} | {r['recall']:.3f} |", flush=True)
                    else:
                        print(f"| {n:,} | {run} | {backend} | {r['seconds']:.1f} | {r['extra_peak_mb']:.0f} | {n * args.k * 12 / 2**20:.0f} | "
                              f"{n * n * 4 / 2**20:,.0f} | {ratio} | {r['recall']:.3f} |", flush=True)

if __name__ == "__main__":
    main()
