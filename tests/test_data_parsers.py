"""Dataset parsers: layouts, relabelling, junk/distractors, clear errors."""
import logging
import os

import pytest

from upreid.data import DatasetError, build_dataset, cuhk03_np, market1501, msmt17, unlabeled
from upreid.data.records import Record, relabel


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xd9")


def make_market(root, train=("0002_c1s1_000451_03.jpg", "0002_c2s1_000452_01.jpg", "0007_c3s1_000001_01.jpg"),
                query=("0003_c1s1_000001_00.jpg", "0003_c2s1_000001_00.jpg"),
                gallery=("0003_c3s1_000002_00.jpg", "0000_c1s1_000003_00.jpg", "-1_c1s1_000004_00.jpg")):
    for folder, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        for n in names:
            touch(os.path.join(root, folder, n))
    return root


def test_market_parse_relabel_junk_distractors(tmp_path):
    ds = market1501(make_market(str(tmp_path / "Market-1501-v15.09.15")))
    assert sorted({r.pid for r in ds.train}) == [0, 1]                 # relabelled 2, 7 -> 0, 1
    assert [r.camid for r in ds.train] == [0, 1, 2]                     # 0-based cameras
    assert [r.pid for r in ds.query] == [3, 3]
    assert sorted(r.pid for r in ds.gallery) == [0, 3]                  # junk dropped, distractor kept
    assert all(os.path.isfile(r.path) for r in ds.train + ds.query + ds.gallery)


def test_market_descends_into_official_folder(tmp_path):
    make_market(str(tmp_path / "Market-1501-v15.09.15"))
    ds = market1501(str(tmp_path))
    assert len(ds.train) == 3 and ds.root.endswith("Market-1501-v15.09.15")


def test_market_warns_on_incomplete_copy(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        market1501(make_market(str(tmp_path)))
    assert "a complete copy has 12936" in caplog.text


def test_summary_table(tmp_path):
    text = market1501(make_market(str(tmp_path))).summary()
    lines = text.splitlines()
    assert "# ids" in lines[1] and "# cameras" in lines[1]
    train = next(ln for ln in lines if ln.strip().startswith("train"))
    assert [c.strip() for c in train.split("|")][1:] == ["2", "3", "3"]


def test_missing_folder_names_path_and_layout(tmp_path):
    root = make_market(str(tmp_path))
    os.rename(os.path.join(root, "query"), os.path.join(root, "queries"))
    with pytest.raises(DatasetError, match=r"query.*does not exist.*bounding_box_train"):
        market1501(root)


def test_empty_folder(tmp_path):
    root = make_market(str(tmp_path))
    for n in os.listdir(os.path.join(root, "query")):
        os.remove(os.path.join(root, "query", n))
    with pytest.raises(DatasetError, match="no images"):
        market1501(root)


def test_bad_names_listed(tmp_path):
    root = make_market(str(tmp_path), train=("0002_c1s1_000451_03.jpg", "img_a.jpg", "img_b.jpg"))
    with pytest.raises(DatasetError) as e:
        market1501(root)
    msg = str(e.value)
    assert "2 file name(s)" in msg and "'img_a.jpg'" in msg and "'img_b.jpg'" in msg
    assert "bounding_box_train" in msg


def test_distractor_in_train_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="distractor"):
        market1501(make_market(str(tmp_path), train=("0000_c1s1_000451_03.jpg", "0002_c1s1_000451_03.jpg")))


def test_cuhk03_variants(tmp_path):
    make_market(str(tmp_path / "labeled"), train=("0001_c1_1.png", "0001_c2_1.png"))
    make_market(str(tmp_path / "detected"), train=("0005_c1_1.png",))
    assert len(cuhk03_np(str(tmp_path), "labeled").train) == 2
    assert len(cuhk03_np(str(tmp_path), "detected").train) == 1
    with pytest.raises(DatasetError, match="variant"):
        cuhk03_np(str(tmp_path), "both")
    # by name, as data.dataset takes them (fine-tuning could only reach the detected boxes)
    assert len(build_dataset("cuhk03-np/labeled", str(tmp_path)).train) == 2
    assert len(build_dataset("cuhk03-np", str(tmp_path)).train) == 1
    assert len(build_dataset("cuhk03-np/detected", str(tmp_path)).train) == 1
    from upreid.engine.config import load_config
    assert load_config("finetune", None, ["data.dataset=cuhk03-np/labeled"]).data.dataset == "cuhk03-np/labeled"


