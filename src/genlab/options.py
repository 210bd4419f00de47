"""Ranges and choices of genlab's options, declared once, on the signature that takes them.

An option's type hint says what it accepts: choices are a ``Literal``, bounds a `Range`
inside ``Annotated``::

    latent_dim: Annotated[int, Range(1)] = 16
    recon_loss: Literal["bce", "mse"] = "bce"
    every_n_train_steps: Annotated[int, Range(1)] | None = None

The start-up check (`genlab.config.validate`) reads these hints from every ``_target_``
in a run's config, and `checked` makes a constructor check its own arguments against the
same hints: a config file, a notebook and a test all meet the same message.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import os
import pathlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from genlab.errors import GenlabError


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``minimum`` (excluded when ``exclusive``) and ``maximum``, each
    optional; ``note`` says what a special value means, e.g. ``"0: only at the end of fit"``."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        low = self.minimum is None or (
            value > self.minimum if self.exclusive else value >= self.minimum
        )
        return low and (self.maximum is None or value <= self.maximum)

    def describe(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            bounds = f"between {_number(self.minimum)} and {_number(self.maximum)}"
        elif self.minimum is not None:
            bounds = f"{'>' if self.exclusive else '>='} {_number(self.minimum)}"
        else:
            bounds = f"<= {_number(self.maximum)}" if self.maximum is not None else ""
        return f"{bounds} ({self.note})" if self.note else bounds


@dataclass(frozen=True)
class NonEmpty:
    """A list that holds at least one item."""

    def holds(self, value: collections.abc.Sized) -> bool:
        return len(value) > 0

    def describe(self) -> str:
        return "(at least one)"


@dataclass(frozen=True)
class Explained:
    """Words that say what an option accepts, instead of the ones its type hint would give."""

    text: str


@dataclass(frozen=True)
class Length:
    """A list of exactly ``n`` items."""

    n: int

    def holds(self, value: collections.abc.Sized) -> bool:
        return len(value) == self.n

    def describe(self) -> str:
        return f"(exactly {self.n})"


_CONSTRAINTS = (Range, NonEmpty, Length)


def matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the type hint: True, False, or None when the hint is beyond this check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        fits = matches(value, args[0])
        if fits is False:
            return False
        return all(c.holds(value) for c in args[1:] if isinstance(c, _CONSTRAINTS)) and fits
    if hint is Any:
        return None
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if inspect.isclass(hint) and issubclass(hint, (os.PathLike, pathlib.PurePath)):
        return isinstance(value, (str, os.PathLike))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [matches(value, arg) for arg in args]
        return True if True in results else None if None in results else False
    if origin in (list, tuple, collections.abc.Sequence) and args:
        if origin is tuple and args[1:] != (...,):  # a fixed-length tuple: beyond this check
            return None
        # OmegaConf's ListConfig, which constructors receive from Hydra, is a Sequence too.
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            return False
        results = [matches(item, args[0]) for item in value]
        return False if False in results else None if None in results else True
    return None


def describe(hint: Any) -> str:
    """What a hint accepts, in words: ``an integer >= 1``, ``one of bce, mse``, ``a list of integers``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if origin is typing.Annotated:
        explained = [e.text for e in args[1:] if isinstance(e, Explained)]
        if explained:
            return explained[0]
        bounds = [c.describe() for c in args[1:] if isinstance(c, _CONSTRAINTS)]
        return " ".join([describe(args[0]), *bounds])
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in a.__args__]
        others = [describe(a) for a in args if typing.get_origin(a) is not typing.Literal]
        choices = [f"one of {', '.join(dict.fromkeys(map(str, literals)))}"] if literals else []
        return " or ".join(choices + others)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0]
        annotated = typing.get_origin(item) is typing.Annotated
        base, *constraints = typing.get_args(item) if annotated else (item,)
        noun = describe(base).removeprefix("an ").removeprefix("a ")
        bounds = "".join(f" {c.describe()}" for c in constraints if isinstance(c, _CONSTRAINTS))
        return f"a list of {noun}s{bounds}"
    if inspect.isclass(hint) and issubclass(hint, (os.PathLike, pathlib.PurePath)):
        return "a path"
    return str(hint)


def problem(where: str, value: Any, hint: Any) -> str | None:
    """``where=value must be ...`` when ``value`` does not fit ``hint``, else None."""
    if matches(value, hint) is False:
        return f"{where}={value!r} must be {describe(hint)}"
    return None


def type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The type hints of a function's or a class's parameters, ``Annotated`` bounds kept."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(inspect.unwrap(function), include_extras=True)
    except (NameError, TypeError, AttributeError):  # a hint only type checkers can resolve
        return {}


def raise_if_any(problems: Mapping[str, str], preamble: str = "") -> None:
    """One `GenlabError` listing every problem found, in the order of their options."""
    if problems:
        found = "; ".join(problems[key] for key in sorted(problems))
        raise GenlabError(f"{preamble}{found}.")


def check_values(values: Mapping[str, Any], hints: Mapping[str, Any], prefix: str) -> None:
    """Refuse every value its hint does not allow, naming each as ``<prefix>.<name>``."""
    problems = {
        name: found
        for name, value in values.items()
        if name in hints and (found := problem(f"{prefix}.{name}", value, hints[name]))
    }
    raise_if_any(problems)


def checked(prefix: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate ``__init__`` so that it refuses arguments its type hints do not allow,
    naming each as its config key ``<prefix>.<name>``, before it builds anything."""

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(*args: Any, **kwargs: Any) -> None:
            arguments = signature.bind(*args, **kwargs).arguments
            check_values(arguments, type_hints(init), prefix)
            init(*args, **kwargs)

        return checked_init

    return decorate


def did_you_mean(word: str, candidates: collections.abc.Iterable[str]) -> str:
    """`` (did you mean latent_dim?)`` when one of ``candidates`` is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown(path: str, key: str, known: collections.abc.Iterable[str], owner: str) -> str:
    """The message for ``path.key``, which ``owner`` does not take: the closest option, and all of them."""
    options = sorted(k for k in known if not (k.startswith("_") and k.endswith("_")))
    where = f"{path}.{key}" if path else key
    return (
        f"{where} is not an option of {owner}{did_you_mean(key, options)}; "
        f"its options are {', '.join(options)}"
    )
