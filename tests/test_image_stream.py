"""RGB image datasets through the loader: decode paths agree, random crops and flips are a pure
function of (seed, epoch, position) — exact mid-epoch resume, 1 vs 2 workers identical — and a
corrupt JPEG is an error naming shard and member, or a counted skip.

Real photographs: scikit-learn's two bundled JPEGs (china.jpg, flower.jpg), cut into crops."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import eval_batches, read_manifest, train_batches
from pipeline.data.contract import ImageTarget, SampleDecoder, SampleSpec, encode_image
from pipeline.data.errors import ShardError
from pipeline.data.reader import ReadOptions, ShardReader
from pipeline.data.shards import ShardInfo, SplitInfo, begin_dataset, finish_dataset, write_shard
from photos import crops


def photo_crops(count: int, seed: int = 0, sizes: tuple[int, int] = (40, 72)) -> list[np.ndarray]:
    """``count`` RGB crops [3, h, w] of the bundled photographs, sides in [sizes[0], sizes[1])."""
    return [np.ascontiguousarray(c.transpose(2, 0, 1)) for c in crops(count, min_side=sizes[0], max_side=sizes[1] - 1,
                                                                       seed=seed)]


def write_image_dataset(url: str, images: list[np.ndarray], *, fmt: str = "jpg", per_shard: int = 10,
                        gzipped: bool = False, size: list[int] | None = None) -> None:
    """A format-2 dataset: train = all images (labels i % 5), val = the first 10."""
    fs, root, stale = begin_dataset(url)
    spec = SampleSpec(image=fmt, channels=3, size=size, label="cls", compression="gzip" if gzipped else "none")
    infos = {}
    for split, chosen in (("train", images), ("val", images[:10])):
        shards = []
        for number, first in enumerate(range(0, len(chosen), per_shard)):
            path = f"{split}-{number:05d}.tar" + (".gz" if gzipped else "")
            members = ((f"{split}-{i:06d}", {fmt: encode_image(chosen[i], fmt, quality=95), "cls": str(i % 5).encode()})
                       for i in range(first, min(first + per_shard, len(chosen))))
            count, nbytes, sha = write_shard(fs, f"{root}/{path}", members, gzipped=gzipped)
            shards.append(ShardInfo(path=path, samples=count, bytes=nbytes, sha256=sha))
        infos[split] = SplitInfo(samples=sum(s.samples for s in shards), shards=shards)
    finish_dataset(fs, root, stale, source="test photos", spec=spec, split_infos=infos)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("photos") / "jpg")
    write_image_dataset(url, photo_crops(48))
    return url


def epoch(url: str, *, world_size: int = 1, start_step: int = 0, partitions: int = 2, epoch_: int = 1,
          target: ImageTarget | None = None) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """step -> (the global batch's images, keys), gathered over ``world_size`` ranks in rank order."""
    manifest = read_manifest(url)
    target = target or ImageTarget(channels=3, size=(32, 32), resize="random-crop", hflip=True)
    steps: dict[int, list] = {}
    for rank in range(world_size):
        decoder = SampleDecoder(manifest.spec, target, workers=2)
        batches = train_batches(manifest, url, epoch=epoch_, seed=7, rank=rank, world_size=world_size,
                                batch_per_rank=8 // world_size, shuffle_buffer=12, partitions=partitions,
                                start_step=start_step, decoder=decoder)
        for step, batch in enumerate(batches, start=start_step):
            steps.setdefault(step, []).append(batch)
    return {step: (torch.cat([b.x for b in parts]), [k for b in parts for k in b.keys]) for step, parts in steps.items()}


def test_rgb_batches_are_uint8_images_of_the_target_size(photos: str) -> None:
    batches = epoch(photos)
    assert len(batches) == 48 // 8
    x, keys = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    assert len(set(keys)) == 8 and x.float().std() > 10  # real, varied pixels


def test_random_crops_and_flips_resume_exactly_mid_epoch(photos: str) -> None:
    full = epoch(photos)
    resumed = epoch(photos, start_step=3)
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step][1] == full[step][1]
        assert torch.equal(resumed[step][0], full[step][0])


