"""Parsers for ReID datasets: Market1501, CUHK03-NP, MSMT17 (V1/V2), PersonX, any Market-style
folder, the synthetic dataset, and unlabeled pre-training sets (folder tree or list file).

Every parser returns a :class:`~upreid.data.records.ReIDDataset` whose train pids are relabelled
``0..N-1``; junk images (pid -1) are dropped, distractors (pid 0) stay in the gallery. Camera ids are
0-based. Bad input raises :class:`DatasetError` naming the path and the expected layout.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .records import IMAGE_EXTENSIONS, Record, ReIDDataset, check_expected, relabel

log = logging.getLogger(__name__)

MARKET_PATTERN = re.compile(r"^([-\d]+)_c(\d+)")

MARKET_LAYOUT = ("<root>/bounding_box_train/, <root>/query/, <root>/bounding_box_test/ with names like "
                 "0002_c1s1_000451_03.jpg (pid 2, camera 1; pid -1 = junk, 0 = distractor)")
CUHK03_LAYOUT = ("<root>/{labeled,detected}/{bounding_box_train,query,bounding_box_test}/ with "
                 "Market-style names like 0001_c1_1.png (the CUHK03-NP 767/700 split)")
MSMT17_LAYOUT = ("<root>/list_train.txt, list_val.txt, list_query.txt, list_gallery.txt with lines "
                 "'relative/path pid', images under <root>/train/ and <root>/test/ (V1) or "
                 "<root>/mask_train_v2/ and <root>/mask_test_v2/ (V2); camera = third '_' field of the name")
UNLABELED_LAYOUT = "a folder tree of images (.jpg/.jpeg/.png/.bmp/.webp), or a text file with one image path per line"

# Sizes of complete copies (METHOD.md 6): split -> (images, ids or None)
EXPECTED = {
    "market1501": {"train": (12936, 751), "query": (3368, 750), "gallery": (15913, None)},
    "cuhk03-np/detected": {"train": (7365, 767), "query": (1400, 700), "gallery": (5332, 700)},
    "cuhk03-np/labeled": {"train": (7368, 767), "query": (1400, 700), "gallery": (5328, 700)},
    "msmt17": {"train": (32621, 1041), "query": (11659, 3060), "gallery": (82161, 3060)},
}


class DatasetError(ValueError):
    """A dataset on disk does not have the expected layout."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: str, what: str, layout: str, hint: Optional[Callable[[], str]] = None) -> None:
    """``hint``: words on why the folder is missing, worked out only when it is (it may scan folders)."""
    if not os.path.isdir(path):
        raise DatasetError(f"{what}: folder {path!r} does not exist{hint() if hint else ''}. "
                           f"Expected layout: {layout}")


# Folder names inside a dataset's root: a data.root that ends in one points one level too deep.
_INNER_FOLDERS = ("bounding_box_train", "bounding_box_test", "query", "gallery", "detected", "labeled", "train",
                  "test", "mask_train_v2", "mask_test_v2")


def _root_hint(root: str, marker: str, limit: int = 200) -> str:
    """Why ``marker`` is not under ``root``, when it can be told: data.root inside the dataset, or a folder
    laid out like one a level or two further down (those folders are named). Looks at no more than
    ``limit`` folders per level: it only words an error."""
    import itertools
    root = os.path.normpath(os.path.expanduser(root))
    if os.path.basename(root) in _INNER_FOLDERS and os.path.exists(os.path.join(os.path.dirname(root), marker)):
        return f" ({root!r} is a folder inside the dataset: point data.root at {os.path.dirname(root)!r})"

    def subdirs(path):
        try:
            with os.scandir(path) as it:
                return sorted(e.path for e in itertools.islice((e for e in it if e.is_dir()), limit))
        except OSError:
            return []
    found = []
    for a in subdirs(root):
        if os.path.exists(os.path.join(a, marker)):
            found.append(a)
        else:
            found += [b for b in subdirs(a) if os.path.exists(os.path.join(b, marker))]
    if not found:
        return ""
    shown = ", ".join(repr(f) for f in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f" (a folder laid out like the dataset, with {marker}, is in {shown}: point data.root at "
            f"{'it' if len(found) == 1 else 'one of them'})")


def _list_images(folder: str, layout: str, what: str) -> List[str]:
    _require_dir(folder, what, layout)
    names = sorted(n for n in os.listdir(folder) if _is_image(n))
    if not names:
        raise DatasetError(f"{what}: no images (.jpg/.jpeg/.png/.bmp/.webp) in {folder!r}. "
                           f"Expected layout: {layout}")
    return names


