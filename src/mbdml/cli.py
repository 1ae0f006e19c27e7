"""The ``mbdml`` command line: a thin layer of argparse over the library.

    mbdml train --method mbdml2 --dataset digits
    mbdml train --data_dir CIFAR100K10/train --test CIFAR100/test --preset paper --pretrained resnet50.pth
    mbdml train --resume runs/mbdml2-digits-seed0-run0
    mbdml evaluate RUN_DIR [--dataset ...]
    mbdml embed RUN_DIR --out embeddings.npz
    mbdml predict RUN_DIR photos/ --out predictions.csv
    mbdml suggest RUN_DIR --unlabelled photos/ --n 100

Every flag of the authors' scripts is accepted with its meaning and a correct type
(``--learning_rate`` and ``--sigma`` are floats, ``--tsne_graph`` a real boolean).
Errors a user can fix are printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig, finite_float, make_config, optional_int, option_specs, reader_for
from .errors import ConfigError, MbdmlError
from .methods.groups import METHOD_GROUPS

log = logging.getLogger("mbdml")


def add_run_options(p: argparse.ArgumentParser, single_run: bool = True) -> None:
    """The options of a run, one flag each, generated from :class:`mbdml.config.RunConfig`
    (grouped as declared there); ``single_run``: ``mbdml train`` (else ``compare``,
    which sets the method, data set, run and folders per run). Only the flags given
    override the preset (their default is left unset)."""
    S = argparse.SUPPRESS
    groups: dict[str, Any] = {}
    for name, (spec, _default, annotation) in option_specs().items():
        if not spec.on_command_line or (spec.single_run and not single_run):
            continue
        if spec.group not in groups:
            groups[spec.group] = p.add_argument_group(spec.group)
        g = groups[spec.group]
        _add_other_flags(g, _FLAGS_BEFORE.get(name, ()), single_run)
        flags = spec.flags or (f"--{name}",)
        if spec.store_false:
            g.add_argument(*flags, dest=name, action="store_false", default=S, help=spec.help)
        else:
            g.add_argument(*flags, dest=name, type=spec.parse or reader_for(annotation), choices=spec.choices, default=S, help=spec.help)
        _add_other_flags(g, _FLAGS_AFTER.get(name, ()), single_run)


def _add_other_flags(group: Any, flags: Any, single_run: bool) -> None:
    for extra in flags:
        if single_run or not extra.get("single_run"):
            group.add_argument(*extra["flags"], **{k: v for k, v in extra.items() if k not in ("flags", "single_run")}, default=argparse.SUPPRESS)


# Flags that are not options of a run (where its options come from, how it is launched), beside an option.
_FLAGS_BEFORE: dict[str, list[dict[str, Any]]] = {
    "sync_bn": [{"flags": ("--nproc",), "type": int, "single_run": True,
                 "help": "train with N processes on this machine: runs 'torchrun --standalone --nproc_per_node N -m mbdml train ...' (batch_size is per process)"}],
}
_FLAGS_AFTER: dict[str, list[dict[str, Any]]] = {
    "preset": [
        {"flags": ("--config",), "metavar": "FILE", "help": "a config.json of an earlier run to start from (flags override it)"},
        {"flags": ("--resume",), "metavar": "RUN_DIR", "help": "continue an interrupted run from its last checkpoint", "single_run": True},
    ],
    "dataset": [{"flags": ("--data_dir",), "single_run": True,
                 "help": "the authors' flag: a folder with one sub-folder of images per class (labelled training images)"}],
    "device": [{"flags": ("--gpu_id",), "type": int, "help": "the authors' flag: train on cuda:GPU_ID"}],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbdml", description="Mixup-based deep metric learning with the NNGK classifier, for few labels.")
    parser.add_argument("--version", action="version", version=f"mbdml {__import__('mbdml').__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train one method on a labelled fraction of a data set", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_options(p)

    p = sub.add_parser("compare", help="the paper's protocol: methods x runs x data sets, then one comparison table")
    g = p.add_argument_group("comparison")
    groups = "; ".join(f"'{grp.name}' ({grp.description})" for grp in METHOD_GROUPS)
    g.add_argument("--methods", default="paper", help=f"comma-separated methods or groups of them: {groups} (default paper)")
    g.add_argument("--datasets", default="digits", help="comma-separated data sets (names or folders; default digits)")
    g.add_argument("--runs", type=int, default=10, help="runs per method and data set, each on its own seeded split (default 10)")
    g.add_argument("--results_dir", default="results/compare", help="where runs, tables and plots go (default results/compare)")
    g.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (default 1)")
    g.add_argument("--reference", default="nngk", help="the method every other is compared with at the end, paired by run; several, comma-separated, give a table each (default nngk)")
    add_run_options(p, single_run=False)

    p = sub.add_parser("report", help="rebuild the comparison tables and plots of results folders without training")
    p.add_argument("results_dir", nargs="+", help="one or more folders written by 'mbdml compare'")
    p.add_argument("--versus", default=None, help="another results folder made with one setting changed: each method is paired by run against the same method there")
    p.add_argument("--doc", default=None, help="also write one Markdown page of every folder's tables, paired differences (and those against --versus), commands, commit, CPU and minutes (e.g. docs/results.md)")
    p.add_argument("--reference", default="nngk", help="the method every other is compared with, paired by run; several, comma-separated (e.g. nngk,mixup), give a table each (default nngk)")

    p = sub.add_parser("export", help="write a run's network and kernel classifier as one file that plain PyTorch loads (uint8 images -> class probabilities)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.pt2 (load it with torch.export.load)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="best-on-validation or last checkpoint")
    p.add_argument("--image_size", type=int, default=None, help="only for runs saved before mbdml recorded their image size: the side in pixels")

    p = sub.add_parser("predict", help="classify image files or folders with a trained run; one CSV row per image")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched at any depth")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default predictions.csv)")
    p.add_argument("--min_confidence", type=finite_float, default=0.5, help="mark a prediction 'uncertain' below this probability (0 to 1; default 0.5)")
    _add_image_reading_options(p)

    p = sub.add_parser("suggest", help="the unlabelled images to label next: the least certain, spread over the embedding space")
    p.add_argument("run_dir")
    p.add_argument("--unlabelled", nargs="+", required=True, metavar="DIR", help="folders (or files) of unlabelled images")
    p.add_argument("--n", type=int, default=100, help="how many images to suggest (default 100)")
    p.add_argument("--out", default="suggestions.csv", help="the CSV to write (default suggestions.csv)")
    p.add_argument("--copy_to", default=None, metavar="FOLDER", help="also copy the picks into this empty or new folder, as <rank>-<name>")
    p.add_argument("--copy_into_nonempty", action="store_true", help="let --copy_to add to a folder that holds files (none is overwritten)")
    p.add_argument("--candidates_per_pick", type=finite_float, default=5.0,
                   help="picks are spread (farthest-first) over this many times n of the least certain images; 1: the least certain alone (default 5)")
    _add_image_reading_options(p)

    p = sub.add_parser("evaluate", help="re-evaluate a saved run on a data set")
    p.add_argument("run_dir")
    p.add_argument("--which", choices=("best", "last"), default="best", help="best-on-validation or last checkpoint")
    p.add_argument("--dataset", default=None, help="data set to evaluate on (default: the run's own test set)")
    p.add_argument("--test", dest="test_dir", default=None, help="a test folder of class folders")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")

    p = sub.add_parser("embed", help="write embeddings of a data set with a saved run's model")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output file: .npz (numpy) or .pt (torch)")
    p.add_argument("--which", choices=("best", "last"), default="best")
    p.add_argument("--dataset", default=None, help="data set (default: the run's own)")
    p.add_argument("--test", dest="test_dir", default=None)
    p.add_argument("--part", choices=("test", "train", "both"), default="test", help="which part of the data set to embed")
    p.add_argument("--device", default="auto")
    return parser


def _add_image_reading_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that read image files with a run (predict, suggest)."""
    p.add_argument("--which", choices=("best", "last"), default="best", help="best-on-validation or last checkpoint")
    p.add_argument("--batch_size", type=int, default=256, help="images read and classified at a time (default 256)")
    p.add_argument("--on-bad-image", "--on_bad_image", dest="on_bad_image", choices=("error", "skip"), default="error",
                   help="an unreadable file: stop with its name (error, the default) or leave it out and count it (skip)")
    p.add_argument("--max_image_pixels", type=optional_int, default=argparse.SUPPRESS,
                   help="refuse image files of more pixels than this before decoding; none: no cap (default: the run's)")
    p.add_argument("--image_size", type=int, default=None, help="only for runs saved before mbdml recorded their image size: the side in pixels")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (none is drawn when stderr is not a terminal)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (or --config file) < explicit flags. Returns a RunConfig, not yet resolved."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "config", "resume", "methods", "datasets", "runs", "results_dir", "jobs", "nproc", "reference")}
    if "gpu_id" in given:
        gpu = given.pop("gpu_id")
        if given.get("device", "cuda") not in ("cuda", "auto"):
            raise ConfigError(f"--gpu_id {gpu} asks for a GPU but --device is {given['device']}; drop one of them")
        given["device"] = f"cuda:{gpu}" if gpu >= 0 else "cpu"
    if "data_dir" in given:
        data_dir = given.pop("data_dir")
        if "dataset" in given and given["dataset"] != data_dir:
            raise ConfigError("--data_dir and --dataset both name the training data; give only one")
        given["dataset"] = data_dir
        # The authors' --data_dir holds only the labelled images: use them all.
        given.setdefault("labelled_fraction", 1.0)
    if hasattr(args, "config"):
        base = RunConfig.load(args.config).to_dict()
        base.update(given)
        cfg = RunConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in base.items()})
        cfg.name = given.get("name")
        return cfg
    return make_config(given.pop("preset", "default"), **given)