def make_msmt(root, v2=False):
    tr, te = ("mask_train_v2", "mask_test_v2") if v2 else ("train", "test")
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0001/0001_003_05_0303noon_0001_1.jpg", 1)],
        "list_val.txt": [("0001/0001_004_07_0303noon_0002_0.jpg", 1)],
        "list_query.txt": [("0000/0000_000_02_0303morning_0001_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_001_15_0303morning_0002_0.jpg", 0)],
    }
    for name, rows in lists.items():
        folder = tr if "train" in name or "val" in name else te
        with open(os.path.join(root, name), "w") as f:
            for rel, pid in rows:
                touch(os.path.join(root, folder, rel))
                f.write(f"{rel} {pid}\n")
    return root


@pytest.mark.parametrize("v2", [False, True])
def test_msmt17(tmp_path, v2):
    ds = msmt17(make_msmt(str(tmp_path), v2))
    assert len(ds.train) == 3 and ds.num_train_pids == 2
    assert [r.camid for r in ds.train] == [0, 4, 6]
    assert ds.gallery[0].camid == 14
    assert len(msmt17(str(tmp_path), combine_trainval=False).train) == 2


def test_msmt17_bad_line(tmp_path):
    root = make_msmt(str(tmp_path))
    with open(os.path.join(root, "list_query.txt"), "a") as f:
        f.write("just_a_path.jpg\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:2"):
        msmt17(root)


def test_msmt17_missing_image(tmp_path):
    root = make_msmt(str(tmp_path))
    os.remove(os.path.join(root, "test", "0000/0000_000_02_0303morning_0001_0.jpg"))
    with pytest.raises(DatasetError, match="missing"):
        msmt17(root)


def test_unlabeled_tree_and_list(tmp_path):
    for p in ("a/1.jpg", "a/b/2.png", "c/3.jpeg", "c/notes.txt"):
        touch(str(tmp_path / "imgs" / p))
    ds = unlabeled(str(tmp_path / "imgs"), progress=False)
    assert len(ds.train) == 3 and all(r.pid == -1 for r in ds.train)
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/a/1.jpg\nimgs/c/3.jpeg\n\n")
    ds2 = unlabeled(str(lst))
    assert [os.path.basename(r.path) for r in ds2.train] == ["1.jpg", "3.jpeg"]
    assert os.path.isfile(ds2.train[0].path)
    with pytest.raises(DatasetError, match="no images"):
        unlabeled(str(tmp_path / "imgs" / "c" / "none") if os.makedirs(tmp_path / "imgs/c/none") is None else "")


def test_a_labelled_dataset_root_as_unlabeled_set_is_warned_about(tmp_path, caplog):
    """A synthetic or Market-style root instead of its unlabeled/ folder: every image is taken (nothing
    dropped silently), with a warning that the test split is among them."""
    for p in ("unlabeled/1.jpg", "query/0001_c1s1_000001_00.jpg", "bounding_box_test/0001_c2s1_000001_00.jpg"):
        touch(str(tmp_path / "ds" / p))
    with caplog.at_level(logging.WARNING):
        ds = unlabeled(str(tmp_path / "ds"), progress=False)
    assert len(ds.train) == 3
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of its 3 images lie in bounding_box_test/ (1 image), query/ (1 image)" in msg
    assert "test images included" in msg and "unlabeled" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(unlabeled(str(tmp_path / "ds" / "unlabeled"), progress=False).train) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_build_dataset_suggests(tmp_path):
    with pytest.raises(DatasetError, match="(?i)did you mean 'market1501'"):
        build_dataset("market1502", str(tmp_path))
    assert len(build_dataset("Market1501", make_market(str(tmp_path))).query) == 2


def test_relabel_is_sorted_and_dense():
    recs = relabel([Record("a", 17, 0), Record("b", 3, 1), Record("c", 17, 2)])
    assert [r.pid for r in recs] == [1, 0, 1]


def test_name_matching_the_pattern_without_an_integer_is_named(tmp_path):
    root = make_market(str(tmp_path), train=("0002_c1s1_000451_03.jpg", "--_c1s1_000452_01.jpg"))
    bad = os.path.join(root, "bounding_box_train", "--_c1s1_000452_01.jpg")
    with pytest.raises(DatasetError, match=f"{bad}'.*identity '--' in the name is not an integer"):
        market1501(root)


def test_empty_query_or_gallery_is_an_error_at_parse_time(tmp_path):
    root = make_market(str(tmp_path / "a"), query=("-1_c1s1_000001_00.jpg",))          # junk only
    with pytest.raises(DatasetError, match=r"market1501 query: no usable images in .*query'.*junk"):
        market1501(root)
    root = make_market(str(tmp_path / "b"), gallery=("-1_c3s1_000002_00.jpg",))
    with pytest.raises(DatasetError, match=r"gallery: no usable images in .*bounding_box_test'"):
        market1501(root)


