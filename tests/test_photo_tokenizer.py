"""The shipped tokenizer recipe (configs/images-dvae.yaml, at its shipped widths and K = 512) on real
photographs: after ninety steps on 2 Ray workers, more than half of its codes are some train
position's argmax. The recipe it replaces (a residual encoder/decoder with a soft Gumbel code and a
random-position code init) fell to about a third of its codes within the first hundred steps, and
under a fifth later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import eval_batches, read_manifest
from pipeline.data.contract import ImageTarget, SampleDecoder
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.models.code_use import code_perplexity, codes_used
from pipeline.tokens.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "images-dvae.yaml"
EPOCHS = 6  # ~15 steps an epoch on the ~1,000 train tiles at scale 256


def _cli(*args: str, timeout: int) -> str:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


@pytest.mark.timeout(900)
def test_shipped_recipe_keeps_more_than_half_its_codes_in_use_on_photos(ray_cluster, tmp_path) -> None:
    data = str(tmp_path / "photos")
    _cli("data", "photos", "--out", data, "--scale", "256", timeout=300)
    train_tiles = read_manifest(data).splits["train"].samples
    assert train_tiles > 900
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gcs = ray_cluster.get_runtime_context().gcs_address
    overrides = [f"data.url={data}", f"train.epochs={EPOCHS}", f"train.storage={tmp_path / 'ray'}", "train.log_every=5"]
    out = _cli("train", str(CONFIG), "--address", gcs, "--tracking-uri", uri,
               *[arg for o in overrides for arg in ("-o", o)], timeout=900)
    run_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("run_id:"))

    tokenizer = Tokenizer.load(run_id, tracking_uri=uri, device="cpu")
    cfg = load_config(CONFIG, overrides)
    manifest = read_manifest(data)
    reader = ShardReader(ReadOptions.from_config(cfg.data),
                         SampleDecoder(manifest.spec, ImageTarget.from_config(manifest.spec, cfg.data), 1))
    images = torch.cat([x for x, _ in eval_batches(manifest, data, split="train", rank=0, world_size=1,
                                                   batch_size=256, reader=reader)])
    assert len(images) == train_tiles
    codes = torch.as_tensor(tokenizer.encode(images)).flatten()
    counts = torch.bincount(codes, minlength=512).double().numpy()
    assert codes_used(counts) > 0.5, (codes_used(counts), code_perplexity(counts))
    assert code_perplexity(counts) > 512 / 4
