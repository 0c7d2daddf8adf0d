"""Data sources: shapes and dtypes, a fixed disjoint split, correct normalisation, bad files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hawada.core.data import DataBundle, load_data
from hawada.core.errors import DataError
from hawada.core.recipe import Recipe, parse_recipe

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)


def _recipe(data: dict, size: int = 16, num_classes: int = 10) -> Recipe:
    return parse_recipe(
        {
            "model": {
                "arch": "resnet18",
                "num_classes": num_classes,
                "input_size": [3, size, size],
                "normalize": {"mean": list(MEAN), "std": list(STD)},
            },
            "data": data,
        }
    )


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 pixel values (rounded)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round()


def _index_npz(path: Path, n: int, size: int = 16, classes: int = 4) -> Path:
    """Each image is filled with its own index, so batches reveal which samples they hold."""
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size)).copy()
    y = np.arange(n) % classes
    np.savez(path, x=x, y=y)
    return path


def _ids(x: torch.Tensor) -> list[int]:
    return _denormalise(x)[:, 0, 0, 0].long().tolist()


@pytest.mark.parametrize(
    ("source", "channels", "total"),
    [("synthetic", 3, 40), ("digits", 1, 40), ("mnist-5k", 1, 40), ("fashion-mnist", 1, 40)],
)
def test_builtin_sources_shapes_and_dtypes(source: str, channels: int, total: int) -> None:
    bundle = load_data(_recipe({"source": source, "limit": total, "val_fraction": 0.25}))
    assert bundle.images.dtype == torch.uint8
    assert tuple(bundle.images.shape) == (total, channels, 16, 16)
    assert bundle.labels.dtype == torch.int64
    assert (bundle.n_train, bundle.n_heldout) == (30, 10)
    assert 1 <= bundle.num_classes <= 10
    x, y = next(bundle.train_batches(8, seed=0))
    assert x.dtype == torch.float32 and tuple(x.shape) == (8, 3, 16, 16)
    assert y.dtype == torch.int64 and tuple(y.shape) == (8,) and int(y.max()) < 10
    assert bundle.labelled == (source != "synthetic")
    assert bundle.describe()["n_train"] == 30


def test_class_count_is_the_datasets_not_the_subsets() -> None:
    bundle = load_data(_recipe({"source": "mnist-5k", "limit": 3}))
    assert bundle.num_classes == 10 and bundle.n_train + bundle.n_heldout == 3


def test_digits_pixel_scale() -> None:
    # sklearn's 0..16 intensities must span the full byte range, not stay dark.
    bundle = load_data(_recipe({"source": "digits", "limit": 200}, size=8))
    assert int(bundle.images.max()) == 255 and int(bundle.images.min()) == 0


def test_mnist_5k_labels_are_the_last_column() -> None:
    bundle = load_data(_recipe({"source": "mnist-5k", "limit": 500}, size=28))
    counts = torch.bincount(bundle.labels, minlength=10)
    assert bool((counts > 20).all())  # all ten digits present, not pixel values
    assert int(bundle.images.max()) == 255


@pytest.mark.slow
def test_fashion_mnist_trains_on_train_and_holds_out_from_test() -> None:
    bundle = load_data(_recipe({"source": "fashion-mnist"}, size=28))
    assert bundle.n_train == 60_000  # the whole official train split, nothing pooled
    assert bundle.n_heldout == 7_000 and bundle.num_classes == 10
    assert bundle.heldout_source == "official-test"
    assert int(bundle.heldout_ids.max()) < 10_000


def test_fashion_mnist_heldout_comes_only_from_the_test_split(tmp_path: Path) -> None:
    # train images are filled with 1..60, test images with 101..140: pixels reveal the split
    x_tr = np.broadcast_to(np.arange(1, 61, dtype=np.uint8)[:, None, None], (60, 28, 28)).copy()
    x_te = np.broadcast_to(np.arange(101, 141, dtype=np.uint8)[:, None, None], (40, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", x_tr, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(60) % 3, False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x_te.copy(), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(40) % 3, False)
    spec = {"source": "fashion-mnist", "path": str(tmp_path), "limit": 50, "val_fraction": 0.2}
    bundle = load_data(_recipe(spec, size=28))
    assert (bundle.n_train, bundle.n_heldout) == (40, 10)
    train_px = bundle.images[bundle.train_idx][:, 0, 0, 0]
    held_px = bundle.images[bundle.heldout_idx][:, 0, 0, 0]
    assert bool((train_px <= 60).all()) and bool((held_px > 100).all())
    assert held_px.tolist() == (bundle.heldout_ids + 101).tolist()  # ids index the test split
    same = load_data(_recipe(spec, size=28))
    other = load_data(_recipe({**spec, "seed": 1}, size=28))
    assert same.heldout_fingerprint() == bundle.heldout_fingerprint()
    assert other.heldout_fingerprint() != bundle.heldout_fingerprint()
    assert bundle.describe()["heldout_source"] == "official-test"


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_path(tmp_path: Path, gz: bool) -> None:
    suffix = ".gz" if gz else ""
    x = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = np.arange(12) % 3
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", x, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", y, gz)
    bundle = load_data(
        _recipe({"source": "fashion-mnist", "path": str(tmp_path), "val_fraction": 0.25}, size=28)
    )
    assert bundle.n_train + bundle.n_heldout == 12 and bundle.num_classes == 3
    assert torch.equal(bundle.images[:, 0].sort(0).values, torch.from_numpy(x).sort(0).values)


def test_fashion_mnist_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        load_data(_recipe({"source": "fashion-mnist", "path": str(tmp_path)}))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        load_data(_recipe({"source": "fashion-mnist", "path": str(tmp_path)}))
    assert info.value.code == "bad_dataset"


def test_split_disjoint_deterministic_and_seeded(tmp_path: Path) -> None:
    path = _index_npz(tmp_path / "d.npz", 100)
    recipe = _recipe({"source": "npz", "path": str(path), "val_fraction": 0.2, "seed": 3})
    a, b = load_data(recipe), load_data(recipe)
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.heldout_idx, b.heldout_idx)
    train, held = set(a.train_idx.tolist()), set(a.heldout_idx.tolist())
    assert not train & held and train | held == set(range(100)) and len(held) == 20
    other = load_data(_recipe({"source": "npz", "path": str(path), "val_fraction": 0.2, "seed": 4}))
    assert set(other.heldout_idx.tolist()) != held
    # The batches really come from their split.
    held_seen = [i for x, _ in a.heldout_batches(7) for i in _ids(x)]
    assert sorted(held_seen) == sorted(held)
    train_seen = [i for x, _ in a.train_epoch(10, seed=0) for i in _ids(x)]
    assert sorted(train_seen) == sorted(train)


def test_train_batches_reshuffle_each_epoch_and_are_seeded(tmp_path: Path) -> None:
    path = _index_npz(tmp_path / "d.npz", 40)
    bundle = load_data(_recipe({"source": "npz", "path": str(path), "val_fraction": 0.2}))
    stream = bundle.train_batches(8, seed=1)
    epoch1 = [i for _ in range(4) for i in _ids(next(stream)[0])]
    epoch2 = [i for _ in range(4) for i in _ids(next(stream)[0])]
    assert sorted(epoch1) == sorted(epoch2) == sorted(bundle.train_idx.tolist())
    assert epoch1 != epoch2
    again = bundle.train_batches(8, seed=1)
    assert [i for _ in range(4) for i in _ids(next(again)[0])] == epoch1
    assert bundle.batches_per_epoch(8) == 4


def test_train_epoch_drops_short_remainder_but_small_sets_still_batch(tmp_path: Path) -> None:
    path = _index_npz(tmp_path / "d.npz", 25)
    bundle = load_data(_recipe({"source": "npz", "path": str(path), "val_fraction": 0.2}))
    assert [len(y) for _, y in bundle.train_epoch(8)] == [8, 8]  # 20 train samples
    assert [len(y) for _, y in bundle.train_epoch(64)] == [20]
    assert [len(y) for _, y in bundle.heldout_batches(2)] == [2, 2, 1]


def test_normalisation_grayscale_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (10, 16, 16), dtype=np.uint8)
    rgb = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    for x in (gray, rgb):
        path = tmp_path / "d.npz"
        np.savez(path, x=x, y=np.zeros(10, dtype=np.int64))
        bundle = load_data(_recipe({"source": "npz", "path": str(path), "val_fraction": 0.5}))
        xb, _ = next(bundle.heldout_batches(100))
        raw = torch.from_numpy(x)[bundle.heldout_idx].float() / 255
        raw = raw.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else raw.permute(0, 3, 1, 2)
        expected = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert xb.shape == expected.shape and xb.is_contiguous()
        torch.testing.assert_close(xb, expected, rtol=0, atol=1e-5)


def test_resize_keeps_constant_images_constant(tmp_path: Path) -> None:
    x = np.full((4, 28, 20), 200, dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(4))
    bundle = load_data(_recipe({"source": "npz", "path": str(path), "val_fraction": 0.5}, size=12))
    assert tuple(bundle.images.shape) == (4, 1, 12, 12)
    assert bool((bundle.images == 200).all())


def test_npz_upload_and_limit(tmp_path: Path) -> None:
    upload = _index_npz(tmp_path / "upload.bin.npz", 50)
    bundle = load_data(
        _recipe({"source": "upload", "limit": 20, "val_fraction": 0.25}), upload=upload
    )
    assert bundle.n_train + bundle.n_heldout == 20 and bundle.num_classes <= 4
    ids = sorted(
        _ids(next(bundle.heldout_batches(100))[0])
        + [i for x, _ in bundle.train_epoch(15) for i in _ids(x)]
    )
    assert len(set(ids)) == 20 and set(ids) <= set(range(50))
    # npz without data.path falls back to the upload too
    assert load_data(_recipe({"source": "npz"}), upload=upload).n_heldout == 5


def test_upload_source_without_upload(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uploaded dataset"):
        load_data(_recipe({"source": "upload"}))


def test_too_many_classes_names_both_counts(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20))
    with pytest.raises(DataError) as info:
        load_data(_recipe({"source": "npz", "path": str(path)}, num_classes=10))
    assert "20 classes" in info.value.message and "model.num_classes is 10" in info.value.message


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((4, 8, 8), np.float32), "y": np.zeros(4, np.int64)}, "uint8"),
        ({"x": np.zeros((4, 8, 8, 2), np.uint8), "y": np.zeros(4, np.int64)}, "N×H×W"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(3, np.int64)}, "one label per image"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.float32)}, "integers"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": -np.ones(4, np.int64)}, ">= 0"),
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "'x' and 'y'"),
        (
            {"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, {}, 2], dtype=object)},
            "pickle",
        ),
    ],
)
def test_bad_npz_rejected(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        load_data(_recipe({"source": "npz", "path": str(path)}))


def test_garbage_and_missing_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"not a valid \.npz"):
        load_data(_recipe({"source": "npz", "path": str(path)}))
    with pytest.raises(DataError, match="not found"):
        load_data(_recipe({"source": "npz", "path": str(tmp_path / "nope.npz")}))


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 4), ("dog", 3), ("emu", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            h, w = 20 + i, 30 - i  # images of different sizes
            mode = "L" if i == 0 else "RGB"
            arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(root / cls / f"{i}.png")


def test_folder_source(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    bundle = load_data(
        _recipe({"source": "folder", "path": str(tmp_path / "imgs"), "val_fraction": 0.2})
    )
    assert tuple(bundle.images.shape) == (10, 3, 16, 16) and bundle.images.dtype == torch.uint8
    assert bundle.num_classes == 3
    assert sorted(bundle.labels.tolist()) == [0] * 4 + [1] * 3 + [2] * 3
    assert (bundle.n_train, bundle.n_heldout) == (8, 2)
    limited = load_data(_recipe({"source": "folder", "path": str(tmp_path / "imgs"), "limit": 5}))
    assert limited.n_train + limited.n_heldout == 5


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        load_data(_recipe({"source": "folder", "path": str(tmp_path / "missing")}))
    _write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"dog/broken\.png"):
        load_data(_recipe({"source": "folder", "path": str(tmp_path / "imgs")}))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="class folder"):  # images but no class sub-folders
        load_data(_recipe({"source": "folder", "path": str(tmp_path / "flat")}))
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_data(_recipe({"source": "folder", "path": str(tmp_path / "flat")}))


def test_allowed_roots_confine_data_path(tmp_path: Path) -> None:
    path = _index_npz(tmp_path / "d.npz", 10)
    recipe = _recipe({"source": "npz", "path": str(path)})
    assert load_data(recipe, allowed_roots=[tmp_path]).n_train == 9
    with pytest.raises(DataError, match="outside the allowed"):
        load_data(recipe, allowed_roots=[tmp_path / "elsewhere"])


def test_bundle_is_a_databundle_with_recipe_batch_size() -> None:
    bundle = load_data(_recipe({"source": "synthetic", "limit": 30, "batch_size": 4}))
    assert isinstance(bundle, DataBundle)
    assert len(next(bundle.train_batches())[1]) == 4
    assert bundle.input_size == (3, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_match_cpu() -> None:
    bundle = load_data(_recipe({"source": "digits", "limit": 64}))
    (xc, yc), (xg, yg) = (
        next(bundle.heldout_batches(16)),
        next(bundle.heldout_batches(16, device="cuda")),
    )
    assert xg.is_cuda and yg.is_cuda
    torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
    assert torch.equal(yg.cpu(), yc)


# --- the held-out set the user chooses -------------------------------------------------------


def test_heldout_npz_path_and_upload_replace_the_split(tmp_path: Path) -> None:
    train = _index_npz(tmp_path / "train.npz", 40)
    x = np.broadcast_to((100 + np.arange(12, dtype=np.uint8))[:, None, None], (12, 16, 16))
    np.savez(tmp_path / "held.npz", x=x.copy(), y=np.arange(12) % 4)
    for kw, data, source in (
        ({}, {"heldout_path": str(tmp_path / "held.npz")}, "heldout_path"),
        ({"heldout": tmp_path / "held.npz"}, {}, "upload"),
    ):
        recipe = _recipe({"source": "npz", "path": str(train), **data})
        bundle = load_data(recipe, allowed_roots=[tmp_path], **kw)
        assert (bundle.n_train, bundle.n_heldout) == (40, 12)  # all 40 train, no split
        assert bundle.heldout_info() == {"source": source, "size": 12}
        held_seen = sorted(i for x, _ in bundle.heldout_batches(5) for i in _ids(x))
        assert held_seen == list(range(100, 112))
        train_seen = sorted(i for x, _ in bundle.train_epoch(8) for i in _ids(x))
        assert train_seen == list(range(40))
    assert load_data(_recipe({"source": "npz", "path": str(train)})).heldout_info() == {
        "source": "split",
        "size": 4,
    }


def test_heldout_outside_roots_or_with_unknown_labels(tmp_path: Path) -> None:
    train = tmp_path / "train.npz"
    np.savez(train, x=np.zeros((8, 8, 8), np.uint8), y=np.arange(8) % 3)  # labels 0..2
    held = tmp_path / "held.npz"
    np.savez(held, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 3, 3]))
    recipe = _recipe({"source": "npz", "path": str(train), "heldout_path": str(held)})
    with pytest.raises(DataError) as info:
        load_data(recipe)
    assert info.value.code == "heldout_mismatch" and "[3]" in info.value.message
    with pytest.raises(DataError, match=r"data\.heldout_path .*HAWADA_DATA_ROOTS"):
        load_data(recipe, allowed_roots=[tmp_path / "only-here"])


def _jpeg_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (80, 100)) -> None:
    rng = np.random.default_rng(1)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.jpg", quality=85)


def test_heldout_folder_classes_must_match(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    _jpeg_folder(tmp_path / "held", {"cat": 2, "dog": 1})
    data = {"source": "folder", "path": str(tmp_path / "train")}
    bundle = load_data(_recipe({**data, "heldout_path": str(tmp_path / "held")}))
    assert (bundle.n_train, bundle.n_heldout, bundle.num_classes) == (6, 3, 2)
    assert sorted(y for _, ys in bundle.heldout_batches(8) for y in ys.tolist()) == [0, 0, 1]
    _jpeg_folder(tmp_path / "other", {"cat": 1, "emu": 1})
    with pytest.raises(DataError) as info:
        load_data(_recipe({**data, "heldout_path": str(tmp_path / "other")}))
    assert info.value.code == "heldout_mismatch"
    assert "['dog']" in info.value.message and "['emu']" in info.value.message


# --- streaming, corrupt files, augmentation ---------------------------------------------------


def _flat(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_loader_serves_what_memory_serves(tmp_path: Path, workers: int) -> None:
    _jpeg_folder(tmp_path / "imgs", {"a": 5, "b": 4, "c": 3})
    data = {"source": "folder", "path": str(tmp_path / "imgs"), "val_fraction": 0.25}
    mem = load_data(_recipe({**data, "loader": "memory"}, size=24))
    stream = load_data(_recipe({**data, "loader": "stream", "workers": workers}, size=24))
    assert (mem.loader, stream.loader) == ("memory", "stream") and not stream.augment
    assert (stream.n_train, stream.n_heldout) == (mem.n_train, mem.n_heldout) == (9, 3)
    # the same held-out images, decoded the same way, in the same order
    xm, ym = _flat(mem.heldout_batches(2))
    xs, ys = _flat(stream.heldout_batches(2))
    assert torch.equal(ym, ys) and torch.equal(xm, xs)
    # one training epoch covers the training split once (short remainder dropped)
    _, yt = _flat(stream.train_epoch(4, seed=0))
    assert len(yt) == 8 and set(yt.tolist()) <= {0, 1, 2}
    x, y = next(stream.train_batches(4, seed=0))
    assert x.dtype == torch.float32 and tuple(x.shape) == (4, 3, 24, 24) and y.dtype == torch.int64
    # a small folder picks memory by itself; past memory_limit_mb it streams
    assert load_data(_recipe(data, size=24)).loader == "memory"
    big = load_data(_recipe({**data, "memory_limit_mb": 1}, size=512))
    assert big.loader == "stream" and big.describe()["loader"] == "stream"


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_corrupt_jpeg_fails_naming_it_or_is_skipped_and_counted(
    tmp_path: Path, loader: str
) -> None:
    _jpeg_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    good = (tmp_path / "imgs" / "b" / "0.jpg").read_bytes()
    (tmp_path / "imgs" / "b" / "9.jpg").write_bytes(good[:200])  # truncated
    (tmp_path / "imgs" / "a" / "8.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = {"source": "folder", "path": str(tmp_path / "imgs"), "loader": loader, "workers": 0}

    def use_all() -> None:  # streaming decodes (and fails) only when batches are drawn
        bundle = load_data(_recipe({**data, "val_fraction": 0.5}, size=16))
        list(bundle.train_epoch(2))
        list(bundle.heldout_batches(2))

    with pytest.raises(DataError, match=r"cannot decode (a/8|b/9)\.jpg") as info:
        use_all()
    assert info.value.code == "bad_dataset" and "on_corrupt: skip" in info.value.message
    bundle = load_data(_recipe({**data, "val_fraction": 0.5, "on_corrupt": "skip"}, size=16))
    seen = sum(len(y) for _, y in bundle.heldout_batches(3)) + sum(
        len(y) for _, y in bundle.train_epoch(1)
    )
    assert seen == 8 and bundle.skipped == 2 and bundle.describe()["skipped_files"] == 2


def test_augmentation_defaults_and_effect(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path / "imgs", {"a": 6, "b": 6}, size=(120, 120))
    data = {"source": "folder", "path": str(tmp_path / "imgs"), "val_fraction": 0.25}
    assert not load_data(_recipe(data, size=64)).augment  # auto: <= 64 px, none
    for loader in ("memory", "stream"):
        aug = load_data(_recipe({**data, "loader": loader, "workers": 0}, size=96))
        plain = load_data(
            _recipe({**data, "loader": loader, "workers": 0, "augment": "none"}, size=96)
        )
        assert aug.augment and not plain.augment and aug.describe()["augment"] == "standard"
        # held-out batches are never augmented: deterministic, equal with and without
        xa, _ = _flat(aug.heldout_batches(4))
        assert torch.equal(xa, _flat(aug.heldout_batches(4))[0])
        xt_aug, yt_aug = next(aug.train_batches(4, seed=0))
        xt_plain, yt_plain = next(plain.train_batches(4, seed=0))
        assert xt_aug.shape == xt_plain.shape == (4, 3, 96, 96)
        if loader == "memory":  # same batch order, different pixels
            assert torch.equal(yt_aug, yt_plain)
        assert not torch.equal(xt_aug, xt_plain)


def test_folder_labels_beyond_num_classes(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path / "imgs", {"a": 2, "b": 2, "c": 2}, size=(8, 8))
    with pytest.raises(DataError, match=r"3 classes but model\.num_classes is 2"):
        load_data(_recipe({"source": "folder", "path": str(tmp_path / "imgs")}, num_classes=2))


def _shards(root: Path, n_shards: int, per_shard: int, classes: int = 3, broken: str = "") -> Path:
    import webdataset as wds

    root.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"train-{s:04d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                buf = io.BytesIO()
                arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(buf, format="JPEG")
                jpg = b"\xff\xd8 broken" if key == broken else buf.getvalue()
                sink.write({"__key__": key, "jpg": jpg, "cls": str((s + i) % classes)})
    return root


def test_webdataset_shards_stream_with_a_seeded_hash_split(tmp_path: Path) -> None:
    root = _shards(tmp_path / "wds", n_shards=3, per_shard=20)
    data = {"source": "webdataset", "path": str(root), "val_fraction": 0.25, "workers": 2}
    bundle = load_data(_recipe(data, size=24, num_classes=3))
    assert bundle.loader == "stream" and bundle.n_train + bundle.n_heldout == 60
    assert 5 <= bundle.n_heldout <= 25  # a hash split: about a quarter, the same every run
    assert load_data(_recipe(data, size=24, num_classes=3)).n_heldout == bundle.n_heldout
    xh, yh = _flat(bundle.heldout_batches(7))
    assert len(yh) == bundle.n_heldout and xh.shape[1:] == (3, 24, 24)
    torch.testing.assert_close(_flat(bundle.heldout_batches(7))[0], xh)  # deterministic
    _, yt = _flat(bundle.train_epoch(5, seed=0))
    assert bundle.n_train - 2 * 5 < len(yt) <= bundle.n_train  # each worker drops < one batch
    pattern = str(root / "train-{0000..0002}.tar")
    assert load_data(_recipe({**data, "path": pattern}, size=24, num_classes=3)).n_train == (
        bundle.n_train
    )
    # a separate held-out shard set
    held = _shards(tmp_path / "held", n_shards=1, per_shard=9)
    both = load_data(_recipe({**data, "heldout_path": str(held)}, size=24, num_classes=3))
    assert (both.n_train, both.n_heldout, both.heldout_source) == (60, 9, "heldout_path")


def test_webdataset_bad_input(tmp_path: Path) -> None:
    root = _shards(tmp_path / "wds", n_shards=1, per_shard=12, classes=5, broken="s0_0003")
    data = {"source": "webdataset", "path": str(root), "workers": 0, "val_fraction": 0.5}
    with pytest.raises(DataError, match=r"out of range: model\.num_classes is 2"):
        list(load_data(_recipe(data, size=16, num_classes=2)).train_epoch(4))
    bundle = load_data(_recipe(data, size=16, num_classes=5))
    with pytest.raises(DataError, match="cannot decode s0_0003"):
        list(bundle.train_epoch(4)) + list(bundle.heldout_batches(4))
    skip = load_data(_recipe({**data, "on_corrupt": "skip"}, size=16, num_classes=5))
    seen = sum(len(y) for _, y in skip.heldout_batches(4)) + sum(
        len(y) for _, y in skip.train_epoch(1)
    )
    assert seen == 11 and skip.skipped == 1
    with pytest.raises(DataError, match=r"no \.tar shards"):
        load_data(_recipe({**data, "path": str(tmp_path)}, size=16, num_classes=5))
    with pytest.raises(DataError, match="not found"):
        load_data(_recipe({**data, "path": str(root / "x-{0..3}.tar")}, size=16, num_classes=5))


def _stream_in_daemon(root: str, queue: object) -> None:
    bundle = load_data(
        _recipe({"source": "folder", "path": root, "loader": "stream", "workers": 2}, size=16)
    )
    queue.put(sum(len(y) for _, y in bundle.heldout_batches(4)) + bundle.n_train)  # type: ignore[attr-defined]


def test_stream_workers_start_inside_a_celery_prefork_child(tmp_path: Path) -> None:
    """Celery runs jobs in daemonic billiard children; DataLoader workers must still start
    (multiprocessing refuses children to daemons unless the loader lifts the flag)."""
    billiard = pytest.importorskip("billiard")
    _jpeg_folder(tmp_path / "imgs", {"a": 5, "b": 5}, size=(20, 20))
    queue = billiard.Queue()
    child = billiard.Process(
        target=_stream_in_daemon, args=(str(tmp_path / "imgs"), queue), daemon=True
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0 and queue.get(timeout=5) == 10


def test_npz_bound_is_the_callers_limit(tmp_path: Path) -> None:
    """`max_dataset_bytes` (the service's HAWADA_MAX_DATASET_BYTES) bounds a data.path .npz and
    an uploaded held-out set by their declared size, before anything is inflated."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((64, 32, 32), np.uint8), y=np.arange(64) % 4)  # 64 KiB + 512 B
    recipe = _recipe({"source": "npz", "path": str(path)}, num_classes=4)
    assert load_data(recipe, max_dataset_bytes=1 << 20).n_train > 0
    with pytest.raises(DataError) as info:
        load_data(recipe, max_dataset_bytes=32 << 10)
    assert "HAWADA_MAX_DATASET_BYTES" in info.value.message
    held = tmp_path / "held.npz"
    np.savez(held, x=np.zeros((64, 32, 32), np.uint8), y=np.arange(64) % 4)
    synthetic = _recipe({"source": "synthetic", "limit": 16}, num_classes=4)
    with pytest.raises(DataError, match="HAWADA_MAX_DATASET_BYTES"):
        load_data(synthetic, heldout=held, max_dataset_bytes=32 << 10)
    assert load_data(recipe).n_train > 0  # the default bound (8 GiB) is restored after a call
