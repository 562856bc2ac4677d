"""`pipeline data index`: existing WebDataset shards (img2dataset's layout, gzip, MNIST as PNG) adopted
without rewriting them, then read back through the training data path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import fsspec
import numpy as np
import pytest

from photos import crops, encode, write_img2dataset, write_mnist_png_shards, write_png_shards, write_tar
from pipeline.data import DataError, ImageTarget, ReadOptions, SampleDecoder, ShardError, eval_batches, read_manifest
from pipeline.data.index import assign_splits, index_shards


def read_back(url: str, split: str, size: tuple[int, int] = (32, 32), channels: int = 3):
    """(uint8 [N, C, H, W], labels [N]) of a whole split through the training reader (sha256 verified)."""
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=channels, size=size))
    batches = list(eval_batches(manifest, url, split=split, rank=0, world_size=1, batch_size=16,
                                options=ReadOptions(verify=True), decoder=decoder))
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


def test_img2dataset_layout_in_place(tmp_path) -> None:
    root = tmp_path / "cc"
    tars = write_img2dataset(root, shards=3, per_shard=10)
    manifest = index_shards([f"{root}/{{00000..00002}}.tar"], str(root), val_shards=1, progress=False)
    spec = manifest.spec
    assert (spec.image, spec.channels, spec.size, spec.label) == ("jpg", 3, None, None)  # crops of varying size
    assert spec.ignore == ["json", "txt"] and spec.compression == "none"
    every = [info for split in manifest.splits.values() for info in split.shards]
    assert sorted(info.path for info in every) == ["00000.tar", "00001.tar", "00002.tar"]  # relative: beside it
    for info in every:  # sha256 and bytes of the untouched files
        data = (root / info.path).read_bytes()
        assert (info.bytes, info.sha256, info.samples) == (len(data), hashlib.sha256(data).hexdigest(), 10)
    assert {name: split.samples for name, split in manifest.splits.items()} == {"train": 20, "val": 10}
    images, labels = read_back(str(root), "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8 and (labels == -1).all()
    assert images.std() > 20  # real photo content, not a blank
    # a folder argument finds the same tars and passes the .parquet / _stats.json files over
    again = index_shards([str(root)], str(tmp_path / "m2"), val_shards=1, progress=False)
    assert sorted(i.sha256 for s in again.splits.values() for i in s.shards) == sorted(i.sha256 for i in every)
    assert all(t.exists() for t in tars) and len(list(root.iterdir())) == 10  # 3 x (tar, parquet, stats) + manifest


def test_label_from_a_json_field(tmp_path) -> None:
    write_img2dataset(tmp_path / "cc", shards=2, per_shard=6)
    manifest = index_shards([str(tmp_path / "cc" / "*.tar")], str(tmp_path / "m"), val=["00001.tar"],
                            label="json:label", progress=False)
    assert manifest.spec.label == "json:label" and manifest.spec.ignore == ["txt"]
    _, labels = read_back(str(tmp_path / "m"), "train")
    assert labels.tolist() == [i % 4 for i in range(6)]
    with pytest.raises(ShardError, match=r"00000\.tar.*member 000000000\.json.*integer field 'nope'"):
        index_shards([str(tmp_path / "cc" / "*.tar")], str(tmp_path / "m"), val=["00001.tar"], label="json:nope",
                     progress=False)


def test_gzip_shards_with_split_patterns(tmp_path) -> None:
    write_png_shards(tmp_path, shards=4, per_shard=5, size=(40, 48), gzipped=True)
    out = tmp_path / "elsewhere"
    manifest = index_shards([f"{tmp_path}/photos-*.tar.gz"], str(out), val=["photos-00002.tar.gz"],
                            test=["*-00003.tar.gz"], progress=False)
    spec = manifest.spec
    assert (spec.image, spec.channels, spec.size, spec.label, spec.compression) == ("png", 3, [40, 48], "cls", "gzip")
    assert {n: s.samples for n, s in manifest.splits.items()} == {"train": 10, "val": 5, "test": 5}
    # the manifest lives apart from the shards: absolute URLs
    assert manifest.splits["val"].shards[0].path == f"file://{tmp_path}/photos-00002.tar.gz"
    images, labels = read_back(str(out), "test", size=(40, 48))
    assert images.shape == (5, 3, 40, 48) and labels.tolist() == [0, 1, 2, 0, 1]


def test_seeded_hold_out_of_whole_shards() -> None:
    urls = [f"s3://b/x/{i:05d}.tar" for i in range(10)]
    one = assign_splits(urls, val_shards=2, test_shards=1, seed=3)
    assert [len(one[s]) for s in ("train", "val", "test")] == [7, 2, 1]
    assert sorted(sum(one.values(), [])) == urls  # every shard exactly once
    assert assign_splits(urls, val_shards=2, test_shards=1, seed=3) == one
    assert any(assign_splits(urls, val_shards=2, test_shards=1, seed=s) != one for s in range(4, 8))
    assert len(assign_splits(urls)["val"]) == 1  # nothing said: ~1% of the shards, at least one
    both = assign_splits(urls, val=["00007.tar"], val_shards=1)["val"]  # a pattern, plus one drawn from the rest
    assert len(both) == 2 and "s3://b/x/00007.tar" in both
    with pytest.raises(DataError, match="val split is empty"):
        assign_splits(urls, val_shards=0)
    assert "val" not in assign_splits(urls, val_shards=0, require_val=False)
    with pytest.raises(DataError, match="no train shards"):
        assign_splits(urls, val_shards=6, test_shards=4)


def test_mnist_png_shards_decode_to_the_digits(tmp_path, mnist_dir) -> None:
    from pipeline.data.sources import load_mnist_splits

    write_mnist_png_shards(tmp_path, mnist_dir, samples=300, per_shard=100)
    manifest = index_shards([str(tmp_path / "mnist-{00000..00002}.tar")], str(tmp_path), val=["mnist-00002.tar"],
                            progress=False)
    assert (manifest.spec.image, manifest.spec.channels, manifest.spec.size) == ("png", 1, [28, 28])
    images, labels = read_back(str(tmp_path), "train", size=(28, 28), channels=1)
    mnist = load_mnist_splits(str(mnist_dir))["train"]
    assert np.array_equal(images[:, 0], mnist.images[:200]) and np.array_equal(labels, mnist.labels[:200])


def test_damaged_shards_are_named(tmp_path) -> None:
    good, other = write_png_shards(tmp_path, shards=2, per_shard=6, gzipped=False)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:3000])  # cut inside a member
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in (truncated, garbage):
        with pytest.raises(ShardError, match=f"shard file://{bad}.*damaged shard"):
            index_shards([str(other), str(bad)], str(tmp_path / "m"), progress=False)
    missing = tmp_path / "missing.tar"
    with pytest.raises(DataError, match=f"1 of 2 shards do not exist: file://{missing}"):
        index_shards([str(other), str(missing)], str(tmp_path / "m"), progress=False, require_val=False)


def test_pickle_member_refused_and_odd_members_named(tmp_path) -> None:
    png = encode(np.zeros((8, 8, 3), np.uint8), "png")
    hostile = write_tar(tmp_path / "hostile.tar", [("a.png", png), ("a.cls", b"1"), ("b.png", png), ("b.pyd", b"x")])
    with pytest.raises(ShardError, match=f"shard file://{hostile}, member b.pyd: pickle-like member refused"):
        index_shards([str(hostile)], str(tmp_path / "m"), require_val=False, progress=False)
    odd = write_tar(tmp_path / "odd.tar", [("a.png", png), ("a.mp4", b"x")])
    with pytest.raises(ShardError, match=r"member a\.mp4: member \.mp4 is not part of the sample contract"):
        index_shards([str(odd)], str(tmp_path / "m"), require_val=False, progress=False)
    bad_image = write_tar(tmp_path / "bad-image.tar", [("a.png", b"not a png")])
    with pytest.raises(ShardError, match=r"member a\.png: not a readable PNG image"):
        index_shards([str(bad_image)], str(tmp_path / "m"), require_val=False, progress=False)


def test_one_sample_in_one_shard(tmp_path) -> None:
    single = write_tar(tmp_path / "one.tar", [("k.jpg", encode(np.full((5, 7), 99, np.uint8), "jpg")),
                                             ("k.cls", b"4")])
    with pytest.raises(DataError, match="pass --no-val"):
        index_shards([str(single)], str(tmp_path), progress=False)
    manifest = index_shards([str(single)], str(tmp_path), require_val=False, progress=False)
    assert list(manifest.splits) == ["train"] and manifest.splits["train"].samples == 1
    assert (manifest.spec.channels, manifest.spec.size) == (1, [5, 7])
    images, labels = read_back(str(tmp_path), "train", size=(5, 7), channels=1)
    assert images.shape == (1, 1, 5, 7) and labels.tolist() == [4] and abs(int(images.mean()) - 99) <= 2


def test_cli_index(tmp_path) -> None:
    write_img2dataset(tmp_path, shards=3, per_shard=4)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "index", f"{tmp_path}/{{00000..00002}}.tar",
                           "--out", str(tmp_path / "m"), "--test-shards", "1", "--seed", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "indexed 3 shards, 12 samples" in text and "image .jpg, 3 channel(s), size varies" in text
    assert "splits: train 4 (1 shards), val 4 (1 shards), test 4 (1 shards)" in text
    from typer.testing import CliRunner

    from pipeline.cli import app

    bad = CliRunner().invoke(app, ["data", "index", str(tmp_path / "00000.tar"), "--out", str(tmp_path / "m1")])
    assert bad.exit_code == 1 and "pass --no-val" in " ".join(bad.stderr.split())


def test_shards_in_a_bucket(tmp_path) -> None:
    from moto_s3 import moto_server, s3_environment

    tars = write_img2dataset(tmp_path, shards=3, per_shard=5)
    with moto_server() as endpoint, s3_environment(endpoint):
        s3 = fsspec.filesystem("s3")
        s3.mkdir("photos")
        for path in tars + [tmp_path / "00000.parquet"]:
            s3.put(str(path), f"photos/cc/{path.name}")
        shards = "s3://photos/cc/{00000..00002}.tar"
        beside = index_shards([shards], "s3://photos/cc", test=["00000.tar"], progress=False)
        assert [s.path for s in beside.splits["test"].shards] == ["00000.tar"]
        apart = index_shards(["s3://photos/cc/*.tar"], "s3://photos/manifests/cc", test=["00000.tar"], progress=False)
        assert [s.path for s in apart.splits["test"].shards] == ["s3://photos/cc/00000.tar"]
        assert apart.digest() != beside.digest() and apart.spec == beside.spec
        local = index_shards([shards], str(tmp_path / "local-manifest"), test=["00000.tar"], progress=False)
        for url in ("s3://photos/cc", "s3://photos/manifests/cc", str(tmp_path / "local-manifest")):
            images, _ = read_back(url, "test")
            assert images.shape == (5, 3, 32, 32)
        assert local.splits["train"].samples + local.splits["val"].samples == 10
        with pytest.raises(DataError, match=r"5 of 8 shards do not exist: s3://photos/cc/00003\.tar, .*00007\.tar$"):
            index_shards(["s3://photos/cc/{00000..00007}.tar"], "s3://photos/m", progress=False)


# --- shards as people have them: pixels against Pillow, refusals naming shard and key -------------------------


def pillow(raw: bytes) -> np.ndarray:
    """uint8 [3, H, W]: Pillow's own RGB decoding of ``raw``."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).transpose(2, 0, 1)


