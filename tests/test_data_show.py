"""`pipeline data show`: a dataset's summary from its manifest, and a grid of samples as validation feeds them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from pipeline.data import eval_batches, read_manifest
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.config import DataConfig
from pipeline.data.reader import ReadOptions


def _show(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "data", "show", *args], capture_output=True, text=True,
                          timeout=120)


def test_summary_and_grid_are_what_training_reads(digits_dataset, tmp_path) -> None:
    manifest = read_manifest(digits_dataset)
    shown = _show(digits_dataset, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["digest"] == manifest.digest() and summary["sample"]["channels"] == 1
    for name, info in manifest.splits.items():
        assert summary["splits"][name] == {"samples": info.samples, "shards": len(info.shards),
                                           "bytes": sum(s.bytes for s in info.shards)}

    grid_file = tmp_path / "grid.png"
    drawn = _show(digits_dataset, "--split", "test", "--count", "20", "--out", str(grid_file),
                  "-o", "data.image_size=[8, 8]")
    assert drawn.returncode == 0, drawn.stderr
    assert "the first 20 test samples" in " ".join(drawn.stderr.split())
    grid = np.asarray(Image.open(grid_file))
    scale = 128 // 8  # tiles of 8x8 drawn 16x
    assert grid.shape == ((2 * 9 + 1) * scale, (16 * 9 + 1) * scale)  # 20 samples: 16 per row, 2 rows, 1-px gaps
    # the 18th tile (row 1, column 1) is the 18th test sample exactly as validation reads it
    data = DataConfig(url=digits_dataset, image_size=[8, 8])
    target = ImageTarget.from_config(manifest.spec, data)
    x, _ = next(iter(eval_batches(manifest, digits_dataset, split="test", rank=0, world_size=1, batch_size=20,
                                  options=ReadOptions.from_config(data), decoder=SampleDecoder(manifest.spec, target, 1))))
    top, left = (1 + 9) * scale, (1 + 9) * scale
    tile = grid[top: top + 8 * scale: scale, left: left + 8 * scale: scale]
    assert np.array_equal(tile, x[17, 0].numpy())


def test_bad_requests_name_what_is_wrong(digits_dataset, tmp_path) -> None:
    missing = _show(digits_dataset, "--split", "holdout", "--out", str(tmp_path / "g.png"))
    assert missing.returncode == 2 and "no split 'holdout'" in missing.stderr and "train, val, test" in missing.stderr
    wrong = _show(digits_dataset, "--out", str(tmp_path / "g.png"), "-o", "train.lr=1")
    assert wrong.returncode == 2 and "only data.* overrides" in wrong.stderr
    nothing = _show(str(tmp_path / "none"))
    assert nothing.returncode == 1 and "manifest.json" in nothing.stderr
    assert not (tmp_path / "g.png").exists()
