"""Names -> components: listing, third-party plug-ins through entry points, and "did you mean" help.

jsonargparse already resolves short class names (``--model.loss.kernel Gaussian``) for every imported subclass of a
typed base class, so the registry of record is the class hierarchy itself. This module makes sure every built-in and
plug-in class is imported, lists them by kind, names the choices of a base class and suggests names for typos.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import warnings
from collections.abc import Iterable
from importlib.metadata import entry_points

import lightning.pytorch as pl

ENTRY_POINT_GROUP = "drifting_lightning.plugins"

# Modules whose import defines the built-in components; a module that fails to import is reported, not fatal.
BUILTIN_MODULES = (
    "drifting_lightning.drift.kernels",
    "drifting_lightning.drift.fields",
    "drifting_lightning.drift.loss",
    "drifting_lightning.models.mlp",
    "drifting_lightning.models.dit",
    "drifting_lightning.encoders.base",
    "drifting_lightning.encoders.resnet_mae",
    "drifting_lightning.encoders.resnet50",
    "drifting_lightning.encoders.composite",
    "drifting_lightning.encoders.convnext",
    "drifting_lightning.encoders.mae",
    "drifting_lightning.sampling.guidance",
    "drifting_lightning.sampling.positives",
    "drifting_lightning.data.toy",
    "drifting_lightning.data.vector",
    "drifting_lightning.data.images",
    "drifting_lightning.data.latents",
    "drifting_lightning.encoders.vae_bridge",
    "drifting_lightning.metrics.classifier",
    "drifting_lightning.module",
    # callbacks: no kind of `drifting list`, but imported so that configs may name them by class name
    "drifting_lightning.callbacks.frechet",
    "drifting_lightning.callbacks.sample_grid",
    "drifting_lightning.callbacks.sample_metrics",
    "drifting_lightning.callbacks.scatter",
)

_loaded = False


def load_components() -> None:
    """Import every built-in module and every plug-in module registered under the entry-point group."""
    global _loaded
    if _loaded:
        return
    for name in BUILTIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a missing dependency inside an existing module is a real error
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plug-in must not take the CLI down with it
            warnings.warn(f"plug-in {ep.name!r} ({ep.value}) failed to load: {err}", stacklevel=2)
    _loaded = True


def kinds() -> dict[str, type]:
    """Kind name -> base class, for ``drifting list``."""
    from drifting_lightning.drift.fields import DriftField
    from drifting_lightning.drift.kernels import Kernel
    from drifting_lightning.encoders.base import FeatureEncoder
    from drifting_lightning.models.base import Generator

    result: dict[str, type] = {
        "kernels": Kernel,
        "fields": DriftField,
        "encoders": FeatureEncoder,
        "generators": Generator,
    }
    try:
        from drifting_lightning.sampling.positives import PositiveSource

        result["samplers"] = PositiveSource
    except ModuleNotFoundError:
        pass
    result["data"] = pl.LightningDataModule
    result["models"] = pl.LightningModule
    return result


def components(kind: str) -> dict[str, type]:
    """Short class name -> class, for every concrete subclass of the kind's base class that is loaded."""
    load_components()
    table = kinds()
    if kind not in table:
        raise ValueError(unknown("kind", kind, list(table)))
    found = _subclasses(table[kind], ours_only=kind in ("data", "models"))
    if kind == "samplers":
        from drifting_lightning.sampling.guidance import GuidanceSampler

        found["GuidanceSampler"] = GuidanceSampler
    return dict(sorted(found.items()))


def _subclasses(base: type, ours_only: bool = False, with_lightning: bool = False) -> dict[str, type]:
    found: dict[str, type] = {}
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        hidden = cls.__name__.startswith(("_", "LazyInstance_"))  # jsonargparse's lazy_instance wrappers
        if hidden or (not with_lightning and cls.__module__.startswith(("lightning", "pytorch_lightning"))):
            continue
        if ours_only and not cls.__module__.startswith("drifting_lightning") and not _is_plugin(cls):
            continue
        if inspect.isabstract(cls):  # a base for others (ImageDataModule): it cannot be built
            continue
        found[cls.__name__] = cls
    return found


def choices(base: type) -> tuple[str, list[str]]:
    """(what a value of type ``base`` is called, the short names it accepts), for "unknown name" errors: "kernel"
    and the kernels for ``Kernel``, likewise for every kind of ``drifting list``; else the base's name, the base
    and its loaded subclasses (Lightning's own included: jsonargparse accepts their short names too)."""
    load_components()
    for kind, kind_base in kinds().items():
        if base is kind_base:
            label = {"data": "data module", "models": "model"}.get(kind, kind.removesuffix("s"))
            # a kind may list a class of another base (the guidance sampler among the samplers of positives)
            return label, [name for name, cls in components(kind).items() if issubclass(cls, base)]
    return base.__name__, sorted({base.__name__, *_subclasses(base, with_lightning=True)})


def _is_plugin(cls: type) -> bool:
    names = {ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return any(cls.__module__ == n or cls.__module__.startswith(n + ".") for n in names)


SUMMARY_CHARACTERS = 200  # of a docstring's first sentence in `drifting list`


def describe(cls: type) -> tuple[str, str]:
    """(first sentence of the docstring, constructor arguments with defaults)."""
    paragraph = (inspect.getdoc(cls) or "").strip().split("\n\n")[0]
    words = " ".join(line.strip() for line in paragraph.splitlines())
    end = re.search(r"\.(?=\s+[A-Z`]|$)", words)  # a sentence may run over several docstring lines
    summary = words[: end.start() + 1] if end else words
    if len(summary) > SUMMARY_CHARACTERS:
        summary = summary[:SUMMARY_CHARACTERS].rsplit(" ", 1)[0] + " ..."
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    args = ", ".join(
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={_show(p.default)}"
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )
    return summary, args


def _show(default: object) -> str:
    # Lazy defaults (jsonargparse's lazy_instance) have no usable repr before they are built: show the class.
    try:
        return repr(default)
    except Exception:
        return type(default).__name__.removeprefix("LazyInstance_") + "(...)"


def suggest(name: str, options: Iterable[str]) -> str:
    """"did you mean 'X'?" for a mistyped name among ``options`` (at least 70% alike: at 60% "iterations" matched
    "attraction_scale"), or ''."""
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.7)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown(label: str, name: str, names: list[str]) -> str:
    """"unknown kernel 'Gausian'; did you mean 'Gaussian'? Choose from Cauchy, Gaussian, ..." (at most 12 shown)."""
    hint = suggest(name.rsplit(".", 1)[-1], names)
    shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:12]) + f", ... ({len(names)} in all)"
    return f"unknown {label} {name!r}; {hint + ' Choose' if hint else 'choose'} from {shown}"
