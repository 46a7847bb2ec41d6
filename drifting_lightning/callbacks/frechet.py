"""Frechet distance of EMA samples during training, with an optional guidance sweep (DESIGN.md, "FID protocol").

The value is logged under the name of the feature space it was measured in: ``fid`` only for Inception with the
published 2015-12-05 weights; ``fd_inception`` (other Inception weights), ``fd_classifier`` (a classifier trained
on the dataset, ``metrics/classifier.py``) or ``fd_encoder`` (a feature encoder, by default the run's own).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from drifting_lightning.callbacks.periodic import MetricCallback, fixed_noise, tensorboards
from drifting_lightning.callbacks.sample_grid import alpha_tag, as_alpha_list, generator_classes
from drifting_lightning.encoders.base import FeatureEncoder
from drifting_lightning.metrics.extractors import ClassifierExtractor, EncoderExtractor, InceptionExtractor
from drifting_lightning.metrics.frechet import FrechetDistance
from drifting_lightning.metrics.npz import through_uint8
from drifting_lightning.metrics.reference import content_fingerprint, files_fingerprint, reference_statistics
from drifting_lightning.sampling.labels import balanced_labels

# Accepted spellings of the metric argument -> extractor kind.
METRICS = {
    "classifier": "classifier",
    "fd_classifier": "classifier",
    "inception": "inception",
    "fid": "inception",
    "fd_inception": "inception",
    "encoder": "encoder",
    "fd_encoder": "encoder",
}


def metric_kind(metric: str) -> str:
    """'classifier', 'inception' or 'encoder' for any accepted spelling (``fid``, ``fd_classifier``, ...)."""
    if metric not in METRICS:
        raise ValueError(f"unknown Frechet metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric]


def encoder_from_checkpoint(path: str) -> FeatureEncoder:
    """A frozen ResNetMAE built from an ``MAEPretraining`` checkpoint (it stores ``encoder_config``)."""
    from drifting_lightning.checkpoints.reading import read_weights
    from drifting_lightning.encoders.resnet_mae import ResNetMAE

    config = read_weights(path, "encoder checkpoint").get("encoder_config")
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds no `encoder_config`, so it is not an MAEPretraining checkpoint (configs/mae/*.yaml). "
            "For the encoder of a drifting run, leave `checkpoint` unset (the callback uses the run's encoder) or "
            "pass the run's checkpoint to `drifting evaluate --checkpoint`."
        )
    return ResNetMAE(checkpoint=str(path))  # the architecture comes with the checkpoint


def make_extractor(
    metric: str,
    checkpoint: str | None = None,
    weights: str | None = None,
    encoder: FeatureEncoder | None = None,
    feature_key: str | None = None,
) -> nn.Module:
    """The feature extractor of a Frechet metric: images [B, C, H, W] in [-1, 1] -> features [B, F].

    inception: torch-fidelity's InceptionV3 from ``weights`` (else ``$DRIFTING_INCEPTION_WEIGHTS`` or the torch
    cache; FileNotFoundError when absent); classifier: the SmallCNN file ``checkpoint``; encoder: ``encoder``, else
    a ResNetMAE from the MAEPretraining ``checkpoint``, averaged over locations of feature set ``feature_key``.
    The extractor's ``metric_name`` is the name its distance is logged under.
    """
    kind = metric_kind(metric)
    if kind == "inception":
        return InceptionExtractor(weights)
    if kind == "classifier":
        if checkpoint is None:
            raise ValueError(
                "metric 'classifier' needs `checkpoint`: the classifier file that "
                "`drifting fit --config configs/classifier/fashion_mnist.yaml` writes (classifier.pt)"
            )
        return ClassifierExtractor(checkpoint)
    if encoder is None:
        if checkpoint is None:
            raise ValueError("metric 'encoder' needs an `encoder` or the `checkpoint` of an MAEPretraining run")
        encoder = encoder_from_checkpoint(checkpoint)
    return EncoderExtractor(encoder, feature_key)


def extractor_fingerprint(extractor: nn.Module) -> str:
    """What identifies the feature space, for the reference-statistics cache: name + weights file or weights hash."""
    if isinstance(extractor, InceptionExtractor):
        source: Any = files_fingerprint([extractor.weights_path])
    elif isinstance(extractor, ClassifierExtractor):
        # The classifier's own weights: a retrained file at the same path gives a new cache entry.
        source = _state_hash(extractor.net)
    elif isinstance(extractor, EncoderExtractor):
        source = {
            "class": type(extractor.encoder).__qualname__,
            "key": extractor.key,
            "weights": _state_hash(extractor),
        }
    else:
        source = {"class": type(extractor).__qualname__, "weights": _state_hash(extractor)}
    return json.dumps({"metric": getattr(extractor, "metric_name", "?"), "source": source}, sort_keys=True, default=str)


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rank_share(n: int, rank: int, world: int) -> Tensor:
    """Global sample indices [m] of one rank: rank, rank + world, ...; label of index i is i mod K (class-balanced)."""
    return torch.arange(rank, n, world)


def sweep_figure(alphas: Sequence[float], values: Sequence[float], name: str, step: int) -> Figure:
    """A line plot of the metric against the guidance scale alpha, on the Agg canvas (no display needed)."""
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(alphas, values, marker="o")
    best = int(np.argmin(values))
    ax.annotate(f"{values[best]:.3g}", (alphas[best], values[best]), textcoords="offset points", xytext=(0, 6))
    ax.set_xlabel("guidance scale alpha")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs alpha, step {step}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


class FrechetCallback(MetricCallback):
    """Every ``every_n_steps`` optimiser steps and at the end of training: the Frechet distance between
    ``num_samples`` EMA samples (class-balanced labels: sample i has class i mod K) and reference statistics, at
    each guidance scale in ``alphas``.

    Features: ``metric`` = "classifier" (``checkpoint``: the classifier file), "inception" (``weights``, else
    ``$DRIFTING_INCEPTION_WEIGHTS`` or the torch cache) or "encoder" (``encoder``, else a ResNetMAE from the
    MAEPretraining ``checkpoint``, else the module's own ``encoder``; ``feature_key`` picks one feature set).
    Samples pass through ``pl_module.decode_samples`` (latent runs), then images are quantised to uint8 and back
    (the DiT rule, as a saved .npz), before extraction; real samples take the same path.
    Reference: ``reference_npz`` (ADM-style mu/sigma) or ``num_reference`` (default ``num_samples``) real samples of
    ``reference_split`` from ``trainer.datamodule.real_samples``, computed once by rank 0 and cached in ``cache_dir``
    (default ``<default_root_dir>/reference_stats``), keyed by the data and the extractor's weights.

    Logged (rank 0, to every logger at the exact step; also ``pl_module.log``-ged for ModelCheckpoint):
    ``metrics/<name>`` for one alpha, ``metrics/<name>_alpha<a>`` for a sweep, where name is ``fid`` only for
    Inception with the published weights, else ``fd_inception``, ``fd_classifier`` or ``fd_encoder``. A sweep also
    draws ``<name>`` against alpha to TensorBoard (``metrics/<name>_vs_alpha``) and to
    ``<name>_vs_alpha_step<step>.png`` in ``trainer.log_dir``. The history goes to ``<name>.json`` at the end, the
    time an evaluation took to ``time/<name>_s``. ``tag`` (e.g. "50k") is appended to the name (``fid_50k``): two
    callbacks of one metric, such as a frequent 10k-sample one and a 50k one, need their own tags.
    Missing Inception weights are reported once and the callback then does nothing: training goes on.

    DDP: every rank samples its share (noise seeded with ``seed + rank``, the same at every evaluation), the
    metric sums the feature statistics across ranks and every rank computes the same value.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 50000,
        alphas: Sequence[float] = (1.0,),
        metric: str = "classifier",
        checkpoint: str | None = None,
        weights: str | None = None,
        encoder: FeatureEncoder | None = None,
        feature_key: str | None = None,
        reference_npz: str | None = None,
        num_reference: int | None = None,
        reference_split: str = "train",
        cache_dir: str | None = None,
        batch_size: int = 250,
        seed: int = 0,
        tag: str | None = None,
    ) -> None:
        metric_kind(metric)
        if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
            raise ValueError(f"FrechetCallback tag must be letters, digits, '_', '.' or '-' (e.g. '50k'), got {tag!r}")
        if num_samples < 2 or batch_size < 1:
            raise ValueError(f"need num_samples >= 2 and batch_size >= 1, got {num_samples}, {batch_size}")
        if metric_kind(metric) == "classifier" and checkpoint is None:
            make_extractor(metric)  # raises the error that says where the classifier file comes from
        super().__init__(every_n_steps)
        self.num_samples, self.alphas, self.metric = num_samples, as_alpha_list(alphas), metric
        self.checkpoint, self.weights, self.encoder, self.feature_key = checkpoint, weights, encoder, feature_key
        self.reference_npz, self.num_reference, self.reference_split = reference_npz, num_reference, reference_split
        self.cache_dir, self.batch_size, self.seed, self.tag = cache_dir, batch_size, seed, tag
        self.disabled = False
        self.name: str | None = None  # known once the extractor is built
        self._extractor: nn.Module | None = None
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def state_key(self) -> str:
        # A classifier and an Inception callback side by side; two of one metric differ by their tags.
        if self.tag is None:
            return self._generate_state_key(metric=self.metric)
        return self._generate_state_key(metric=self.metric, tag=self.tag)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), {k: float(v) for k, v in d.items()}) for s, d in state_dict.get("history", [])]

    def keys(self) -> dict[float, str]:
        """{alpha: logged key}: ``metrics/<name>`` for one alpha, ``metrics/<name>_alpha<a>`` for a sweep."""
        if len(self.alphas) == 1:
            return {self.alphas[0]: f"metrics/{self.name}"}
        return {a: f"metrics/{self.name}_alpha{alpha_tag(a)}" for a in self.alphas}

    # ---- hooks ----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._extractor is not None or self.disabled:
            return
        encoder = self.encoder
        if metric_kind(self.metric) == "encoder" and encoder is None and self.checkpoint is None:
            encoder = getattr(pl_module, "encoder", None)
        try:
            self._extractor = make_extractor(self.metric, self.checkpoint, self.weights, encoder, self.feature_key)
        except FileNotFoundError as err:
            if metric_kind(self.metric) != "inception":
                raise
            self.disabled = True
            rank_zero_warn(f"FrechetCallback: no Inception metric will be logged in this run. {err}")
            return
        self._extractor.eval().to(pl_module.device)
        self.name = self._extractor.metric_name + ("" if self.tag is None else f"_{self.tag}")
        if self.reference_npz is not None and not os.path.isfile(self.reference_npz):
            raise FileNotFoundError(
                f"FrechetCallback: reference_npz {self.reference_npz} does not exist; give an ADM-style .npz with "
                "mu and sigma, or leave it unset to compute the statistics from the DataModule's real samples"
            )

    def runs_here(self, trainer: L.Trainer) -> bool:
        return not self.disabled

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            record = {
                "metric": self.name,
                "num_samples": self.num_samples,
                "alphas": self.alphas,
                "history": [{"step": s, **v} for s, v in self.history],
            }
            with open(os.path.join(self.log_dir, f"{self.name}.json"), "w") as f:
                json.dump(record, f, indent=2)

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """{key: value} at every alpha; a collective under DDP (every rank calls it and gets the same values).
        Records the history and writes to the loggers on rank 0."""
        if self._extractor is None:
            self.on_fit_start(trainer, pl_module)
            if self.disabled:
                return {}
        started = time.perf_counter()
        mu, sigma = self.reference(trainer, pl_module)
        values = {key: self.distance(trainer, pl_module, mu, sigma, a) for a, key in self.keys().items()}
        step = trainer.global_step
        self.history.append((step, values))
        if trainer.is_global_zero:
            logged = {**values, f"time/{self.name}_s": time.perf_counter() - started}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
            if len(self.alphas) > 1:
                self._plot_sweep(trainer, list(values.values()), step)
            rank_zero_info(f"step {step}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in values.items()))
        return values

    @torch.no_grad()
    def distance(
        self, trainer: L.Trainer, pl_module: L.LightningModule, mu: np.ndarray, sigma: np.ndarray, alpha: float
    ) -> float:
        """Frechet distance at guidance scale alpha between this rank's share of samples (summed over ranks by
        the metric) and the reference (mu [F], sigma [F, F])."""
        metric = FrechetDistance(num_features=mu.shape[0]).to(pl_module.device)
        metric.set_reference(mu, sigma)
        for x in self._generated(trainer, pl_module, alpha):
            metric.update(self._extractor(through_uint8(pl_module.decode_samples(x))), real=False)
        return float(metric.compute())

    def _generated(self, trainer: L.Trainer, pl_module: L.LightningModule, alpha: float) -> Iterator[Tensor]:
        """This rank's samples [B, ...] in batches of ``batch_size``, from the same seeded noise every time."""
        device = pl_module.device
        num_classes = generator_classes(pl_module)
        noise = fixed_noise(pl_module, self.seed + trainer.global_rank)
        for idx in rank_share(self.num_samples, trainer.global_rank, trainer.world_size).split(self.batch_size):
            labels = balanced_labels(idx, num_classes, device)
            yield pl_module.sample(len(idx), labels=labels, alpha=alpha, use_ema=True, generator=noise)

    def reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) float64 of the real data, computed (or read from the cache) once by rank 0."""
        if self._reference is not None:
            return self._reference
        if self.reference_npz is not None:
            from drifting_lightning.metrics.reference import load_reference_npz

            self._reference = load_reference_npz(self.reference_npz)
        else:
            stats = self._compute_reference(trainer, pl_module) if trainer.is_global_zero else None
            self._reference = trainer.strategy.broadcast(stats, src=0)
        return self._reference

    def _compute_reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "real_samples"):
            raise RuntimeError(
                "FrechetCallback needs reference statistics: give `reference_npz`, or train with a DataModule that "
                "has real_samples(n, split, seed) (every DataModule of drifting_lightning.data does)"
            )
        n = self.num_reference or self.num_samples
        real = dm.real_samples(n, split=self.reference_split, seed=self.seed)[0]
        fingerprint = {
            "datamodule": type(dm).__qualname__,
            "split": self.reference_split,
            "seed": self.seed,
            "decode": type(pl_module).__qualname__ if pl_module.decoder is not None else None,
            "content": content_fingerprint(real),
        }
        cache = self.cache_dir or os.path.join(trainer.default_root_dir, "reference_stats")

        def batches() -> Iterator[Tensor]:
            for x in real.split(self.batch_size):
                yield through_uint8(pl_module.decode_samples(x.to(pl_module.device)))

        return reference_statistics(
            extractor_fingerprint(self._extractor), batches, len(real), cache, fingerprint, self._extractor
        )

    def _plot_sweep(self, trainer: L.Trainer, values: list[float], step: int) -> None:
        fig = sweep_figure(self.alphas, values, self.name, step)
        os.makedirs(self.log_dir, exist_ok=True)
        fig.savefig(os.path.join(self.log_dir, f"{self.name}_vs_alpha_step{step:06d}.png"))
        for board in tensorboards(trainer):
            board.add_figure(f"metrics/{self.name}_vs_alpha", fig, global_step=step, close=False)