def _bad_names_error(what: str, folder: str, bad: Sequence[str], pattern: str, layout: str) -> DatasetError:
    shown = ", ".join(repr(b) for b in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return DatasetError(f"{what}: {len(bad)} file name(s) in {folder!r} do not match the pattern "
                        f"{pattern!r}: {shown}{more}. Expected layout: {layout}")


def parse_market_folder(folder: str, *, what: str = "dataset", layout: str = MARKET_LAYOUT,
                        drop_junk: bool = True, cam_base: int = 1) -> List[Record]:
    """Parse one folder of Market-style names ``<pid>_c<cam>...``; camera ids become 0-based."""
    names = _list_images(folder, layout, what)
    records, bad = [], []
    for n in names:
        m = MARKET_PATTERN.match(n)
        if m is None:
            bad.append(n)
            continue
        try:
            pid, cam = int(m.group(1)), int(m.group(2))
        except ValueError:
            raise DatasetError(f"{what}: {os.path.join(folder, n)!r}: the identity {m.group(1)!r} in the name is "
                               f"not an integer. Expected layout: {layout}") from None
        if pid == -1 and drop_junk:
            continue
        records.append(Record(os.path.join(folder, n), pid, cam - cam_base))
    if bad:
        raise _bad_names_error(what, folder, bad, MARKET_PATTERN.pattern, layout)
    return records


def market_style(root: str, *, name: str = "market-style", train_dir: str = "bounding_box_train",
                 query_dir: str = "query", gallery_dir: str = "bounding_box_test",
                 layout: str = MARKET_LAYOUT, expected: Optional[dict] = None) -> ReIDDataset:
    """Any dataset laid out like Market1501 (three folders of ``<pid>_c<cam>_...`` images)."""
    root = os.path.expanduser(root)
    _require_dir(root, name, layout)
    _require_dir(os.path.join(root, train_dir), f"{name} train", layout, lambda: _root_hint(root, train_dir))
    train = parse_market_folder(os.path.join(root, train_dir), what=f"{name} train", layout=layout)
    query = parse_market_folder(os.path.join(root, query_dir), what=f"{name} query", layout=layout)
    gallery = parse_market_folder(os.path.join(root, gallery_dir), what=f"{name} gallery", layout=layout)
    if any(r.pid == 0 for r in train):
        raise DatasetError(f"{name} train: distractor images (pid 0) in {os.path.join(root, train_dir)!r}; "
                           f"distractors belong in the gallery only. Expected layout: {layout}")
    if any(r.pid == 0 for r in query):
        raise DatasetError(f"{name} query: distractor images (pid 0) in {os.path.join(root, query_dir)!r}; "
                           f"every query needs an identity. Expected layout: {layout}")
    ds = ReIDDataset(name, root, relabel(train), query, gallery)
    _check_not_empty(ds, {"train": train_dir, "query": query_dir, "gallery": gallery_dir}, layout)
    _check_counts(ds, expected)
    return ds


def _check_not_empty(ds: ReIDDataset, where: dict, layout: str) -> None:
    for split, recs in ds.splits():
        if not recs:
            raise DatasetError(f"{ds.name} {split}: no usable images in {os.path.join(ds.root, where[split])!r} "
                               f"(junk images, pid -1, are dropped). Expected layout: {layout}")


def _check_counts(ds: ReIDDataset, expected: Optional[dict], distractors: bool = True) -> None:
    """Warn when a split's image or identity count is not a complete copy's. Train pids are relabelled
    to 0..N-1, so pid 0 is an identity there; in query and gallery it is the distractor class when the
    layout has one (``distractors``; Market-style), and an identity otherwise (MSMT17)."""
    if not expected:
        return
    for split, recs in ds.splits():
        n_img, n_ids = expected.get(split, (None, None))
        check_expected(ds.name, split, len(recs), n_img, ds.root)
        if n_ids is not None:
            ids = len({r.pid for r in recs if r.pid != 0 or split == "train" or not distractors})
            if ids != n_ids:
                log.warning("%s: found %d %s identities under %s, a complete copy has %d",
                            ds.name, ids, split, ds.root, n_ids)


def _descend(root: str, markers: Sequence[str], candidates: Sequence[str]) -> str:
    """Accept both ``root`` and ``root/<official folder name>`` (as the archives unpack)."""
    root = os.path.expanduser(root)
    if any(os.path.exists(os.path.join(root, m)) for m in markers):
        return root
    found, real = [], set()
    for c in candidates:      # one folder reached by two names (a symlink, a case-insensitive disk) counts once
        sub = os.path.join(root, c)
        if not any(os.path.exists(os.path.join(sub, m)) for m in markers):
            continue
        r = os.path.realpath(sub)
        if r not in real:
            found.append(sub)
            real.add(r)
    if len(found) > 1:
        log.warning("%s holds %d copies of the dataset (%s): using %r; point data.root at another to use it",
                    root, len(found), ", ".join(os.path.basename(f) for f in found), found[0])
    return found[0] if found else root


def market1501(root: str) -> ReIDDataset:
    root = _descend(root, ["bounding_box_train"], ["Market-1501-v15.09.15", "Market-1501", "market1501"])
    return market_style(root, name="market1501", expected=EXPECTED["market1501"])


def personx(root: str) -> ReIDDataset:
    root = _descend(root, ["bounding_box_train"], ["PersonX", "personx"])
    return market_style(root, name="personx")


def cuhk03_np(root: str, variant: str = "detected") -> ReIDDataset:
    if variant not in ("detected", "labeled"):
        raise DatasetError(f"cuhk03-np: variant must be 'detected' or 'labeled', got {variant!r}")
    root = _descend(root, ["detected", "labeled"], ["cuhk03-np", "cuhk03_np", "CUHK03-NP"])
    sub = os.path.join(root, variant)

    def hint() -> str:
        try:
            names = os.listdir(root) if os.path.isdir(root) else []
        except OSError:
            names = []
        release = any(n.endswith(".mat") or n == "cuhk03_release" for n in names)
        return _root_hint(root, variant) + (
            " (this looks like the original CUHK03 release with .mat files: upreid reads the CUHK03-NP folders "
            "of the new protocol, detected/ and labeled/ of Market-style images)" if release else "")
    _require_dir(sub, f"cuhk03-np {variant}", CUHK03_LAYOUT, hint)
    name = f"cuhk03-np/{variant}"
    return market_style(sub, name=name, layout=CUHK03_LAYOUT, expected=EXPECTED[name])


def _msmt_camid(rel: str, list_file: str, lineno: int) -> int:
    fields = os.path.basename(rel).split("_")
    if len(fields) < 3 or not fields[2].isdigit():
        raise DatasetError(f"msmt17: {list_file}:{lineno}: cannot read a camera id from {rel!r} "
                           f"(expected the third '_' field to be a number, e.g. 0000_000_01_0303morning_0015_0.jpg). "
                           f"Expected layout: {MSMT17_LAYOUT}")
    return int(fields[2]) - 1


def _parse_msmt_list(root: str, list_name: str, image_dirs: Sequence[str], check_files: bool) -> List[Record]:
    list_file = os.path.join(root, list_name)
    if not os.path.isfile(list_file):
        raise DatasetError(f"msmt17: list file {list_file!r} does not exist{_root_hint(root, list_name)}. "
                           f"Expected layout: {MSMT17_LAYOUT}")
    image_dir = next((os.path.join(root, d) for d in image_dirs if os.path.isdir(os.path.join(root, d))), None)
    if image_dir is None:
        raise DatasetError(f"msmt17: none of the image folders {[os.path.join(root, d) for d in image_dirs]} "
                           f"exists. Expected layout: {MSMT17_LAYOUT}")
    records = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)          # the path may hold spaces; the pid is the last field
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"msmt17: {list_file}:{lineno}: expected 'relative/path pid', got {line!r}")
            rel, pid = parts[0], int(parts[1])
            records.append(Record(os.path.join(image_dir, rel), pid, _msmt_camid(rel, list_file, lineno)))
    if not records:
        raise DatasetError(f"msmt17: list file {list_file!r} is empty. Expected layout: {MSMT17_LAYOUT}")
    records = _unique(records, list_file)
    if check_files:
        missing = [r.path for r in records if not os.path.isfile(r.path)]
        if missing:
            raise DatasetError(f"msmt17: {len(missing)} image(s) listed in {list_file!r} are missing, e.g. "
                               f"{missing[:3]}. Expected layout: {MSMT17_LAYOUT}")
    return records


