"""Progress bars: drawn on a terminal or in a notebook, not into pipes and log files; UPREID_PROGRESS
overrides; a bad value is named in a warning and ignored (it must not stop a run)."""
import io
import os
import subprocess
import sys
import types

import pytest

from upreid.utils import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)


def test_terminal_or_not():
    assert progress.interactive(Tty())
    assert not progress.interactive(io.StringIO())
    assert not progress.interactive(object())          # a stream without isatty
    closed = io.StringIO()
    closed.close()
    assert not progress.interactive(closed)


def test_bar_writes_only_where_watched():
    out = io.StringIO()
    assert list(progress.bar(range(5), file=out, desc="piped")) == list(range(5))
    assert out.getvalue() == ""
    tty = Tty()
    assert list(progress.bar(range(5), file=tty, desc="watched", mininterval=0)) == list(range(5))
    assert "watched" in tty.getvalue() and "5/5" in tty.getvalue()
    asked_off = Tty()
    list(progress.bar(range(5), file=asked_off, enabled=False))
    assert asked_off.getvalue() == ""


def test_override_and_notebook(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.interactive(io.StringIO())
    out = io.StringIO()
    list(progress.bar(range(3), file=out, desc="forced"))
    assert "forced" in out.getvalue()
    list(progress.bar(range(3), file=(off := io.StringIO()), enabled=False))
    assert off.getvalue() == ""                          # progress=False wins over the setting
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.interactive(Tty())
    monkeypatch.delenv(progress.ENV)
    ipython = types.ModuleType("IPython")
    shell = types.SimpleNamespace(config={})
    ipython.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert not progress.interactive(io.StringIO())       # IPython in a terminal: its stderr decides
    shell.config = {"IPKernelApp": {}}
    assert progress.interactive(io.StringIO())           # a Jupyter kernel: tqdm.auto draws a widget


def test_bad_setting_is_named_once_and_ignored(monkeypatch, caplog):
    monkeypatch.setenv(progress.ENV, "sometimes")
    monkeypatch.setattr(progress, "_warned", set())
    assert progress.interactive(Tty()) and not progress.interactive(io.StringIO())   # read as unset
    warnings = [r.getMessage() for r in caplog.records if progress.ENV in r.getMessage()]
    assert warnings == ["UPREID_PROGRESS='sometimes' is neither 1 (always draw progress bars) nor 0 (never): "
                        "ignored; bars are drawn when stderr is a terminal"]


def test_piped_command_prints_no_bar_frames(tmp_path):
    """`upreid synth` with stderr piped: no carriage-return frames, and its summary is still there; the
    same command told UPREID_PROGRESS=1 draws its bar."""
    args = [sys.executable, "-m", "upreid", "synth", "--root", "", "--ids", "4", "--cameras", "2",
            "--unlabeled", "2", "--distractors", "1", "--junk", "1", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    results = {}
    for name, extra in (("auto", {}), ("forced", {progress.ENV: "1"})):
        args[5] = str(tmp_path / name)
        p = subprocess.run(args, capture_output=True, env={**env, **extra}, timeout=300)   # bytes: "\r" kept
        assert p.returncode == 0, p.stderr.decode()
        results[name] = p.stdout + p.stderr
    assert b"rendering" not in results["auto"] and b"\r" not in results["auto"]
    assert b"rendering" in results["forced"] and b"\r" in results["forced"]   # tqdm's frames, when drawn
    assert results["auto"].strip()                      # the command still says what it wrote
