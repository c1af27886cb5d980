"""`upreid evaluate` refuses malformed inputs and bad options with a message naming the problem,
before any work, and without a traceback."""
import numpy as np
import pytest

from upreid.evaluation.cli import main


def good(path, **over):
    rng = np.random.default_rng(0)
    arrays = dict(features=rng.standard_normal((12, 4)).astype(np.float32), pids=np.arange(12) % 3,
                  camids=np.arange(12) % 2, num_query=np.int64(4))
    arrays.update(over)
    np.savez(path, **arrays)
    return str(path)


def run(capsys, *argv):
    rc = main(["evaluate", *map(str, argv), "--no-progress"])
    return rc, capsys.readouterr().err


def test_good_file_still_evaluates(tmp_path, capsys):
    rc, err = run(capsys, good(tmp_path / "f.npz"))
    assert rc == 0 and err == ""


@pytest.mark.parametrize("num_query,message", [(-3, "got -3"), (0, "got 0"), (12, "got 12")])
def test_num_query_out_of_range(tmp_path, capsys, num_query, message):
    rc, err = run(capsys, good(tmp_path / "f.npz", num_query=np.int64(num_query)))
    assert rc == 2 and "'num_query' must be in [1, 11]" in err and message in err


def test_truncated_empty_and_non_npz_files_are_named(tmp_path, capsys):
    full = good(tmp_path / "full.npz")
    data = open(full, "rb").read()
    cases = {"truncated.npz": data[: len(data) // 2], "empty.npz": b"", "text.npz": b"query,gallery\n1,2\n"}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        rc, err = run(capsys, p)
        assert rc == 2 and str(p) in err and ("not a readable .npz" in err or "truncated" in err), (name, err)
        assert "Traceback" not in err
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    rc, err = run(capsys, single)
    assert rc == 2 and "single array, not an .npz" in err


@pytest.mark.parametrize("over,message", [
    (dict(features=np.array(["a"] * 12)), "2-D floating array"),
    (dict(pids=np.arange(12) * 1.5), "pids must be a 1-D integer array"),
    (dict(camids=np.arange(11)), "12 features, 12 pids and 11 camids"),
    (dict(num_query=np.array([4, 5])), "'num_query' must be one integer"),
])
def test_wrong_dtypes_and_shapes(tmp_path, capsys, over, message):
    rc, err = run(capsys, good(tmp_path / "f.npz", **over))
    assert rc == 2 and message in err, err


def test_missing_arrays_list_the_schemes(tmp_path, capsys):
    p = tmp_path / "f.npz"
    np.savez(p, feats=np.zeros((3, 2)))
    rc, err = run(capsys, p)
    assert rc == 2 and "found arrays ['feats']" in err and "query_features" in err


@pytest.mark.parametrize("device,message", [("gpu", "is not a device"), ("cuda:0", "no CUDA device"),
                                            ("meta", "only cpu and cuda")])
def test_bad_device(tmp_path, capsys, device, message):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, err = run(capsys, good(tmp_path / "f.npz"), "--device", device)
    assert rc == 2 and message in err, err


def test_bad_json_destination_is_refused_before_work(tmp_path, capsys):
    f = good(tmp_path / "f.npz")
    (tmp_path / "afile").write_text("x")
    rc, err = run(capsys, f, "--json", tmp_path / "afile" / "r.json")
    assert rc == 2 and "is a file, not a folder" in err
    rc, err = run(capsys, f, "--json", tmp_path)
    assert rc == 2 and "is a folder" in err


def test_json_folder_is_created_as_the_docs_example_expects(tmp_path, capsys):
    """`upreid evaluate feats.npz --json eval/results.json` (docs/evaluation.md) with no eval/ yet."""
    out = tmp_path / "eval" / "sub" / "results.json"
    rc, err = run(capsys, good(tmp_path / "f.npz"), "--json", out)
    assert rc == 0 and out.is_file() and (tmp_path / "eval" / "sub" / "cmc.png").is_file(), err


@pytest.mark.parametrize("opts,message", [
    (["--rerank", "yes", "--k2", "30"], "--k2 30: re-ranking needs 1 <= k2 <= k1 + 1 = 21"),
    (["--rerank", "both", "--k1", "0"], "--k1 0: re-ranking needs k1 >= 1"),
    (["--rerank", "yes", "--lambda", "1.5"], "--lambda 1.5: re-ranking needs a weight in [0, 1]"),
])
def test_bad_rerank_settings_are_refused_before_work(tmp_path, capsys, opts, message):
    """Refused before the plain evaluation runs: nothing printed, no --json written."""
    out = tmp_path / "r.json"
    rc = main(["evaluate", good(tmp_path / "f.npz"), "--no-progress", "--json", str(out), *opts])
    cap = capsys.readouterr()
    assert rc == 2 and message in cap.err and cap.out == "" and not out.exists(), cap.err


def test_plots_destination_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = run(capsys, good(tmp_path / "f.npz"), "--plots", f)
    assert rc == 2 and "--plots" in err and "is a file" in err



def test_a_file_that_is_not_an_npz_gets_no_advice_to_unpickle_it(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    rc, err = run(capsys, junk)
    assert rc == 2 and "not an .npz file" in err and "allow_pickle" not in err


def test_a_library_error_is_one_line_without_a_repeated_prefix(tmp_path, capsys):
    feats = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    feats[1, 2] = np.nan
    rc, err = run(capsys, good(tmp_path / "f.npz", features=feats))
    assert rc == 2 and err.startswith("upreid evaluate: 'query_features' contains NaN or Inf"), err
    assert "evaluate: evaluate:" not in err and "Traceback" not in err
