"""Do the labels ``mbdml suggest`` asks for help more than as many labels drawn at random?

For each seed s:

1. The base run: ``--labelled_fraction`` of the training images (a stratified draw from
   seed s, ``mbdml.data.split.labelled_split``) in class folders, the rest as one flat
   folder of unlabelled images; ``mbdml train --data_dir <labelled> --test <test>`` with
   ``--preset``, ``--method``, ``--seed s`` and any ``--train_args``.
2. ``mbdml suggest <base run> --unlabelled <pool> --n N`` picks N images; N others are
   drawn at random from the same pool (seeded). The true labels stand in for the person
   who labels them.
3. Two new runs, trained exactly as the base run (same flags, same seed, from the start)
   on the labelled images plus the N suggested, or plus the N random ones.

It prints, per seed, the test accuracy (NNGK, final model) of the three runs, the gain
of each arm over the base run, the paired difference suggest - random over the seeds
(``mbdml.paired.paired_difference``: mean, 95% interval, sign-flip p), and how many of
each arm's N images the base run got wrong. Everything goes under ``--workdir``; a run
whose ``summary.json`` exists is not trained again, so an interrupted measurement goes
on where it stopped.

Every image goes through files, as a user's would: the data set is written once as PNG
files (lossless: the same pixels as ``load_dataset`` gives) and the runs read them as
class folders, so they train on colour images (3 channels) even for grey data. For
grey data ``--flip false`` is added (a grey data set's own default), unless
``--train_args`` sets ``--flip``.

    python benchmarks/suggest_vs_random.py --dataset cifar10 --preset finetune --method mbdml1 --n 500 --seeds 0,1,2
    python benchmarks/suggest_vs_random.py --dataset digits --n 30 --seeds 0,1,2 --train_args "--max_epochs 10"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mbdml.cli import main as mbdml
from mbdml.data.sources import load_dataset
from mbdml.data.split import labelled_split
from mbdml.paired import paired_difference
from mbdml.predict import classify_files, open_run


def write_data(spec: str, folder: Path) -> dict:
    """The data set as PNG files: folder/train/<index>.png (no labels in the names),
    folder/test/<class>/<index>.png, and folder/labels.json. Done once per folder."""
    marker = folder / "labels.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info["dataset"] == spec:
            return info
        raise SystemExit(f"{folder} holds the data set {info['dataset']!r}, not {spec!r}; give another --workdir")
    train, test = load_dataset(spec)
    for name, data in (("train", train), ("test", test)):
        for i in range(len(data)):
            target = folder / name / (data.classes[int(data.labels[i])] if name == "test" else "") / f"{i:06d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image = data.images[i].numpy()
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(target)
    info = {"dataset": spec, "classes": list(train.classes), "train_labels": train.labels.tolist(), "channels": train.channels}
    marker.write_text(json.dumps(info))
    return info


def link_folder(root: Path, indices: list[int], data: Path, info: dict, with_classes: bool) -> Path:
    """root/<class>/<index>.png (or root/<index>.png) as links to the written images."""
    if root.exists():
        shutil.rmtree(root)
    for i in indices:
        cls = info["classes"][info["train_labels"][i]] if with_classes else ""
        target = root / cls / f"{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((data / "train" / f"{i:06d}.png").resolve(), target)
    return root


def trained(run_dir: Path, argv: list[str]) -> float:
    """Test accuracy (NNGK, final model) of the run at run_dir, trained with argv unless it finished before."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted start: train it again from the beginning
        start = time.time()
        code = mbdml(["-q", "train", *argv, "--save_dir", str(run_dir.parent), "--name", run_dir.name, "--no-progress"])
        if code != 0:
            raise SystemExit(f"training {run_dir} failed (exit status {code})")
        print(f"  trained {run_dir.name} in {time.time() - start:.0f} s", flush=True)
    return float(json.loads(summary.read_text())["final"]["nngk_acc"])


