"""Importers of released poisons: each format round-trips a known poison onto real CIFAR-10
images, small class-wise patches land at the centre, rows are matched by index, bad files
fail with one line naming the file, and `raypurify poison import` writes the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raypurify.attacks.importers import import_poison
from raypurify.cli import main
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import open_dataset, read_images, write_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec
from raypurify.errors import DatasetError

ROWS = 120  # rows in the "released" files; the base has index 0..ROWS-1


@pytest.fixture(scope="module")
def base(cifar10_dir) -> ImageSet:
    """Real CIFAR-10 test images renumbered 0..ROWS-1, as a released file's rows would be."""
    data = load(DatasetSpec(name="cifar10", path=str(cifar10_dir), split="test", subset=ROWS))
    return ImageSet(data.images, data.labels, np.arange(ROWS), data.classes, name="base")


def added(base: ImageSet, delta_nhwc: np.ndarray) -> np.ndarray:
    """What a released additive perturbation (in [0, 1] units) should turn the base into."""
    return np.clip(np.rint(base.images + 255.0 * delta_nhwc), 0, 255).astype(np.uint8)


def sample_wise_delta(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-8 / 255, 8 / 255, size=(ROWS, 3, 32, 32)).astype(np.float32)


def test_sample_wise_npy_in_unit_values(base, tmp_path):
    delta = sample_wise_delta()
    np.save(tmp_path / "perturbation.npy", delta)
    poisoned, budget = import_poison(base, "perturbation", [tmp_path / "perturbation.npy"])
    expected = added(base, delta.transpose(0, 2, 3, 1))
    assert np.array_equal(poisoned.images, expected)
    assert np.array_equal(poisoned.labels, base.labels)
    changed = (expected != base.images).any((1, 2, 3))
    assert np.array_equal(poisoned.poisoned, changed)
    assert budget["linf_255"] == 8 and budget["changed_rows"] == changed.sum()
    assert budget["l0_max"] <= 1024


def test_sample_wise_pt_in_pixel_units_picks_the_base_rows_by_index(base, tmp_path):
    delta = sample_wise_delta(1)
    torch.save(torch.from_numpy(delta * 255), tmp_path / "perturbation.pt")
    subset = base.take(np.array([3, 50, 119]))  # rows 3, 50, 119 of the released file
    poisoned, _ = import_poison(subset, "perturbation", [tmp_path / "perturbation.pt"])
    expected = added(base, delta.transpose(0, 2, 3, 1))[[3, 50, 119]]
    assert np.array_equal(poisoned.images, expected)


def test_an_integer_perturbation_is_grey_levels_even_when_it_stays_within_one(base, tmp_path):
    """A poison of +-1 grey level stored as int8 reads as 1/255, not as a full-range
    change (float values of at most 1 are [0, 1] units; integers can only be levels)."""
    levels = np.random.default_rng(3).integers(-1, 2, size=(ROWS, 3, 32, 32)).astype(np.int8)
    np.save(tmp_path / "levels.npy", levels)
    poisoned, budget = import_poison(base, "perturbation", [tmp_path / "levels.npy"])
    assert np.array_equal(poisoned.images, added(base, levels.transpose(0, 2, 3, 1) / 255.0))
    assert budget["linf_255"] == 1


