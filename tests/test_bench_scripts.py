"""The benchmark scripts' own behaviour (not timings): bad arguments refused, failures reported in the
exit status, so that an unattended GPU run (benchmarks/run_device.sh) cannot read as OK."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

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


def _csv_rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("flag,value", [("--ops", "rerank,rernak"), ("--reference", "rerank")])
def test_bench_eval_refuses_an_unknown_op(capsys, flag, value):
    from benchmarks import bench_eval
    with pytest.raises(SystemExit) as e:
        bench_eval.main(["--workload", "tiny", flag, value, "--no-csv"])
    bad = value.split(",")[-1]
    assert e.value.code == 2 and f"{flag}: unknown ['{bad}']" in capsys.readouterr().err


def test_bench_eval_fails_when_nothing_was_measured(capsys):
    from benchmarks import bench_eval
    assert bench_eval.main(["--workload", "tiny", "--ops", "", "--no-csv"]) == 1
    assert "no row was measured" in capsys.readouterr().err


def test_bench_eval_measures_the_cpu_references_on_the_cpu_in_a_gpu_run(tmp_path, monkeypatch):
    """--device cuda, faked on the CPU: the op's row names the GPU with the allocator's peak, the
    reference's row names the CPU with a resident-set peak from a fresh CPU process."""
    from benchmarks import bench_eval
    real_make, real_peak, peaks = bench_eval.make, bench_eval.peak_bytes, []
    monkeypatch.setattr(bench_eval, "make", lambda w, device, seed=0: real_make(w, "cpu", seed))
    monkeypatch.setattr(bench_eval, "sync", lambda device: None)
    monkeypatch.setattr(bench_eval, "env_fields",
                        lambda device: {"device": f"dev:{torch.device(device).type}", "threads": 1, "torch": "t"})

    def fake_peak(fn, device):
        peaks.append(str(device))
        return 7 * 2**20 if torch.device(device).type == "cuda" else real_peak(fn, device)
    monkeypatch.setattr(bench_eval, "peak_bytes", fake_peak)
    path = tmp_path / "r.csv"
    assert bench_eval.main(["--workload", "tiny", "--device", "cuda", "--ops", "rank", "--reference", "rank",
                            "--repeats", "1", "--csv", str(path)]) == 0
    rows = {r["impl"]: r for r in _csv_rows(path)}
    assert rows["upreid"]["device"] == "dev:cuda" and rows["upreid"]["peak_mem_mb"] == "7.0"
    assert rows["reference"]["device"] == "dev:cpu" and peaks == ["cuda"]   # the reference: not the allocator


def test_bench_eval_writes_rows_to_the_csv_given(tmp_path):
    from benchmarks import bench_eval
    path = tmp_path / "out" / "eval.csv"
    assert bench_eval.main(["--workload", "tiny", "--ops", "rank", "--repeats", "1", "--csv", str(path)]) == 0
    rows = _csv_rows(path)
    assert [r["benchmark"] for r in rows] == ["rank_metrics"] and rows[0]["commit"] and rows[0]["device"]


def test_bench_compat_writes_rows_to_the_csv_given_and_refuses_an_unknown_skip(tmp_path, capsys):
    from benchmarks import bench_compat
    path = tmp_path / "compat.csv"
    assert bench_compat.main(["--rank-workload", "tiny", "--rerank-workload", "tiny", "--repeats", "1",
                              "--csv", str(path)]) == 0
    assert {r["benchmark"] for r in _csv_rows(path)} == {"evaluate_rank", "re_ranking"}
    with pytest.raises(SystemExit) as e:
        bench_compat.main(["--skip", "rnak", "--no-csv"])
    assert e.value.code == 2 and "--skip: unknown ['rnak']" in capsys.readouterr().err