def format_summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: final, best-on-validation, and the authors' selection."""
    rows = [
        ("final model", summary["final"]),
        ("best on validation", summary["best_val"]),
    ]
    head = f"{'model':<24}{'epoch':>6}{'NNGK acc':>10}{'k-NN acc':>10}{'P@1':>8}{'MAP@R':>8}{'NMI':>8}"
    lines = [f"{summary['method']} on {summary['dataset']}: {summary['labelled_train']} labelled, {summary['validation']} validation, {summary['test']} test images", head, "-" * len(head)]

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    for label, r in rows:
        lines.append(
            f"{label:<24}{str(r.get('epoch') or '-'):>6}{pct(r.get('nngk_acc')):>10}{pct(r.get('knn_acc')):>10}"
            f"{pct(r.get('precision_at_1')):>8}{pct(r.get('map_at_r')):>8}{pct(r.get('nmi')):>8}"
        )
    a = summary["authors_best_on_test"]
    lines.append(f"{'best on test (authors)*':<24}{str(a.get('epoch') or '-'):>6}{pct(a.get('nngk_acc')):>10}")
    lines.append("* chosen on the test set as the authors did: optimistic, shown only to compare with the paper")
    lines.append(f"run folder: {summary['run_dir']}  ({summary['seconds']:.0f} s)")
    return "\n".join(lines)