def msmt17(root: str, *, combine_trainval: bool = True, check_files: bool = True) -> ReIDDataset:
    """MSMT17 V1 or V2 (detected from the folder names). ``combine_trainval`` adds list_val to train."""
    root = _descend(root, ["list_train.txt"], ["MSMT17_V1", "MSMT17_V2", "MSMT17"])
    _require_dir(root, "msmt17", MSMT17_LAYOUT)
    train_dirs, test_dirs = ("train", "mask_train_v2"), ("test", "mask_test_v2")
    train = _parse_msmt_list(root, "list_train.txt", train_dirs, check_files)
    if combine_trainval and not os.path.isfile(os.path.join(root, "list_val.txt")):
        log.warning("msmt17: no list_val.txt in %s: training on list_train.txt alone (the benchmark's protocol "
                    "trains on train + val)", root)
        combine_trainval = False
    elif combine_trainval:
        train += _parse_msmt_list(root, "list_val.txt", train_dirs, check_files)
    query = _parse_msmt_list(root, "list_query.txt", test_dirs, check_files)
    gallery = _parse_msmt_list(root, "list_gallery.txt", test_dirs, check_files)
    ds = ReIDDataset("msmt17", root, relabel(train), query, gallery)
    _check_not_empty(ds, {"train": "list_train.txt", "query": "list_query.txt", "gallery": "list_gallery.txt"},
                     MSMT17_LAYOUT)
    # a complete copy's counts: train's only for train + val; query and gallery's always
    expected = {k: v for k, v in EXPECTED["msmt17"].items() if combine_trainval or k != "train"}
    _check_counts(ds, expected, distractors=False)
    return ds


