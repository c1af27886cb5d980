"""``upreid evaluate FEATURES.npz``: ReID metrics (optionally with exact k-reciprocal re-ranking) of
features saved by any tool. The main ``upreid`` command calls :func:`register`;
``python -m upreid.evaluation.cli evaluate ...`` works on its own.

The ``.npz`` holds query and gallery features, identities and cameras under one of these naming
schemes: ``query_features, gallery_features, query_pids, gallery_pids, query_camids,
gallery_camids``; ``qf, gf, q_pids, g_pids, q_camids, g_camids``; or ``features, pids, camids,
num_query`` (queries first).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import zipfile

import numpy as np

from upreid.utils.cli_checks import say_error

DISTANCE_BINS = 100
SCHEMES = (
    ("query_features", "gallery_features", "query_pids", "gallery_pids", "query_camids",
     "gallery_camids"),
    ("qf", "gf", "q_pids", "g_pids", "q_camids", "g_camids"),
)


class FeaturesError(ValueError):
    """A features file that cannot be evaluated; the message names the file and the problem."""


def load_features(path: str) -> dict:
    """The six evaluation arrays of a features ``.npz`` (see the module docstring), checked: floating
    ``[n, D]`` features with one D, integer 1-D identities and cameras of matching lengths, and a
    ``num_query`` in [1, N - 1] for the single-array scheme."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        if not zipfile.is_zipfile(path) and "pickled" in str(exc):
            # numpy reads any non-.npy, non-zip bytes as a pickle and advises allow_pickle: not ours to give
            raise FeaturesError(f"{path}: not an .npz file (upreid extract writes one; this is some other file, "
                                "or a damaged one)") from None
        raise FeaturesError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FeaturesError(f"{path}: holds a single array, not an .npz archive of named arrays")
    with z:
        keys = set(z.files)
        try:
            data = _select(z, keys, path)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            if isinstance(exc, FeaturesError):
                raise
            raise FeaturesError(f"{path}: an array cannot be read, the file may be truncated "
                                f"({type(exc).__name__}: {exc})") from None
    _check_arrays(data, path)
    return data


def _select(z, keys: set, path: str) -> dict:
    for scheme in SCHEMES:
        if set(scheme) <= keys:
            names = ("query_features", "gallery_features", "q_pids", "g_pids", "q_camids", "g_camids")
            return {n: z[k] for n, k in zip(names, scheme)}
    if {"features", "pids", "camids", "num_query"} <= keys:
        f, p, c, nq = z["features"], z["pids"], z["camids"], z["num_query"]
        if nq.ndim != 0 or not np.issubdtype(nq.dtype, np.integer):
            raise FeaturesError(f"{path}: 'num_query' must be one integer, got {nq.dtype} of shape {nq.shape}")
        if not len(f) == len(p) == len(c):
            raise FeaturesError(f"{path}: {len(f)} features, {len(p)} pids and {len(c)} camids; one of "
                                "each per row was expected")
        nq = int(nq)
        if not 1 <= nq < len(f):
            raise FeaturesError(f"{path}: 'num_query' must be in [1, {len(f) - 1}] (queries first, then at "
                                f"least one gallery item among the {len(f)} rows), got {nq}")
        return {"query_features": f[:nq], "gallery_features": f[nq:], "q_pids": p[:nq],
                "g_pids": p[nq:], "q_camids": c[:nq], "g_camids": c[nq:]}
    expected = "; ".join(", ".join(s) for s in SCHEMES) + "; features, pids, camids, num_query"
    raise FeaturesError(f"{path}: found arrays {sorted(keys)}, expected one of: {expected}")


