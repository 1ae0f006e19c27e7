"""Everything worth timing on a lent GPU, in one script that finishes in under 5 minutes.

Each part prints its own side-by-side table and runs in a subprocess with a time limit;
when the budget (``--budget`` seconds from the start, 270 by default) nears its end, the
remaining parts are skipped and named. No downloads, no network.

(a) NNGK loss forward + backward, ours against the per-sample loop
    (``kernel_speed.py --device``): batch 128, K 200, dims 128 / 2048, 5k / 50k centres.
(b) One training step of each method against plain cross-entropy
    (``step_speed.py --device``): MbDML2 against one CE step, MbDML1 / MbDML3 against CE
    on both passes.
(c) The centre refresh, ``self_knn`` on the GPU for 50k / 200k / 1M centres of dim 128,
    K 200, against faiss's exact flat index on the CPU for a sample of queries
    (extrapolated to all rows; without faiss, our exact search on all CPU cores stands
    in); recall of the GPU result on those rows against that exact search; peak GPU memory against
    N x K x 12 and N x N x 4 bytes. A size is skipped when the previous one's time,
    scaled by (N / N_prev)^2, would not fit in the budget left.
(d) End-to-end training images/s on the CIFAR-10 archive (``end_to_end.py --device``),
    plain and bf16, capped at 90 s; skipped when the archive is not found.

    python3 benchmarks/gpu_suite.py --device cuda --log $OUT/gpu_suite.md
    python benchmarks/gpu_suite.py --device cpu --quick        # smoke test, about a minute

On an NVIDIA H200 (2026-12-04) the four parts ran in 138 s; the figures are in
docs/performance.md, "On a GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
START = time.perf_counter()


class Log:
    """Print, and append to a file when one is given."""

    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a", buffering=1) if path else None

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")


def child_env() -> dict[str, str]:
    """The parts import mbdml from this checkout, installed or not."""
    src = str(HERE.parent / "src")
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=src + (os.pathsep + path if path else ""))


def elapsed() -> float:
    return time.perf_counter() - START


def run_part(log: Log, name: str, cmd: list[str], cap: float, budget: float, reserve: float) -> str:
    """Run one part with a time limit; stream its output. Returns 'ok', 'failed', 'timeout' or 'skipped'."""
    left = budget - elapsed() - reserve
    if left < 10:
        log(f"\n### {name}: skipped ({elapsed():.0f} s of the {budget:.0f} s budget used)")
        return "skipped"
    limit = min(cap, left)
    log(f"\n### {name} (limit {limit:.0f} s, {elapsed():.0f} s used so far)\n")
    log("`" + " ".join(Path(c).name if c.endswith(".py") else c for c in cmd[1:]) + "`\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=HERE.parent)
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        log(f"\n{name}: stopped at its {limit:.0f} s limit (what it printed is above)")
        return "timeout"
    reader.join(5)
    log(f"\n({name}: {time.perf_counter() - t0:.1f} s)")
    if rc != 0:
        log(f"{name}: failed with exit status {rc}")
        return "failed"
    return "ok"


# ----------------------------------------------------------------------------- part (c)


def refresh_child(args: argparse.Namespace) -> None:
    """One size of part (c): self_knn on the device, faiss flat (CPU) on sampled rows."""
    import torch

    from mbdml.neighbours import knn_search, plan_self_knn, self_knn

    device = torch.device(args.device)
    n, dim, k, q = args.n, args.dim, args.k, args.queries

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(n, dim, generator=g)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: min(q, n)].sort().values
    self_knn(torch.randn(4096, dim, generator=g).to(device), k)  # warm-up: kernels, allocator
    x = centres.to(device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = self_knn(x, k, block=args.block)
    sync()
    ours = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:  # resident memory
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
    got = res.indices[rows.to(device)].cpu()
    del res, x
    try:
        import faiss
        import numpy as np

        index = faiss.IndexFlatL2(dim)
        t0 = time.perf_counter()
        index.add(np.ascontiguousarray(centres.numpy()))
        _, idx = index.search(np.ascontiguousarray(centres[rows].numpy()), k + 1)
        flat_s = time.perf_counter() - t0
        idx = torch.from_numpy(idx).long()
        exact = torch.stack([r[r != own][:k] for r, own in zip(idx, rows)])  # own index dropped
        ref = f"faiss flat, {faiss.omp_get_max_threads()} CPU threads"
    except ImportError:  # our exact generic search on the CPU, as reference and as the timing
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        exact = knn_search(centres[rows], centres, k, exclude=rows).indices
        flat_s = time.perf_counter() - t0
        ref = f"faiss not installed: our exact search on the CPU, {torch.get_num_threads()} threads"
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact))
    recall = hits / exact.numel()
    plan = plan_self_knn(n, k, dim, args.block, device=device)
    flat_full = flat_s * n / len(rows) if flat_s is not None else None
    print(json.dumps({"n": n, "ours_s": ours, "flat_sample_s": flat_s, "flat_full_s": flat_full, "rows": len(rows), "recall": recall,
                      "peak_mb": peak_mb, "nk12_mb": n * k * 12 / 2**20, "nn4_mb": n * n * 4 / 2**20, "tile": plan.tile_shape[0], "ref": ref}))


def refresh_part(log: Log, args: argparse.Namespace, sizes: list[int], queries: int, cap: float) -> str:
    left = args.budget - elapsed() - args.reserve
    if left < 20:
        log(f"\n### (c) centre refresh: skipped ({elapsed():.0f} s of the {args.budget:.0f} s budget used)")
        return "skipped"
    limit_all = min(cap, left)
    t_part = time.perf_counter()
    log(f"\n### (c) centre refresh, self_knn on {args.device} against faiss flat on the CPU (limit {limit_all:.0f} s)\n")
    log("| centres | ours (self_knn) s | CPU exact s: faiss flat (else our CPU search), extrapolated from sampled rows | CPU / ours | recall@K vs exact | extra peak MB (device allocator; CPU: resident) | N x K x 12 B MB | N x N x 4 B MB |")
    log("|---|---|---|---|---|---|---|---|")
    prev = None
    status = "ok"
    for n in sizes:
        left = limit_all - (time.perf_counter() - t_part)
        if prev is not None:
            estimate = prev[1] * (n / prev[0]) ** 2 + 15  # quadratic work, plus start-up and the CPU sample
            if estimate > left:
                log(f"| {n:,} | skipped: about {estimate:.0f} s expected from {prev[0]:,} centres, {left:.0f} s left | | | | | | |")
                continue
        if left < 15:
            log(f"| {n:,} | skipped: {left:.0f} s left | | | | | | |")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-refresh", "--device", args.device, "--n", str(n), "--queries", str(queries),
               "--k", str(args.k), "--dim", str(args.dim)]
        if args.block:
            cmd += ["--block", str(args.block)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=HERE.parent, env=child_env())
        except subprocess.TimeoutExpired:
            log(f"| {n:,} | stopped at the {left:.0f} s limit | | | | | | |")
            status = "timeout"
            break
        if out.returncode != 0:
            err = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1]
            log(f"| {n:,} | failed: {err} | | | | | | |")
            status = "failed"
            break
        r = json.loads(out.stdout.strip().splitlines()[-1])
        prev = (n, r["ours_s"])
        flat = f"{r['flat_full_s']:.1f} (from {r['rows']} rows: {r['flat_sample_s']:.2f} s)" if r["flat_full_s"] is not None else "-"
        ratio = f"{r['flat_full_s'] / r['ours_s']:.1f}x" if r["flat_full_s"] is not None else "-"
        log(f"| {n:,} | {r['ours_s']:.2f} | {flat} | {ratio} | {r['recall']:.4f} ({r['ref']}) | {r['peak_mb']:.0f} | {r['nk12_mb']:.0f} | {r['nn4_mb']:,.0f} |")
    log(f"\n((c) centre refresh: {time.perf_counter() - t_part:.1f} s; self_knn tile side {args.block or 'default'})")
    return status


# ------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, e.g. on a CPU)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds from the start after which nothing new is started")
    p.add_argument("--reserve", type=float, default=5.0, help="seconds kept back at the end of the budget")
    p.add_argument("--parts", default="a,b,c,d", help="which parts to run")
    p.add_argument("--log", default=None, help="also append the output to this file")
    p.add_argument("--block", type=int, default=None, help="self_knn tile side for part (c) (default: the library's)")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--dim", type=int, default=128)
    # internal: one size of part (c)
    p.add_argument("--child-refresh", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--queries", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_refresh:
        refresh_child(args)
        return
    log = Log(args.log)
    py = sys.executable
    parts = set(args.parts.split(","))
    info = subprocess.run([py, "-c", "import torch, sys; d = sys.argv[1]; "
                           "print(torch.__version__, torch.cuda.get_device_name(d) if d.startswith('cuda') else 'CPU', torch.get_num_threads())",
                           args.device], capture_output=True, text=True, env=child_env())
    log(f"# GPU suite: device {args.device}{' (quick)' if args.quick else ''}, budget {args.budget:.0f} s")
    log(f"torch, device, CPU threads: {info.stdout.strip() or info.stderr.strip().splitlines()[-1]}")
    if info.returncode != 0:
        log("cannot use the device; stopping")
        sys.exit(1)
    q = args.quick
    status = {}
    if "a" in parts:
        cmd = [py, str(HERE / "kernel_speed.py"), "--device", args.device]
        cmd += ["--batch", "16", "--k", "200", "--dims", "32", "--centres", "2000", "--repeats", "2"] if q else ["--batch", "128", "--k", "200", "--dims", "128,2048", "--centres", "5000,50000", "--repeats", "8"]
        status["a"] = run_part(log, "(a) NNGK loss, ours against the per-sample loop", cmd, 40 if q else 60, args.budget, args.reserve)
    if "b" in parts:
        cmd = [py, str(HERE / "step_speed.py"), "--device", args.device, "--no-pipeline"]
        cmd += ["--batch", "16", "--centres", "300", "--width", "8", "--k", "20", "--rounds", "1"] if q else ["--batch", "128", "--centres", "4500", "--k", "200", "--rounds", "7"]
        status["b"] = run_part(log, "(b) one training step against cross-entropy", cmd, 40 if q else 60, args.budget, args.reserve)
    if "c" in parts:
        sizes = [3000, 6000] if q else [50_000, 200_000, 1_000_000]
        status["c"] = refresh_part(log, args, sizes, 256 if q else 2048, 60 if q else 150)
    if "d" in parts:
        cmd = [py, str(HERE / "end_to_end.py"), "--device", args.device, "--epochs", "2"]
        cmd += ["--dataset", "digits", "--methods", "softmax,mbdml2", "--modes", "plain"] if q else ["--methods", "softmax,mbdml2", "--modes", "plain,bf16"]
        status["d"] = run_part(log, "(d) end-to-end images/s", cmd, 40 if q else 90, args.budget, args.reserve)
    log(f"\ndone in {elapsed():.0f} s; parts: " + ", ".join(f"{k} {v}" for k, v in status.items()))


if __name__ == "__main__":
    main()