def test_each_image_listed_once_whatever_symlinks_say(tmp_path, caplog):
    for p in ("a/1.jpg", "a/2.jpg"):
        touch(str(tmp_path / "imgs" / p))
    os.symlink(tmp_path / "imgs" / "a", tmp_path / "imgs" / "again")            # the same folder twice
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "a" / "loop")             # a loop back to the root
    os.symlink(tmp_path / "imgs" / "a" / "1.jpg", tmp_path / "imgs" / "link.jpg")
    with caplog.at_level(logging.WARNING):
        ds = unlabeled(str(tmp_path / "imgs"), progress=False)
    assert sorted(os.path.basename(r.path) for r in ds.train) == ["1.jpg", "2.jpg"]
    assert "loop" in caplog.text and "not scanned again" in caplog.text
    assert "1 duplicate entries" in caplog.text


def test_list_file_with_spaces_duplicates_and_missing_entries(tmp_path, caplog):
    touch(str(tmp_path / "my images" / "a 1.jpg"))
    touch(str(tmp_path / "my images" / "b.jpg"))
    lst = tmp_path / "list.txt"
    lst.write_text("my images/a 1.jpg\nmy images/b.jpg 7\nmy images/a 1.jpg\n")
    with caplog.at_level(logging.WARNING):
        ds = unlabeled(str(lst))
    assert [os.path.basename(r.path) for r in ds.train] == ["a 1.jpg", "b.jpg"]
    assert "1 duplicate entries" in caplog.text
    lst.write_text("my images/b.jpg\nmy images/gone.jpg\n")
    with pytest.raises(DatasetError, match=r"1 images listed in .*list.txt' do not exist, e.g. .*gone.jpg"):
        unlabeled(str(lst))


def test_msmt17_path_with_spaces_and_duplicates(tmp_path, caplog):
    root = make_msmt(str(tmp_path))
    rel = "0002/0002_001_03_0303noon 2_0001_0.jpg"
    touch(os.path.join(root, "test", rel))
    with open(os.path.join(root, "list_gallery.txt"), "a") as f:
        f.write(f"{rel} 2\n{rel} 2\n")
    with caplog.at_level(logging.WARNING):
        ds = msmt17(root)
    assert len(ds.gallery) == 2 and ds.gallery[1].path.endswith("noon 2_0001_0.jpg") and ds.gallery[1].camid == 2
    assert "1 duplicate entries" in caplog.text


def test_identity_counts_take_pid_0_as_an_identity_where_it_is_one(caplog):
    """Train pids are relabelled to 0..N-1 (pid 0 is an identity); in a Market-style query/gallery pid 0
    is the distractor class, in MSMT17's it is an identity. A complete copy draws no warning."""
    from upreid.data.datasets import _check_counts
    from upreid.data.records import Record, ReIDDataset
    train = [Record(f"t{i}", i % 3, 0) for i in range(6)]                     # ids 0, 1, 2
    query = [Record(f"q{i}", i % 3, 1) for i in range(3)]                     # ids 0, 1, 2
    gallery = [Record(f"g{i}", i % 4, 0) for i in range(8)]                   # 0 (distractors), 1, 2, 3
    ds = ReIDDataset("x", "/x", train, query, gallery)
    with caplog.at_level(logging.WARNING):
        _check_counts(ds, {"train": (6, 3), "query": (3, 3), "gallery": (8, 4)}, distractors=False)
        assert caplog.text == ""
        _check_counts(ds, {"train": (6, 3), "gallery": (8, 3)})             # Market-style: 0 is no identity
        assert caplog.text == ""
        _check_counts(ds, {"train": (6, 4)})
    assert "found 3 train identities" in caplog.text


