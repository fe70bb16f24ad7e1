"""The dataset summary CSV, its content hash, and the synthetic dataset generator."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
import yaml

from bridge.errors import ConfigError
from bridge.yolo.dataset import DIGEST_CHARS, label_file, make_synthetic_dataset, summarize_dataset
from tests.support.yolo import count_labels


def _write(path: Path, text: str | bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture
def hand_made(tmp_path) -> Path:
    """3 train images (2 labelled, 1 with an empty label file), 2 val images (1 with no label file at all)."""
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        _write(root / "images" / "train" / f"{name}.jpg", b"x" * 10)
    _write(root / "labels" / "train" / "a.txt", "0 0.5 0.5 0.2 0.4\n1 0.3 0.3 0.6 0.2\n")
    _write(root / "labels" / "train" / "b.txt", "1 0.5 0.5 0.4 0.4\n")
    _write(root / "labels" / "train" / "c.txt", "")
    _write(root / "images" / "val" / "d.png", b"y" * 5)
    _write(root / "images" / "val" / "e.png", b"z" * 5)
    _write(root / "labels" / "val" / "d.txt", "0 0.1 0.1 0.8 0.6\n")
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": {0: "cat", 1: "dog"}})
    )
    return data


def _rows(summary) -> dict[str, dict[str, str]]:
    return {r["split"]: r for r in csv.DictReader(io.StringIO(summary.to_csv()))}


def test_summary_counts_a_hand_made_dataset(hand_made):
    summary = summarize_dataset(hand_made)
    rows = _rows(summary)
    assert list(rows) == ["train", "val"]
    t, v = rows["train"], rows["val"]
    assert (t["images"], t["labelled_images"], t["empty_images"], t["instances"]) == ("3", "2", "1", "3")
    assert (t["instances/cat"], t["instances/dog"]) == ("1", "2")
    assert float(t["box_width_mean"]) == pytest.approx((0.2 + 0.6 + 0.4) / 3)
    assert float(t["box_width_min"]) == pytest.approx(0.2) and float(t["box_width_max"]) == pytest.approx(0.6)
    assert float(t["box_height_std"]) == pytest.approx(0.0942809, rel=1e-5)  # population std of .4 .2 .4
    assert (v["images"], v["labelled_images"], v["empty_images"], v["instances/cat"]) == ("2", "1", "1", "1")
    assert float(v["box_height_mean"]) == pytest.approx(0.6)


def test_hash_follows_labels_images_and_classes(hand_made):
    first = summarize_dataset(hand_made).content_hash
    assert summarize_dataset(hand_made).content_hash == first
    lbl = hand_made.parent / "labels" / "train" / "b.txt"
    lbl.write_text("1 0.5 0.5 0.4 0.41\n")
    second = summarize_dataset(hand_made).content_hash
    assert second != first
    (hand_made.parent / "images" / "val" / "e.png").write_bytes(b"z" * 6)
    third = summarize_dataset(hand_made).content_hash
    assert third != second
    cfg = yaml.safe_load(hand_made.read_text())
    cfg["names"] = {0: "cat", 1: "wolf"}
    hand_made.write_text(yaml.safe_dump(cfg))
    assert summarize_dataset(hand_made).content_hash != third


def test_image_list_files_and_polygon_labels(tmp_path):
    root = tmp_path / "seg"
    _write(root / "images" / "x.jpg", b"1")
    _write(root / "labels" / "x.txt", "0 0.1 0.1 0.5 0.1 0.5 0.7 0.1 0.7\n")
    (root / "train.txt").write_text("images/x.jpg\n")
    data = root / "seg.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "train.txt", "val": "train.txt", "names": ["blob"]}))
    rows = _rows(summarize_dataset(data))
    assert rows["train"]["instances/blob"] == "1"
    assert float(rows["train"]["box_width_mean"]) == pytest.approx(0.4)
    assert float(rows["train"]["box_height_mean"]) == pytest.approx(0.6)


def test_bad_data_yaml_is_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        summarize_dataset(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: images\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*names"):
        summarize_dataset(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"train": "nowhere", "names": ["a"]}))
    with pytest.raises(ConfigError, match="nowhere"):
        summarize_dataset(missing)


def test_label_file_mapping():
    assert label_file(Path("/d/images/train/a.jpg")) == Path("/d/labels/train/a.txt")
    assert label_file(Path("/images/d/images/x.png")) == Path("/images/d/labels/x.txt")


def test_synthetic_dataset_is_deterministic_with_empty_images(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".png", ".txt"):
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    a = make_synthetic_dataset(tmp_path / "a", n_train=12, n_val=4, imgsz=48, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", n_train=12, n_val=4, imgsz=48, seed=3)
    c = make_synthetic_dataset(tmp_path / "c", n_train=12, n_val=4, imgsz=48, seed=4)
    assert digest(a.parent) == digest(b.parent) != digest(c.parent)
    truth = count_labels(a)
    assert truth["train"]["images"] == 12 and truth["train"]["empty"] == 3 and truth["val"]["empty"] == 1
    rows = _rows(summarize_dataset(a))
    assert int(rows["train"]["empty_images"]) == 3
    assert int(rows["train"]["instances/square"]) == truth["train"]["per_class"][0]
    assert int(rows["train"]["instances/bar"]) == truth["train"]["per_class"][1]
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path / "d", n_train=0)


def test_train_and_val_become_dataset_inputs_named_by_split_with_the_hash_as_digest(hand_made):
    summary = summarize_dataset(hand_made)
    inputs = summary.inputs()
    assert [(i.name, i.context) for i in inputs] == [("data/train", "training"), ("data/val", "validation")]
    assert {i.digest for i in inputs} == {summary.content_hash[:DIGEST_CHARS]}
    root = hand_made.parent.resolve()
    assert [(i.source_type, json.loads(i.source)) for i in inputs] == [
        ("local", {"uri": str(root / "images" / "train")}),
        ("local", {"uri": str(root / "images" / "val")}),
    ]
    train = json.loads(inputs[0].profile)
    assert (train["images"], train["labelled_images"], train["instances"], train["classes"]) == (3, 2, 3, 2)


def test_a_download_url_is_the_inputs_source_and_a_download_script_is_not(hand_made):
    cfg = yaml.safe_load(hand_made.read_text())
    hand_made.write_text(yaml.safe_dump({**cfg, "test": "images/val", "download": "https://example.org/ds.zip"}))
    inputs = summarize_dataset(hand_made).inputs()
    assert [i.name for i in inputs] == ["data/train", "data/val"]  # the test split is no training input
    assert {(i.source_type, i.source) for i in inputs} == {("http", json.dumps({"url": "https://example.org/ds.zip"}))}
    hand_made.write_text(yaml.safe_dump({**cfg, "download": "import os\nos.system('true')\n"}))
    assert {i.source_type for i in summarize_dataset(hand_made).inputs()} == {"local"}