def _setup_logging(quiet: bool) -> None:
    for old in [h for h in log.handlers if getattr(h, "mbdml_cli", False)]:  # main() called again: one handler
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.mbdml_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def launch_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mbdml train`` again under torchrun with ``nproc`` processes on this machine."""
    import subprocess

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    rest: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "mbdml", *rest]
    print("launching: " + " ".join(cmd[1:]), file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def cmd_train(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from .distributed import launched_by_torchrun
    from .train import build_trainer, resume

    nproc = getattr(args, "nproc", 1)
    if nproc != 1 and not launched_by_torchrun():
        return launch_torchrun(nproc, argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if hasattr(args, "resume"):
        extra = sorted(k for k in vars(args) if k not in ("command", "quiet", "resume", "progress", "device", "nproc"))
        if extra:
            raise ConfigError(f"--resume continues a run with its saved configuration; drop {', '.join('--' + e for e in extra)}")
        result = resume(args.resume)
    else:
        cfg = config_from_args(args)
        trainer = build_trainer(cfg)
        if main_rank:
            print(f"run folder: {trainer.run_dir}", file=sys.stderr)
        result = trainer.run()
    if main_rank:
        print(format_summary_table(result.summary))
    return 0


def _method_list(text: str) -> list[str]:
    from .methods import METHODS, group_methods

    out: list[str] = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        for name in group_methods(item) or [item]:
            if name not in METHODS:
                groups = ", ".join(g.name for g in METHOD_GROUPS)
                raise ConfigError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}, or a group: {groups}")
            if name not in out:
                out.append(name)
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiment import compare, comparison_runs
    from .report import report_text

    base = config_from_args(args)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    methods = _method_list(args.methods)
    paths = compare(
        base, datasets, methods, runs=args.runs, results_dir=args.results_dir, jobs=args.jobs,
        progress=getattr(args, "progress", True), reference=args.reference,
    )
    asked = comparison_runs(args.results_dir, datasets, methods, args.runs)
    print(report_text(args.results_dir, reference=args.reference, records=asked))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .experiment import write_outputs
    from .report import collect_runs, report_text, results_document

    written: list[str] = []
    records = {folder: collect_runs(folder) for folder in args.results_dir}  # each read once: each warning once
    for folder in args.results_dir:
        paths = write_outputs(folder, records[folder], reference=args.reference)
        print(report_text(folder, reference=args.reference, records=records[folder]))
        written += [str(p) for p in paths.values()]
    if args.versus is not None:
        from .report import versus_tables

        if args.versus not in records:  # read once, for the page too
            records[args.versus] = collect_runs(args.versus)
        others = records[args.versus]
        for folder in args.results_dir:
            for table in versus_tables(folder, records[folder], args.versus, others):
                print(table)
    if args.doc is not None:
        words = (["mbdml report", *args.results_dir] + (["--reference", args.reference] if args.reference != "nngk" else [])
                 + (["--versus", args.versus] if args.versus is not None else []) + ["--doc", args.doc])
        doc = Path(args.doc)
        blocking = next((p for p in doc.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"cannot write {doc}: {blocking} is a file, not a folder; give another --doc path")
        try:
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(results_document(args.results_dir, reference=args.reference, command=" ".join(words), runs_by_folder=records, versus=args.versus), encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write {doc} ({e.strerror or e}); give a writable --doc path") from None
        written.append(str(doc))
    print("written: " + ", ".join(written))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.out, which=args.which, image_size=args.image_size)
    print(f"written: {out} (load it with torch.export.load; class names and input size in its mbdml.json)")
    return 0


def _reading_options(args: argparse.Namespace) -> dict[str, Any]:
    from .predict import RUN_CAP

    return {"batch_size": args.batch_size, "on_bad_image": args.on_bad_image, "image_size": args.image_size,
            "max_image_pixels": getattr(args, "max_image_pixels", RUN_CAP), "progress": args.progress}


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import check_min_confidence, classify_files, open_run, write_predictions

    check_min_confidence(args.min_confidence)
    result = classify_files(open_run(args.run_dir, args.which, args.device), args.paths, **_reading_options(args))
    out = write_predictions(result, args.out, args.min_confidence)
    uncertain = int((result.probabilities.max(1).values < args.min_confidence).sum())
    skipped = f"; {len(result.skipped)} unreadable file(s) skipped" if result.skipped else ""
    print(f"wrote {out}: {len(result.files)} images, {uncertain} uncertain (probability below {args.min_confidence:g}){skipped}{result.conversions}")
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from .predict import open_run
    from .suggest import check_copy_folder, copy_suggestions, suggest, write_suggestions

    if args.copy_to is not None:
        check_copy_folder(args.copy_to, args.unlabelled, args.copy_into_nonempty)
    picks = suggest(open_run(args.run_dir, args.which, args.device), args.unlabelled, args.n,
                    candidates_per_pick=args.candidates_per_pick, **_reading_options(args))
    copied = ""
    if args.copy_to is not None:
        copy_suggestions(picks, args.copy_to, args.copy_into_nonempty)
        copied = f"; copied to {args.copy_to}"
    out = write_suggestions(picks, args.out)
    skipped = f"; {len(picks.skipped)} unreadable file(s) skipped" if picks.skipped else ""
    print(f"wrote {out}: {len(picks.files)} of {picks.pool_size} images, spread over the {picks.candidates} least certain"
          f"{copied}{skipped}{picks.conversions}")
    return 0


def _data_for(run: Any, dataset: str | None, test_dir: str | None) -> tuple[Any, Any]:
    from .data.sources import load_dataset

    cfg = run.config
    spec = dataset or cfg.dataset
    train, test = load_dataset(spec, test_dir=test_dir or (None if dataset else cfg.test_dir), im_ext=cfg.im_ext, image_size=cfg.input_size,
                               on_bad_image=cfg.on_bad_image, cache_dir=cfg.cache_dir, max_image_pixels=cfg.max_image_pixels,
                               load_unlabelled=False)
    return train, test


def _check_classes(run: Any, data: Any) -> None:
    if data.num_classes != run.kernel.num_classes:
        raise ConfigError(f"the run was trained on {run.kernel.num_classes} classes but this data set has {data.num_classes}; evaluate on data with the same classes")


def _loaded(args: argparse.Namespace) -> tuple[Any, Any]:
    """The saved run of ``args.run_dir`` and the embedder it trained with (its
    normalisation, test-time flips, precision and memory format)."""
    from .components import load_run
    from .embedder import Embedder
    from .environment import resolve_device
    from .precision import resolve_amp

    device = resolve_device(args.device)
    run = load_run(args.run_dir, args.which, device=str(device))
    amp = resolve_amp(run.config.amp, device, warn=False)
    return run, Embedder.for_run(run.model, run.config, device, amp=amp)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_embeddings

    run, embedder = _loaded(args)
    _, test = _data_for(run, args.dataset, args.test_dir)
    _check_classes(run, test)
    cfg = run.config
    emb = embedder.embed(test.images)
    metrics = evaluate_embeddings(run.kernel, emb, test.labels.to(embedder.device), knn_k=cfg.knn_k, retrieval=True, seed=cfg.seed)
    metrics = {"run_dir": str(args.run_dir), "checkpoint": args.which, "epoch": run.epoch, "images": len(test), **metrics}
    for key, value in metrics.items():
        print(f"{key:>16}: {100 * value:.2f}" if key in ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi") else f"{key:>16}: {value}")
    if args.out:
        from .checkpoint import save_json

        save_json(metrics, args.out, fix="pass another --out")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    path = Path(args.out)
    if path.suffix not in (".pt", ".npz"):
        raise ConfigError(f"--out {path}: use a .npz or .pt file name")
    run, embedder = _loaded(args)
    train, test = _data_for(run, args.dataset, args.test_dir)
    parts = {"test": [("test", test)], "train": [("train", train)], "both": [("train", train), ("test", test)]}[args.part]
    out: dict[str, Any] = {"classes": list(test.classes)}
    for name, data in parts:
        _check_classes(run, data)
        out[f"{name}_embeddings"] = embedder.embed(data.images).cpu()
        out[f"{name}_labels"] = data.labels.cpu()
    from .checkpoint import atomic_write

    if path.suffix == ".pt":
        atomic_write(path, lambda f: torch.save(out, f), fix="pass another --out")
    else:
        arrays = {k: (v.numpy() if hasattr(v, "numpy") else np.array(v)) for k, v in out.items()}
        atomic_write(path, lambda f: np.savez(f, **arrays), fix="pass another --out")
    sizes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in out.items() if hasattr(v, "shape"))
    print(f"wrote {path} ({sizes})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        if args.command == "train":
            return cmd_train(args, list(sys.argv[1:] if argv is None else argv))
        commands = {"compare": cmd_compare, "report": cmd_report, "evaluate": cmd_evaluate, "embed": cmd_embed, "export": cmd_export,
                    "predict": cmd_predict, "suggest": cmd_suggest}
        return commands[args.command](args)
    except MbdmlError as exc:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"mbdml: error{'' if rank is None else f' (rank {rank})'}: {exc}", file=sys.stderr)
        if rank is not None:
            # After a lost peer the communication library's threads may abort the
            # process while the interpreter shuts down (exit status -6 instead of 2):
            # leave at once, with the message out and the status torchrun should see.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("mbdml: interrupted; the last finished epoch is saved: continue with 'mbdml train --resume RUN_DIR'", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m mbdml.cli
    sys.exit(main())
