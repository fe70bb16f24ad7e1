"""What a YOLO dataset holds: a per-split summary CSV, a content hash, and a tiny synthetic dataset for tests and demos.

The summary and the hash read the dataset the way Ultralytics does (a data YAML whose splits are folders,
image-list files or lists of either; labels found by replacing the last `images` folder with `labels`).
`DatasetSummary.inputs()` describes the training and validation splits as MLflow dataset inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.errors import ConfigError

#: Image suffixes Ultralytics reads (kept here so summarising does not import torch).
IMAGE_SUFFIXES = frozenset(
    {".avif", ".bmp", ".dng", ".heic", ".heif", ".jp2", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}
)
SPLITS = ("train", "val", "test")
#: The MLflow dataset-input context of each split a training reads (MLflow's `mlflow.data.context` tag values).
SPLIT_CONTEXTS = {"train": "training", "val": "validation"}
#: A dataset input's digest: the first characters of the content hash (MLflow keeps at most 36).
DIGEST_CHARS = 12
#: Box statistics in the summary, in normalised image units (0..1) as in the label files.
BOX_STATS = ("mean", "std", "min", "max")


@dataclass(frozen=True)
class DataConfig:
    """A data YAML read and resolved: where each split's images are, and the class names in index order."""

    yaml_path: Path | None
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]
    keypoints: bool = False
    download: str | None = None  # the data YAML's `download` URL, where the data came from

    @property
    def name(self) -> str:
        """The dataset's name: the data YAML's stem, as Ultralytics names it."""
        return self.yaml_path.stem if self.yaml_path else self.root.name


@dataclass
class SplitSummary:
    """Counts and box statistics of one split."""

    split: str
    images: int = 0
    labelled_images: int = 0
    empty_images: int = 0
    instances: int = 0
    instances_per_class: dict[str, int] = field(default_factory=dict)
    box_width: dict[str, float] = field(default_factory=dict)
    box_height: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitInput:
    """One split as an MLflow dataset input: its dataset's name, digest, source and profile, and its context."""

    name: str
    digest: str
    source_type: str  # "http" (the data YAML's download URL) or "local" (the split's folder or list)
    source: str  # JSON, as MLflow's own dataset sources write it: {"url": ...} or {"uri": ...}
    profile: str  # JSON: the split's counts
    context: str


