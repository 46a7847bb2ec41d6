"""Inception Score (Salimans et al. 2016) from the logits of the FID Inception network, as torch-fidelity.

IS = exp(E_x KL(p(y|x) || p(y))), computed on 10 splits of the (seeded, shuffled) samples; reported as the mean
and standard deviation over splits. Logits are the "unbiased" 1008-way logits of torch-fidelity's InceptionV3
(``InceptionExtractor.features_and_logits``), which is what torch-fidelity uses for ``isc``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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
