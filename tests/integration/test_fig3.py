"""Paper Fig. 3: from a generator collapsed onto one mode of the bimodal target, drifting recovers both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drifting_lightning.commands.fit import DriftingCLI
from drifting_lightning.data.toy import bimodal_centers
from drifting_lightning.metrics.energy import mode_fractions
from tests.integration.cli_helpers import REPO


@pytest.mark.slow
def test_bimodal_collapsed_start_recovers_both_modes(tmp_path: Path):
    cli = DriftingCLI(
        args=["--config", str(REPO / "configs/toy/bimodal_collapsed.yaml"), "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    start = cli.model.sample(2000, generator=torch.Generator().manual_seed(0))
    assert mode_fractions(start, bimodal_centers())[1] > 0.99  # every sample starts on the mode at (1, 0)
    cli.trainer.fit(cli.model, cli.datamodule)
    fractions = mode_fractions(cli.model.sample(5000, generator=torch.Generator().manual_seed(0)), bimodal_centers())
    assert ((fractions > 0.35) & (fractions < 0.65)).all(), fractions
