"""The training methods: each turns (model, batch) into a loss.

=====================  =============================================================
``base``               :class:`MethodOptions`, :class:`LossOutput`, the :class:`Method` base
``mixed_neighbours``   the rules for a mixed sample's neighbour list (sample, union, search)
``mbdml``              nngk, mixup, mbdml1, mbdml2, mbdml3 and softmax
``semi``               mbdml_semi and mbdml1_semi, with :class:`PseudoBatch`
``baselines``          the pytorch-metric-learning losses of the paper's table
``registry``           :data:`METHODS` by name and :func:`build_method`
``groups``             :data:`METHOD_GROUPS`: ``--methods paper`` and the result tables' sections
=====================  =============================================================

Usage, with no trainer::

    method = build_method("mbdml3", kernel, embedding_dim, num_classes, MethodOptions(scale_mixup=2.0))
    out = method(model, images, labels, indices, generator)
    out.loss.backward()

The group lists are read without torch (``mbdml report`` needs nothing else); every
other name here loads its module, and so torch, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .groups import BASELINES, METHOD_GROUPS, METHOD_TITLES, PAPER_METHODS, SEMI_SUPERVISED, MethodGroup, group_methods, table_sections

if TYPE_CHECKING:
    from .base import MIXUP_HEADS, EmbeddingModel, LossOutput, Method, MethodOptions, smoothed_nll
    from .baselines import ContrastiveBaseline, MetricLearningBaseline, ProxyAnchorBaseline, SoftTripleBaseline, SupConBaseline, TripletBaseline
    from .mbdml import MbDML1, MbDML2, MbDML3, MixupMethod, NNGKMethod, SoftmaxMethod
    from .mixed_neighbours import (
        MIXED_NEIGHBOUR_RULES,
        MIXED_NEIGHBOURS,
        MixedNeighbourLists,
        MixedNeighbourRule,
        SampleNeighbours,
        SearchNeighbours,
        UnionNeighbours,
        class_absent_share,
        mixed_neighbour_rule,
    )
    from .registry import METHODS, build_method
    from .semi import PSEUDO_LABELLERS, MbDML1Semi, MbDMLSemi, PseudoBatch

# The module that defines each torch-backed name.
_MODULE_OF: dict[str, str] = {
    **dict.fromkeys(("MIXUP_HEADS", "EmbeddingModel", "LossOutput", "Method", "MethodOptions", "smoothed_nll"), "base"),
    **dict.fromkeys(
        ("ContrastiveBaseline", "MetricLearningBaseline", "ProxyAnchorBaseline", "SoftTripleBaseline", "SupConBaseline", "TripletBaseline"),
        "baselines",
    ),
    **dict.fromkeys(("MbDML1", "MbDML2", "MbDML3", "MixupMethod", "NNGKMethod", "SoftmaxMethod"), "mbdml"),
    **dict.fromkeys(
        (
            "MIXED_NEIGHBOUR_RULES",
            "MIXED_NEIGHBOURS",
            "MixedNeighbourLists",
            "MixedNeighbourRule",
            "SampleNeighbours",
            "SearchNeighbours",
            "UnionNeighbours",
            "class_absent_share",
            "mixed_neighbour_rule",
        ),
        "mixed_neighbours",
    ),
    **dict.fromkeys(("METHODS", "build_method"), "registry"),
    **dict.fromkeys(("PSEUDO_LABELLERS", "MbDML1Semi", "MbDMLSemi", "PseudoBatch"), "semi"),
}

__all__ = sorted(
    [
        "BASELINES",
        "METHOD_GROUPS",
        "METHOD_TITLES",
        "PAPER_METHODS",
        "SEMI_SUPERVISED",
        "MethodGroup",
        "group_methods",
        "table_sections",
        *_MODULE_OF,
    ]
)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