def test_test_split_images_deeper_in_the_tree_are_warned_about(tmp_path, caplog):
    """The folder above a dataset, CUHK03-NP's two variants and MSMT17's test/: the test-split folders
    are found at any depth and named with their image counts; a training split alone is not warned about."""
    for p in ("Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg",
              "Market-1501-v15.09.15/query/0002_c2s1_000451_03.jpg",
              "Market-1501-v15.09.15/bounding_box_test/0002_c3s1_000451_03.jpg",
              "Market-1501-v15.09.15/bounding_box_test/0003_c3s1_000451_03.jpg",
              "cuhk03-np/detected/query/0001_c1_1.png", "cuhk03-np/labeled/bounding_box_test/0001_c2_1.png",
              "MSMT17_V1/test/0000/0000_000_01_0303morning_0015_0.jpg",
              "MSMT17_V1/train/0000/0000_000_01_0303morning_0016_0.jpg"):
        touch(str(tmp_path / "all" / p))
    touch(str(tmp_path / "all" / "MSMT17_V1" / "list_query.txt"))     # test/ is MSMT17's beside its lists
    touch(str(tmp_path / "all" / "mine" / "test" / "1.jpg"))            # and not a folder of one's own
    with caplog.at_level(logging.WARNING):
        ds = unlabeled(str(tmp_path / "all"), progress=False)
    assert len(ds.train) == 9
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "6 of its 9 images lie in" in msg and "mine/test" not in msg
    for folder, n in (("Market-1501-v15.09.15/query/", 1), ("Market-1501-v15.09.15/bounding_box_test/", 2),
                      ("cuhk03-np/detected/query/", 1)):
        assert f"{folder} ({n} image{'s' if n > 1 else ''})" in msg
    assert "and 1 more folder." in msg and "synthetic" not in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(unlabeled(str(tmp_path / "all" / "Market-1501-v15.09.15" / "bounding_box_train"),
                             progress=False).train) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_data_root_at_the_wrong_depth_says_where_the_dataset_is(tmp_path):
    """One level too deep (a split folder), or two levels too high: the error names the folder to use."""
    m = make_market(str(tmp_path / "data" / "reid" / "Market-1501-v15.09.15"))
    with pytest.raises(DatasetError, match=r"is a folder inside the dataset: point data.root at '.*Market-1501-v15\.09\.15'"):
        market1501(os.path.join(m, "bounding_box_train"))
    with pytest.raises(DatasetError, match=r"a folder laid out like the dataset, with bounding_box_train, is in "
                                           r"'.*reid/Market-1501-v15\.09\.15': point "
                                           r"data.root at it\)"):
        market1501(str(tmp_path / "data"))
    assert len(market1501(str(tmp_path / "data" / "reid")).train) == 3      # one level above: descended into
    ms = make_msmt(str(tmp_path / "ms" / "MSMT17_V1") if os.makedirs(tmp_path / "ms" / "MSMT17_V1") is None else "")
    with pytest.raises(DatasetError, match=r"list file .*train/list_train.txt' does not exist \('.*train' is a folder "
                                           r"inside the dataset: point data.root at '.*MSMT17_V1'\)"):
        msmt17(os.path.join(ms, "train"))
    os.makedirs(tmp_path / "cu" / "cuhk03-np" / "detected" / "query")
    with pytest.raises(DatasetError, match=r"is a folder inside the dataset: point data.root at '.*cuhk03-np'"):
        cuhk03_np(str(tmp_path / "cu" / "cuhk03-np" / "detected"))


def test_the_original_cuhk03_release_is_recognised(tmp_path):
    touch(str(tmp_path / "cuhk03" / "cuhk03_new_protocol_config_detected.mat"))
    with pytest.raises(DatasetError, match=r"original CUHK03 release with \.mat files: upreid reads the CUHK03-NP"):
        cuhk03_np(str(tmp_path / "cuhk03"))


def test_two_copies_under_one_root_are_named(tmp_path, caplog):
    make_msmt(str(tmp_path / "MSMT17_V1") if os.makedirs(tmp_path / "MSMT17_V1") is None else "")
    make_msmt(str(tmp_path / "MSMT17_V2") if os.makedirs(tmp_path / "MSMT17_V2") is None else "", v2=True)
    with caplog.at_level(logging.WARNING):
        ds = msmt17(str(tmp_path))
    assert ds.root.endswith("MSMT17_V1")
    assert "holds 2 copies of the dataset (MSMT17_V1, MSMT17_V2): using" in caplog.text
    caplog.clear()
    os.makedirs(tmp_path / "other")
    os.symlink(tmp_path / "MSMT17_V2", tmp_path / "other" / "MSMT17")           # one copy under two names
    os.symlink(tmp_path / "MSMT17_V2", tmp_path / "other" / "MSMT17_V2")
    with caplog.at_level(logging.WARNING):
        assert msmt17(str(tmp_path / "MSMT17_V2")).root.endswith("MSMT17_V2")
        assert msmt17(str(tmp_path / "other")).root.endswith("MSMT17_V2")
    assert "copies of the dataset" not in caplog.text


def test_hard_linked_duplicates_are_named(tmp_path, caplog):
    touch(str(tmp_path / "imgs" / "a.jpg"))
    os.link(tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "b.jpg")
    with caplog.at_level(logging.WARNING):
        assert len(unlabeled(str(tmp_path / "imgs"), progress=False).train) == 1
    assert "1 duplicate entries (the same file listed again, or reached through a symlink or a hard link)" in caplog.text
    assert "b.jpg' is '" in caplog.text and "a.jpg'" in caplog.text


def test_msmt17_without_list_val_trains_on_train_alone(tmp_path, caplog):
    os.remove(make_msmt(str(tmp_path)) + "/list_val.txt")
    with caplog.at_level(logging.WARNING):
        ds = msmt17(str(tmp_path))
    assert len(ds.train) == 2 and "no list_val.txt" in caplog.text
    assert "train images" not in caplog.text and "found 1 query images" in caplog.text   # query, gallery: checked
