import json

import pytest

from mbdml.config import RunConfig, default_scale_mixup, make_config
from mbdml.errors import ConfigError
from mbdml.train import check_config


def test_defaults_resolve_and_roundtrip(tmp_path):
    cfg = RunConfig().resolved()
    assert cfg.scale_mixup == 1.0 and cfg.eval_every == cfg.update_interval
    cfg.save(tmp_path / "c.json")
    again = RunConfig.load(tmp_path / "c.json")
    assert again == cfg


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("sigma", -1.0, "sigma"),
        ("sigma", 0.0, "sigma"),
        ("alpha", -0.5, "alpha"),
        ("learning_rate", -1e-3, "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("k", 0, r"K \(the number of neighbours\) must be at least 1"),
        ("k", 2.5, "k must be a whole number"),
        ("labelled_fraction", 0.0, "labelled_fraction"),
        ("labelled_fraction", 1.5, "labelled_fraction"),
        ("val_fraction", 1.0, "val_fraction"),
        ("batch_size", 0, "batch_size"),
        ("method", "arcface", "method"),
        ("device", "tpu", "device"),
        ("cutout", -2, "cutout size -2 must be an integer >= 0"),
        ("cutout", 1.5, "cutout must be a whole number"),
        ("alpha", float("nan"), "alpha must be a finite number"),
        ("pseudo_fraction", 1.5, "pseudo_fraction"),
        ("pseudo_fraction", 0.0, "pseudo_fraction"),
    ],
)
def test_nonsense_values_are_refused_before_any_work(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**{field: value}).resolved()


def test_config_file_is_checked_not_evaluated(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"sigma": "__import__('os').system('touch pwned')"}))
    with pytest.raises(ConfigError, match="sigma"):
        RunConfig.load(path)
    path.write_text(json.dumps({"sigma": 1.0, "evil": 1}))
    with pytest.raises(ConfigError, match="unknown configuration keys: evil"):
        RunConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(path)
    with pytest.raises(ConfigError, match="whole number"):
        RunConfig.from_dict({"k": 2.5})


def test_paper_preset_is_the_authors_setup():
    cfg = make_config("paper", method="mbdml3").resolved()
    assert (cfg.model, cfg.embedding_dim, cfg.freeze_bn, cfg.learning_rate, cfg.batch_size) == ("resnet50", None, True, 1e-5, 32)
    assert cfg.sigma == 10.0 and cfg.k == 200 and cfg.update_interval == 5 and cfg.mixup_head == "features"
    assert cfg.scale_mixup == 2.0  # MbDML3's s in the authors' code
    assert default_scale_mixup("paper", "mbdml2") == 1e-4
    # Their README's command: 200 epochs; their classifier.py's floor; their scripts' weights.
    assert cfg.max_epochs == 200 and cfg.class_floor == "authors"
    assert (cfg.optimizer, cfg.schedule, cfg.weight_decay, cfg.alpha, cfg.beta) == ("adam", "none", 0.0, 1.0, 1.0)
    weights = {m: make_config("paper", method=m).resolved().scale_mixup for m in ("mbdml1", "mbdml2", "mbdml3")}
    assert weights == {"mbdml1": 1e-4, "mbdml2": 1e-4, "mbdml3": 2.0}
    # An explicit value wins over the preset.
    assert make_config("paper", learning_rate=3e-4).learning_rate == 3e-4


def test_scratch_preset_is_the_validated_recipe():
    cfg = make_config("scratch", method="mbdml1").resolved()
    assert (cfg.optimizer, cfg.schedule, cfg.learning_rate, cfg.label_smoothing) == ("sgd", "onecycle", 0.05, 0.1)
    assert (cfg.batch_size, cfg.tta_flip, cfg.update_interval, cfg.max_epochs) == (128, True, 4, 70)
    assert cfg.preset == "scratch" and cfg.scale_mixup == 1.0
    assert cfg.amp == "auto" and make_config("scratch", amp="none").amp == "none"
    assert make_config("scratch", max_epochs=5).max_epochs == 5


def test_finetune_preset_is_the_scratch_recipe_on_pretrained_lite0():
    cfg = make_config("finetune", method="mbdml1").resolved()
    assert (cfg.model, cfg.pretrained, cfg.input_size, cfg.mean, cfg.std) == ("efficientnet_lite0", "imagenet", 128, (0.5,), (0.5,))
    assert cfg.freeze_stages == 3 and cfg.split_batch is True
    assert (cfg.optimizer, cfg.schedule, cfg.learning_rate, cfg.label_smoothing) == ("sgd", "onecycle", 0.02, 0.1)
    assert (cfg.batch_size, cfg.tta_flip, cfg.update_interval, cfg.max_epochs) == (128, True, 6, 30)
    assert cfg.preset == "finetune" and cfg.amp == "auto"
    # Explicit values win, and the preset survives a round trip through config.json.
    assert make_config("finetune", learning_rate=0.01, input_size=64).input_size == 64
    assert make_config("finetune", freeze_stages=0).freeze_stages == 0
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_augmentation_defaults_follow_the_images():
    grey = RunConfig().with_data(channels=1, image_side=8)
    colour = RunConfig().with_data(channels=3, image_side=32)
    assert (grey.flip, grey.crop_padding) == (False, 1)
    assert (colour.flip, colour.crop_padding) == (True, 4)
    assert RunConfig(flip=True, crop_padding=0).with_data(1, 8).flip is True  # explicit values win