def test_one_and_two_workers_train_on_identical_global_batches(photos: str) -> None:
    one, two = epoch(photos, world_size=1), epoch(photos, world_size=2)
    assert sorted(one) == sorted(two)
    for step in one:
        assert one[step][1] == two[step][1]
        assert torch.equal(one[step][0], two[step][0])


def test_random_choices_change_with_the_epoch_and_really_crop_and_flip(photos: str) -> None:
    a, b = epoch(photos, epoch_=1), epoch(photos, epoch_=2)
    assert not all(torch.equal(a[s][0], b[s][0]) for s in a)
    # the same sample under different random choices: its crops differ between two epochs
    first = {k: x for s in a for k, x in zip(a[s][1], a[s][0])}
    second = {k: x for s in b for k, x in zip(b[s][1], b[s][0])}
    assert sum(not torch.equal(first[k], second[k]) for k in first) > len(first) // 2
    # a flip is exactly a mirror: with crops off (center) every image is the center crop or its mirror
    centered = epoch(photos, target=ImageTarget(channels=3, size=(32, 32), resize="center-crop", hflip=True))
    plain = {k: x for k, x in zip(*_eval(photos))}
    flipped = 0
    for x, keys in centered.values():
        for key, image in zip(keys, x):
            assert torch.equal(image, plain[key]) or torch.equal(image, plain[key].flip(-1))
            flipped += not torch.equal(image, plain[key])
    assert 0 < flipped < 48


def _eval(url: str) -> tuple[list[str], torch.Tensor]:
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(32, 32)))
    keys = [s.path for s in manifest.splits["train"].shards]
    xs = torch.cat([x for x, _ in eval_batches(manifest, url, split="train", rank=0, world_size=1, batch_size=7,
                                               decoder=decoder)])
    names = [f"train-{i:06d}" for i in range(len(xs))]
    assert len(keys) == 5
    return names, xs


def test_decode_paths_agree_png_npy_gzip_and_pillow(tmp_path: Path) -> None:
    """The same images stored as png, npy and gzip-compressed png decode to identical arrays, equal to Pillow's own."""
    images = photo_crops(12, seed=3, sizes=(30, 31))  # 30x30: one stored size
    for fmt, gz in (("png", False), ("npy", False), ("png", True)):
        write_image_dataset(str(tmp_path / f"{fmt}{gz}"), images, fmt=fmt, gzipped=gz, size=[30, 30])
    decoded = []
    for name in ("pngFalse", "npyFalse", "pngTrue"):
        manifest = read_manifest(str(tmp_path / name))
        xs = torch.cat([x for x, _ in eval_batches(manifest, str(tmp_path / name), split="train", rank=0,
                                                   world_size=1, batch_size=5)])
        decoded.append(xs)
    assert decoded[0].shape == (12, 3, 30, 30)
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[0], decoded[2])
    assert torch.equal(decoded[0], torch.from_numpy(np.stack(images)))  # png is lossless: the source pixels
    # grey on read: Pillow's own L conversion
    manifest = read_manifest(str(tmp_path / "pngFalse"))
    grey = next(eval_batches(manifest, str(tmp_path / "pngFalse"), split="train", rank=0, world_size=1, batch_size=2,
                             decoder=SampleDecoder(manifest.spec, ImageTarget(channels=1, size=(30, 30)))))[0]
    expected = np.asarray(Image.fromarray(images[0].transpose(1, 2, 0)).convert("L"))
    assert grey.shape == (2, 1, 30, 30) and np.array_equal(grey[0, 0].numpy(), expected)


