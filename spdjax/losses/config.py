"""`LossConfig`: the configured terms (each with its own coefficient and options) and the shared settings.

Config-file form (`config.loss`, every value overridable as `--config.loss.terms.<term>.<option>=...`):

    loss = dict(
        terms=dict(
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0),            # option: unroll (None or int)
            importance_minimality=dict(coeff=3e-3, pnorm=1.0),     # p_anneal_*, beta, eps
            pgd_recon_subset=dict(coeff=2.0, n_steps=2, mask_scope="shared_across_batch"),
        ),
        n_mask_samples=1, mask_type="continuous", use_delta_component=True, sigmoid="leaky_hard",
        output_loss="mse", ci_l0_threshold=0.1, remat=False,
    )

Python form: `LossConfig(terms={"pgd_recon": PGDOptions(coeff=1.0, n_steps=2), ...}, n_mask_samples=2)`
(options objects or dicts). The old flat form still works as an alias: `LossConfig(coeffs=(("pgd_recon",
1.0), ...), pgd_n_steps=2, pnorm=2.0)`: each flat option (`FLAT_OPTIONS`) applies to every listed term
that has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from spdjax import masks as masks_lib
from spdjax.fields import _type_ok, to_dict
from spdjax.losses.forward import DIVERGENCES
from spdjax.losses.registry import TERM_OPTIONS, OptionError, TermOptions, _type_name
from spdjax.losses.terms import LayerwiseOptions, MinimalityOptions, PGDOptions, SubsetOptions
from spdjax.sigmoids import get_sigmoids

# The old flat LossConfig keywords: flat name -> (options class that has it, option name). A flat value applies
# to every term whose options class derives from that class.
FLAT_OPTIONS: dict[str, tuple[type[TermOptions], str]] = {
    "pnorm": (MinimalityOptions, "pnorm"),
    "p_anneal_start_frac": (MinimalityOptions, "p_anneal_start_frac"),
    "p_anneal_final_p": (MinimalityOptions, "p_anneal_final_p"),
    "p_anneal_end_frac": (MinimalityOptions, "p_anneal_end_frac"),
    "minimality_beta": (MinimalityOptions, "beta"),
    "minimality_eps": (MinimalityOptions, "eps"),
    "layerwise_unroll": (LayerwiseOptions, "unroll"),
    "subset_routing": (SubsetOptions, "routing"),
    "subset_p": (SubsetOptions, "subset_p"),
    "pgd_init": (PGDOptions, "init"),
    "pgd_n_steps": (PGDOptions, "n_steps"),
    "pgd_step_size": (PGDOptions, "step_size"),
    "pgd_mask_scope": (PGDOptions, "mask_scope"),
}
_FLAT_OF = {opt: flat for flat, (_, opt) in FLAT_OPTIONS.items()}  # option name -> flat name (all distinct)

DEFAULT_COEFFS = (("stochastic_recon", 1.0), ("stochastic_recon_layerwise", 1.0), ("importance_minimality", 3e-3))
_MISSING = object()


@contextlib.contextmanager
def _naming(path_of):
    """Re-raise an `OptionError` as a ValueError naming the full field (`path_of(option)`)."""
    try:
        yield
    except OptionError as e:
        raise ValueError(f"{path_of(e.option)}{e.detail}") from None


def _flat_default(flat: str):
    owner, opt = FLAT_OPTIONS[flat]
    return owner.__dataclass_fields__[opt].default


@dataclasses.dataclass(frozen=True, init=False)
class LossConfig:
    """Static loss configuration (hashable; a leafless pytree, so it can be passed to `jit`).

    `terms`: `((term name, options), ...)` in order; only these terms are in the loss (a term with
    coeff 0 is computed and reported, not added). The other fields are shared by all terms. Defaults are the
    reference-main recipe (delta component on, no faithfulness term).

    Construct with `terms=` a mapping or sequence of `(name, options)` where options is the term's options
    object or a dict of its options, or with the old flat keywords (`coeffs=` and `FLAT_OPTIONS`), not
    both. `flat_defaults` holds flat options given to the alias that no listed term has: they still serve
    `options_for` (evaluation-only terms) and the flat attributes (`config.pgd_n_steps`, ...).
    """

    terms: tuple[tuple[str, TermOptions], ...]
    n_mask_samples: int = 1
    mask_type: str = "continuous"
    use_delta_component: bool = True
    sigmoid: str = "leaky_hard"
    output_loss: str = "mse"
    ci_l0_threshold: float = 0.1
    remat: bool = False  # masked forward passes and CI functions under jax.checkpoint (recomputed in backward)
    vocab_chunk: int | None = None  # KL over the last axis in chunks of this many entries (large vocabularies)
    # masked passes keep low-rank linear site outputs in factored form (spdjax.lowrank): for targets
    # whose residual stream only adds site outputs and reads them through matrices (ResidMLP)
    low_rank_outputs: bool = False
    flat_defaults: tuple[tuple[str, Any], ...] = ()

    def __init__(self, terms=None, *, coeffs=None, flat_defaults=(), **kwargs):
        shared = {f.name: kwargs.pop(f.name, f.default) for f in dataclasses.fields(self) if f.name in SHARED_FIELDS}
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in FLAT_OPTIONS}
        if kwargs:
            raise TypeError(f"LossConfig: unknown keyword(s) {sorted(kwargs)}; allowed: "
                            f"{['terms', *SHARED_FIELDS, 'coeffs', *FLAT_OPTIONS]}")
        leftover = dict(flat_defaults)
        if terms is not None:
            if coeffs is not None or flat:
                raise ValueError(
                    "loss: give either `terms` (each term with its own options) or the old flat form (`coeffs` and "
                    f"{sorted(set(flat) | ({'coeffs'} if coeffs is not None else set()))}), not both"
                )
            terms = _normalise_terms(terms)
        else:
            terms, unused = _terms_from_flat(DEFAULT_COEFFS if coeffs is None else coeffs, flat)
            leftover.update(unused)
        bad = sorted(set(leftover) - set(FLAT_OPTIONS))
        if bad:
            raise ValueError(f"loss.flat_defaults: unknown flat option(s) {bad}; allowed: {list(FLAT_OPTIONS)}")
        # a leftover at its default is no setting at all (so the flat form of the default equals LossConfig())
        leftover = tuple((k, v) for k, v in leftover.items() if v != _flat_default(k))
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "flat_defaults", leftover)
        for k, v in shared.items():
            object.__setattr__(self, k, v)
        self._validate_shared()

    def _validate_shared(self):
        if isinstance(self.n_mask_samples, bool) or not isinstance(self.n_mask_samples, int) or self.n_mask_samples < 1:
            raise ValueError(f"loss.n_mask_samples must be an int >= 1, got {self.n_mask_samples!r}")
        if self.mask_type not in masks_lib.MASK_KINDS:
            raise ValueError(f"loss.mask_type: unknown {self.mask_type!r}; allowed: {list(masks_lib.MASK_KINDS)}")
        if self.output_loss not in DIVERGENCES:
            raise ValueError(f"loss.output_loss: unknown {self.output_loss!r}; allowed: {list(DIVERGENCES)}")
        get_sigmoids(self.sigmoid)
        for f in ("use_delta_component", "remat", "low_rank_outputs"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"loss.{f} must be a bool, got {getattr(self, f)!r}")
        vc = self.vocab_chunk
        if vc is not None and (isinstance(vc, bool) or not isinstance(vc, int) or vc < 1):
            raise ValueError(f"loss.vocab_chunk must be None or an int >= 1, got {vc!r}")

    # ------------------------------------------------------------------ reading it

    @property
    def coeffs(self) -> tuple[tuple[str, float], ...]:
        """`((term, coeff), ...)` of the configured terms, in order."""
        return tuple((n, o.coeff) for n, o in self.terms)

    @property
    def coeff_dict(self) -> dict[str, float]:
        return dict(self.coeffs)

    @property
    def term_dict(self) -> dict[str, TermOptions]:
        return dict(self.terms)

    def options_for(self, name: str) -> TermOptions:
        """The options of term `name`: the configured ones, else (an evaluation-only term) its class defaults,
        each flat option (`FLAT_OPTIONS`) it has taken from the first configured term that has it (e.g. an
        evaluated `pgd_recon` uses a configured `pgd_recon_subset`'s PGD settings) or from `flat_defaults`."""
        for n, o in self.terms:
            if n == name:
                return o
        if name not in TERM_OPTIONS:
            raise ValueError(f"unknown loss term {name!r}; allowed: {sorted(TERM_OPTIONS)}")
        cls = TERM_OPTIONS[name]
        kw = {}
        for flat, (owner, opt) in FLAT_OPTIONS.items():
            if issubclass(cls, owner) and (v := self._flat(flat)) is not _MISSING:
                kw[opt] = v
        return cls(**kw)

    def _flat(self, flat: str):
        owner, opt = FLAT_OPTIONS[flat]
        for _, o in self.terms:
            if isinstance(o, owner):
                return getattr(o, opt)
        return dict(self.flat_defaults).get(flat, _MISSING)


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.name not in ("terms", "flat_defaults"))


