"""`datasets export --format folder`: a dataset (a purification's P3 above all) written as
`OUT/<class>/<index>.png`, which torchvision's ImageFolder and our `folder` source read
back with the same labels and the same pixels."""

from __future__ import annotations

import numpy as np
import pytest

from raypurify.atomic import read_marker
from raypurify.cli import main
from raypurify.data.export import class_folders
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import open_dataset, write_images
from raypurify.data.registry import load, spec_for


@pytest.mark.parametrize(
    "classes, folders",
    [
        (["airplane", "bird", "cat"], ["airplane", "bird", "cat"]),  # already sorted: as is
        (["cat", "airplane"], ["0-cat", "1-airplane"]),  # unsorted: the label in front
        (["a/b", ".hidden"], ["0-a_b", "1-hidden"]),  # not one visible folder name
        (["x", "x"], ["0-x", "1-x"]),  # not distinct
        ([f"c{k}" for k in range(11)], [f"{k:02d}-c{k}" for k in range(11)]),  # c10 < c2
    ],
)
def test_class_folders_sort_in_label_order(classes, folders):
    got = class_folders(classes)
    assert got == folders
    assert sorted(got) == got  # what every ImageFolder reader numbers the classes by


def unsorted_dataset(path):
    """A small dataset whose class names do not sort in label order, indices not 0..n-1."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    index = 1000 + 7 * np.arange(30)
    write_images(ImageSet(images, labels, index, ["zebra", "ant", "moth"]), path)
    return images, labels, index


def test_folder_export_reads_back_with_the_same_labels_and_pixels(ray_session, tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    src, out = tmp_path / "p3", tmp_path / "folder"
    images, labels, index = unsorted_dataset(src)
    argv = ["datasets", "export", str(src), "--format", "folder", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 30 images to {out}/<class>/<index>.png, classes in label order: "
        "0-zebra, 1-ant, 2-moth"
    )
    marker = read_marker(out)
    assert marker["kind"] == "image-folder" and marker["rows"] == 30
    assert marker["source"]["id"] == open_dataset(src).id

    # torchvision numbers the classes by sorted folder name: the labels come back.
    by_file = {p.split("/")[-1]: y for p, y in ImageFolder(str(out)).samples}
    assert by_file == {f"{i:06d}.png": int(y) for i, y in zip(index, labels, strict=True)}

    # Our own `folder` source reads the same pixels (rows by class, then file name).
    back = load(spec_for("folder", path=str(out)))
    order = np.lexsort((index, labels))
    assert np.array_equal(back.images, images[order])
    assert np.array_equal(back.labels, labels[order])

    # A second export neither replaces it silently nor touches a folder it did not write.
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--subset", "3"]) == 0
    pngs = list(out.rglob("*.png"))
    assert sorted(p.parent.name for p in pngs) == ["0-zebra", "1-ant", "2-moth"]
    foreign = tmp_path / "mine"
    (foreign / "keep").mkdir(parents=True)
    assert main([*argv[:-1], str(foreign), "--overwrite"]) == 2
    assert "not written by raypurify" in capsys.readouterr().err
    assert (foreign / "keep").is_dir()
