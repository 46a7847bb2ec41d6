"""jsonargparse's nested errors -> one sentence that names the key, the value and the fix.

jsonargparse reports a bad value deep in a config as a chain of exceptions, one per nesting level (a ``Parser key
"loss"`` level, a ``Problem with given class_path`` level, a union of subtypes ...), and prints all of them with the
usage: 60-90 lines for one typo. The chain holds everything a short message needs: the keys of the levels, the base
class of the innermost component, and the root error. ``parse_error`` and ``instantiation_error`` read it.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import re
import types
import typing
from argparse import ArgumentError
from collections.abc import Iterator
from typing import Any

from drifting_lightning import registry

_KEY = re.compile(r'^Parser key "([^"]+)"(?: element (\d+))?:')
_UNION = re.compile(r"^Does not validate against any of the Union subtypes\nSubtypes: \[<class '([\w.]+)'>")
_PROBLEM = re.compile(r"^Problem with given class_path '([\w.]+)'")
_GIVEN_CLASS = re.compile(r"Given value: Namespace\(class_path='([\w.]+)'")
_UNKNOWN_NAME = (
    re.compile(r"^Expected a dot import path string: (\S+)"),
    re.compile(r"^Import path (\S+) does not correspond to a subclass of"),
)
_UNKNOWN_KEY = re.compile(r"^Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"^Expected a <class '(\w+)'>\. Got value: (.*)$", re.S)
_EXPECTED_LIST = re.compile(r"^Expected a <class '(?:collections\.abc\.Sequence|list|tuple)'>\. Got value: (.*)$", re.S)
_EXPECTED_LITERAL = re.compile(r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", re.S)
_ABSTRACT = re.compile(r"^Expected an instantiatable class, but (?:[\w]+\.)*(\w+) is abstract")
_BY_INDEX = re.compile(r"unrecognized arguments: --(\d+\.\S*)")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --([A-Za-z_]\w*)[.=]")  # a component's argument, mistyped
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)  # "from None" ends it


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def parse_error(message: str, err: BaseException | None) -> str | None:
    """One line for a parse error of the ``fit`` parser (``message``, the exception chain ``err``), or None when the
    error is of a kind not recognised here (the caller then keeps jsonargparse's message)."""
    keys: list[str] = []
    classes: list[str] = []  # the class_path of each component level, outermost first
    owner = base = None  # the class whose argument the innermost key is, and that key's base class
    subtypes: list[str] = []  # the plain types of the innermost union, when the key takes one of several
    levels = [e for e in _chain(err) if not isinstance(e, ArgumentError)] or [ValueError(message)]
    for e in levels:
        text = str(e).strip()
        if match := _KEY.match(text):
            keys += [k for k in match.group(1).split(".") if k != "init_args"]
            owner, base, subtypes = (classes[-1] if classes else None), None, []
            if match.group(2):
                keys[-1] += f"[{int(match.group(2)) - 1}]"
        elif match := _PROBLEM.match(text):
            classes.append(match.group(1))
        elif match := _UNION.match(text):
            base = base or match.group(1)
            subtypes = re.findall(r"<class '(\w+)'>", text.splitlines()[1])
    root = str(levels[-1]).strip()
    key = ".".join(keys)
    if match := _UNKNOWN_KEY.match(root):
        return _unknown_key(keys, match.group(1), classes[-1] if classes else None)
    name = next((m.group(1) for pattern in _UNKNOWN_NAME if (m := pattern.match(root))), None)
    if name is None and isinstance(levels[-1], (AttributeError, ModuleNotFoundError)) and classes:
        name = classes[-1]  # a full class path whose module or class does not exist
    expected = _import(base) if base else _argument_type(owner, keys[-1]) if owner and keys else None
    if expected is None and key == "trainer.callbacks":  # the Trainer's list takes callbacks of any class
        from lightning.pytorch.callbacks import Callback

        expected = Callback
    if name is not None and expected is not None:
        return _unknown_name(key, name, expected)
    if match := _EXPECTED.match(root):
        plain = [t for t in subtypes if t in _TYPE_WORDS]
        names = plain if match.group(1) in plain else [match.group(1)]  # bool | int: either is fine
        wanted = " or ".join(_TYPE_WORDS.get(n, n) for n in names)
        return f"{key}: expected {wanted}, got {match.group(2).strip()!r}"
    if match := _EXPECTED_LIST.match(root):
        value = match.group(1).strip()
        if value.startswith("["):  # brackets that do not close, or a stray comma
            return f"{key}: {value!r} is not a complete list; e.g. --{key} '[{value.strip('[], ')}]'"
        return f"{key}: expected a list, got {value!r}; in brackets, e.g. --{key} '[{value}]'"
    if match := _EXPECTED_LITERAL.match(root):
        return f"{key}: expected one of {match.group(1)}, got {match.group(2).strip()!r}"
    if (match := _ABSTRACT.match(root)) and expected is not None:
        label, names = registry.choices(expected)
        return f"{key}: {match.group(1)} is a base class; choose one of the {label}s: {', '.join(names)}"
    if match := _BY_INDEX.search(root):
        option = f"--{key}.{match.group(1).split('=')[0]}"
        return (f"{key}: list elements cannot be set by index on the command line ({option}); set them in a "
                f"config file (--config), or give the whole list: --{key} '[...]'")
    if (match := _UNRECOGNIZED.search(root)) and classes:
        return _unknown_key(keys, match.group(1), classes[-1])
    if key:  # the reason may follow on the next lines ("Problem with given class_path ...:\n  <reason>")
        return f"{key}: " + " ".join(line.strip() for line in root.splitlines() if line.strip())
    return None


def _argument_type(class_path: str, name: str) -> type | None:
    """The class an argument of ``class_path``'s constructor takes (the first class of a union), or None."""
    try:
        hint = typing.get_type_hints(_import(class_path).__init__).get(name.split("[")[0])
    except Exception:  # an annotation that does not resolve: no hint, jsonargparse's message stays
        return None
    for candidate in (hint, *typing.get_args(hint)):
        if inspect.isclass(candidate) and candidate is not type(None):
            return candidate
    return None


def _unknown_name(key: str, name: str, base: type) -> str:
    label, names = registry.choices(base)
    where = f"{key}: " if key else ""
    if any(name in registry.components(kind) for kind in registry.kinds()):  # a component, of another kind or base
        options = f" ({', '.join(names)})" if names != [label] else ""
        return f"{where}{name} does not go here: this takes a {label}{options}"
    return f"{where}{registry.unknown(label, name, names)}"


def _unknown_key(keys: list[str], option: str, class_path: str | None) -> str:
    cls = _import(class_path) if class_path else None
    key = ".".join([*keys, option])
    if cls is None:
        return f"{key}: no such option; see `drifting fit --help`"
    params = [p for p in list(inspect.signature(cls.__init__).parameters)[1:] if p not in ("args", "kwargs")]
    kind = next((k for k, base in registry.kinds().items() if base is cls), None)
    if not params and kind is not None:  # the config names no class here: the constructor's default is used
        found = registry.components(kind)
        takes = [name for name, c in found.items() if option in inspect.signature(c.__init__).parameters]
        where = ".".join(keys)
        return (f"{key}: the config names no {registry.choices(cls)[0]} at {where} (its default is used), so it has no "
                f"arguments to set; name one first, e.g. --{where} {(takes or list(found))[0]} --{key} ... "
                f"(choose from {', '.join(found)})")
    if not params:
        return f"{key}: {cls.__name__} takes no arguments"
    hint = registry.suggest(option, params)
    return f"{key}: {cls.__name__} has no argument {option!r}; {hint + ' Its' if hint else 'its'} arguments: " + (
        ", ".join(params)
    )


def _trainer_arguments() -> list[str]:
    import lightning.pytorch as pl

    return list(inspect.signature(pl.Trainer.__init__).parameters)[1:]


def argparse_error(message: str, options: list[str]) -> str | None:
    """One line for argparse's own errors: an unknown option (with the closest options of the parser), missing
    required sections (with how to give them)."""
    if message.startswith("unrecognized arguments:"):
        first = message.split(":", 1)[1].split()[0]
        hint = registry.suggest(first.split("=", 1)[0], options)
        return f"unknown option {first}{'; ' + hint if hint else ''} (see `drifting fit --help`)"
    if match := re.match(r"Subcommand '\w+' does not accept option '([\w.]+)'", message):  # a key in a config file
        key = match.group(1)
        section, _, name = key.partition(".")
        known = [f"{section}.{p}" for p in _trainer_arguments()] if section == "trainer" and name else options
        hint = registry.suggest(key, known)
        return f"{key}: no such option{'; ' + hint if hint else ''} (see `drifting fit --help`)"
    if message.startswith("the following arguments are required:"):
        return f"{message.strip()}: give them in a config, e.g. --config configs/toy/checkerboard.yaml (see configs/)"
    return None


def instantiation_error(err: BaseException, config: Any) -> BaseException | None:
    """For an error raised while jsonargparse built the classes of ``config``: the root error, as one line that
    names the config key of the class whose constructor refused its arguments (``model.loss: temperatures must
    be ...``); None when ``err`` is not such an error."""
    chain = list(_chain(err))
    classes = [m.group(1) for e in chain if (m := _GIVEN_CLASS.search(str(e)))]
    root = chain[-1]
    if not classes or root is err:
        return None
    tree = config.as_dict() if hasattr(config, "as_dict") else config
    found = list(_find_class(tree, classes[-1], []))
    where = _raising_component(root, tree) or (found[0] if len(found) == 1 else classes[-1].rsplit(".", 1)[-1])
    if isinstance(root, FileNotFoundError):
        return FileNotFoundError(f"{where}: {str(root).strip()}")
    return ValueError(f"{where}: {str(root).strip()}") if isinstance(root, (ValueError, TypeError)) else root


def null_argument(config: Any) -> str | None:
    """One line for the first constructor argument in ``config`` (a parsed config) that is null although its
    type does not admit None (``model.lr: expected a number, got null``), else None. jsonargparse lets such a null
    through when it comes from the command line for an argument of a component (``--model.lr null``), and the
    constructor then fails on it with a bare TypeError, or the run at its first step."""
    tree = config.as_dict() if hasattr(config, "as_dict") else config
    for key, cls, name in _null_init_args(tree, []):
        hint = _init_hint(cls, name)
        if hint is not None and not _admits_none(hint):
            return f"{key}: expected {_type_words(hint)}, got null ({cls.__name__} needs a value here)"
    return None


def base_class_named(config: Any) -> str | None:
    """One line for the first component in ``config`` (a parsed config) that is the base class of its kind
    (``--model.loss.kernel Kernel``): a base builds, but fails at the first step on its unimplemented method."""
    tree = config.as_dict() if hasattr(config, "as_dict") else config
    bases = {base: kind for kind, base in registry.kinds().items()}
    for key, class_path in _class_paths(tree, []):
        cls = _import(class_path)
        if cls in bases:
            label, names = registry.choices(cls)
            return f"{key}: {cls.__name__} is a base class; choose one of the {label}s: {', '.join(names)}"
    return None


def _class_paths(node: Any, keys: list[str]) -> Iterator[tuple[str, str]]:
    """(key, class_path) of every component in a config tree, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield ".".join(keys), node["class_path"]
        for k, v in node.items():
            yield from _class_paths(v, keys if k == "init_args" else [*keys, str(k)])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_paths(v, [*keys[:-1], f"{keys[-1]}[{i}]"] if keys else [f"[{i}]"])


def _null_init_args(node: Any, keys: list[str]) -> Iterator[tuple[str, type, str]]:
    """(key, class, argument name) of every null init argument of a component, depth first."""
    if isinstance(node, dict):
        cls = _import(node["class_path"]) if isinstance(node.get("class_path"), str) else None
        args = node.get("init_args")
        if inspect.isclass(cls) and isinstance(args, dict):
            for name, value in args.items():
                if value is None:
                    yield ".".join([*keys, name]), cls, name
        for k, v in node.items():
            yield from _null_init_args(v, keys if k == "init_args" else [*keys, str(k)])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _null_init_args(v, [*keys[:-1], f"{keys[-1]}[{i}]"] if keys else [f"[{i}]"])


def _init_hint(cls: type, name: str) -> Any:
    """The annotation of ``cls``'s constructor argument ``name``; None when it has none, its default is None, or
    the annotations do not resolve (then there is nothing to hold the value to)."""
    try:
        parameter = inspect.signature(cls.__init__).parameters.get(name)
        hint = typing.get_type_hints(cls.__init__).get(name)
    except Exception:
        return None
    if parameter is None or parameter.default is None:
        return None
    return hint


def _admits_none(hint: Any) -> bool:
    if hint is None or hint is type(None) or hint is Any or hint is object:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_admits_none(arg) for arg in typing.get_args(hint))
    return False


def _type_words(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin is dict or origin is collections.abc.Mapping:
        return "a mapping"
    if inspect.isclass(hint):
        return _TYPE_WORDS.get(hint.__name__, f"a {hint.__name__}")
    return "a value"


def _raising_component(err: BaseException, tree: Any) -> str | None:
    """The config key of the component whose constructor raised ``err``: the outermost constructor in its traceback
    that the config names once. jsonargparse's error names only the top-level class (``model``) when a nested
    component (``model.generator``) refused its arguments."""
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "__init__" else None
        if owner is not None:
            found = list(_find_class(tree, f"{type(owner).__module__}.{type(owner).__qualname__}", []))
            if len(found) == 1:
                return found[0]
        tb = tb.tb_next
    return None


def _find_class(node: Any, class_path: str, keys: list[str]) -> Iterator[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    if isinstance(node, dict) and node.get("class_path") == class_path:
        yield ".".join(keys)
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _find_class(v, class_path, keys + ([] if k == "init_args" else [str(k)]))