def test_class_wise_small_patch_lands_at_the_centre(base, tmp_path):
    patches = np.random.default_rng(2).uniform(-0.1, 0.1, size=(10, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "classwise.npy", patches)
    poisoned, budget = import_poison(base, "perturbation", [tmp_path / "classwise.npy"])
    diff = poisoned.images.astype(int) - base.images.astype(int)
    outside = np.ones((32, 32), dtype=bool)
    outside[12:20, 12:20] = False
    assert not diff[:, outside].any()
    full = np.zeros((ROWS, 32, 32, 3), np.float32)
    full[:, 12:20, 12:20] = patches[base.labels].transpose(0, 2, 3, 1)
    assert np.array_equal(poisoned.images, added(base, full))
    assert budget["l0_max"] <= 64


def test_png_folder_by_row(base, tmp_path):
    poison = np.random.default_rng(3).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    rows = [0, 7, 8, 30, 119]
    (tmp_path / "data").mkdir()
    for image, row in zip(poison, rows, strict=True):
        Image.fromarray(image).save(tmp_path / "data" / f"{row}.png")
    poisoned, budget = import_poison(base, "png", [tmp_path])
    assert np.array_equal(poisoned.images[rows], poison)
    others = np.setdiff1d(np.arange(ROWS), rows)
    assert np.array_equal(poisoned.images[others], base.images[others])
    assert np.flatnonzero(poisoned.poisoned).tolist() == rows
    assert budget["changed_rows"] == 5


def test_png_image_folder_checks_the_class_folders(base, tmp_path):
    label = int(base.labels[4])
    good = tmp_path / "train" / base.classes[label]
    good.mkdir(parents=True)
    Image.fromarray(base.images[4]).save(good / "4.png")
    poisoned, budget = import_poison(base, "png", [tmp_path / "train"])
    assert budget["changed_rows"] == 0 and not poisoned.poisoned.any()

    wrong = tmp_path / "train" / base.classes[(int(base.labels[5]) + 1) % 10]
    wrong.mkdir(exist_ok=True)
    Image.fromarray(base.images[5]).save(wrong / "5.png")
    one_line_error(base, "png", [tmp_path / "train"], f"{wrong / '5.png'}: in class folder")


@pytest.mark.parametrize("keys", [("data", "targets"), ("x", "y")])
def test_npz_dump_uint8_or_float(base, tmp_path, keys):
    poison = np.random.default_rng(4).integers(0, 256, size=(ROWS, 32, 32, 3), dtype=np.uint8)
    images = poison if keys[0] == "data" else poison / 255.0
    np.savez(tmp_path / "poison.npz", **{keys[0]: images, keys[1]: base.labels})
    poisoned, budget = import_poison(base, "npz", [tmp_path / "poison.npz"])
    assert np.array_equal(poisoned.images, poison)
    assert budget["linf_255"] == np.abs(poison.astype(int) - base.images).max()


def test_ntga_folder_or_two_paths_with_one_hot_labels(base, tmp_path):
    rng = np.random.default_rng(5)
    poison = np.clip(base.images + rng.integers(-8, 9, size=base.images.shape), 0, 255)
    x = (poison / 255.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[base.labels]
    np.save(tmp_path / "x_train_cifar10_ntga_cnn_best.npy", x)
    np.save(tmp_path / "y_train_cifar10.npy", y)
    np.save(tmp_path / "x_test_cifar10.npy", x[:5])  # released alongside; not the poison
    from_folder, budget = import_poison(base, "ntga", [tmp_path])
    assert np.array_equal(from_folder.images, poison)
    assert budget["linf_255"] == 8
    x_path, y_path = (
        tmp_path / "x_train_cifar10_ntga_cnn_best.npy",
        tmp_path / "y_train_cifar10.npy",
    )
    from_paths, _ = import_poison(base, "ntga", [x_path, y_path])
    assert np.array_equal(from_paths.images, poison)


def one_line_error(base, fmt, paths, match, overrides=()):
    with pytest.raises(DatasetError) as e:
        import_poison(base, fmt, paths, overrides)
    message = str(e.value)
    assert "\n" not in message
    assert match in message, message
    return message


def test_wrong_shape_range_labels_and_rows_fail_naming_the_file(base, tmp_path):
    big = tmp_path / "big.npy"
    np.save(big, np.zeros((ROWS, 3, 40, 40), np.float32))
    one_line_error(base, "perturbation", [big], f"{big}: shape (120, 3, 40, 40)")

    loud = tmp_path / "loud.npy"
    np.save(loud, np.full((ROWS, 3, 32, 32), 3.0, np.float32))
    one_line_error(base, "perturbation", [loud], f"{loud}: values span", ["units=unit"])

    short = tmp_path / "short.npy"
    np.save(short, np.zeros((ROWS - 20, 3, 32, 32), np.float32))
    one_line_error(base, "perturbation", [short], f"{short}: holds 100 rows")

    shuffled = tmp_path / "shuffled.npz"
    labels = base.labels.copy()
    labels[[10, 11]] = (labels[[10, 11]] + 1) % 10
    np.savez(shuffled, data=base.images, targets=labels)
    message = one_line_error(base, "npz", [shuffled], f"{shuffled}: row 10 has label")
    assert "2 rows differ" in message

    over = tmp_path / "over.npz"
    np.savez(over, x=base.images / 255.0 * 1.5, y=base.labels)
    one_line_error(base, "npz", [over], f"{over}: values span", ["units=unit"])
    negative = tmp_path / "negative.npz"
    np.savez(negative, x=base.images / 255.0 - 0.5, y=base.labels)
    one_line_error(base, "npz", [negative], f"{negative}: values span [-0.5")

    keys = tmp_path / "keys.npz"
    np.savez(keys, images=base.images)
    one_line_error(base, "npz", [keys], f"{keys}: needs keys data/targets or x/y")

    pickled = tmp_path / "dict.pt"
    torch.save({"delta": torch.zeros(1)}, pickled)
    one_line_error(base, "perturbation", [pickled], f"{pickled}: expected one tensor")


def test_poison_import_cli_writes_manifest_and_mlflow_run(base, tmp_path, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    base_dir = tmp_path / "base"
    base_info = write_images(base, base_dir)
    delta = sample_wise_delta(6)
    np.save(tmp_path / "em.npy", delta)
    out = tmp_path / "imported"
    argv = ["poison", "import", "--format", "perturbation", "--from", str(tmp_path / "em.npy")]
    argv += ["--base", str(base_dir), "--out", str(out), "--set", "attack=em"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("budget: linf 0.0314 (8/255)")

    info = open_dataset(out)
    config = info.manifest["config"]
    assert config["attack"] == "em"
    assert config["import"] == {"format": "perturbation", "from": [str(tmp_path / "em.npy")]}
    assert config["attack_config"]["units"] == "auto"
    assert config["budget"]["linf_255"] == 8.0
    assert config["base"]["path"] == str(base_dir)
    assert info.manifest["parents"] == [base_info.lineage()]
    assert np.array_equal(read_images(out).images, added(base, delta.transpose(0, 2, 3, 1)))

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("poison").experiment_id])
    assert run.data.params["format"] == "perturbation"
    assert run.data.metrics["linf_255"] == 8.0
    assert "poison_grid.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    assert (
        main(
            [*argv[:-4], "--base", str(base_dir), "--out", str(tmp_path / "x"), "--set", "unitz=1"]
        )
        == 2
    )
    assert "import perturbation, --set unitz=1: unitz: unknown key" in capsys.readouterr().err
