"""The method registry: every method by name, and :func:`build_method`."""

from __future__ import annotations

from ..errors import ConfigError
from ..kernel import NNGKClassifier
from .base import Method, MethodOptions
from .baselines import ContrastiveBaseline, ProxyAnchorBaseline, SoftTripleBaseline, SupConBaseline, TripletBaseline
from .mbdml import MbDML1, MbDML2, MbDML3, MixupMethod, NNGKMethod, SoftmaxMethod
from .semi import MbDML1Semi, MbDMLSemi

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        NNGKMethod,
        MixupMethod,
        MbDML1,
        MbDML2,
        MbDML3,
        MbDMLSemi,
        MbDML1Semi,
        SoftmaxMethod,
        ContrastiveBaseline,
        ProxyAnchorBaseline,
        SoftTripleBaseline,
        SupConBaseline,
        TripletBaseline,
    )
}


def build_method(name: str, kernel: NNGKClassifier, embedding_dim: int, num_classes: int, options: MethodOptions | None = None) -> Method:
    """A method by its registry name (case-insensitive)."""
    key = name.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key](kernel, embedding_dim, num_classes, options)
