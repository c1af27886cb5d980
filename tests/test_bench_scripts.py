"""The benchmark scripts' own behaviour (not timings): bad arguments refused, failures reported in the
exit status, so that an unattended GPU run (benchmarks/run_device.sh) cannot read as OK."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_ops  # noqa: E402


def test_bench_ops_refuses_an_unknown_implementation(capsys):
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--impls", "fused,refernce", "--no-csv"])
    assert e.value.code == 2 and "unknown ['refernce']" in capsys.readouterr().err


def test_bench_ops_fails_when_the_fused_operator_fails(monkeypatch, capsys):
    real = bench_ops.bench_shape

    def flaky(s, impl, *a):
        if impl == "fused":
            raise IndexError("kernel failed")
        return real(s, impl, *a)
    monkeypatch.setattr(bench_ops, "bench_shape", flaky)
    rc = bench_ops.main(["--only", "bank_kl", "--impls", "fused,reference", "--repeat", "1", "--warmup", "0",
                         "--no-csv"])
    assert rc == 1 and "the fused operator failed" in capsys.readouterr().err


def test_bench_ops_fails_when_nothing_was_measured(capsys):
    assert bench_ops.main(["--only", "no-such-shape", "--no-csv"]) == 1
    assert "no row was measured" in capsys.readouterr().err
