"""Progress bars: drawn on a terminal or in a notebook, not into pipes and log files; UPREID_PROGRESS
overrides; a bad value is refused by name."""
import io
import os
import subprocess
import sys
import types

import pytest

from upreid.utils import progress


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)


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
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert progress.interactive(io.StringIO())


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ValueError, match="UPREID_PROGRESS='sometimes': must be 1"):
        progress.interactive(Tty())


def test_piped_command_prints_no_bar_frames(tmp_path):
    """`upreid synth` with stderr piped: no carriage-return frames, and its summary is still there; the
    same command told UPREID_PROGRESS=1 draws its bar."""
    args = [sys.executable, "-m", "upreid", "synth", "--root", "", "--ids", "4", "--cameras", "2",
            "--unlabeled", "2", "--distractors", "1", "--junk", "1", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    results = {}
    for name, extra in (("auto", {}), ("forced", {progress.ENV: "1"})):
        args[5] = str(tmp_path / name)
        p = subprocess.run(args, capture_output=True, text=True, env={**env, **extra}, timeout=300)
        assert p.returncode == 0, p.stderr
        results[name] = p.stdout + p.stderr
    assert "rendering" not in results["auto"] and "\r" not in results["auto"]
    assert "rendering" in results["forced"]
    assert results["auto"].strip()                      # the command still says what it wrote