def test_bench_data_refuses_an_unknown_pipeline(capsys):
    from benchmarks import bench_data
    with pytest.raises(SystemExit) as e:
        bench_data.main(["--pipeline", "pretrian", "--no-csv"])
    assert e.value.code == 2 and "invalid choice: 'pretrian'" in capsys.readouterr().err


def test_bench_data_writes_rows_to_the_csv_given(tmp_path):
    from benchmarks import bench_data
    path = tmp_path / "data.csv"
    assert bench_data.main(["--device", "cpu", "--impl", "torch", "--pipeline", "eval", "--images", "16",
                            "--batch", "8", "--epochs", "1", "--threads", "1", "--csv", str(path)]) == 0
    rows = _csv_rows(path)
    assert [(r["pipeline"], r["impl"], r["images"]) for r in rows] == [("eval", "torch", "16")]


def test_bench_data_times_each_crop_rule_and_names_it(tmp_path):
    """--crop-attempts gives one pre-training row per rule, named in 'pipeline'; the rows carry the
    commit and the device with its CPU's vector ISA (environment.device_name)."""
    import torch

    from benchmarks import bench_data
    path = tmp_path / "data.csv"
    assert bench_data.main(["--device", "cpu", "--impl", "torch", "--pipeline", "pretrain", "--images", "16",
                            "--batch", "8", "--epochs", "1", "--threads", "1", "--crop-attempts", "1", "3",
                            "--csv", str(path)]) == 0
    rows = _csv_rows(path)
    assert [r["pipeline"] for r in rows] == ["pretrain, crop_attempts=1", "pretrain, crop_attempts=3"]
    assert all(r["commit"] and r["device"].endswith(torch.backends.cpu.get_cpu_capability()) for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--crop-attempts", "0"], "--crop-attempts 0: crop_attempts must be an integer in 1..100"),
    (["--crop-attempts", "10", "101"], "--crop-attempts 101: crop_attempts must be an integer in 1..100"),
    (["--pipeline", "eval", "--crop-attempts", "3"], "applies to the pretrain pipeline"),
])
def test_bench_data_refuses_crop_attempts_before_measuring(argv, message, capsys):
    from benchmarks import bench_data
    with pytest.raises(SystemExit) as e:
        bench_data.main(argv + ["--no-csv"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_append_rows_writes_the_fields_given_and_refuses_another_header(tmp_path):
    """One appender for every benchmark CSV: its own fields, missing cells empty, unknown keys an error
    unless ignored, and never rows under a header of other columns."""
    from benchmarks.common import append_rows
    path = tmp_path / "x.csv"
    append_rows([{"a": 1, "b": 2}, {"b": 3}], path, fields=["a", "b"])
    append_rows([{"a": 4, "extra": 5}], path, fields=["a", "b"], ignore_unknown=True)
    assert path.read_text().splitlines() == ["a,b", "1,2", ",3", "4,"]
    with pytest.raises(KeyError, match="extra"):
        append_rows([{"a": 4, "extra": 5}], path, fields=["a", "b"])
    with pytest.raises(ValueError, match=r"header \['a', 'b'\] is not this script's \['a', 'c'\]"):
        append_rows([{"a": 6}], path, fields=["a", "c"])
    assert path.read_text().splitlines() == ["a,b", "1,2", ",3", "4,"]      # nothing written by the refusals


def test_append_rows_widens_an_older_header_only_when_asked(tmp_path):
    """A CSV written before its script gained a column: rewritten under the full header (old rows keep
    their cells, the new one empty), then appended; a column the script does not know is still refused."""
    from benchmarks.common import append_rows
    path = tmp_path / "x.csv"
    append_rows([{"a": 1, "b": 2}], path, fields=["a", "b"])
    with pytest.raises(ValueError, match="is not this script's"):
        append_rows([{"a": 3, "c": 4}], path, fields=["a", "b", "c"])          # not without widen
    append_rows([{"a": 3, "c": 4}], path, fields=["a", "b", "c"], widen=True)
    assert path.read_text().splitlines() == ["a,b,c", "1,2,", "3,,4"]
    append_rows([{"c": 5, "b": 6}], path, fields=["c", "b", "a"], widen=True)    # same columns, another order
    assert path.read_text().splitlines() == ["c,b,a", ",2,1", "4,,3", "5,6,"]
    with pytest.raises(ValueError, match=r"columns \['a'\] are not this script's"):
        append_rows([{"c": 7}], path, fields=["c", "b"], widen=True)
    assert path.read_text().splitlines() == ["c,b,a", ",2,1", "4,,3", "5,6,"]
    bad = tmp_path / "bad.csv"                   # a row with more cells than the header: refused, file kept
    bad.write_text("a,b\n1,2,3\n")
    with pytest.raises(ValueError, match=r"line\(s\) \[2\] have more cells than its header \['a', 'b'\]"):
        append_rows([{"a": 4}], bad, fields=["a", "b", "c"], widen=True)
    assert bad.read_text() == "a,b\n1,2,3\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "x.csv"]
    dup = tmp_path / "dup.csv"                   # a header naming a column twice is not widened
    dup.write_text("a,a\n1,2\n")
    with pytest.raises(ValueError, match=r"it names \['a'\] twice"):
        append_rows([{"a": 4}], dup, fields=["a", "b"], widen=True)


def test_bench_pretrain_refuses_an_unknown_implementation(capsys):
    from benchmarks import bench_pretrain
    with pytest.raises(SystemExit) as e:
        bench_pretrain.main(["--impls", "upreid,foo", "--no-csv"])
    assert e.value.code == 2 and "unknown ['foo']" in capsys.readouterr().err


def test_bench_pretrain_resets_the_cuda_peak_for_each_implementation(monkeypatch):
    from benchmarks import bench_pretrain
    resets = []

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(bench_pretrain, "load_config", stop)   # the rest of the step needs a GPU
    args = SimpleNamespace(backend="torch", plain_backend="auto", depth=18, queue=64, height=128, width=64, batch=4,
                           workers=1, hidden=32)
    for impl in bench_pretrain.IMPLS:
        with pytest.raises(Stop):
            bench_pretrain.run(impl, args, torch.device("cuda"), "unused")
    assert len(resets) == len(bench_pretrain.IMPLS)


def test_bench_pretrain_rows_record_the_settings_and_the_backend_that_ran(tmp_path):
    from benchmarks import bench_pretrain
    from upreid.data.loader import resolve_backend
    path = tmp_path / "r.csv"
    assert bench_pretrain.main(["--device", "cpu", "--impls", "upreid", "--backend", "auto", "--depth", "18",
                                "--height", "128", "--width", "64", "--batch", "4", "--steps", "1", "--warmup", "0",
                                "--queue", "64", "--hidden", "32", "--workers", "1", "--images", "8",
                                "--csv", str(path)]) == 0
    (row,) = _csv_rows(path)
    for setting in ("batch 4", "images 8", "steps 1", "warmup 0", "workers 1", "compile 0",
                    f"backend {resolve_backend('auto')}"):
        assert setting in row["config"], (setting, row["config"])
    assert "auto" not in row["config"] + row["extra"]


def test_report_filters_by_benchmark(tmp_path, capsys):
    from benchmarks import report
    from benchmarks.common import append_rows
    path = tmp_path / "r.csv"
    append_rows([{"timestamp": "t", "device": "GPU", "benchmark": op, "impl": "fused", "config": f"{op}-shape",
                  "dtype": "float32", "pass": "fwd+bwd", "median_ms": "1.0", "peak_mem_mb": "1"}
                 for op in ("info_nce", "bank_kl")], path)
    report.main(["--csv", str(path), "--benchmark", "bank_kl"])
    out = capsys.readouterr().out
    assert "bank_kl-shape" in out and "info_nce-shape" not in out
