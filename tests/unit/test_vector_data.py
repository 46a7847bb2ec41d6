import numpy as np
import pytest
import torch

from drifting_lightning.data.vector import VectorDataModule, load_vectors


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([5.0, -2.0, 0.0])
    path = tmp_path / "actions.npy"
    np.save(path, data.astype(np.float32))
    return path, data


def test_npy_batches_and_standardisation(table):
    path, data = table
    dm = VectorDataModule(str(path), positives_per_step=32, steps_per_epoch=4, test_fraction=0.25, seed=1)
    assert dm.sample_shape == (3,) and dm.num_classes == 0
    assert dm.train_data.shape == (150, 3) and dm.test_data.shape == (50, 3)
    assert torch.allclose(dm.train_data.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(dm.train_data.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    batches = [b["positives"] for b in dm.train_dataloader()]
    assert len(batches) == 4 and all(b.shape == (1, 32, 3) for b in batches)
    rows = {tuple(r) for r in dm.train_data.tolist()}
    assert all(tuple(r) in rows for r in batches[0][0].tolist())  # train rows only, never held-out ones
    assert len({tuple(r) for r in batches[0][0].tolist()}) == 32  # distinct rows within a step
    back = dm.unstandardize(torch.cat([dm.train_data, dm.test_data]))
    assert np.allclose(np.sort(back.numpy(), axis=0), np.sort(data, axis=0), atol=1e-4)


def test_reproducible_split_and_stream(table):
    path, _ = table
    a = VectorDataModule(str(path), positives_per_step=8, steps_per_epoch=2, seed=3)
    b = VectorDataModule(str(path), positives_per_step=8, steps_per_epoch=2, seed=3)
    assert torch.equal(a.test_data, b.test_data)
    pairs = zip(a.train_dataloader(), b.train_dataloader(), strict=True)
    assert all(torch.equal(x["positives"], y["positives"]) for x, y in pairs)
    c = VectorDataModule(str(path), positives_per_step=8, steps_per_epoch=2, seed=4)
    assert not torch.equal(a.test_data, c.test_data)


def test_real_samples(table):
    path, _ = table
    dm = VectorDataModule(str(path), test_fraction=0.1)
    x, labels = dm.real_samples(50)
    assert x.shape == (50, 3) and labels is None
    assert torch.equal(x, dm.real_samples(50)[0]) and not torch.equal(x, dm.real_samples(50, seed=1)[0])
    held_out = dm.real_samples(1000, split="test")[0]
    assert held_out.shape == (20, 3)  # all 20 held-out rows, none repeated
    assert torch.equal(held_out.sort(0).values, dm.test_data.sort(0).values)
    assert dm.real_samples(1000)[0].shape == (180, 3)
    with pytest.raises(ValueError, match="no held-out rows"):
        VectorDataModule(str(path), test_fraction=0.0).real_samples(5, split="test")


def test_more_positives_than_rows(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.arange(10, dtype=np.float64).reshape(5, 2))
    dm = VectorDataModule(str(path), positives_per_step=16, standardize=False, test_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))["positives"]
    assert batch.shape == (1, 16, 2)
    assert torch.equal(dm.mean, torch.zeros(2)) and torch.equal(dm.std, torch.ones(2))


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_and_without_header(tmp_path, header):
    path = tmp_path / "data.csv"
    lines = (["a,b"] if header else []) + ["1.0,2.0", "3.5,-4", "1e-3,7"]
    path.write_text("\n".join(lines) + "\n")
    data = load_vectors(path)
    assert data.dtype == np.float32
    assert np.allclose(data, [[1.0, 2.0], [3.5, -4.0], [1e-3, 7.0]])


def test_constant_column_keeps_unit_scale(tmp_path):
    path = tmp_path / "const.npy"
    np.save(path, np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1))
    dm = VectorDataModule(str(path), test_fraction=0.0)
    assert dm.std[1] == 1.0 and torch.isfinite(dm.train_data).all()


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("missing.npy", None, FileNotFoundError, "no such file"),
        ("data.txt", "1,2\n3,4\n", ValueError, "unsupported file type '.txt'"),
        ("flat.npy", np.arange(5.0), ValueError, r"2-D array \[n, D\], got shape \(5,\).*reshape"),
        ("cube.npy", np.zeros((2, 2, 2)), ValueError, r"got shape \(2, 2, 2\)"),
        ("nan.npy", np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, 1.0]]), ValueError, "2 non-finite.*first at row 0"),
        ("nan.csv", "1,2\n3,nan\n", ValueError, "non-finite.*first at line 2;"),
        ("one.npy", np.ones((1, 3)), ValueError, "at least 2 rows"),
        ("one.csv", "x,y\n1,2\n", ValueError, "at least 2 rows"),
        ("text.csv", "x,y\n1,2\n3,four\n", ValueError,
         r"text.csv, line 3, column 2: not a number \(could not convert string .four."),
        ("ragged.csv", "1,2\n3\n", ValueError, "cannot read numbers"),
        ("strings.npy", np.array([["a", "b"], ["c", "d"]]), ValueError, "expected real numbers"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, error, match):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(error, match=match) as info:
        VectorDataModule(str(path))
    assert str(path) in str(info.value)


def test_bad_arguments(table):
    path, _ = table
    with pytest.raises(ValueError, match="test_fraction"):
        VectorDataModule(str(path), test_fraction=1.0)
    with pytest.raises(ValueError, match="positives_per_step"):
        VectorDataModule(str(path), positives_per_step=0)