def _check_arrays(d: dict, path: str) -> None:
    for side in ("query", "gallery"):
        f = d[f"{side}_features"]
        if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
            raise FeaturesError(f"{path}: {side} features must be a 2-D floating array [n, D], got "
                                f"{f.dtype} of shape {f.shape}")
        if len(f) == 0:
            raise FeaturesError(f"{path}: no {side} features (0 rows)")
        for what in ("pids", "camids"):
            v = d[f"{side[0]}_{what}"]
            if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
                raise FeaturesError(f"{path}: {side} {what} must be a 1-D integer array, got {v.dtype} of "
                                    f"shape {v.shape}")
            if len(v) != len(f):
                raise FeaturesError(f"{path}: {len(v)} {side} {what} for {len(f)} {side} features")
    if d["query_features"].shape[1] != d["gallery_features"].shape[1]:
        raise FeaturesError(f"{path}: query features have D = {d['query_features'].shape[1]}, gallery features "
                            f"D = {d['gallery_features'].shape[1]}")


def _check_outputs(args: argparse.Namespace) -> str | None:
    """The problem with --device, the re-ranking settings, --plots or --json, found before any work, or None."""
    from upreid.utils.cli_checks import device_problem, output_file_problem

    problem = device_problem(args.device)
    if problem:
        return problem
    if args.rerank != "no":
        if args.k1 < 1:
            return f"--k1 {args.k1}: re-ranking needs k1 >= 1"
        if not 1 <= args.k2 <= args.k1 + 1:
            return f"--k2 {args.k2}: re-ranking needs 1 <= k2 <= k1 + 1 = {args.k1 + 1} (--k1 {args.k1})"
        if not 0.0 <= args.lambda_value <= 1.0:
            return f"--lambda {args.lambda_value}: re-ranking needs a weight in [0, 1]"
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        return f"--plots {args.plots!r} is a file; give a folder for cmc.png and distances.png"
    return output_file_problem(args.json, "--json", create_folder=True) if args.json else None


def _run(args: argparse.Namespace) -> int:
    import torch

    from upreid.evaluation import evaluate, format_table

    problem = _check_outputs(args)
    if problem:
        say_error("evaluate", problem)
        return 2
    try:
        data = load_features(args.features)
    except FeaturesError as exc:
        say_error("evaluate", exc)
        return 2
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    if args.device != "cpu":
        data["query_features"] = data["query_features"].to(args.device)
        data["gallery_features"] = data["gallery_features"].to(args.device)
    reranks = [False, True] if args.rerank == "both" else [args.rerank == "yes"]
    plots = args.plots or (os.path.dirname(os.path.abspath(args.json)) if args.json else None)
    results = {}
    for rr in reranks:
        try:
            res = evaluate(**data, metric=args.metric, rerank=rr, k1=args.k1, k2=args.k2,
                           lambda_value=args.lambda_value, max_rank=args.max_rank,
                           progress=not args.no_progress, distance_bins=DISTANCE_BINS if plots else 0)
        except (ValueError, RuntimeError) as exc:
            say_error("evaluate", exc)
            return 2
        title = f"{args.features} [{args.metric}" + (
            f", re-ranked k1={args.k1} k2={args.k2} lambda={args.lambda_value}]" if rr else "]")
        print(format_table(res, title))
        results["rerank" if rr else "plain"] = res
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if plots:
        from upreid.evaluation.plots import write_plots
        try:   # beside --json the plots are a bonus; asked for with --plots they are required
            paths = write_plots(plots, results, title=os.path.basename(args.features), required=bool(args.plots))
        except ImportError as exc:
            print(f"upreid evaluate: --plots: {exc}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="mAP / mINP / CMC of saved query and gallery features",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("features", help=".npz with query/gallery features, pids and camids")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine",
                   help="distance (default cosine)")
    p.add_argument("--rerank", choices=("no", "yes", "both"), default="no",
                   help="exact k-reciprocal re-ranking: no, yes, or both tables (default no)")
    p.add_argument("--k1", type=int, default=20, help="re-ranking k1 (default 20)")
    p.add_argument("--k2", type=int, default=6, help="re-ranking k2 (default 6)")
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.3,
                   help="re-ranking lambda (default 0.3)")
    p.add_argument("--max-rank", type=int, default=50, help="CMC length (default 50)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--json", help="also write every metric (CMC curve and distance histograms included) to "
                                  "this file, and the plots beside it")
    p.add_argument("--plots", metavar="DIR", help="write the CMC curve (cmc.png) and the positive / negative "
                                                  "distance distributions (distances.png) here (default: "
                                                  "beside --json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