@dataclass
class DatasetSummary:
    """The per-split summary of a dataset and its content hash."""

    name: str
    names: list[str]
    splits: list[SplitSummary]
    content_hash: str
    sources: dict[str, list[Path]] = field(default_factory=dict)
    download: str | None = None

    def inputs(self) -> list[SplitInput]:
        """The training and validation splits as MLflow dataset inputs, named `<dataset>/<split>`.

        Both carry the content hash as digest, so a run is found by the data it trained on; the names differ
        because MLflow keeps one input per (name, digest) and run, and logging them again adds nothing.
        """
        out = []
        for s in self.splits:
            if s.split not in SPLIT_CONTEXTS:
                continue
            if self.download and re.fullmatch(r"https?://\S+", self.download):
                source_type, source = "http", json.dumps({"url": self.download})
            else:
                paths = self.sources.get(s.split) or []
                uri = str(paths[0]) if len(paths) == 1 else ",".join(str(p) for p in paths)
                source_type, source = "local", json.dumps({"uri": uri})
            profile = {
                "split": s.split,
                "images": s.images,
                "labelled_images": s.labelled_images,
                "empty_images": s.empty_images,
                "instances": s.instances,
                "classes": len(self.names),
            }
            out.append(
                SplitInput(
                    name=f"{self.name}/{s.split}",
                    digest=self.content_hash[:DIGEST_CHARS],
                    source_type=source_type,
                    source=source,
                    profile=json.dumps(profile),
                    context=SPLIT_CONTEXTS[s.split],
                )
            )
        return out

    def columns(self) -> list[str]:
        cols = ["split", "images", "labelled_images", "empty_images", "instances"]
        cols += [f"instances/{n}" for n in self.names]
        cols += [f"box_width_{s}" for s in BOX_STATS] + [f"box_height_{s}" for s in BOX_STATS]
        return cols

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in self.splits:
            row: dict[str, Any] = {
                "split": s.split,
                "images": s.images,
                "labelled_images": s.labelled_images,
                "empty_images": s.empty_images,
                "instances": s.instances,
            }
            row.update({f"instances/{n}": s.instances_per_class.get(n, 0) for n in self.names})
            row.update({f"box_width_{k}": _fmt(s.box_width.get(k)) for k in BOX_STATS})
            row.update({f"box_height_{k}": _fmt(s.box_height.get(k)) for k in BOX_STATS})
            out.append(row)
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def load_data_config(data: str | Path | dict) -> DataConfig:
    """Read a data YAML (or an already-loaded dict) and resolve each split's image sources to paths."""
    yaml_path: Path | None = None
    if isinstance(data, dict):
        cfg = data
    else:
        yaml_path = Path(data).expanduser()
        if not yaml_path.is_file():
            raise ConfigError(f"data YAML {str(yaml_path)!r} does not exist")
        try:
            cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"data YAML {str(yaml_path)!r} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"data YAML {str(yaml_path)!r} must be a mapping, not {type(cfg).__name__}")
    if yaml_path is None and cfg.get("yaml_file"):
        yaml_path = Path(cfg["yaml_file"])
    base = yaml_path.parent if yaml_path else Path.cwd()
    root = Path(cfg.get("path") or base)
    if not root.is_absolute():
        root = (base / root).resolve()
    names = cfg.get("names")
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise ConfigError(f"data YAML {str(yaml_path or '<dict>')!r} has no 'names' list or mapping")
    splits: dict[str, list[Path]] = {}
    for split in SPLITS:
        src = cfg.get(split)
        if not src:
            continue
        sources = src if isinstance(src, (list, tuple)) else [src]
        resolved = []
        for s in sources:
            p = Path(s)
            resolved.append(p if p.is_absolute() else (root / p))
        splits[split] = resolved
    download = cfg.get("download")
    return DataConfig(
        yaml_path=yaml_path,
        root=root,
        splits=splits,
        names=names,
        keypoints="kpt_shape" in cfg,
        download=download.strip() if isinstance(download, str) and download.strip() else None,
    )