# Folders of a labelled dataset's test split: Market-style and CUHK03-NP ones by name; MSMT17's (V1 test/,
# V2 mask_test_v2/) only beside its list files, as a folder named test/ is common elsewhere.
TEST_SPLIT_FOLDERS = ("query", "bounding_box_test", "gallery")
MSMT17_TEST_FOLDERS = ("test", "mask_test_v2")


def _test_split_images(root: str, paths: Sequence[str]) -> Dict[str, int]:
    """The test-split folders at any depth under ``root`` that hold some of ``paths`` (which start with
    ``root``): folder (relative to ``root``, the first test-split folder on the way down) -> images under
    it. One decision per directory, not per image (a pre-training tree may hold millions)."""
    found: Dict[str, int] = {}
    per_dir: Dict[str, Optional[str]] = {}
    cut = len(os.path.join(root, ""))
    for p in paths:
        d = p[:p.rfind(os.sep) + 1]
        if d not in per_dir:
            parts = d[cut:].split(os.sep)[:-1]
            per_dir[d] = None
            for k, part in enumerate(parts):
                if part in TEST_SPLIT_FOLDERS or (part in MSMT17_TEST_FOLDERS and any(
                        os.path.isfile(os.path.join(root, *parts[:k], f))
                        for f in ("list_query.txt", "list_gallery.txt"))):
                    per_dir[d] = "/".join(parts[:k + 1]) + "/"
                    break
        key = per_dir[d]
        if key is not None:
            found[key] = found.get(key, 0) + 1
    return found


def unlabeled(root: str, *, name: str = "unlabeled", progress: bool = True) -> ReIDDataset:
    """Unlabeled pre-training images (e.g. LUPerson): a folder tree, or a list file of paths
    (relative paths are taken relative to the list file's folder)."""
    root = os.path.expanduser(root)
    if os.path.isfile(root):
        paths = _read_path_list(root, name)
    elif os.path.isdir(root):
        paths = _walk_images(root, progress)
        if not paths:
            raise DatasetError(f"{name}: no images under {root!r}. Expected: {UNLABELED_LAYOUT}")
        test = _test_split_images(root, paths)
        if test:
            n = sum(test.values())
            shown = ", ".join(f"{d} ({k} image{'s' if k > 1 else ''})" for d, k in list(test.items())[:4])
            rest = len(test) - 4
            more = f" and {rest} more folder{'s' if rest > 1 else ''}" if rest > 0 else ""
            hint = (f" (a synthetic set's are in {os.path.join(root, 'unlabeled')})"
                    if os.path.isdir(os.path.join(root, "unlabeled")) else "")
            log.warning("%s: %r holds a labelled dataset's test split: %d of its %d images lie in %s%s. They are "
                        "all taken, the test images included, so a model evaluated on that benchmark would "
                        "have seen its query and gallery images. For pre-training point data.root at the "
                        "unlabeled or training images alone%s", name, root, n, len(paths), shown, more, hint)
    else:
        raise DatasetError(f"{name}: {root!r} does not exist. Expected: {UNLABELED_LAYOUT}")
    return ReIDDataset(name, root, [Record(p, -1, -1) for p in paths], unlabeled=True)


