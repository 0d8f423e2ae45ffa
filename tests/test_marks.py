"""The ``vllm`` mark follows the fixtures, and a test that starts vLLM without it fails.

Run in an inner pytest (``pytester``) with this suite's own conftest, against a stand-in
``vllm`` program that exits at once: the check looks at the command line, not at what runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

INNER_TESTS = """
import subprocess
import sys
from pathlib import Path

import pytest

VLLM = Path(sys.argv[0]).parent  # unused; the stand-in comes from the environment
STAND_IN = {stand_in!r}


def test_starts_vllm_without_the_fixture():
    subprocess.run([STAND_IN, "serve", "model"], check=True)


def test_starts_vllm_with_the_fixture(vllm_launch):
    subprocess.run([STAND_IN, "serve", "model"], check=True)


@pytest.fixture(scope="module")
def shared_server(vllm_launch):
    subprocess.run([STAND_IN, "serve", "model"], check=True)
    return "server"


def test_uses_a_server_fixture(shared_server):
    assert shared_server == "server"


def test_pure():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, tmp_path: Path) -> pytest.Pytester:
    stand_in = tmp_path / "bin" / "vllm"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=INNER_TESTS.format(stand_in=str(stand_in)))
    return pytester


def test_a_test_that_starts_vllm_without_the_fixture_fails(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*test_starts_vllm_without_the_fixture started vLLM without depending*"])


def test_marks_follow_the_fixture_closure(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-m", "vllm", "--collect-only", "-q")
    result.stdout.fnmatch_lines(
        ["*test_starts_vllm_with_the_fixture", "*test_uses_a_server_fixture", "*2/4 tests collected*"]
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not vllm")
    # The pure test passes; the unmarked launcher passes its call and is caught at teardown.
    result.assert_outcomes(passed=2, errors=1, deselected=2)


def test_starts_vllm_reads_the_program_and_the_script() -> None:
    from conftest import starts_vllm

    assert starts_vllm(["/venv/bin/vllm", "serve", "m"])
    assert starts_vllm(["/venv/bin/python", "/repo/tests/scripts/vllm_generate.py", "r.json"])
    assert not starts_vllm(["/venv/bin/python", "-c", "import vllm"])
    assert not starts_vllm(["/venv/bin/awq-plugin", "quantize", "vllm", "out"])
    assert not starts_vllm("ls")