def test_jpeg_draft_decoding_is_close_to_a_full_decode() -> None:
    """Draft mode (DCT downscaling) for a target far smaller than the stored image: close to decoding in full."""
    big = photo_crops(1, seed=5, sizes=(400, 401))[0]
    raw = encode_image(big, "jpg", quality=95)
    spec = SampleSpec(image="jpg", channels=3, size=None, label=None)
    fast = SampleDecoder(spec, ImageTarget(channels=3, size=(50, 50))).decode({"jpg": raw}, "mem", "k")[0]
    full = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((50, 50), Image.Resampling.BILINEAR))
    assert fast.shape == (3, 50, 50)
    assert np.abs(fast.astype(int) - full.transpose(2, 0, 1).astype(int)).mean() < 6
    # draft mode ran: the pixels are Pillow's DCT-scaled decode (400 -> 50 is 1/8 in the DCT domain, no
    # resize after it), which a full decode resized to 50x50 does not reproduce
    drafted = Image.open(io.BytesIO(raw))
    drafted.draft("RGB", (50, 50))
    assert drafted.size == (50, 50)
    assert np.array_equal(fast, np.asarray(drafted.convert("RGB")).transpose(2, 0, 1))
    assert not np.array_equal(fast, full.transpose(2, 0, 1))


def _corrupt_dataset(tmp_path: Path) -> str:
    url = str(tmp_path / "corrupt")
    images = photo_crops(20, seed=9)
    write_image_dataset(url, images, per_shard=20)
    # Replace sample 5's JPEG with garbage of a JPEG's start: a member that cannot be decoded.
    manifest = read_manifest(url)
    shard = manifest.splits["train"].shards[0]
    path = Path(url) / shard.path
    data = bytearray(path.read_bytes())
    good = encode_image(images[5], "jpg", quality=95)
    at = bytes(data).index(good)
    data[at + 200: at + len(good)] = b"\0" * (len(good) - 200)
    path.write_bytes(bytes(data))
    return url


def test_corrupt_jpeg_is_an_error_naming_shard_and_member(tmp_path: Path) -> None:
    url = _corrupt_dataset(tmp_path)
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(32, 32)))
    with pytest.raises(ShardError) as caught:
        list(train_batches(manifest, url, epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=4, shuffle_buffer=0,
                           decoder=decoder))
    message = str(caught.value)
    assert "train-00000.tar" in message and "train-000005.jpg" in message and "JPEG" in message


def test_corrupt_jpeg_skipped_and_counted_with_lockstep_kept(tmp_path: Path) -> None:
    url = _corrupt_dataset(tmp_path)
    manifest = read_manifest(url)
    decoder = SampleDecoder(manifest.spec, ImageTarget(channels=3, size=(32, 32)))
    reader = ShardReader(ReadOptions(on_corrupt="skip"), decoder)
    batches = list(train_batches(manifest, url, epoch=0, seed=0, rank=0, world_size=1, batch_per_rank=4,
                                 shuffle_buffer=0, reader=reader))
    assert len(batches) == 5  # 20 samples / 4: the lost one is made up by a refill, every step still runs
    keys = [k for b in batches for k in b.keys]
    assert "train-000005" not in keys and len(keys) == 20
    health = reader.stats
    assert health.skipped_samples == 1 and any("train-000005.jpg" in p for p in health.skipped_shards.values())


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    spec = SampleSpec(image="png", channels=1, size=None, label=None)
    decoder = SampleDecoder(spec, ImageTarget(channels=1, size=(8, 8)))
    limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, 1000
    try:
        # 1x-2x the limit: Pillow itself only warns; the contract refuses
        raw = encode_image(np.zeros((1, 40, 40), np.uint8), "png")
        with pytest.raises(ShardError, match="decompression-bomb limit"):
            decoder.decode({"png": raw}, "shard.tar", "k")
        raw = encode_image(np.zeros((1, 64, 64), np.uint8), "png")  # beyond 2x: Pillow's own error, named
        with pytest.raises(ShardError, match="shard.tar, member k.png.*DecompressionBomb"):
            decoder.decode({"png": raw}, "shard.tar", "k")
    finally:
        PILImage.MAX_IMAGE_PIXELS = limit


def test_a_declared_format_is_the_only_one_opened() -> None:
    """A PNG inside a member declared .jpg is refused, not decoded by whatever Pillow recognises."""
    spec = SampleSpec(image="jpg", channels=3, size=None, label=None)
    raw = encode_image(photo_crops(1)[0], "png")
    with pytest.raises(ShardError, match="undecodable JPEG"):
        SampleDecoder(spec, ImageTarget(channels=3, size=(8, 8))).decode({"jpg": raw}, "shard.tar", "k")