def jpeg_samples(prefix: str, n: int, seed: int, size: tuple[int, int] = (24, 40)) -> list[tuple[str, bytes, int]]:
    """(key, JPEG bytes, label) of ``n`` photo crops, all ``size``."""
    return [(f"{prefix}{i:03d}", encode(image, "jpg", 95), (seed + i) % 5)
            for i, image in enumerate(crops(n, size=size, seed=seed))]


def write_samples(path, samples, *, gzipped: bool = False, json_for=lambda key: True):
    return write_tar(path, [member for key, raw, label in samples for member in
                            [(f"{key}.jpg", raw), (f"{key}.cls", str(label).encode())]
                            + ([(f"{key}.json", json.dumps({"key": key}).encode())] if json_for(key) else [])],
                     gzipped=gzipped)


def assert_pixels_and_labels(url: str, samples, size=(24, 40)) -> None:
    images, labels = read_back(url, "train", size=size)
    assert labels.tolist() == [label for _, _, label in samples]
    assert len(images) == len(samples)
    differ = {key: int(np.abs(image.astype(int) - pillow(raw)).max())
              for image, (key, raw, _) in zip(images, samples) if not np.array_equal(image, pillow(raw))}
    assert differ == {}  # key -> largest difference of any pixel


def test_tgz_shard_pixel_for_pixel(tmp_path) -> None:
    samples = jpeg_samples("t", 6, seed=1)
    write_samples(tmp_path / "photos-00000.tgz", samples, gzipped=True)
    manifest = index_shards([str(tmp_path / "*.tgz")], str(tmp_path), require_val=False, progress=False)
    assert manifest.spec.compression == "gzip" and manifest.splits["train"].shards[0].path == "photos-00000.tgz"
    assert (manifest.spec.image, manifest.spec.size, manifest.spec.label) == ("jpg", [24, 40], "cls")
    assert_pixels_and_labels(str(tmp_path), samples)


