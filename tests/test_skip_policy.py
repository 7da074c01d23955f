"""The skip rule of tests/skip_policy.py, on small suites run in a pytester sandbox with the same hooks: every way a
test can end up not running is either documented ("reason: ...") or a failure."""

from __future__ import annotations

import pytest

HOOKS = "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport\n"


@pytest.fixture
def sandbox(pytester):
    pytester.makeconftest(HOOKS)
    return pytester


def test_documented_skips_and_xfails_pass(sandbox):
    sandbox.makepyfile("""
        import pytest

        def test_skip_call():
            pytest.skip("reason: the model is not installed here")

        @pytest.mark.skip(reason="reason: shown in the marker")
        def test_skip_marker():
            pass

        @pytest.mark.xfail(reason="reason: a peer's known bug", strict=True)
        def test_xfail_marker():
            assert False

        def test_xfail_call():
            pytest.xfail("reason: decided while running")
    """)
    sandbox.runpytest().assert_outcomes(skipped=2, xfailed=2)


def test_undocumented_skips_and_xfails_fail(sandbox):
    sandbox.makepyfile("""
        import pytest

        def test_skip_call():
            pytest.skip("no model")

        @pytest.mark.skip
        def test_skip_marker():
            pass

        @pytest.mark.skipif(True, reason="")
        def test_skipif():
            pass

        @pytest.mark.xfail
        def test_xfail_marker():
            assert False

        @pytest.mark.xfail(reason="flaky")
        def test_xpass():
            pass

        def test_xfail_call():
            pytest.xfail("later")
    """)
    result = sandbox.runpytest()
    result.assert_outcomes(failed=4, errors=2)  # marker skips happen at set-up, so they fail as errors
    result.stdout.fnmatch_lines(["*skipped without a documented reason*", "*xfail without a documented reason*"])


def test_a_module_skipped_at_collection_fails_unless_documented(sandbox):
    sandbox.makepyfile(
        test_quiet="""
            import pytest
            pytest.importorskip("a_module_that_does_not_exist")

            def test_never_collected():
                pass
        """,
        test_documented="""
            import pytest
            pytest.skip("reason: needs a GPU; run by scripts/test_gpu.sh", allow_module_level=True)
        """,
        test_plain="""
            def test_runs():
                pass
        """,
    )
    result = sandbox.runpytest()
    result.assert_outcomes(skipped=1, errors=1)  # a collection error stops the run before any test
    result.stdout.fnmatch_lines(["*test_quiet.py skipped at collection without a documented reason*"])
    assert result.ret != 0
