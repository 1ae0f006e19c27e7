"""Training speed on the CPU under each memory allocator, measured side by side in one run.

A CPU training step allocates and frees the same large activation tensors every step.
glibc's malloc hands blocks above its mmap threshold (at most 32 MiB) back to the
system at each free and trims the heap top, so the next step faults the same pages in
again (zeroed by the kernel): system time and minor page faults that grow with the
image size. jemalloc and tcmalloc keep such blocks for reuse. PyTorch's CPU tuning
guide recommends preloading one of them; this script measures what it buys here.

Each allocator trains the same short run (the same seed and split) in its own process:
glibc as it comes (``--keep_freed_memory false``), glibc tuned by mbdml at the start of
the run (``--keep_freed_memory true``, the default: see ``mbdml.cpu_memory``), and
jemalloc and tcmalloc started with ``LD_PRELOAD``; the rounds are
interleaved (A B C, then C B A) and the median of each is printed beside its ratio to
glibc, with the minor page faults and the system time of the process per training image.

    python benchmarks/allocator.py                          # the finetune preset at 96 px, MbDML1, one pass per image
    python benchmarks/allocator.py --method mixup --set preset=scratch amp=auto
    python benchmarks/allocator.py --dataset digits --set max_epochs=2   # a quick check

Install the allocators with ``apt-get install libjemalloc2 libtcmalloc-minimal4``
(Debian / Ubuntu); those not found are left out. To use one for a run (mbdml then
leaves glibc's settings alone):
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 mbdml train ...`` (see
docs/performance.md for the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from methods_cifar10 import parse_settings  # noqa: E402

from mbdml.cpu_memory import find_allocator_library  # noqa: E402

# jemalloc as PyTorch's CPU tuning guide sets it: freed pages kept (no decay), large
# blocks in their own arenas, purging in a background thread.
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocators() -> dict[str, dict[str, str]]:
    """Name -> environment variables to set, for each allocator found on this machine.

    The two glibc entries differ in the run's ``keep_freed_memory`` (see ``measure``);
    the preloaded ones run with it on, to show that mbdml then leaves them alone.
    """
    found: dict[str, dict[str, str]] = {"glibc": {}, "glibc tuned": {}}
    jemalloc = find_allocator_library("jemalloc")
    if jemalloc:
        found["jemalloc"] = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
    tcmalloc = find_allocator_library("tcmalloc")
    if tcmalloc:
        found["tcmalloc"] = {"LD_PRELOAD": tcmalloc}
    return found


def child(args: argparse.Namespace) -> None:
    """Train the short run in this process and print one JSON line of timings."""
    import dataclasses
    import resource
    import tempfile

    import torch

    from mbdml.config import make_config
    from mbdml.train import build_trainer
    from mbdml.training_data import prepare_data

    settings = dict(dataset=args.dataset, method=args.method, max_epochs=2, eval_every=1000, update_interval=1000,
                    retrieval_metrics=False, progress=False, labelled_fraction=args.labelled_fraction, seed=0)
    settings.update(parse_settings(args.set))
    settings["keep_freed_memory"] = args.keep_freed_memory == "true"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(save_dir=tmp, name="run", **settings)
        data = prepare_data(cfg)
        # The final evaluation is not what is measured: a few hundred images suffice.
        data = dataclasses.replace(data, val=data.val.subset(torch.arange(min(len(data.val), 100))),
                                   test=data.test.subset(torch.arange(min(len(data.test), 256))))
        before = resource.getrusage(resource.RUSAGE_SELF)
        trainer = build_trainer(cfg, data=data)
        result = trainer.run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        allocator = json.loads((trainer.run_dir / "environment.json").read_text())["allocator"]
    n = len(data.train) * cfg.max_epochs
    print(json.dumps({
        "train_s": result.history[-1]["train_s"],
        "images": len(data.train),
        "minflt_per_image": (after.ru_minflt - before.ru_minflt) / n,
        "sys_ms_per_image": 1000 * (after.ru_stime - before.ru_stime) / n,
        "user_ms_per_image": 1000 * (after.ru_utime - before.ru_utime) / n,
        "preload": os.environ.get("LD_PRELOAD", ""),
        "allocator": allocator,
        "peak_rss_mib": after.ru_maxrss / 1024,
    }))


def measure(name: str, extra_env: dict[str, str], args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    env.update(extra_env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--dataset", args.dataset, "--method", args.method,
           "--labelled_fraction", str(args.labelled_fraction), "--keep_freed_memory", str(name != "glibc").lower(), "--set", *args.set]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run under {name} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if extra_env.get("LD_PRELOAD") and row["preload"] != extra_env["LD_PRELOAD"]:
        raise SystemExit(f"{name} was not preloaded in the child process")
    print(f"{name:>12}: last epoch {row['train_s']:.1f} s, {row['minflt_per_image']:.0f} minor faults and "
          f"{row['sys_ms_per_image']:.2f} ms of system time per training image, peak {row['peak_rss_mib']:.0f} MiB "
          f"(allocator: {row['allocator']})", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--method", default="mbdml1")
    p.add_argument("--labelled_fraction", type=float, default=0.05, help="a short epoch (2,250 CIFAR-10 training images)")
    p.add_argument("--set", nargs="*", default=["preset=finetune", "amp=auto", "split_batch=true", "input_size=96"], metavar="KEY=VALUE",
                   help="configuration values for the run (JSON values); default: the finetune preset at 96 px (where docs/performance.md measured it) in bf16 where the CPU has it (amp=auto), one pass per image")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the allocators, alternately forwards and backwards")
    p.add_argument("--only", default=None, help="comma-separated allocator names to measure (default: all found)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keep_freed_memory", default="false", choices=("true", "false"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    found = allocators()
    if args.only:
        wanted = [x.strip() for x in args.only.split(",")]
        missing = [x for x in wanted if x not in found]
        if missing:
            raise SystemExit(f"allocator(s) {', '.join(missing)} not found; found: {', '.join(found)}")
        found = {k: found[k] for k in wanted}
    names = list(found)
    rows: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rows[name].append(measure(name, found[name], args))
    base = statistics.median(x["train_s"] for x in rows[names[0]])
    print(f"\n{args.method} on {args.dataset} ({rows[names[0]][0]['images']} training images, settings: {' '.join(args.set) or 'defaults'}), "
          f"time of the second epoch, median of {args.rounds} interleaved rounds")
    print(f"| allocator | epoch s | ratio to {names[0]} | minor faults / image | system ms / image | user ms / image | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        med = {k: statistics.median(x[k] for x in rows[name]) for k in ("train_s", "minflt_per_image", "sys_ms_per_image", "user_ms_per_image", "peak_rss_mib")}
        print(f"| {name} | {med['train_s']:.1f} | {med['train_s'] / base:.3f} | {med['minflt_per_image']:.0f} | "
              f"{med['sys_ms_per_image']:.2f} | {med['user_ms_per_image']:.2f} | {med['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