def _flat_property(flat: str):
    owner, opt = FLAT_OPTIONS[flat]

    def get(self):
        v = self._flat(flat)
        return _flat_default(flat) if v is _MISSING else v

    return property(get, doc=f"Flat alias: `{opt}` of the first configured term with {owner.__name__} (else "
                             f"`flat_defaults`, else the default).")


for _flat_name in FLAT_OPTIONS:
    setattr(LossConfig, _flat_name, _flat_property(_flat_name))

jax.tree_util.register_pytree_node(LossConfig, lambda c: ((), c), lambda c, _: c)


def _normalise_terms(terms) -> tuple[tuple[str, TermOptions], ...]:
    items = terms.items() if isinstance(terms, (Mapping, ml_collections.ConfigDict)) else terms
    out: dict[str, TermOptions] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"loss.terms: expected (term name, options) pairs or a mapping, got {item!r}")
        name, opts = item
        if name not in TERM_OPTIONS:
            raise ValueError(f"loss.terms: unknown loss term {name!r}; allowed: {sorted(TERM_OPTIONS)}")
        if name in out:
            raise ValueError(f"loss.terms: term {name!r} given twice")
        cls = TERM_OPTIONS[name]
        if isinstance(opts, (Mapping, ml_collections.ConfigDict)):
            opts = dict(opts)
            allowed = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(opts) - set(allowed))
            if unknown:
                raise ValueError(f"loss.terms.{name}.{unknown[0]}: unknown option of term {name!r}; "
                                 f"allowed: {allowed}")
            with _naming(lambda opt: f"loss.terms.{name}.{opt}"):
                opts = cls(**opts)
        elif type(opts) is not cls:
            raise ValueError(f"loss.terms.{name}: options must be a {cls.__name__} or a dict of its options "
                             f"{[f.name for f in dataclasses.fields(cls)]}, got {opts!r}")
        out[name] = opts
    return tuple(out.items())