def image_files(sources: Iterable[Path]) -> list[Path]:
    """Every image a split names: folders searched recursively, `.txt` lists read line by line, sorted."""
    found: list[Path] = []
    for src in sources:
        if src.is_dir():
            found += [p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif src.is_file() and src.suffix == ".txt":
            for line in src.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    p = Path(line)
                    found.append(p if p.is_absolute() else (src.parent / p).resolve())
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            found.append(src)
        else:
            raise ConfigError(f"dataset split source {str(src)!r} does not exist")
    return sorted(set(found))


def label_file(image: Path) -> Path:
    """The label file Ultralytics reads for `image` (last `images` folder → `labels`, suffix → `.txt`)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _boxes(text: str, keypoints: bool) -> list[tuple[int, float, float]]:
    """(class, width, height) of each object in a label file; polygons give their extent."""
    out = []
    for line in text.splitlines():
        vals = line.split()
        if not vals:
            continue
        cls = int(float(vals[0]))
        nums = [float(v) for v in vals[1:]]
        if len(nums) == 4 or keypoints:
            w, h = nums[2], nums[3]
        else:  # segment polygon: x1 y1 x2 y2 ...
            xs, ys = nums[0::2], nums[1::2]
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        out.append((cls, w, h))
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values)}


def summarize_dataset(data: str | Path | dict) -> DatasetSummary:
    """Count images, labelled/empty images, instances per class and box sizes per split, and hash the content.

    The hash is SHA-256 over the class names, every label file's bytes and every image's relative path and
    size: it changes when a label, an image file or a class changes, without reading gigabytes of pixels.
    """
    cfg = load_data_config(data)
    digest = hashlib.sha256()
    digest.update(repr(cfg.names).encode())
    splits = []
    for split, sources in cfg.splits.items():
        summary = SplitSummary(split=split, instances_per_class=dict.fromkeys(cfg.names, 0))
        widths: list[float] = []
        heights: list[float] = []
        digest.update(f"\0split:{split}".encode())
        for img in image_files(sources):
            summary.images += 1
            try:
                rel = img.relative_to(cfg.root)
            except ValueError:
                rel = Path(img.name)
            digest.update(f"\0img:{rel.as_posix()}:{img.stat().st_size}".encode())
            lbl = label_file(img)
            boxes: list[tuple[int, float, float]] = []
            if lbl.is_file():
                raw = lbl.read_bytes()
                digest.update(b"\0lbl:" + raw)
                boxes = _boxes(raw.decode("utf-8", "replace"), cfg.keypoints)
            if boxes:
                summary.labelled_images += 1
            else:
                summary.empty_images += 1
            for cls, w, h in boxes:
                name = cfg.names[cls] if 0 <= cls < len(cfg.names) else str(cls)
                summary.instances_per_class[name] = summary.instances_per_class.get(name, 0) + 1
                summary.instances += 1
                widths.append(w)
                heights.append(h)
        summary.box_width, summary.box_height = _stats(widths), _stats(heights)
        splits.append(summary)
    return DatasetSummary(
        name=cfg.name,
        names=cfg.names,
        splits=splits,
        content_hash=digest.hexdigest(),
        sources=dict(cfg.splits),
        download=cfg.download,
    )


def make_synthetic_dataset(
    root: str | Path,
    n_train: int = 16,
    n_val: int = 8,
    imgsz: int = 64,
    classes: Sequence[str] = ("square", "bar"),
    seed: int = 0,
) -> Path:
    """Write a small deterministic detection dataset (every 4th image empty) and return its data YAML path.

    Objects are filled rectangles on a noisy background; class 0 is square-ish, class 1 elongated, and so on.
    """
    from PIL import Image, ImageDraw  # Pillow comes with Ultralytics and matplotlib

    if n_train < 1 or n_val < 1 or imgsz < 16 or not classes:
        raise ConfigError("make_synthetic_dataset needs n_train >= 1, n_val >= 1, imgsz >= 16 and at least one class")
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            bg = tuple(rng.randrange(40, 90) for _ in range(3))
            im = Image.new("RGB", (imgsz, imgsz), bg)
            draw = ImageDraw.Draw(im)
            for _ in range(imgsz // 4):  # a little texture so the images are not trivially flat
                x, y = rng.randrange(imgsz), rng.randrange(imgsz)
                draw.point((x, y), fill=tuple(rng.randrange(0, 255) for _ in range(3)))
            lines = []
            n_obj = 0 if i % 4 == 3 else rng.randint(1, 3)
            for _ in range(n_obj):
                cls = rng.randrange(len(classes))
                aspect = 1.0 + 1.5 * cls  # class k: width/height ratio 1, 2.5, 4, ...
                h = rng.uniform(0.15, 0.35) * imgsz
                w = min(h * aspect, 0.9 * imgsz)
                x0, y0 = rng.uniform(0, imgsz - w), rng.uniform(0, imgsz - h)
                colour = ((60 + 90 * cls) % 256, 200, (220 - 70 * cls) % 256)
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
                lines.append(
                    f"{cls} {(x0 + w / 2) / imgsz:.6f} {(y0 + h / 2) / imgsz:.6f} {w / imgsz:.6f} {h / imgsz:.6f}"
                )
            im.save(img_dir / f"{split}_{i:04d}.png")
            if lines or i % 8 == 3:  # some empty images have an empty label file, others none at all
                (lbl_dir / f"{split}_{i:04d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {
                "path": str(root.resolve()),
                "train": "images/train",
                "val": "images/val",
                "names": {i: str(n) for i, n in enumerate(classes)},
            },
            sort_keys=False,
        )
    )
    return data_yaml