def base_errors(run_dir: Path, files: list[Path], labels: list[int], classes: list[str]) -> int:
    """How many of files the run classifies wrongly."""
    result = classify_files(open_run(run_dir, "best", "cpu"), files)
    predicted = result.probabilities.argmax(1).tolist()
    return sum(classes[p] != classes[y] for p, y in zip(predicted, labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, fashion-mnist, cifar10 or a folder, as mbdml train takes it")
    p.add_argument("--preset", default="default")
    p.add_argument("--method", default=None, help="default: mbdml train's")
    p.add_argument("--labelled_fraction", type=float, default=0.1, help="labels of the base run (default 0.1)")
    p.add_argument("--n", type=int, default=500, help="labels added in each arm (default 500)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--candidates_per_pick", type=float, default=5.0, help="suggest's --candidates_per_pick (default 5)")
    p.add_argument("--train_args", default="", help="more flags for every mbdml train, e.g. \"--max_epochs 10\"")
    p.add_argument("--workdir", default="results/suggest_vs_random", help="where data, runs and results go")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(args.workdir)
    data = work / "data"
    info = write_data(args.dataset, data)
    extra = shlex.split(args.train_args)
    if info["channels"] == 1 and not any(a.startswith("--flip") for a in extra):
        extra += ["--flip", "false"]
    common = ["--test", str(data / "test"), "--im_ext", "png", "--preset", args.preset, "--cache_dir", str(work / "cache"),
              *(["--method", args.method] if args.method else []), *extra]
    labels = info["train_labels"]
    results: dict[str, dict[int, float]] = {"base": {}, "suggest": {}, "random": {}}
    wrong: dict[str, dict[int, int]] = {"suggest": {}, "random": {}}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        folder = work / f"seed{seed}"
        labelled = sorted(labelled_split(np.asarray(labels), args.labelled_fraction, seed).tolist())
        chosen = set(labelled)
        pool = [i for i in range(len(labels)) if i not in chosen]
        argv = [*common, "--seed", str(seed)]
        base_dir = link_folder(folder / "base", labelled, data, info, with_classes=True)
        pool_dir = link_folder(folder / "pool", pool, data, info, with_classes=False)
        results["base"][seed] = trained(folder / "runs" / "base", ["--data_dir", str(base_dir), *argv])
        out = folder / "suggestions.csv"
        if not out.is_file():
            code = mbdml(["suggest", str(folder / "runs" / "base"), "--unlabelled", str(pool_dir), "--n", str(args.n),
                          "--candidates_per_pick", str(args.candidates_per_pick), "--out", str(out), "--no-progress"])
            if code != 0:
                raise SystemExit(f"mbdml suggest failed (exit status {code})")
        with open(out, newline="") as f:
            picks = {"suggest": [int(Path(r["file"]).stem) for r in csv.DictReader(f)]}
        picks["random"] = sorted(np.random.default_rng([seed, 12345]).choice(pool, size=args.n, replace=False).tolist())
        for arm, added in picks.items():
            arm_dir = link_folder(folder / arm, labelled + added, data, info, with_classes=True)
            results[arm][seed] = trained(folder / "runs" / arm, ["--data_dir", str(arm_dir), *argv])
            wrong[arm][seed] = base_errors(folder / "runs" / "base", [pool_dir / f"{i:06d}.png" for i in added],
                                           [labels[i] for i in added], info["classes"])
        print(f"  base {100 * results['base'][seed]:.2f}  + suggested {100 * results['suggest'][seed]:.2f}  "
              f"+ random {100 * results['random'][seed]:.2f}", flush=True)

    n_labelled = len(labelled_split(np.asarray(labels), args.labelled_fraction, seeds[0]))
    print(f"\n{args.dataset}, preset {args.preset}, {args.method or 'the default method'}, {n_labelled} labels + {args.n} "
          f"(suggested or random), {len(seeds)} seeds; test accuracy (NNGK, final model), %; flags: {' '.join(common)}")
    print("| seed | base | + suggested | + random | gain, suggested | gain, random | base wrong on suggested | base wrong on random |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        b, s, r = (100 * results[k][seed] for k in ("base", "suggest", "random"))
        print(f"| {seed} | {b:.2f} | {s:.2f} | {r:.2f} | {s - b:+.2f} | {r - b:+.2f} | {wrong['suggest'][seed]}/{args.n} | {wrong['random'][seed]}/{args.n} |")
    gain_s = paired_difference(results["suggest"], results["base"])
    gain_r = paired_difference(results["random"], results["base"])
    versus = paired_difference(results["suggest"], results["random"])
    print(f"gain of the suggested labels: {gain_s.format()}")  # type: ignore[union-attr]
    print(f"gain of the random labels:    {gain_r.format()}")  # type: ignore[union-attr]
    print(f"suggested - random (paired by seed): {versus.format()} ({versus.verdict})")  # type: ignore[union-attr]
    (work / "results.json").write_text(json.dumps({"args": vars(args), "accuracy": results, "base_wrong": wrong}, indent=2))


if __name__ == "__main__":
    main()
