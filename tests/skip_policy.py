"""The suite's rule for tests that do not run: a skip or an expected failure must say why ("reason: ..." in its
message), or it fails. Applies to a test skipped or xfailed while it runs and to a whole module skipped at
collection (`pytest.importorskip`, `pytest.skip(allow_module_level=True)`), so a broken import or a missing model
cannot turn tests into quiet skips. Imported by conftest.py; tests/test_skip_policy.py checks it on a suite of its own."""

from __future__ import annotations

import pytest

DOCUMENTED = "reason: "


def _message(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if hasattr(report, "wasxfail"):  # xfailed, or xpassed without strict
        if DOCUMENTED not in report.wasxfail:
            report.outcome = "failed"
            report.longrepr = f"xfail without a documented reason ('{DOCUMENTED}...' in its reason): {report.wasxfail!r}"
            del report.wasxfail
    elif report.skipped and DOCUMENTED not in _message(report):
        report.outcome = "failed"
        report.longrepr = f"skipped without a documented reason ('{DOCUMENTED}...' in the message): {_message(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and DOCUMENTED not in _message(report):
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped at collection without a documented reason "
                           f"('{DOCUMENTED}...' in the message): {_message(report)}")  # fmt: skip
    return report