def _terms_from_flat(coeffs, flat: dict) -> tuple[tuple[tuple[str, TermOptions], ...], dict]:
    """The old flat form -> (terms, the flat options no listed term has)."""
    by_owner: dict[type, dict] = {}
    for f, v in flat.items():
        owner, opt = FLAT_OPTIONS[f]
        by_owner.setdefault(owner, {})[opt] = v
    for owner, kw in by_owner.items():  # validate every given flat value, used or not
        with _naming(lambda opt: f"loss.{_FLAT_OF[opt]}"):
            owner(**kw)
    terms: dict[str, TermOptions] = {}
    used = set()
    for item in coeffs:
        name, coeff = item
        if name not in TERM_OPTIONS:
            raise ValueError(f"loss.coeffs: unknown loss term {name!r}; allowed: {sorted(TERM_OPTIONS)}")
        if name in terms:
            raise ValueError(f"loss.coeffs: term {name!r} given twice")
        cls = TERM_OPTIONS[name]
        kw = {}
        for f, v in flat.items():
            owner, opt = FLAT_OPTIONS[f]
            if issubclass(cls, owner):
                kw[opt] = v
                used.add(f)
        with _naming(lambda opt: f"loss.coeffs.{name}" if opt == "coeff" else f"loss.{_FLAT_OF[opt]}"):
            terms[name] = cls(coeff=coeff, **kw)
    return tuple(terms.items()), {f: v for f, v in flat.items() if f not in used}