def test_gzip_and_plain_shards_in_one_index(tmp_path) -> None:
    plain, gz, tgz = jpeg_samples("a", 4, seed=2), jpeg_samples("b", 5, seed=3), jpeg_samples("c", 3, seed=4)
    write_samples(tmp_path / "s-0.tar", plain)
    write_samples(tmp_path / "s-1.tar.gz", gz, gzipped=True)
    write_samples(tmp_path / "s-2.tgz", tgz, gzipped=True)
    manifest = index_shards([str(tmp_path)], str(tmp_path), require_val=False, progress=False)
    assert manifest.spec.compression == "gzip"  # some are: the reader finds which from the bytes
    assert [s.path for s in manifest.splits["train"].shards] == ["s-0.tar", "s-1.tar.gz", "s-2.tgz"]
    assert [s.samples for s in manifest.splits["train"].shards] == [4, 5, 3]
    assert_pixels_and_labels(str(tmp_path), plain + gz + tgz)


def test_json_in_some_samples_only(tmp_path) -> None:
    samples = jpeg_samples("j", 6, seed=5)
    write_samples(tmp_path / "s-0.tar", samples, json_for=lambda key: key in ("j001", "j004"))
    manifest = index_shards([str(tmp_path / "s-0.tar")], str(tmp_path), require_val=False, progress=False)
    assert (manifest.spec.label, manifest.spec.ignore) == ("cls", ["json"])
    assert manifest.splits["train"].samples == 6
    assert_pixels_and_labels(str(tmp_path), samples)


