"""Centre refresh of 50,000 labelled images on 1 and on 2 processes (torch.distributed, gloo).

A refresh re-estimates BatchNorm statistics on the labelled images, embeds them and finds
each centre's K nearest other centres. With N processes each does this for its shard and
one all-gather shares the result. The driver launches itself with torchrun for each
process count (threads per process = cores / processes) and prints the times side by side.

    python benchmarks/distributed_refresh.py [--procs 1,2 --dataset cifar10 --width 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from mbdml import distributed as D
    from mbdml.config import make_config
    from mbdml.neighbours import knn_search
    from mbdml.train import build_trainer

    cfg = make_config("default", dataset=args.dataset, method="mbdml2", labelled_fraction=1.0, val_fraction=0.0, width=args.width, progress=False).resolved()
    trainer = build_trainer(cfg, run_dir="/tmp/mbdml-refresh-bench")
    with trainer.session():  # joins the torchrun job
        trainer.prepare()  # the data, the network and a first refresh (not timed)
        ctx = trainer.dist
        n = len(trainer.data.train)
        D.barrier(ctx)
        t0 = time.perf_counter()
        total = trainer.refresh_centres()
        D.barrier(ctx)
        wall = time.perf_counter() - t0
        # the search alone, on the centres just computed
        centres = trainer.kernel.centres
        part = ctx.shard(n)
        D.barrier(ctx)
        t1 = time.perf_counter()
        local = knn_search(centres[part], centres, cfg.k, exclude=torch.arange(part.start, part.stop)).indices
        D.all_gather_rows(local, ctx)
        D.barrier(ctx)
        search = time.perf_counter() - t1
        if ctx.is_main:
            print(json.dumps({"procs": ctx.world_size, "centres": n, "refresh_s": wall, "refresh_s_rank0": total, "search_s": search, "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    rows = []
    for n in map(int, args.procs.split(",")):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__, "--worker", "--dataset", args.dataset, "--width", str(args.width)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{n} process(es) failed")
        rows.append(json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1]))
    print(f"centre refresh (BatchNorm re-estimation + embedding + K=200 search), {rows[0]['centres']} centres, {args.dataset}, resnet_small width {args.width}, {cores} cores")
    print("| processes | threads each | refresh s | search alone s | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['threads']} | {r['refresh_s']:.1f} | {r['search_s']:.1f} | {rows[0]['refresh_s'] / r['refresh_s']:.2f}x |")


if __name__ == "__main__":
    main()
