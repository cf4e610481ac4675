"""The term registry: every loss term is a name, a function `fn(ctx, opts) -> scalar` and an options class.

A term's options class is a frozen dataclass derived from `TermOptions` (so it has `coeff`); its fields are
what `config.loss.terms.<term>.<option>` may set. `register_term` adds a term (built-in or a user's):

    @dataclasses.dataclass(frozen=True)
    class MyOptions(TermOptions):
        scale: float = 1.0

    @register_term("my_term", MyOptions)
    def my_term(ctx: LossContext, opts: MyOptions):
        return opts.scale * jnp.mean(ctx.out ** 2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, NamedTuple

from jaxtyping import Array

from spdjax.fields import _type_ok


class OptionError(ValueError):
    """A bad option value; `option` is the option's name, `detail` the rest of the message (" must be ...",
    ": unknown ..."). `LossConfig` re-raises it as a ValueError naming the full field (`loss.terms.<term>.<option>`)."""

    def __init__(self, option: str, detail: str):
        super().__init__(f"{option}{detail}")
        self.option, self.detail = option, detail


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)


@dataclasses.dataclass(frozen=True)
class TermOptions:
    """Options every term has: its coefficient in the total loss (finite and >= 0; 0: computed and reported,
    not added).

    Subclasses add fields (with defaults) and may override `validate` (calling `super().validate()`) to raise
    `OptionError(option, detail)`. Field values are type-checked against the annotations first.
    """

    coeff: float = 1.0

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            v, hint = getattr(self, f.name), hints[f.name]
            if not _type_ok(v, hint):
                raise OptionError(f.name, f" must be of type {_type_name(hint)}, got {v!r} ({type(v).__name__})")
        if not (math.isfinite(self.coeff) and self.coeff >= 0):
            raise OptionError("coeff", f" must be finite and >= 0, got {self.coeff!r}")
        self.validate()

    def validate(self) -> None:
        pass


class LossContext(NamedTuple):
    """Everything a term may need, computed once per step (see `spdjax.losses.loss_fn`)."""

    params: Any  # SPDParams
    target: Any  # Target
    batch: Any
    out: Array  # clean target output (gradient stopped)
    inputs: dict[str, Array]  # every site's clean input
    ci: Any  # CIOutputs: raw / lower-leaky / upper-leaky importances per site
    key: Array
    config: Any  # LossConfig: the shared settings (n_mask_samples, mask_type, use_delta_component, output_loss, remat)
    progress: Array  # fraction of training done, in [0, 1]


TermFn = Callable[[LossContext, TermOptions], Array]

# name -> term function and name -> options class; `register_term` fills both.
TERMS: dict[str, TermFn] = {}
TERM_OPTIONS: dict[str, type[TermOptions]] = {}


def register_term(name: str, options_cls: type[TermOptions] = TermOptions, fn: TermFn | None = None, *,
                  replace: bool = False):
    """Register loss term `name`: `fn(ctx: LossContext, opts: options_cls) -> scalar`.

    Use as a decorator (`@register_term("my_term", MyOptions)`) or call with `fn`. Once registered, the
    name works in `LossConfig(terms=...)`, in `config.loss.terms.<name>` and in `loss_fn(extra_terms=...)`.
    `options_cls` must be a frozen dataclass derived from `TermOptions` whose fields all have defaults.
    Registering a taken name is an error unless `replace=True` (re-running the same definition is fine).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_term: the term name must be an identifier, got {name!r}")
    if not (isinstance(options_cls, type) and issubclass(options_cls, TermOptions)
            and dataclasses.is_dataclass(options_cls) and options_cls.__dataclass_params__.frozen):
        raise TypeError(f"register_term({name!r}): options_cls must be a frozen dataclass derived from TermOptions, "
                        f"got {options_cls!r}")
    no_default = [f.name for f in dataclasses.fields(options_cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if no_default:
        raise TypeError(f"register_term({name!r}): options {no_default} of {options_cls.__name__} need defaults")

    def add(fn: TermFn) -> TermFn:
        old = TERMS.get(name)
        where = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))
        same = old is not None and where(fn)[1] is not None and where(old) == where(fn)
        if old is not None and not (replace or same):
            raise ValueError(f"register_term: loss term {name!r} is already registered ({old!r}); pass replace=True")
        TERMS[name] = fn
        TERM_OPTIONS[name] = options_cls
        return fn

    return add if fn is None else add(fn)
