"""The method groups: one list, read by the command line and by the result tables.

Torch-free on purpose, so that ``mbdml.report`` can lay out tables without importing
the methods themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

BASELINES: tuple[str, ...] = ("contrastive", "proxyanchor", "softtriple", "supcon", "triplet")
PAPER_METHODS: tuple[str, ...] = ("nngk", "mixup", "mbdml1", "mbdml2", "mbdml3")
SEMI_SUPERVISED: tuple[str, ...] = ("mbdml_semi", "mbdml1_semi")


@dataclass(frozen=True)
class MethodGroup:
    """Methods that go together: ``--methods NAME`` selects them all.

    A group with a ``title`` is also a section of the result tables, its methods'
    rows in this order; those sections hold every method once. A group without one
    (``paper``, ``all``) is a selection only.
    """

    name: str
    methods: tuple[str, ...]
    title: str | None = None
    description: str = ""  # a few words for the command line's help


METHOD_GROUPS: tuple[MethodGroup, ...] = (
    MethodGroup("baselines", BASELINES, "Baseline losses", "the five pytorch-metric-learning losses"),
    MethodGroup("original", ("softmax", "mixup", "nngk"), "Original methods", "softmax, mixup, nngk"),
    MethodGroup("mbdml", ("mbdml1", "mbdml2", "mbdml3"), "MbDML", "mbdml1, mbdml2, mbdml3"),
    MethodGroup("semi", ("mbdml1_semi", "mbdml_semi"), "Semi-supervised (ours)", "mbdml1_semi, mbdml_semi"),
    MethodGroup("paper", PAPER_METHODS, None, "the five MbDML-paper methods: nngk, mixup, mbdml1-3"),
    MethodGroup("all", BASELINES + PAPER_METHODS, None, "the paper's ten: baselines and paper"),
)

# How the result tables name each method.
METHOD_TITLES: dict[str, str] = {
    "contrastive": "Contrastive",
    "proxyanchor": "ProxyAnchor",
    "softtriple": "SoftTriple",
    "supcon": "SupCon",
    "triplet": "Triplet",
    "softmax": "Softmax",
    "mixup": "Mixup",
    "nngk": "NNGK",
    "mbdml1": "MbDML1",
    "mbdml2": "MbDML2",
    "mbdml3": "MbDML3",
    "mbdml1_semi": "MbDML1-semi",
    "mbdml_semi": "MbDML3-semi",
}


def table_sections() -> tuple[MethodGroup, ...]:
    """The groups that are sections of the result tables (those with a title), in order."""
    return tuple(g for g in METHOD_GROUPS if g.title)


def group_methods(name: str) -> tuple[str, ...] | None:
    """The methods of the group called ``name`` (case-insensitive), or None if there is none."""
    for group in METHOD_GROUPS:
        if group.name == name.lower():
            return group.methods
    return None
