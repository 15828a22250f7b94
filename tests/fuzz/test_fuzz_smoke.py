"""Every fuzz harness runs a few seconds from its seed corpus without a crash, and every kept crash input passes.

A crash found here is saved under tests/fuzz/crashes/ (like scripts/fuzz does); fix
the bug and keep the input: it is replayed by test_kept_crash_input from then on.
Inputs of bugs not fixed yet are listed in tests/fuzz/crashes/OPEN and must still
fail (so that the entry is removed, with the harness's guard, once the bug is fixed).
"""
from __future__ import annotations

import pytest

from tests.fuzz import run

SMOKE_SECONDS = 3


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch work directory: new corpus entries of a smoke run are thrown away."""
    return tmp_path_factory.mktemp("fuzz-work")


@pytest.mark.parametrize("harness", run.HARNESSES)
def test_harness_runs_clean(harness, work):
    result = run.run_harness(harness, SMOKE_SECONDS, work=work)
    if result.crash is not None:
        pytest.fail(f"fuzz harness {harness} crashed; input saved as {result.crash} "
                    f"(replay: python -m tests.fuzz.atheris_main {harness} {result.crash}, or for scan "
                    f"{work}/build/fuzz_scan {result.crash})\n{run._tail(result.log)}")
    assert result.returncode == 0, f"fuzz harness {harness} failed to run:\n{run._tail(result.log)}"
    assert result.execs, f"fuzz harness {harness} reported no executions:\n{run._tail(result.log)}"


def _kept():
    return [pytest.param(path, id=path.name) for path in run.kept_crashes()] or [
        pytest.param(None, marks=pytest.mark.skip(reason="no kept crash inputs"))]


@pytest.mark.parametrize("path", _kept())
def test_kept_crash_input(path, work):
    harness = path.name.split("-", 1)[0]
    passed, output = run.replay(harness, [path], work=work)
    why_open = run.open_bugs().get(path.name)
    if why_open is not None:
        assert not passed, (f"{path.name} passes now: its bug ({why_open}) looks fixed; remove it from "
                            f"tests/fuzz/crashes/OPEN and its guard() from the {harness} harness")
        pytest.xfail(f"open bug: {why_open}")
    assert passed, f"kept crash input {path} fails the {harness} harness again:\n{output[-3000:]}"
