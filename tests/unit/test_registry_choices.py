"""What `drifting list` and the "choose from" lists offer: only classes that can be built, only of the right base."""

import pytest

from drifting_lightning import registry
from drifting_lightning.commands import explain
from drifting_lightning.commands.config_errors import _unknown_name
from drifting_lightning.sampling.positives import PositiveSource


def test_abstract_bases_are_not_offered():
    data = registry.components("data")
    assert "ImageDataModule" not in data and "StreamingDataModule" not in data
    assert {"DigitsDataModule", "ToyDataModule", "VectorDataModule"} <= set(data)


def test_a_component_of_another_base_is_named_as_such_not_as_unknown():
    label, names = registry.choices(PositiveSource)
    assert label == "sampler" and "GuidanceSampler" not in names and "ClassAwareSampler" in names
    assert _unknown_name("data.positives", "GuidanceSampler", PositiveSource) == (
        f"data.positives: GuidanceSampler does not go here: this takes a sampler ({', '.join(names)})"
    )
    assert _unknown_name("data.positives", "ClassAwareSamplr", PositiveSource).startswith(
        "data.positives: unknown sampler 'ClassAwareSamplr'; did you mean 'ClassAwareSampler'?"
    )


@pytest.mark.parametrize("err", [NotImplementedError(), RuntimeError("  ")])
def test_an_error_without_a_message_is_still_named(err):
    assert explain(err) == f"{type(err).__name__} without a message (DRIFTING_DEBUG=1 shows where it was raised)"


def test_list_shows_the_first_sentence_whole():
    from drifting_lightning.data.images import ImageFolderDataModule
    from drifting_lightning.drift.fields import MeanShift

    # over two docstring lines, with abbreviations ("Eq. 11") that do not end it
    first = "Mean-shift attraction minus repulsion (paper Eq. 11, Alg. 2), the paper's field."
    assert registry.describe(MeanShift)[0] == first
    assert registry.describe(ImageFolderDataModule)[0].endswith("random horizontal flips, read lazily by the workers.")


def test_suggestions_are_close_matches_only():
    fields = ["normalization", "affinity_floor", "attraction_scale", "repulsion_scale"]
    assert registry.suggest("afinity_floor", fields) == "did you mean 'affinity_floor'?"
    assert registry.suggest("iterations", fields) == ""  # 62% alike to attraction_scale: no hint beats a wrong one