def test_sample_without_its_image_named_nothing_written(tmp_path) -> None:
    (a, b, c) = jpeg_samples("k", 3, seed=6)
    write_tar(tmp_path / "s-0.tar", [("k000.jpg", a[1]), ("k000.cls", b"1"), ("k000.json", b"{}"),
                                     ("k001.cls", b"2"), ("k001.json", b"{}"),  # no k001.jpg
                                     ("k002.jpg", c[1]), ("k002.cls", b"3"), ("k002.json", b"{}")])
    with pytest.raises(DataError, match=r"no image member is in every sample \(seen: \['jpg'\]\): "
                                        rf"shard file://{tmp_path}/s-0\.tar has 2 \.jpg members in 3 samples"
                                        r".*key k001\b"):
        index_shards([str(tmp_path / "s-0.tar")], str(tmp_path), require_val=False, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    # the first sample lacks it, the member first seen later; and a second shard whole
    write_samples(tmp_path / "s-1.tar", jpeg_samples("m", 2, seed=7))
    write_tar(tmp_path / "s-2.tar", [("n000.cls", b"1"), ("n001.jpg", a[1]), ("n001.cls", b"1")])
    with pytest.raises(DataError, match=rf"shard file://{tmp_path}/s-2\.tar has 1 \.jpg members in 2 samples"
                                        r".*key n000\b"):
        index_shards([str(tmp_path / "s-1.tar"), str(tmp_path / "s-2.tar")], str(tmp_path), require_val=False,
                     progress=False)
    assert not (tmp_path / "manifest.json").exists()
    # a label member some sample lacks: with --label auto it is no label (ignored), with --label cls refused
    write_tar(tmp_path / "s-3.tar", [("p000.jpg", a[1]), ("p000.cls", b"1"), ("p001.jpg", c[1])])
    with pytest.raises(DataError, match=r"--label cls: not every sample has a \.cls member: shard "
                                        rf"file://{tmp_path}/s-3\.tar has 1 \.cls members in 2 samples.*key p001\b"):
        index_shards([str(tmp_path / "s-3.tar")], str(tmp_path), require_val=False, label="cls", progress=False)
    assert not (tmp_path / "manifest.json").exists()
    auto = index_shards([str(tmp_path / "s-3.tar")], str(tmp_path), require_val=False, progress=False)
    assert (auto.spec.label, auto.spec.ignore) == (None, ["cls"])


def test_non_integer_cls_named_nothing_written(tmp_path) -> None:
    (a, b) = jpeg_samples("k", 2, seed=8)
    write_tar(tmp_path / "s-0.tar", [("k000.jpg", a[1]), ("k000.cls", b"1"), ("k001.jpg", b[1]), ("k001.cls", b"cat")])
    with pytest.raises(ShardError, match=rf"shard file://{tmp_path}/s-0\.tar, member k001\.cls: label not an integer"):
        index_shards([str(tmp_path / "s-0.tar")], str(tmp_path), require_val=False, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    # --label none: the .cls members are declared ignored, never read as labels
    manifest = index_shards([str(tmp_path / "s-0.tar")], str(tmp_path), require_val=False, label=None,
                            progress=False)
    assert (manifest.spec.label, manifest.spec.ignore) == (None, ["cls"])


def test_empty_shard_named_nothing_written(tmp_path) -> None:
    write_samples(tmp_path / "s-0.tar", jpeg_samples("k", 3, seed=9))
    write_samples(tmp_path / "s-1.tar", jpeg_samples("m", 3, seed=10))
    empty = write_tar(tmp_path / "s-2.tar", [])
    assert tarfile.open(empty).getmembers() == []  # a valid tar, no members
    empty_gz = write_tar(tmp_path / "s-3.tar.gz", [], gzipped=True)
    for bad in (empty, empty_gz):
        with pytest.raises(ShardError, match=rf"shard file://{bad}: holds no samples"):
            index_shards([str(tmp_path / "s-0.tar"), str(tmp_path / "s-1.tar"), str(bad)], str(tmp_path),
                         val=["s-1.tar"], progress=False)
        assert not (tmp_path / "manifest.json").exists()


def test_img2dataset_layout_pixel_for_pixel(tmp_path) -> None:
    root = tmp_path / "cc"
    tars = write_img2dataset(root, shards=2, per_shard=5, size=(24, 40))
    manifest = index_shards([str(root)], str(root), val=["00001.tar"], progress=False)
    assert (manifest.spec.image, manifest.spec.size, manifest.spec.ignore) == ("jpg", [24, 40], ["json", "txt"])
    with tarfile.open(tars[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [name for name, _ in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    sources = [(name.split(".")[0], raw, -1) for name, raw in members if name.endswith(".jpg")]
    assert_pixels_and_labels(str(root), sources)
