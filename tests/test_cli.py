"""The command line: the authors' flags with correct types, bad input, evaluate and embed."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mbdml.cli import build_parser, config_from_args, main


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_authors_flags_have_their_meaning_and_types():
    cfg = parse(
        "--data_dir", "/d/train", "--test", "/d/test", "--save_dir", "out", "--num_classes", "10", "--im_ext", "png",
        "--sigma", "0.5", "--batch_size", "16", "--learning_rate", "1e-5", "--update_interval", "3", "--max_epochs", "7",
        "--input_size", "32", "--name", "exp", "--alpha", "0.4", "--scale_mixup", "0.0001", "--beta", "2", "--tsne_graph", "False",
    )
    assert cfg.dataset == "/d/train" and cfg.test_dir == "/d/test" and cfg.save_dir == "out"
    assert cfg.num_classes == 10 and cfg.im_ext == "png" and cfg.batch_size == 16 and cfg.update_interval == 3
    assert isinstance(cfg.sigma, float) and cfg.sigma == 0.5  # the authors parsed it as an int
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1e-5
    assert cfg.alpha == 0.4 and cfg.scale_mixup == 1e-4 and cfg.beta == 2.0
    assert cfg.tsne_graph is False  # a real boolean, not the string "False"
    assert cfg.labelled_fraction == 1.0  # --data_dir holds only labelled images
    assert parse("--tsne_graph", "True").tsne_graph is True
    assert parse("--gpu_id", "1").device == "cuda:1"
    assert parse("--embedding_dim", "none").embedding_dim is None
    assert parse("--preset", "paper").model == "resnet50"


def test_fine_tuning_flags_reach_the_configuration():
    cfg = parse("--preset", "finetune", "--method", "mbdml1", "--split_batch", "true", "--frozen_cache_gb", "0.5")
    assert cfg.split_batch is True and cfg.frozen_cache_gb == 0.5 and cfg.freeze_stages == 3
    # Left to the preset unless given: one pass per image under finetune, two elsewhere.
    assert parse("--method", "mbdml3").split_batch is None and parse("--method", "mbdml3").resolved().split_batch is False
    assert parse("--preset", "finetune", "--method", "mbdml3").resolved().split_batch is True
    assert parse("--preset", "finetune", "--method", "mbdml1", "--split_batch", "false").resolved().split_batch is False


def test_strong_augmentation_flags_reach_the_configuration():
    cfg = parse("--method", "mbdml1_semi", "--pseudo_augment", "randaugment", "--randaugment_ops", "3", "--randaugment_magnitude", "0.5")
    assert (cfg.pseudo_augment, cfg.randaugment_ops, cfg.randaugment_magnitude) == ("randaugment", 3, 0.5)
    assert parse("--method", "mbdml1_semi").pseudo_augment == "standard"


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    for argv in (["--sigma", "ten"], ["--tsne_graph", "maybe"], ["--method", "arcface"], ["--pseudo_augment", "autoaugment"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["train", *argv])
        assert exc.value.code == 2
    assert "expected True or False" in capsys.readouterr().err


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "mbdml", *argv], capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_clear_line_without_traceback(tmp_path):
    missing = run_cli("train", "--data_dir", str(tmp_path / "nope"), "--test", str(tmp_path / "nope"), "--save_dir", str(tmp_path))
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "nope" in missing.stderr and "error" in missing.stderr
    bad = run_cli("train", "--dataset", "digits", "--sigma", "-1", "--save_dir", str(tmp_path))
    assert bad.returncode == 2 and "sigma must be a positive number" in bad.stderr and "Traceback" not in bad.stderr


def write_folder(root, n_per_class=6, corrupt=False, empty_class=False):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    if empty_class:
        (root / "bird").mkdir()


def test_folder_errors_name_the_file_and_the_fix(tmp_path, capsys):
    write_folder(tmp_path / "train", corrupt=True)
    write_folder(tmp_path / "test")
    code = main(["train", "--data_dir", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--save_dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err and "skip" in err
    write_folder(tmp_path / "t2", empty_class=True)
    code = main(["train", "--data_dir", str(tmp_path / "t2"), "--test", str(tmp_path / "test"), "--save_dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bird" in err


def test_train_evaluate_embed_on_a_folder(tmp_path, capsys):
    write_folder(tmp_path / "train", n_per_class=10)
    write_folder(tmp_path / "test", n_per_class=4)
    args = ["train", "--data_dir", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--save_dir", str(tmp_path / "runs"),
            "--name", "f", "--method", "mbdml1", "--max_epochs", "2", "--eval_every", "1", "--width", "8", "--embedding_dim", "8", "--k", "5",
            "--batch_size", "8", "--no-progress", "--val_fraction", "0.2", "--num_classes", "2", "--tsne_graph", "True"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final model" in out and "best on validation" in out and "best on test (authors)*" in out
    run_dir = tmp_path / "runs" / "f"
    for png in ("accuracy.png", "tsne_train.png", "tsne_test.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    gif = Image.open(run_dir / "tsne_test_epochs.gif")
    assert gif.format == "GIF" and gif.n_frames == 2  # one frame per evaluation (epochs 1 and 2)
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 8 and 0 <= metrics["nngk_acc"] <= 1
    assert main(["embed", str(run_dir), "--out", str(tmp_path / "e.npz"), "--part", "both"]) == 0
    emb = np.load(tmp_path / "e.npz")
    assert emb["test_embeddings"].shape == (8, 8) and emb["train_embeddings"].shape == (20, 8)
    assert list(emb["classes"]) == ["cat", "dog"]
    # --resume of a finished run has nothing left to do, and says so in its table.
    assert main(["train", "--resume", str(run_dir)]) == 0


@pytest.mark.parametrize(
    "preset, network",
    [
        ("scratch", ["--width", "8", "--embedding_dim", "16"]),
        # the pretrained Lite0 with its first stages fixed (their outputs kept), one pass per image
        ("finetune", ["--model", "efficientnet_lite0", "--input_size", "16"]),
    ],
)
def test_evaluate_prints_the_figures_of_the_runs_summary(tmp_path, capsys, preset, network):
    """'mbdml evaluate' embeds the test images as the run did (with the presets' test-time
    flips, channels-last and precision), so the last and the best checkpoint give the
    figures of the run's summary.json; 'mbdml embed' gives the embeddings behind them."""
    run_dir = tmp_path / "flip"
    assert main(["-q", "train", "--preset", preset, "--dataset", "digits", "--method", "mbdml1", *network, "--k", "20",
                 "--batch_size", "32", "--sigma", "1", "--max_epochs", "2", "--update_interval", "1", "--tta_flip", "true",
                 "--save_dir", str(tmp_path), "--name", "flip", "--cache_dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for which, selection, keys in (("last", "final", ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi")),
                                   ("best", "best_val", ("nngk_acc", "knn_acc"))):
        capsys.readouterr()
        assert main(["evaluate", str(run_dir), "--which", which, "--device", "cpu"]) == 0
        printed = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert int(printed["epoch"]) == summary[selection]["epoch"]
        assert {k: printed[k] for k in keys} == {k: f"{100 * summary[selection][k]:.2f}" for k in keys}, which
    capsys.readouterr()
    assert main(["embed", str(run_dir), "--which", "last", "--out", str(tmp_path / "e.pt"), "--device", "cpu"]) == 0
    from mbdml.components import load_run
    from mbdml.evaluate import nngk_accuracy

    out = __import__("torch").load(tmp_path / "e.pt")
    run = load_run(run_dir, "last")
    assert f"{100 * nngk_accuracy(run.kernel, out['test_embeddings'], out['test_labels']):.2f}" == f"{100 * summary['final']['nngk_acc']:.2f}"
