"""Behaviour of the data layer: sources with bad data, buckets, augmentations, resume, sharding, records."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from sd3_jax.data import pipeline, records, sources
from sd3_jax.data.shapes import ShapesDataset


def _png(path, w, h, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path):
    """Five good captioned images (two 2:1, three square), one without caption, one corrupt."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 20), (40, 20), (24, 24), (24, 24), (24, 24)]):
        _png(root / ("sub" if i == 4 else "") / f"img{i}.png", w, h, i)
        (root / ("sub" if i == 4 else "") / f"img{i}.txt").write_text(f"caption {i}\n")
    _png(root / "nocap.jpg", 8, 8, 9)  # no nocap.txt
    (root / "bad.png").write_bytes(b"\x89PNG not really an image")
    (root / "bad.txt").write_text("a corrupt image")
    return root


def _memory_source(n, size=(12, 16), skip_every=0):
    """A list of records (lists are grain sources) with distinct random images; optionally some skips."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if skip_every and i % skip_every == skip_every - 1:
            out.append({"skip": True, "reason": "corrupt_image", "index": i})
        else:
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            out.append({"image": image, "caption": f"c{i}", "index": i})
    return out


# ---------------------------------------------------------------------------------------------------------
# Sources.


def test_folder_source_skips_missing_caption_and_corrupt_image(folder):
    src = sources.ImageCaptionFolder(folder)
    assert len(src) == 6  # five good plus the corrupt one, which is found only when read
    assert src.skip_counts == {"missing_caption": 1}
    assert src.skipped[0][0].endswith("nocap.jpg")
    items = [src[i] for i in range(len(src))]
    bad = [r for r in items if r.get("skip")]
    assert len(bad) == 1 and bad[0]["reason"] == "corrupt_image" and bad[0]["path"].endswith("bad.png")
    good = [r for r in items if not r.get("skip")]
    assert {r["caption"] for r in good} == {f"caption {i}" for i in range(5)}
    for r in good:
        assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3
        assert items[r["index"]] is r
    first = next(r for r in good if r["caption"] == "caption 0")
    np.testing.assert_array_equal(
        first["image"], np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    )
    assert src.image_size(first["index"]) == (40, 20)


def test_jsonl_source_resolves_paths_and_skips(folder, tmp_path):
    lines = [
        json.dumps({"image": "imgs/img0.png", "caption": "zero"}),
        json.dumps({"image": str(folder / "img2.png"), "caption": "absolute"}),
        json.dumps({"image": "imgs/img1.png"}),  # no caption
        "{not json",
        json.dumps({"image": "imgs/bad.png", "caption": "corrupt"}),
        json.dumps({"image": "imgs/gone.png", "caption": "missing file"}),
        json.dumps({"image": "imgs/img3.png", "caption": "  "}),
        "",
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    src = sources.JsonlSource(tmp_path / "data.jsonl")
    assert len(src) == 5
    assert src.skip_counts == {"missing_caption": 1, "bad_line": 1}
    assert src[0]["caption"] == "zero" and src[0]["image"].shape == (20, 40, 3)
    assert src[1]["image"].shape == (24, 24, 3)
    assert [src[i]["reason"] for i in (2, 3, 4)] == ["corrupt_image", "missing_image", "empty_caption"]
    assert isinstance(sources.open_source(tmp_path / "data.jsonl"), sources.JsonlSource)
    assert isinstance(sources.open_source(folder), sources.ImageCaptionFolder)


def test_loader_filters_and_counts_skips(folder):
    src = sources.ImageCaptionFolder(folder)
    tf = pipeline.image_transforms([(16, 16)], random_crop=False, flip_p=0.0)
    it = pipeline.make_loader(
        src, batch_size=2, seed=0, shuffle=False, num_epochs=1, transforms=tf, drop_remainder=False
    )
    batches = list(it)
    assert [len(b["caption"]) for b in batches] == [2, 2, 1]
    assert sorted(c for b in batches for c in b["caption"]) == [f"caption {i}" for i in range(5)]
    assert batches[0]["image"].dtype == np.float32 and batches[0]["image"].shape == (2, 16, 16, 3)
    assert -1.0 <= min(b["image"].min() for b in batches) and max(b["image"].max() for b in batches) <= 1.0
    assert it.skipped == {"corrupt_image": 1} and it.num_skipped == 1


def test_loader_accepts_shapes_dataset():
    ds = ShapesDataset(size=16, length=8, size_word_prob=0.0)
    it = pipeline.make_loader(ds, batch_size=4, seed=0, transforms=[pipeline.Normalize()])
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["caption"].dtype == object and all(c.startswith("a ") for c in batch["caption"])


def test_loader_refuses_all_bad_source():
    bad = [{"skip": True, "reason": "corrupt_image"}] * 3
    with pytest.raises(ValueError, match="no usable record"):
        next(pipeline.make_loader(bad, batch_size=1, seed=0))


# ---------------------------------------------------------------------------------------------------------
# Buckets, crops, flips.


def test_bucket_closed_forms():
    assert pipeline.buckets(64, 16) == [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
    assert pipeline.buckets(64, 64) == [(64, 64)]
    big = pipeline.buckets(1024, 64)
    assert len(big) == 13 and big[0] == (768, 1408) and big[6] == (1024, 1024) and big[-1] == (1408, 768)
    # Each height is the step multiple whose area is nearest 1024²: off by at most half a step of width.
    assert all(w % 64 == 0 and h % 64 == 0 and abs(w * h - 1024**2) <= 32 * max(w, h) for w, h in big)
    b = pipeline.buckets(64, 16)
    assert pipeline.nearest_bucket(200, 100, b) == (96, 48)  # 2:1 exactly
    assert pipeline.nearest_bucket(100, 200, b) == (48, 96)
    assert pipeline.nearest_bucket(100, 60, b) == (80, 48)  # 5:3 exactly
    assert pipeline.nearest_bucket(33, 32, b) == (64, 64)
    assert pipeline.nearest_bucket(1000, 100, b) == (96, 48)  # beyond max_ratio: the widest bucket
    out = pipeline.BucketResizeCrop(b).random_map({"image": np.zeros((100, 200, 3), np.uint8)}, None)
    assert out["image"].shape == (48, 96, 3)


def test_resize_covers_then_crops():
    image = np.zeros((30, 90, 3), np.uint8)
    image[:, 40:50] = 255  # a bright bar in the middle
    out = pipeline.BucketResizeCrop([(16, 16)]).random_map({"image": image}, None)["image"]
    assert out.shape == (16, 16, 3)  # resized to 48x16, centre crop keeps the bar centred
    assert (
        out[:, 7:9].mean() > 200 and out[:, :4].max() < 20 and out[:, -4:].max() < 20
    )  # Lanczos rings a little


def test_crop_and_flip_are_deterministic_per_seed():
    src = _memory_source(16, size=(20, 28))
    tf = pipeline.image_transforms([(16, 16)], random_crop=True, flip_p=0.5)

    def run(seed):
        return pipeline.take(pipeline.make_loader(src, batch_size=4, seed=seed, transforms=tf), 8)

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    # Epochs 1 and 2 see each record once, with fresh crops and flips.
    first = {i: im for x in a[:4] for i, im in zip(x["index"], x["image"])}
    second = {i: im for x in a[4:] for i, im in zip(x["index"], x["image"])}
    assert sorted(first) == sorted(second) == list(range(16))
    assert sum(np.array_equal(first[i], second[i]) for i in first) < 4


def test_flip_probability_one_and_zero():
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        np.testing.assert_array_equal(
            pipeline.RandomFlip(1.0).random_map({"image": image}, rng)["image"], image[:, ::-1]
        )
        np.testing.assert_array_equal(
            pipeline.RandomFlip(0.0).random_map({"image": image}, rng)["image"], image
        )
    src = _memory_source(8)
    base = pipeline.take(pipeline.make_loader(src, batch_size=8, seed=0, shuffle=False), 1)[0]
    for p, expect in ((1.0, base["image"][:, :, ::-1]), (0.0, base["image"])):
        got = pipeline.take(
            pipeline.make_loader(
                src, batch_size=8, seed=0, shuffle=False, transforms=[pipeline.RandomFlip(p)]
            ),
            1,
        )[0]
        np.testing.assert_array_equal(got["image"], expect)
    flips = [
        pipeline.RandomFlip(0.5).random_map({"image": image}, np.random.default_rng(s))["image"][0, 0, 0]
        != image[0, 0, 0]
        for s in range(400)
    ]
    assert 0.4 < np.mean(flips) < 0.6


# ---------------------------------------------------------------------------------------------------------
# Resume and sharding.


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_from_json_state_is_bitwise():
    src = _memory_source(13, size=(20, 28), skip_every=5)
    kwargs = dict(batch_size=3, seed=7, transforms=pipeline.image_transforms([(16, 16)], random_crop=True))
    it = pipeline.make_loader(src, **kwargs)
    pipeline.take(it, 4)
    state = pipeline.iterator_state_to_json(it)
    skipped_then = it.skipped
    expected = pipeline.take(it, 5)
    fresh = pipeline.restore_iterator(pipeline.make_loader(src, **kwargs), state)
    assert fresh.skipped == skipped_then and skipped_then["corrupt_image"] >= 1
    _assert_batches_equal(pipeline.take(fresh, 5), expected)
    assert fresh.skipped == it.skipped


def test_resume_with_bucket_groups(folder):
    src = sources.ImageCaptionFolder(folder)
    bucket_list = [(32, 16), (16, 16)]
    groups, unreadable = pipeline.bucket_groups(src, bucket_list)
    assert {k: len(v) for k, v in groups.items()} == {"16x16": 3, "32x16": 2} and len(unreadable) == 1
    kwargs = dict(
        batch_size=2,
        seed=3,
        groups=groups,
        transforms=pipeline.image_transforms(bucket_list, random_crop=True),
    )
    it = pipeline.make_loader(src, **kwargs)
    seen = pipeline.take(it, 3)
    state = pipeline.iterator_state_to_json(it)
    expected = pipeline.take(it, 4)
    assert {b["image"].shape[1:3] for b in seen + expected} == {(16, 16), (16, 32)}
    _assert_batches_equal(
        pipeline.take(pipeline.restore_iterator(pipeline.make_loader(src, **kwargs), state), 4), expected
    )


def test_resume_with_worker_processes():
    src = _memory_source(13, size=(20, 28), skip_every=5)
    kwargs = dict(batch_size=3, seed=7, worker_count=2, transforms=pipeline.image_transforms([(16, 16)]))
    it = pipeline.make_loader(src, **kwargs)
    first = pipeline.take(it, 3)
    state = pipeline.iterator_state_to_json(it)
    expected = pipeline.take(it, 3)
    fresh = pipeline.restore_iterator(pipeline.make_loader(src, **kwargs), state)
    got = pipeline.take(fresh, 3)
    counts = it.skipped, fresh.skipped
    it.close(), fresh.close()
    _assert_batches_equal(got, expected)
    assert type(got[0]["image"]) is np.ndarray  # copied out of grain's shared memory
    assert counts[0] == counts[1] and counts[0]["corrupt_image"] >= 2  # skips counted in the workers
    assert len({int(i) for b in first + expected for i in b["index"]}) == 11  # 18 examples, the 11 good ones


def test_orbax_checkpoint_of_iterator(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = _memory_source(10)
    it = pipeline.make_loader(src, batch_size=2, seed=0)
    pipeline.take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = pipeline.take(it, 3)
    fresh = pipeline.make_loader(src, batch_size=2, seed=0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(pipeline.take(fresh, 3), expected)


@pytest.mark.parametrize("n", [20, 21])
def test_shards_are_disjoint_and_cover_the_epoch(n):
    src = _memory_source(n)
    seen = []
    for shard in range(2):
        it = pipeline.make_loader(src, batch_size=2, seed=0, num_epochs=1, shard_index=shard, shard_count=2)
        seen.append([int(i) for b in it for i in b["index"]])
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert union == set(range(20)) if n == 20 else len(union) == 20  # 21: one record waits for epoch 2
    assert seen[0] != sorted(seen[0])  # shuffled


def test_global_batches_do_not_depend_on_process_count():
    src = _memory_source(12, size=(20, 28))
    tf = pipeline.image_transforms([(16, 16)], random_crop=True)
    one = pipeline.take(pipeline.make_loader(src, batch_size=4, seed=5, transforms=tf, shard_count=1), 6)
    two = [
        pipeline.take(
            pipeline.make_loader(src, batch_size=2, seed=5, transforms=tf, shard_index=p, shard_count=2), 6
        )
        for p in range(2)
    ]
    for k, batch in enumerate(one):
        merged = {int(i): im for b in (two[0][k], two[1][k]) for i, im in zip(b["index"], b["image"])}
        assert sorted(merged) == sorted(int(i) for i in batch["index"])
        for i, im in zip(batch["index"], batch["image"]):
            np.testing.assert_array_equal(merged[int(i)], im)  # same crop and flip on either layout


# ---------------------------------------------------------------------------------------------------------
# Records and prepare.


def test_records_round_trip_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    examples = [
        {
            "latents": rng.standard_normal((4, 2, 3)).astype(np.float32),
            "t5": rng.standard_normal((5, 8)).astype(ml_dtypes.bfloat16),
            "pooled_l": rng.standard_normal(6).astype(np.float16),
            "ids": rng.integers(-(2**31), 2**31 - 1, (3,), dtype=np.int32),
            "flag": np.array(bool(i % 2)),
            "caption": np.asarray(f"caption {i} ünïcode"),
            "empty": np.zeros((0, 3), np.float32),
            "strided": np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2].T,  # not C-contiguous
        }
        for i in range(7)
    ]
    examples[3]["latents"][0, 0, 0] = np.nan
    index = records.write_records(tmp_path / "out" / "train", iter(examples), num_shards=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train-00000-of-00003.array_record",
        "train-00001-of-00003.array_record",
        "train-00002-of-00003.array_record",
        "train.json",
    ]
    on_disk = json.loads((tmp_path / "out" / "train.json").read_text())
    assert on_disk == json.loads(json.dumps(index))
    assert on_disk["count"] == 7 and on_disk["shard_counts"] == [3, 2, 2] and "groups" not in on_disk
    assert on_disk["dtypes"]["t5"] == "bfloat16" and on_disk["shapes"]["t5"] == [5, 8]
    src = records.PreparedSource(tmp_path / "out" / "train")
    assert len(src) == 7
    for i, ex in enumerate(examples):
        got = src[i]
        assert got.keys() == ex.keys()
        for k in ex:
            assert got[k].dtype == ex[k].dtype and got[k].shape == ex[k].shape
            assert got[k].tobytes() == ex[k].tobytes()
    assert isinstance(sources.open_source(tmp_path / "out" / "train"), records.PreparedSource)


def _fake_encode(calls):
    def encode(images, captions):
        calls.append(len(images))
        assert images.dtype == np.float32 and -1 <= images.min() and images.max() <= 1
        mean = images.mean(axis=(1, 2))  # (B, 3)
        return {
            "latents": np.broadcast_to(mean[:, None, None, :], (len(images), 2, 2, 3)).astype(np.float32),
            "pooled_l": np.array([[len(c)] for c in captions], np.float32),
        }

    return encode


def test_prepare_matches_encode_fn_and_counts_skips(folder, tmp_path):
    src = sources.ImageCaptionFolder(folder)
    calls = []
    tf = [pipeline.BucketResizeCrop([(16, 16)])]
    stats = records.prepare(
        src, _fake_encode(calls), tmp_path / "prep", batch_size=2, num_shards=2, transforms=tf
    )
    assert stats == {"written": 5, "skipped": 2, "reasons": {"corrupt_image": 1, "missing_caption": 1}}
    assert calls == [2, 2, 2]  # the last, single image is padded to the batch size
    prepared = records.PreparedSource(tmp_path / "prep")
    assert prepared.metadata["prepare"]["reasons"] == stats["reasons"]
    good = [r for r in (src[i] for i in range(len(src))) if not r.get("skip")]
    assert len(prepared) == len(good)
    for i, r in enumerate(good):
        image = pipeline.normalize(pipeline.apply_transforms(r, tf, None)["image"])
        expect = np.broadcast_to(image.mean(axis=(0, 1)), (2, 2, 3)).astype(np.float32)
        assert prepared[i]["latents"].tobytes() == expect.tobytes()
        assert prepared[i]["pooled_l"][0] == len(r["caption"])
    batch = next(pipeline.make_loader(prepared, batch_size=4, seed=0))
    assert batch.keys() == {"latents", "pooled_l"} and batch["latents"].shape == (4, 2, 2, 3)


def test_prepare_with_buckets_groups_records(folder, tmp_path):
    src = sources.ImageCaptionFolder(folder)
    bucket_list = [(32, 16), (16, 16)]

    def encode(images, captions):
        return {"latents": images[:, ::8, ::8, :].copy()}

    tf = [pipeline.BucketResizeCrop(bucket_list)]
    stats = records.prepare(src, encode, tmp_path / "b", batch_size=2, num_shards=1, transforms=tf)
    prepared = records.PreparedSource(tmp_path / "b")
    assert stats["written"] == 5 and prepared.index["shapes"]["latents"] is None
    groups = prepared.groups()
    assert sorted(len(v) for v in groups.values()) == [2, 3]
    it = pipeline.make_loader(prepared, batch_size=2, seed=0, groups=groups)
    assert {next(it)["latents"].shape for _ in range(6)} == {(2, 2, 2, 3), (2, 2, 4, 3)}


def test_failed_prepare_leaves_no_index(folder, tmp_path):
    src = sources.ImageCaptionFolder(folder)
    tf = [pipeline.BucketResizeCrop([(16, 16)])]
    records.prepare(src, _fake_encode([]), tmp_path / "p", batch_size=2, num_shards=2, transforms=tf)
    assert (tmp_path / "p.json").exists()  # a completed earlier run
    calls = []

    def flaky(images, captions):
        if calls:
            raise RuntimeError("encoder fell over")
        return _fake_encode(calls)(images, captions)

    with pytest.raises(RuntimeError, match="fell over"):
        records.prepare(src, flaky, tmp_path / "p", batch_size=2, num_shards=2, transforms=tf)
    assert not (tmp_path / "p.json").exists()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        records.PreparedSource(tmp_path / "p")