def _unique(records: List[Record], source: str) -> List[Record]:
    """Each image once (by its real path, so a symlink and its target count once); duplicates logged."""
    seen, out, dropped = {}, [], []
    for r in records:
        try:
            st = os.stat(r.path)
            key = (st.st_dev, st.st_ino)        # one system call; the same file through any link
        except OSError:
            key = os.path.abspath(r.path)
        if key not in seen:
            seen[key] = r.path
            out.append(r)
        else:
            dropped.append((r.path, seen[key]))
    if dropped:
        eg = "; ".join(f"{a!r} is {b!r}" for a, b in dropped[:3])
        log.warning("%s: %d duplicate entries (the same file listed again, or reached through a symlink or a "
                    "hard link) were dropped; each image is used once. E.g. %s", source, len(dropped), eg)
    return out


def _read_path_list(list_file: str, name: str) -> List[str]:
    """A list file of image paths, one per line (relative to the list's folder); a path may hold spaces,
    and an integer after it (a label) is ignored. Missing files are an error naming them."""
    base = os.path.dirname(os.path.abspath(list_file))
    paths = []
    with open(list_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            path = line if os.path.isabs(line) else os.path.join(base, line)
            head, _, tail = line.rpartition(" ")
            if not os.path.exists(path) and head and tail.lstrip("-").isdigit():
                path = head.strip() if os.path.isabs(head.strip()) else os.path.join(base, head.strip())
            paths.append(path)
    if not paths:
        raise DatasetError(f"{name}: list file {list_file!r} is empty. Expected: {UNLABELED_LAYOUT}")
    bad = [p for p in paths if not _is_image(p)]
    if bad:
        raise DatasetError(f"{name}: {len(bad)} entries of {list_file!r} are not image paths, e.g. {bad[:3]}. "
                           f"Expected: {UNLABELED_LAYOUT}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{name}: {len(missing)} images listed in {list_file!r} do not exist, e.g. "
                           f"{missing[:3]}")
    return [r.path for r in _unique([Record(p, -1, -1) for p in paths], list_file)]


def _walk_images(root: str, progress: bool) -> List[str]:
    """Images under ``root``, following symlinks; a folder reached again (a symlink loop) is named in
    a warning and not entered twice, and an image reached by two paths is listed once."""
    from upreid.utils.progress import bar as progress_bar

    out: List[str] = []
    stack = [root]
    visited = {os.path.realpath(root)}
    with progress_bar(desc=f"scanning {os.path.basename(root) or root}", unit=" img", enabled=progress,
                      leave=False) as bar:
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=True):
                        real = os.path.realpath(e.path)
                        if real in visited:
                            log.warning("unlabeled: %r leads back to %r (a symlink loop or a second link to "
                                        "the same folder): not scanned again", e.path, real)
                            continue
                        visited.add(real)
                        stack.append(e.path)
                    elif _is_image(e.name):
                        out.append(e.path)
                        bar.update(1)
    out.sort()
    return [r.path for r in _unique([Record(p, -1, -1) for p in out], root)]


def synth(root: str) -> ReIDDataset:
    """The dataset written by ``upreid synth`` (Market-style folders plus ``unlabeled/``)."""
    root = os.path.expanduser(root)
    return market_style(root, name="synth",
                        layout=MARKET_LAYOUT + " (write one with `upreid synth --root DIR`)")


DATASETS: Dict[str, Callable[..., ReIDDataset]] = {
    "market1501": market1501,
    "cuhk03-np": cuhk03_np,                                          # the detected boxes, as published
    "cuhk03-np/detected": lambda root, **kw: cuhk03_np(root, "detected", **kw),
    "cuhk03-np/labeled": lambda root, **kw: cuhk03_np(root, "labeled", **kw),
    "msmt17": msmt17,
    "personx": personx,
    "market-style": market_style,
    "synth": synth,
    "unlabeled": unlabeled,
    "luperson": lambda root, **kw: unlabeled(root, name="luperson", **kw),
}


def build_dataset(name: str, root: str, **kwargs) -> ReIDDataset:
    """Parse dataset ``name`` at ``root``; unknown names are an error with a suggestion."""
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}.{hint} Known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key](root, **kwargs)


def parse_spec(spec: str) -> Tuple[str, str]:
    """``name:root`` -> (name, root); a bare path means the synthetic/Market-style layout."""
    if ":" in spec and not os.path.exists(spec):
        name, root = spec.split(":", 1)
        return name, root
    return "market-style", spec
