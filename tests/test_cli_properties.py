"""Property tests of the command-line parsing: every option, random valid values."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from mbdml.cli import build_parser, config_from_args

positive = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
count = st.integers(min_value=1, max_value=10_000)
boolean = st.booleans()


def bool_text(b: bool, style: int) -> str:
    return [("True", "False"), ("true", "false"), ("1", "0"), ("yes", "no")][style % 4][0 if b else 1]


@settings(max_examples=60, deadline=None)
@given(
    sigma=positive, lr=positive, alpha=st.floats(min_value=0, max_value=10), scale=st.floats(min_value=0, max_value=100),
    beta=st.floats(min_value=0, max_value=100), k=count, batch=count, epochs=count, interval=count, seed=st.integers(0, 2**31 - 1),
    fraction=st.floats(min_value=1e-4, max_value=1.0), tsne=boolean, flip=boolean, style=st.integers(0, 3),
    emb=st.one_of(st.none(), st.integers(1, 4096)), method=st.sampled_from(["nngk", "mixup", "mbdml1", "mbdml2", "mbdml3", "triplet"]),
    preset=st.sampled_from(["default", "paper"]),
)
def test_every_option_round_trips_with_its_type(sigma, lr, alpha, scale, beta, k, batch, epochs, interval, seed, fraction, tsne, flip, style, emb, method, preset):
    argv = [
        "train", "--preset", preset, "--method", method, "--sigma", repr(sigma), "--learning_rate", repr(lr), "--alpha", repr(alpha),
        "--scale_mixup", repr(scale), "--beta", repr(beta), "--k", str(k), "--batch_size", str(batch), "--max_epochs", str(epochs),
        "--update_interval", str(interval), "--seed", str(seed), "--labelled_fraction", repr(fraction),
        "--tsne_graph", bool_text(tsne, style), "--flip", bool_text(flip, style + 1), "--embedding_dim", "none" if emb is None else str(emb),
    ]
    cfg = config_from_args(build_parser().parse_args(argv)).resolved()
    assert cfg.preset == preset and cfg.method == method
    assert isinstance(cfg.sigma, float) and math.isclose(cfg.sigma, sigma)
    assert isinstance(cfg.learning_rate, float) and math.isclose(cfg.learning_rate, lr)
    assert (cfg.alpha, cfg.scale_mixup, cfg.beta) == (alpha, scale, beta)
    assert (cfg.k, cfg.batch_size, cfg.max_epochs, cfg.update_interval, cfg.seed) == (k, batch, epochs, interval, seed)
    assert cfg.labelled_fraction == fraction and cfg.tsne_graph is tsne and cfg.flip is flip and cfg.embedding_dim == emb
    assert cfg.eval_every == interval  # defaults to the refresh cadence


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=8).filter(lambda t: t.strip().lower() not in {"true", "false", "t", "f", "yes", "no", "y", "n", "1", "0", "on", "off"}))
def test_anything_but_a_boolean_is_refused_for_boolean_flags(text):
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--tsne_graph", text])


@settings(max_examples=40, deadline=None)
@given(value=st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_non_positive_sigma_is_refused_with_a_message(value):
    import pytest

    from mbdml.errors import ConfigError

    with pytest.raises(ConfigError, match="sigma must be a positive number"):
        config_from_args(build_parser().parse_args(["train", f"--sigma={value!r}"])).resolved()