def loss_config_from(section) -> LossConfig:
    """The `loss` section of a run config (ConfigDict, dict or None) -> `LossConfig`; errors name the field.

    Either the `terms` form (`terms: {term: {coeff, option...}}` plus the shared fields) or the old flat form
    (`coeffs: {term: coeff}` plus the flat options of `FLAT_OPTIONS` and the shared fields), not both.
    """
    values = to_dict(section, "loss")
    terms = values.pop("terms", None)
    coeffs = values.pop("coeffs", None)
    flat = {k: values.pop(k) for k in list(values) if k in FLAT_OPTIONS}
    unknown = sorted(set(values) - set(SHARED_FIELDS))
    if unknown:
        raise ValueError(f"config.loss: unknown field(s) {unknown}; allowed: "
                         f"{['terms', *SHARED_FIELDS]} (or the old flat form: {['coeffs', *FLAT_OPTIONS]})")
    hints = typing.get_type_hints(LossConfig)
    for k, v in values.items():
        if not _type_ok(v, hints[k]):
            raise ValueError(f"config.loss.{k} must be of type {_type_name(hints[k])}, got {v!r} ({type(v).__name__})")
    if terms is not None:
        if coeffs is not None or flat:
            old = (["coeffs"] if coeffs is not None else []) + sorted(flat)
            raise ValueError(f"config.loss: give either `terms` or the old flat form ({old}), not both; move "
                             "each option into config.loss.terms.<term>")
        return LossConfig(terms=_terms_section(terms), **values)
    for f, v in flat.items():
        owner, opt = FLAT_OPTIONS[f]
        hint = typing.get_type_hints(owner)[opt]
        if not _type_ok(v, hint):
            raise ValueError(f"config.loss.{f} must be of type {_type_name(hint)}, got {v!r} ({type(v).__name__})")
    if coeffs is not None:
        coeffs = to_dict(coeffs, "loss.coeffs")
        for k, v in coeffs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.loss.coeffs.{k} must be a number, got {v!r}")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"config.loss.coeffs.{k} must be finite and >= 0, got {v!r}")
        coeffs = tuple((k, float(v)) for k, v in coeffs.items())
    return LossConfig(coeffs=coeffs, **values, **flat)


def _terms_section(terms) -> dict[str, TermOptions]:
    """`config.loss.terms` -> {term: options}, checking names, options and types (errors name the field)."""
    terms = to_dict(terms, "loss.terms")
    out = {}
    for name, entry in terms.items():
        if name not in TERM_OPTIONS:
            raise ValueError(f"config.loss.terms.{name}: unknown loss term; allowed: {sorted(TERM_OPTIONS)}")
        if entry is None:
            entry = {}
        if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
            raise ValueError(f"config.loss.terms.{name} must be a dict of options (e.g. dict(coeff=1.0)), "
                             f"got {entry!r}")
        entry = to_dict(entry, f"loss.terms.{name}")
        cls = TERM_OPTIONS[name]
        hints = typing.get_type_hints(cls)
        allowed = [f.name for f in dataclasses.fields(cls)]
        for opt, v in entry.items():
            if opt not in allowed:
                raise ValueError(f"config.loss.terms.{name}.{opt}: unknown option of term {name!r}; "
                                 f"allowed: {allowed}")
            if not _type_ok(v, hints[opt]):
                raise ValueError(f"config.loss.terms.{name}.{opt} must be of type {_type_name(hints[opt])}, got {v!r} "
                                 f"({type(v).__name__})")
        if isinstance(entry.get("coeff"), int):
            entry["coeff"] = float(entry["coeff"])
        with _naming(lambda opt: f"config.loss.terms.{name}.{opt}"):
            out[name] = cls(**entry)
    return out
