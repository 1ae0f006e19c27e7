"""The one list of method groups, and its readers: the registry, the result tables and
the command line."""

import os
import subprocess
import sys

from mbdml.methods import BASELINES, METHOD_GROUPS, METHODS, PAPER_METHODS, group_methods, table_sections


def test_every_group_holds_registered_methods_and_the_sections_hold_each_once():
    for group in METHOD_GROUPS:
        assert group.methods and set(group.methods) <= set(METHODS), group.name
    in_sections = [m for g in table_sections() for m in g.methods]
    assert sorted(in_sections) == sorted(METHODS) and len(in_sections) == len(set(in_sections))
    assert len({g.name for g in METHOD_GROUPS}) == len(METHOD_GROUPS)


def test_the_paper_selections_keep_their_members_and_order():
    assert group_methods("paper") == PAPER_METHODS == ("nngk", "mixup", "mbdml1", "mbdml2", "mbdml3")
    assert group_methods("baselines") == BASELINES == ("contrastive", "proxyanchor", "softtriple", "supcon", "triplet")
    assert group_methods("ALL") == BASELINES + PAPER_METHODS
    assert group_methods("semi") == ("mbdml1_semi", "mbdml_semi")
    assert group_methods("nngk") is None  # a method, not a group


def run_cli(*argv):
    env = {**os.environ, "COLUMNS": "2000"}  # help lines unwrapped
    return subprocess.run([sys.executable, "-m", "mbdml", *argv], capture_output=True, text=True, timeout=120, env=env)


def test_command_line_names_every_group_in_its_help_and_its_error(tmp_path):
    bad = run_cli("compare", "--methods", "paper,arcface", "--results_dir", str(tmp_path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown method 'arcface' in --methods" in bad.stderr
    assert "or a group: " + ", ".join(g.name for g in METHOD_GROUPS) in bad.stderr
    help_text = run_cli("compare", "--help").stdout
    assert all(f"'{g.name}' ({g.description})" in help_text for g in METHOD_GROUPS)


def test_result_tables_read_the_groups_without_importing_torch():
    """``mbdml.report`` lays tables out from the group list alone: no torch import."""
    code = "import sys, mbdml.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