def test_freeze_stages_needs_a_pretrained_trunk_and_a_count():
    with pytest.raises(ConfigError, match="pretrained"):
        make_config(freeze_stages=2).validate()
    with pytest.raises(ConfigError, match="freeze_stages must be a whole number"):
        make_config("finetune", freeze_stages=-1).validate()
    cfg = make_config("finetune", freeze_stages=3).resolved()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).freeze_stages == 3


def test_finetune_preset_splits_the_batch_of_the_methods_with_two_terms(tmp_path):
    from mbdml.experiment import plan
    from mbdml.methods import METHODS

    for method, cls in METHODS.items():
        assert make_config("finetune", method=method).resolved().split_batch is cls.can_split_batch, method
        assert make_config("scratch", method=method).resolved().split_batch is False, method
    assert make_config("finetune", method="mbdml1", split_batch=False).resolved().split_batch is False
    # compare swaps the method into an unresolved base: each method gets its own default
    jobs = plan(make_config("finetune"), ["digits"], ["mbdml1", "mixup", "mbdml1_semi", "nngk"], 1, tmp_path)
    assert [(job.method, job.config.split_batch) for job in jobs] == [("mbdml1", True), ("mixup", False), ("mbdml1_semi", True), ("nngk", False)]
    # a saved run keeps the value it ran with
    cfg = make_config("finetune", method="mbdml3").resolved()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).split_batch is True


def test_split_batch_is_refused_where_there_is_nothing_to_split():
    with pytest.raises(ConfigError, match="only mbdml1, mbdml3, mbdml_semi, mbdml1_semi have"):
        make_config(method="mixup", split_batch=True).validate()
    cfg = make_config(method="mbdml1", split_batch=True).resolved()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).split_batch


@pytest.mark.parametrize("value", [-1.0, float("nan"), "4", True])
def test_frozen_cache_size_must_be_a_size(value):
    with pytest.raises(ConfigError, match="frozen_cache_gb must be a number of GiB"):
        make_config("finetune", frozen_cache_gb=value).validate()
    assert make_config("finetune", frozen_cache_gb=0).validate().frozen_cache_gb == 0


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_pseudo_ratio_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(ConfigError, match="pseudo_ratio must be a whole number >= 1"):
        make_config(method="mbdml1_semi", pseudo_ratio=value).validate()
    assert make_config(method="mbdml1_semi", pseudo_ratio=4).resolved().pseudo_ratio == 4


def test_pseudo_labeller_head_needs_a_method_with_a_head():
    with pytest.raises(ConfigError, match="method mbdml_semi has no head; use --pseudo_labeller kernel, or a method with one: mbdml1_semi"):
        check_config(make_config(method="mbdml_semi", pseudo_labeller="head"))
    with pytest.raises(ConfigError, match="--pseudo_labeller .softmax. is not known; choose one of: kernel, kernel_all, head, mean"):
        make_config(method="mbdml1_semi", pseudo_labeller="softmax").validate()
    assert check_config(make_config(method="mbdml1_semi", pseudo_labeller="mean")).pseudo_labeller == "mean"
    assert check_config(make_config(method="mbdml1", pseudo_labeller="head")).method == "mbdml1"  # ignored without unlabelled images
    assert check_config(make_config(method="mbdml_semi", pseudo_labeller="kernel_all")).pseudo_labeller == "kernel_all"


def test_a_config_saved_before_class_floor_existed_loads_with_the_floor_it_ran_with():
    """Runs saved before the option existed floored after normalising; our presets'
    default may change, their config.json must still mean what it did."""
    old = make_config("default").resolved().to_dict()
    del old["class_floor"]
    assert RunConfig.from_dict(old).class_floor == "normalised"
    assert RunConfig.from_dict({**old, "class_floor": "authors"}).class_floor == "authors"
    with pytest.raises(ConfigError, match="class_floor"):
        RunConfig.from_dict({**old, "class_floor": "later"}).validate()


def test_mean_and_std_may_be_given_as_lists_of_numbers():
    """A Python caller's lists (as JSON settings give them) are accepted as the tuples they stand for."""
    cfg = make_config(mean=[0.2, 0.4, 0.6], std=[0.5, 0.5, 0.5]).resolved()
    assert cfg.to_dict()["mean"] == [0.2, 0.4, 0.6]
    with pytest.raises(ConfigError, match="mean must be a list of numbers"):
        make_config(mean=["a"]).resolved()
    with pytest.raises(ConfigError, match="std must be a list of numbers"):
        make_config(std=0.5).resolved()
