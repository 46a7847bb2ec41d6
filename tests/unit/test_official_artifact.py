"""The flax msgpack reader against a file flax wrote (tools/official_generator_fixtures.py): float32, bfloat16, a
chunked array, a scalar, skipped subtrees, damaged files and metadata."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_lightning.official.artifact import ArtifactError, read_metadata, read_params

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
READER = FIXTURES / "gen_reader.msgpack"


def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "gen_reader.npz") as d:
        return {k.replace(".", "/"): d[k] for k in d.files}


def test_reads_every_leaf_kind_as_flax_wrote_it():
    params = read_params(READER)
    want = expected()
    assert set(params) == set(want)
    for key, value in want.items():
        assert params[key].dtype == torch.float32, key
        np.testing.assert_array_equal(params[key].numpy(), value, err_msg=key)
    assert params["big"].shape == (7, 9)  # reassembled from its chunks
    assert params["nested/bf16"].shape == (4, 6) and params["nested/scalar"].item() == 2.5


def test_the_fixture_really_holds_a_chunked_array_and_bfloat16():
    raw = READER.read_bytes()
    assert b"__msgpack_chunked_array__" in raw and b"bfloat16" in raw


def test_skip_passes_over_subtrees_and_keeps_the_rest():
    params = read_params(READER, skip=lambda path: path[0] in ("skipme", "big"))
    assert set(params) == {"f32", "nested/bf16", "nested/scalar"}
    np.testing.assert_array_equal(params["f32"].numpy(), expected()["f32"])


@pytest.mark.parametrize("cut", [1, 40, 200, -1])
def test_truncated_file_is_an_error_naming_it(tmp_path, cut):
    path = tmp_path / "ema_params.msgpack"
    path.write_bytes(READER.read_bytes()[:cut])
    with pytest.raises(ArtifactError, match=r"ema_params\.msgpack is truncated"):
        read_params(path)


def test_trailing_bytes_and_non_map_are_errors(tmp_path):
    path = tmp_path / "ema_params.msgpack"
    path.write_bytes(READER.read_bytes() + b"\x00")
    with pytest.raises(ArtifactError, match="bytes after its parameter tree"):
        read_params(path)
    path.write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(ArtifactError, match="top level is not a map"):
        read_params(path)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_params(tmp_path / "absent.msgpack")


def test_metadata_missing_corrupted_or_not_an_object(tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(FIXTURES / "gen_plain", folder)
    assert read_metadata(folder)["kind"] == "gen"
    (folder / "metadata.json").write_text('{"kind": "gen", ')
    with pytest.raises(ArtifactError, match=r"metadata\.json is not valid JSON"):
        read_metadata(folder)
    (folder / "metadata.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ArtifactError, match="holds a list, expected a JSON object"):
        read_metadata(folder)
    (folder / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match=r"metadata\.json does not exist"):
        read_metadata(folder)
