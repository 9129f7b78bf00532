"""The suite's own rules: every path to the published models goes through conftest's ``realworld`` fixture/marker.

A test that built ``../shared/realworld`` itself would fail on a user's clone
instead of skipping, and would still find the models when CI hides them with
``BNFOLD_NO_REALWORLD=1`` (issue #26).
"""

from __future__ import annotations

import re

from conftest import ROOT

SHARED_PATH = re.compile(r"""["']shared["']\s*/|/\s*["']shared["']|["']realworld["']\s*/|parents\[2\]""")


def test_no_test_file_builds_the_published_models_path_itself() -> None:
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("conftest.py", "test_suite_layout.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SHARED_PATH.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == [], "use conftest's realworld fixture, realworld_path() or realworld_files():\n" + "\n".join(offenders)


def test_the_pattern_finds_the_old_way() -> None:
    """The check above can fail: the ways the files used to build the path match."""
    assert SHARED_PATH.search('REALWORLD = ROOT.parent / "shared" / "realworld" / "onnx"')
    assert SHARED_PATH.search('Path(__file__).resolve().parents[2] / "x"')
