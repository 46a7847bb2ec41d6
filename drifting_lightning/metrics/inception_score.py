"""Inception Score (Salimans et al. 2016) from the logits of the FID Inception network, as torch-fidelity.

IS = exp(E_x KL(p(y|x) || p(y))), computed on 10 splits of the (seeded, shuffled) samples; reported as the mean
and standard deviation over splits. Logits are the "unbiased" 1008-way logits of torch-fidelity's InceptionV3
(``InceptionExtractor.features_and_logits``), which is what torch-fidelity uses for ``isc``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def inception_score(logits: Tensor, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """logits: [N, K] -> (mean, std) of the Inception Score over ``splits`` chunks, in float64.

    Same permutation (numpy RandomState(seed)) and chunking as torch-fidelity's ``isc_features_to_metric``.
    """
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"need logits [N, K] with N >= splits={splits}, got {list(logits.shape)}")
    n = logits.shape[0]
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(logits.device)]
    log_p = logits.double().log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits : (i + 1) * n // splits]
        log_q = lp.exp().mean(dim=0, keepdim=True).log()  # log p(y) of this split
        kl = (lp.exp() * (lp - log_q)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


class InceptionScore(Metric):
    """Accumulates logits [B, K] and returns (mean, std) of the Inception Score; a collective under DDP.

    Keeps every logit (N x 1008 floats: 200 MB for 50k samples; ``compute_on_cpu=True`` keeps them off the
    GPU). After the DDP gather the sample order differs from a single process, so with shuffling the value
    differs from a one-process run by split-to-split noise only. Call ``compute()`` on every rank.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, splits: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.splits = splits
        self.add_state("logits", [], dist_reduce_fx="cat")

    def update(self, logits: Tensor) -> None:
        self.logits.append(logits.detach().float())

    def compute(self) -> tuple[Tensor, Tensor]:
        mean, std = inception_score(dim_zero_cat(self.logits), self.splits)
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
