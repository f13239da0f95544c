"""Progress bars: per-step callbacks only on request (they make the loops uncacheable)."""
import io

from unclip_jax.pipelines import progress as progress_lib


def test_no_host_callback_in_the_loops_unless_step_progress():
    assert progress_lib.STEP_PROGRESS is False
    assert progress_lib.callback(True) is None
    try:
        progress_lib.set_step_progress(True)
        assert progress_lib.callback(True) is progress_lib.report
        assert progress_lib.callback(False) is None
    finally:
        progress_lib.set_step_progress(False)


def test_stage_bar_moves_with_reports_and_completes(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress_lib.sys, "stderr", out)
    with progress_lib.stage("decoder") as bar:
        progress_lib.report(2, 5)
        assert (bar.n, bar.total) == (2, 5)
    assert (bar.n, bar.total) == (5, 5)
    assert "decoder" in out.getvalue()
    with progress_lib.stage("prior", enabled=False) as none_bar:
        assert none_bar is None
