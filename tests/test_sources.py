"""Dataset sources: synthetic, the real CIFAR-10 offline copy, the bundled sample, ImageFolder,
and the name-or-directory resolution of `spec_for`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raypurify import config
from raypurify.data import registry
from raypurify.data.interchange import write_images
from raypurify.data.spec import DatasetSpec
from raypurify.errors import ConfigError, DatasetError

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def load(**fields):
    return registry.load(DatasetSpec(**fields))


# ---------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_for_a_seed():
    a = load(name="synthetic", rows=60, size=16, classes=4, seed=3)
    b = load(name="synthetic", rows=60, size=16, classes=4, seed=3)
    assert a.images.shape == (60, 16, 16, 3) and a.images.dtype == np.uint8
    assert a.classes == ["class0", "class1", "class2", "class3"]
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.index, np.arange(60))
    assert np.array_equal(a.class_counts(), [15, 15, 15, 15])


def test_synthetic_differs_across_seeds_and_splits():
    a = load(name="synthetic", rows=60, size=16, classes=4, seed=3)
    b = load(name="synthetic", rows=60, size=16, classes=4, seed=4)
    test = load(name="synthetic", rows=60, size=16, classes=4, seed=3, split="test")
    assert not np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, test.images)
    assert a.images.std() > 10  # not a constant image


def test_synthetic_defaults():
    train = load(name="synthetic")
    test = load(name="synthetic", split="test")
    assert train.images.shape == (1000, 32, 32, 3)
    assert len(test) == 500
    assert train.num_classes == 10


def test_balanced_subset_is_balanced_and_reproducible():
    spec = dict(name="synthetic", rows=200, size=8, classes=5, seed=1)
    a = load(**spec, subset=50)
    b = load(**spec, subset=50)
    c = registry.load(DatasetSpec(**spec, subset=50).model_copy(update={"seed": 2}))
    assert len(a) == 50
    assert np.array_equal(a.class_counts(), [10] * 5)
    assert np.array_equal(a.index, b.index)
    assert np.array_equal(a.images, b.images)
    assert np.all(np.diff(a.index) > 0)  # sorted, distinct
    # The subset rows are the full dataset's rows, by index.
    full = load(**spec)
    assert np.array_equal(full.images[a.index], a.images)
    assert np.array_equal(full.labels[a.index], a.labels)
    # A different seed draws different rows (and different images).
    assert not np.array_equal(a.index, c.index)


def test_uneven_subset_and_too_large_subset():
    data = load(name="synthetic", rows=40, size=8, classes=4, subset=10)
    assert np.array_equal(data.class_counts(), [3, 3, 2, 2])
    with pytest.raises(DatasetError, match="needs 11 images of class 0, only 10 exist"):
        load(name="synthetic", rows=40, size=8, classes=4, subset=41)


# ---------------------------------------------------------------------------------------
# cifar10 resolution


def test_cifar10_from_explicit_path(cifar10_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("RAYPURIFY_DATA_DIR", str(tmp_path))  # not used when path is given
    data = load(name="cifar10", path=str(cifar10_dir), split="test", subset=200, seed=1)
    assert len(data) == 200
    assert data.shape == (32, 32, 3)
    assert data.classes == CIFAR_CLASSES
    assert np.array_equal(data.class_counts(), [20] * 10)
    assert data.index.max() < 10_000
    assert data.images.std() > 20


def test_cifar10_from_data_dir_matches_explicit_path(cifar10_dir, monkeypatch):
    monkeypatch.setenv("RAYPURIFY_DATA_DIR", str(cifar10_dir.parent))
    via_env = load(name="cifar10", split="test", subset=100, seed=7)
    via_path = load(name="cifar10", split="test", subset=100, seed=7, path=str(cifar10_dir))
    assert np.array_equal(via_env.index, via_path.index)
    assert np.array_equal(via_env.images, via_path.images)
    assert via_env.classes == CIFAR_CLASSES


def test_cifar10_explicit_path_to_our_format(tmp_path):
    data = load(name="synthetic", rows=20, size=8, classes=10)
    write_images(data, tmp_path / "mine" / "train")
    back = load(name="cifar10", path=str(tmp_path / "mine"))
    assert np.array_equal(back.images, data.images)


def test_cifar10_explicit_path_that_holds_nothing(tmp_path):
    with pytest.raises(DatasetError) as e:
        load(name="cifar10", path=str(tmp_path))
    assert str(e.value) == (
        f"cifar10: path {tmp_path} holds neither our format, train.parquet, nor torchvision's files"
    )


def test_cifar10_not_found_lists_where_it_looked(tmp_path, monkeypatch):
    data_dir, tv_root = tmp_path / "data", tmp_path / "torchvision"
    data_dir.mkdir()
    tv_root.mkdir()
    monkeypatch.setenv("RAYPURIFY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RAYPURIFY_OFFLINE", "1")
    monkeypatch.setenv("RAYPURIFY_TORCHVISION_ROOT", str(tv_root))
    with pytest.raises(DatasetError) as e:
        load(name="cifar10")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cifar10: not found; looked in ")
    assert str(data_dir / "cifar10" / "train.parquet") in msg
    assert f"torchvision at {tv_root}" in msg
    assert "RAYPURIFY_DATA_DIR" in msg
    assert list(tv_root.iterdir()) == []  # offline: nothing was downloaded

    monkeypatch.delenv("RAYPURIFY_DATA_DIR")
    with pytest.raises(DatasetError, match=r"\$RAYPURIFY_DATA_DIR \(unset\)"):
        load(name="cifar10", split="test")


# ---------------------------------------------------------------------------------------
# cifar10-sample


def test_cifar10_sample_is_bundled_and_balanced():
    train = load(name="cifar10-sample")
    test = load(name="cifar10-sample", split="test")
    assert len(train) == 2500 and len(test) == 1000
    assert train.classes == CIFAR_CLASSES
    assert np.array_equal(train.class_counts(), [250] * 10)
    assert np.array_equal(test.class_counts(), [100] * 10)
    assert train.shape == (32, 32, 3)
    small = load(name="cifar10-sample", subset=30)
    assert np.array_equal(small.class_counts(), [3] * 10)
    assert set(small.index) <= set(train.index)


def test_cifar10_sample_is_real_cifar(cifar10_dir):
    """The sample's images are the offline copy's images at the same index."""
    sample = load(name="cifar10-sample", split="test", subset=20)
    full = load(name="cifar10", path=str(cifar10_dir), split="test")
    assert np.array_equal(full.images[sample.index], sample.images)
    assert np.array_equal(full.labels[sample.index], sample.labels)


# ---------------------------------------------------------------------------------------
# folder


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/<image>: classes created out of order, images of mixed sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    sizes = {"zebra": [(20, 24), (20, 24)], "ant": [(20, 24), (30, 18)], "mole": [(20, 24)]}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"img{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_folder_with_mixed_sizes_needs_size(image_folder):
    with pytest.raises(DatasetError) as e:
        load(name="folder", path=str(image_folder))
    msg = str(e.value)
    assert msg.startswith(f"{image_folder / 'ant' / 'img1.png'}: image is 30x18x3")
    assert "set size" in msg


def test_folder_resized(image_folder):
    data = load(name="folder", path=str(image_folder), size=16)
    assert data.classes == ["ant", "mole", "zebra"]
    assert data.images.shape == (5, 16, 16, 3)
    assert list(data.labels) == [0, 0, 1, 2, 2]
    assert list(data.index) == [0, 1, 2, 3, 4]
    # The first image (20x24) is resized to 16x19 then centre-cropped: not a blank tile.
    assert data.images[0].std() > 10


def test_a_streamed_folder_is_the_folder_loaded(ray_session, image_folder):
    """The Ray Data path (large folders, ImageNet subsets) decodes the same rows, labels and
    indices as the in-memory one, and needs the size up front."""
    spec = DatasetSpec(name="folder", path=str(image_folder), size=16)
    loaded, stream = registry.load(spec), registry.stream(spec)
    assert (stream.classes, stream.shape, stream.rows) == (loaded.classes, (16, 16, 3), 5)
    rows = sorted(stream.ds.take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(loaded.index)
    assert [r["label"] for r in rows] == list(loaded.labels)
    assert np.array_equal(np.stack([r["image"] for r in rows]), loaded.images)
    with pytest.raises(DatasetError, match="streaming needs size"):
        registry.stream(DatasetSpec(name="folder", path=str(image_folder)))


def test_folder_with_same_sizes_loads_as_is(tmp_path):
    root = tmp_path / "f"
    for cls in ("b", "a"):
        (root / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (5, 4), (10, 20, 30)).save(root / "train" / cls / "x.jpg")
        Image.new("L", (5, 4), 200).save(root / "train" / cls / "y.png")
    data = load(name="folder", path=str(root))
    assert data.classes == ["a", "b"]
    assert data.images.shape == (4, 4, 5, 3)
    assert np.all(data.images[1] == 200)  # grey image converted to RGB


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs a path"):
        load(name="folder")
    with pytest.raises(DatasetError, match="no such image folder"):
        load(name="folder", path=str(tmp_path / "missing"))
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(DatasetError, match="no class sub-directories"):
        load(name="folder", path=str(tmp_path / "noclasses"))
    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as e:
        load(name="folder", path=str(tmp_path / "bad"))
    assert str(e.value).startswith(f"{tmp_path / 'bad' / 'c' / 'broken.png'}: undecodable image")


# ---------------------------------------------------------------------------------------
# spec_for and the registry


def test_spec_for_directory_name_and_unknown(tmp_path):
    data = load(name="synthetic", rows=12, size=8, classes=3)
    write_images(data, tmp_path / "ds")
    spec = registry.spec_for(str(tmp_path / "ds"), subset=6)
    assert spec.name == "parquet" and spec.path == str(tmp_path / "ds") and spec.subset == 6
    loaded = registry.load(spec)
    assert np.array_equal(loaded.class_counts(), [2, 2, 2])

    # A directory holding train/ (and test/) splits counts too.
    write_images(data, tmp_path / "splits" / "train")
    assert registry.spec_for(str(tmp_path / "splits")).name == "parquet"

    spec = registry.spec_for("cifar10-sample", split="test")
    assert spec.name == "cifar10-sample" and spec.path is None and spec.split == "test"

    with pytest.raises(DatasetError) as e:
        registry.spec_for("imagenet-22k")
    assert str(e.value).startswith("unknown dataset 'imagenet-22k': not a directory, nor one of")
    assert "'cifar10-sample'" in str(e.value)

    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a dataset directory"):
        registry.spec_for(str(tmp_path / "plain"))


def test_registry_names_and_unknown_source():
    assert set(registry.SOURCES.names()) == {
        "cifar10",
        "cifar100",
        "imagenet-subset",
        "folder",
        "parquet",
        "synthetic",
        "cifar10-sample",
    }
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        registry.load(DatasetSpec(name="mnist"))
    with pytest.raises(ConfigError, match="subset: Input should be greater than 0"):
        config.validate(DatasetSpec, {"name": "synthetic", "subset": 0})


def test_a_truncated_offline_copy_is_one_line_naming_the_file(cifar10_dir, tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    whole = (cifar10_dir / "test.parquet").read_bytes()
    (tmp_path / "cifar10" / "test.parquet").write_bytes(whole[: len(whole) // 3])
    monkeypatch.setenv("RAYPURIFY_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"test\.parquet: not a readable offline copy"):
        load(name="cifar10", split="test", subset=10)
