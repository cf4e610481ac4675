"""Per-term loss configuration (`spdjax.losses.LossConfig`, `loss_config_from`, `register_term`).

The new `terms` form, its errors (naming the field), the old flat keywords as an alias (equal configs and
bitwise-equal losses and gradients), per-term options really used, `remat`, and a user-registered term.
"""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_ref as ref  # tests/ is on sys.path
import pytest
from test_terms import _build, _np_ci

from spdjax import losses
from spdjax import masks as masks_lib
from spdjax.losses import (
    TERM_OPTIONS,
    TERMS,
    LayerwiseOptions,
    LossConfig,
    MinimalityOptions,
    PGDOptions,
    PGDSubsetOptions,
    SubsetOptions,
    TermOptions,
    loss_config_from,
    register_term,
)

ROOT = Path(__file__).resolve().parents[3]
ALL = ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "stochastic_recon_subset",
       "importance_minimality", "ci_masked_recon", "ci_masked_recon_layerwise", "ci_masked_recon_subset",
       "unmasked_recon", "pgd_recon", "pgd_recon_layerwise", "pgd_recon_subset", "stochastic_hidden_acts_recon")

# ============================================================================= the terms form


def test_terms_form_parses_with_defaults_for_omitted_options():
    section = ml_collections.ConfigDict(dict(
        terms=dict(
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0, unroll=None),
            importance_minimality=dict(coeff=3e-3, pnorm=2.0, p_anneal_final_p=0.5, beta=0.1),
            pgd_recon_subset=dict(coeff=2, routing="static_p", n_steps=3, mask_scope="shared_across_batch"),
        ),
        n_mask_samples=2, output_loss="kl", remat=True,
    ))
    cfg = loss_config_from(section)
    opts = cfg.term_dict
    assert opts["stochastic_recon"] == TermOptions(coeff=1.0)
    assert opts["stochastic_recon_layerwise"] == LayerwiseOptions(coeff=1.0, unroll=None)
    assert opts["importance_minimality"] == MinimalityOptions(coeff=3e-3, pnorm=2.0, p_anneal_final_p=0.5, beta=0.1)
    assert opts["pgd_recon_subset"] == PGDSubsetOptions(
        coeff=2.0, routing="static_p", subset_p=0.5, init="random", n_steps=3, step_size=1.0,
        mask_scope="shared_across_batch",
    )
    assert (cfg.n_mask_samples, cfg.output_loss, cfg.remat, cfg.mask_type) == (2, "kl", True, "continuous")
    assert cfg.coeff_dict == {"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0,
                              "importance_minimality": 3e-3, "pgd_recon_subset": 2.0}
    # the old flat attributes read the term that has the option
    assert (cfg.pnorm, cfg.minimality_beta, cfg.pgd_n_steps, cfg.subset_routing) == (2.0, 0.1, 3, "static_p")
    assert cfg.layerwise_unroll is None and cfg.pgd_step_size == 1.0
    # static under jit: hashable and leafless
    hash(cfg)
    assert jax.tree.leaves(cfg) == []
    assert jax.tree.unflatten(jax.tree.structure(cfg), []) == cfg
    # the Python form with options objects or dicts gives the same config
    assert LossConfig(terms=cfg.terms, n_mask_samples=2, output_loss="kl", remat=True) == cfg
    assert LossConfig(terms={n: dataclasses.asdict(o) for n, o in cfg.terms}, n_mask_samples=2,
                      output_loss="kl", remat=True) == cfg


def test_defaults_and_empty_sections():
    assert loss_config_from(None) == loss_config_from({}) == LossConfig()
    assert LossConfig().coeffs == (("stochastic_recon", 1.0), ("stochastic_recon_layerwise", 1.0),
                                   ("importance_minimality", 3e-3))
    new = loss_config_from(dict(terms=dict(stochastic_recon=dict(coeff=1.0), stochastic_recon_layerwise=dict(),
                                           importance_minimality=dict(coeff=3e-3))))
    # a ConfigDict orders its keys, so compare as dicts; with the same order the configs are equal
    assert new.term_dict == LossConfig().term_dict
    assert LossConfig(terms=LossConfig().term_dict) == LossConfig()
    assert loss_config_from(dict(terms=dict())).terms == ()


@pytest.mark.parametrize("section,words", [
    (dict(terms=dict(stochastic_recon_typo=dict(coeff=1.0))), ["config.loss.terms.stochastic_recon_typo",
                                                               "unknown loss term", "pgd_recon"]),
    (dict(terms=dict(pgd_recon=dict(coeff=1.0, n_stepz=2))), ["config.loss.terms.pgd_recon.n_stepz",
                                                              "allowed", "'n_steps'", "'mask_scope'"]),
    # an option of another term: routing belongs to subset terms, unroll to layerwise ones
    (dict(terms=dict(pgd_recon=dict(routing="static_p"))), ["config.loss.terms.pgd_recon.routing", "allowed"]),
    (dict(terms=dict(stochastic_recon=dict(unroll=2))), ["config.loss.terms.stochastic_recon.unroll",
                                                         "allowed: ['coeff']"]),
    (dict(terms=dict(pgd_recon_layerwise=dict(unroll=2))), ["config.loss.terms.pgd_recon_layerwise.unroll"]),
    (dict(terms=dict(pgd_recon=dict(n_steps="2"))), ["config.loss.terms.pgd_recon.n_steps", "int", "'2'"]),
    (dict(terms=dict(pgd_recon=dict(coeff="one"))), ["config.loss.terms.pgd_recon.coeff", "float"]),
    (dict(terms=dict(stochastic_recon_layerwise=dict(unroll=1.5))), ["terms.stochastic_recon_layerwise.unroll"]),
    (dict(terms=dict(pgd_recon=dict(n_steps=-1))), ["loss.terms.pgd_recon.n_steps", ">= 0"]),
    (dict(terms=dict(pgd_recon_subset=dict(routing="random"))), ["loss.terms.pgd_recon_subset.routing", "random",
                                                                 "uniform_k"]),
    (dict(terms=dict(stochastic_recon_subset=dict(subset_p=0.0))), ["terms.stochastic_recon_subset.subset_p"]),
    (dict(terms=dict(importance_minimality=dict(pnorm=0.0))), ["loss.terms.importance_minimality.pnorm", "> 0"]),
    (dict(terms=dict(importance_minimality=dict(p_anneal_end_frac=0.5))), ["importance_minimality.p_anneal"]),
    (dict(terms=dict(pgd_recon=1.0)), ["config.loss.terms.pgd_recon", "dict"]),
    (dict(terms=dict(pgd_recon=dict()), pgd_n_steps=2), ["config.loss", "terms", "pgd_n_steps", "not both"]),
    (dict(terms=dict(pgd_recon=dict()), coeffs=dict(pgd_recon=1.0)), ["config.loss", "coeffs", "not both"]),
    (dict(remat=1), ["config.loss.remat", "bool"]),
    (dict(n_mask_sample=2), ["config.loss", "n_mask_sample"]),
    (dict(coeffs=dict(stochastic_recon_typo=1.0)), ["coeffs", "stochastic_recon_typo"]),
    (dict(pnorm=0.0), ["loss.pnorm", "> 0"]),
    (dict(pgd_mask_scope="per_batch"), ["loss.pgd_mask_scope", "per_batch"]),
    # coefficients: finite and >= 0
    (dict(terms=dict(stochastic_recon=dict(coeff=-1.0))), ["config.loss.terms.stochastic_recon.coeff must be finite "
                                                          "and >= 0, got -1.0"]),
    (dict(terms=dict(importance_minimality=dict(coeff=float("nan")))), ["config.loss.terms.importance_minimality.coeff",
                                                                         "finite and >= 0", "nan"]),
    (dict(terms=dict(pgd_recon=dict(coeff=float("inf")))), ["config.loss.terms.pgd_recon.coeff", "finite", "inf"]),
    (dict(terms=dict(faithfulness=dict(coeff=-2))), ["config.loss.terms.faithfulness.coeff", "-2"]),
    (dict(coeffs=dict(stochastic_recon=-0.5)), ["config.loss.coeffs.stochastic_recon must be finite and >= 0, got -0.5"]),
    (dict(coeffs=dict(stochastic_recon=float("nan"))), ["config.loss.coeffs.stochastic_recon", "nan"]),
    (dict(coeffs=dict(stochastic_recon=float("-inf"))), ["config.loss.coeffs.stochastic_recon", "-inf"]),
])
def test_loss_config_from_errors_name_the_field(section, words):
    with pytest.raises(ValueError) as e:
        loss_config_from(ml_collections.ConfigDict(section))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("kwargs,words", [
    (dict(terms={"pgd_recon": {"n_stepz": 2}}), ["loss.terms.pgd_recon.n_stepz", "allowed"]),
    (dict(terms={"pgd_recon": {"n_steps": "2"}}), ["loss.terms.pgd_recon.n_steps", "int"]),
    (dict(terms={"pgd_recon": PGDSubsetOptions()}), ["loss.terms.pgd_recon", "PGDOptions"]),
    (dict(terms={"nope": {}}), ["loss.terms", "'nope'", "allowed"]),
    (dict(terms=(("pgd_recon", {}), ("pgd_recon", {}))), ["'pgd_recon'", "twice"]),
    (dict(terms={"pgd_recon": {}}, pnorm=2.0), ["terms", "pnorm", "not both"]),
    (dict(coeffs=(("nope", 1.0),)), ["loss.coeffs", "'nope'"]),
    (dict(subset_routing="random"), ["loss.subset_routing", "random"]),
    (dict(n_mask_samples=0), ["loss.n_mask_samples"]),
    (dict(terms={"pgd_recon": {"coeff": -0.5}}), ["loss.terms.pgd_recon.coeff must be finite and >= 0, got -0.5"]),
    (dict(terms={"stochastic_recon": {"coeff": float("nan")}}), ["loss.terms.stochastic_recon.coeff", "nan"]),
    (dict(coeffs=(("stochastic_recon", float("inf")),)), ["loss.coeffs.stochastic_recon must be finite", "inf"]),
    (dict(coeffs=(("stochastic_recon", 1.0), ("importance_minimality", -3e-3))), ["loss.coeffs.importance_minimality",
                                                                                   ">= 0", "-0.003"]),
])
def test_python_form_errors_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        LossConfig(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(TypeError, match="bogus"):
        LossConfig(bogus=1)


@pytest.mark.parametrize("coeff", [-1.0, float("nan"), float("inf"), -1e-12])
def test_term_options_coeff_finite_and_non_negative(coeff):
    for cls in (TermOptions, PGDOptions, MinimalityOptions):
        with pytest.raises(ValueError, match=r"^coeff must be finite and >= 0, got"):
            cls(coeff=coeff)
    assert TermOptions(coeff=0.0).coeff == 0.0 and TermOptions(coeff=0).coeff == 0


def test_shipped_config_files_parse():
    """Every SPD config file's loss section (plain and with each documented flag) parses."""
    seen = 0
    for path in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem.replace('-', '_')}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.get_config(None)
        if cfg.get("method", "spd") != "spd" or "loss" not in cfg:
            continue
        rc = loss_config_from(cfg.loss)
        assert rc.terms and all(n in TERMS for n, _ in rc.terms), path
        seen += 1
    assert seen >= 3


# ============================================================================= flat alias == terms form

FLAT_ALL = dict(
    coeffs=tuple((t, 0.3 + 0.1 * i) for i, t in enumerate(ALL)), n_mask_samples=2, pgd_n_steps=2, pgd_step_size=0.3,
    pgd_mask_scope="shared_across_batch", subset_routing="static_p", subset_p=0.4, pnorm=1.5, p_anneal_final_p=0.7,
    p_anneal_start_frac=0.2, p_anneal_end_frac=0.8, minimality_beta=0.3, layerwise_unroll=2,
)


def _terms_all():
    pgd = dict(n_steps=2, step_size=0.3, mask_scope="shared_across_batch")
    sub = dict(routing="static_p", subset_p=0.4)
    per_term = {
        "stochastic_recon_layerwise": dict(unroll=2), "ci_masked_recon_layerwise": dict(unroll=2),
        "stochastic_recon_subset": sub, "ci_masked_recon_subset": sub, "pgd_recon": pgd, "pgd_recon_layerwise": pgd,
        "pgd_recon_subset": {**pgd, **sub},
        "importance_minimality": dict(pnorm=1.5, p_anneal_final_p=0.7, p_anneal_start_frac=0.2, p_anneal_end_frac=0.8,
                                      beta=0.3),
    }
    return {t: dict(coeff=0.3 + 0.1 * i, **per_term.get(t, {})) for i, t in enumerate(ALL)}


CASES = {
    "default": (dict(), dict(terms=dict(stochastic_recon=dict(coeff=1.0), stochastic_recon_layerwise=dict(coeff=1.0),
                                        importance_minimality=dict(coeff=3e-3)))),
    "all_terms": (FLAT_ALL, dict(terms=_terms_all(), n_mask_samples=2)),
    "pgd_kl": (dict(coeffs=(("pgd_recon_subset", 1.0), ("importance_minimality", 3e-5), ("faithfulness", 0.0)),
                    pgd_n_steps=3, pgd_step_size=0.5, pgd_init="ones", use_delta_component=False, output_loss="kl",
                    sigmoid="logistic", pnorm=2.0, ci_l0_threshold=0.3),
               dict(terms=dict(pgd_recon_subset=dict(coeff=1.0, n_steps=3, step_size=0.5, init="ones"),
                               importance_minimality=dict(coeff=3e-5, pnorm=2.0), faithfulness=dict(coeff=0.0)),
                    use_delta_component=False, output_loss="kl", sigmoid="logistic", ci_l0_threshold=0.3)),
}


def _value_and_grad(cfg, extra=(), progress=0.5):
    """A fresh trace per call (the config is a closure constant), so equal results are not one cached program."""
    _, target, params, _, x = _build()
    f = jax.jit(jax.value_and_grad(lambda p: losses.loss_fn(p, target, x, jax.random.key(5), cfg, progress, extra),
                                   has_aux=True))
    (v, m), g = f(params)
    return np.asarray(v), {k: np.asarray(a) for k, a in m.items()}, [np.asarray(a) for a in jax.tree.leaves(g)]


def _assert_bitwise(a, b):
    (va, ma, ga), (vb, mb, gb) = a, b
    np.testing.assert_array_equal(va, vb)
    assert set(ma) == set(mb)
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    assert len(ga) == len(gb) and len(ga) > 0
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", list(CASES))
def test_flat_alias_equals_terms_form(case):
    flat_kw, section = CASES[case]
    flat = LossConfig(**flat_kw)
    shared = {k: v for k, v in section.items() if k != "terms"}
    # the Python terms form, in the flat form's order (the order of the sum in the total)
    new = LossConfig(terms=[(n, section["terms"][n]) for n, _ in flat.coeffs], **shared)
    assert new == flat and hash(new) == hash(flat)
    # the config-file form (a ConfigDict orders its terms by name): the same terms and options
    parsed = loss_config_from(ml_collections.ConfigDict(section))
    assert parsed.term_dict == flat.term_dict
    assert dataclasses.replace(parsed, terms=flat.terms) == flat
    a = _value_and_grad(flat)
    _assert_bitwise(a, _value_and_grad(new))
    assert np.isfinite(a[0]) and any(np.abs(g).max() > 0 for g in a[2])


def test_flat_alias_options_apply_to_every_term_that_has_them():
    cfg = LossConfig(coeffs=(("pgd_recon", 1.0), ("pgd_recon_subset", 2.0), ("stochastic_recon_subset", 1.0),
                             ("stochastic_recon_layerwise", 1.0)),
                     pgd_n_steps=4, subset_p=0.2, subset_routing="static_p", layerwise_unroll=3, pnorm=2.0)
    t = cfg.term_dict
    assert t["pgd_recon"] == PGDOptions(coeff=1.0, n_steps=4)
    assert t["pgd_recon_subset"] == PGDSubsetOptions(coeff=2.0, n_steps=4, subset_p=0.2, routing="static_p")
    assert t["stochastic_recon_subset"] == SubsetOptions(coeff=1.0, subset_p=0.2, routing="static_p")
    assert t["stochastic_recon_layerwise"] == LayerwiseOptions(coeff=1.0, unroll=3)
    # pnorm has no listed term: kept for evaluation-only terms and the flat attribute
    assert cfg.flat_defaults == (("pnorm", 2.0),) and cfg.pnorm == 2.0
    assert cfg.options_for("importance_minimality") == MinimalityOptions(pnorm=2.0)
    # an evaluation-only term takes the configured terms' shared options
    assert cfg.options_for("pgd_recon_layerwise") == PGDOptions(n_steps=4)
    assert cfg.options_for("ci_masked_recon_subset") == SubsetOptions(subset_p=0.2, routing="static_p")
    # flat values at their defaults are no setting: the flat spelling of the defaults is LossConfig()
    assert LossConfig(pgd_n_steps=1, pnorm=1.0, layerwise_unroll=None) == LossConfig()


def test_evaluation_extra_terms_same_as_flat():
    """`extra_terms` (all terms, evaluation) give the same metrics for the flat and the terms form."""
    flat = LossConfig(coeffs=(("stochastic_recon", 1.0), ("pgd_recon_subset", 0.5)), pgd_n_steps=2,
                      pgd_step_size=0.2, pgd_mask_scope="shared_across_batch", subset_routing="static_p")
    new = LossConfig(terms={"stochastic_recon": {}, "pgd_recon_subset": dict(
        coeff=0.5, n_steps=2, step_size=0.2, mask_scope="shared_across_batch", routing="static_p")})
    assert new == flat
    a = _value_and_grad(flat, ALL, 1.0)
    _assert_bitwise(a, _value_and_grad(new, ALL, 1.0))
    assert {f"loss/{t}" for t in ALL} <= set(a[1])
    # an explicit (name, options) pair overrides
    b = _value_and_grad(new, (("pgd_recon", PGDOptions(n_steps=0)),), 1.0)
    assert float(b[1]["loss/pgd_recon"]) != float(a[1]["loss/pgd_recon"])
    np.testing.assert_allclose(b[0], a[0], rtol=1e-6)  # extra terms never enter the total


# ============================================================================= per-term options are used


def test_two_pgd_terms_use_their_own_settings():
    _, target, params, _, x = _build()
    key = jax.random.key(11)
    cfg = LossConfig(terms={"pgd_recon": PGDOptions(coeff=1.0, n_steps=0),
                            "pgd_recon_subset": PGDSubsetOptions(coeff=0.5, n_steps=3, step_size=0.5)})
    total, m = jax.jit(losses.loss_fn)(params, target, x, key, cfg)
    # n_steps=0: the loss at the random initial sources, by hand
    out, inputs = losses.clean_forward(target, x)
    ci = losses.compute_ci(params, target, inputs, cfg.sigmoid).lower
    src = masks_lib.pgd_sources_init(jax.random.fold_in(key, 6), ci, "random", "per_example", True)
    want0 = losses.divergence("mse", losses.masked_forward(params, target, x, masks_lib.masks_from_sources(ci, src)),
                              out)
    np.testing.assert_allclose(float(m["loss/pgd_recon"]), float(want0), rtol=1e-6)
    # each term equals itself configured alone, and differs with the other term's PGD settings
    for name, opts, other in (("pgd_recon", cfg.term_dict["pgd_recon"], dict(n_steps=3, step_size=0.5)),
                              ("pgd_recon_subset", cfg.term_dict["pgd_recon_subset"], dict(n_steps=0))):
        _, alone = jax.jit(losses.loss_fn)(params, target, x, key, LossConfig(terms={name: opts}))
        np.testing.assert_allclose(float(m[f"loss/{name}"]), float(alone[f"loss/{name}"]), rtol=1e-6)
        swapped = LossConfig(terms={name: dataclasses.replace(opts, **other)})
        _, sw = jax.jit(losses.loss_fn)(params, target, x, key, swapped)
        assert abs(float(sw[f"loss/{name}"]) - float(m[f"loss/{name}"])) > 1e-4, name
    # the adversary only increases the loss
    assert float(m["loss/pgd_recon"]) > 0
    np.testing.assert_allclose(float(total), float(m["loss/pgd_recon"]) + 0.5 * float(m["loss/pgd_recon_subset"]),
                               rtol=1e-6)


def test_terms_form_against_numpy_reference():
    """Minimality and CI-masked recon from a terms-form config against the NumPy reference."""
    _, target, params, layers, x = _build()
    cfg = loss_config_from(dict(terms=dict(importance_minimality=dict(coeff=0.3, pnorm=0.9, beta=0.5),
                                           ci_masked_recon=dict(coeff=0.7)), sigmoid="leaky_hard"))
    total, m = jax.jit(losses.loss_fn)(params, target, x, jax.random.key(0), cfg)
    _, lower, upper = _np_ci(params, layers, x, "leaky_hard")
    comps = [(ref.f64(params.components[n].V), ref.f64(params.components[n].U)) for n in ("fc1", "fc2")]
    det = {i: (g, None, V, U) for i, (g, (V, U)) in enumerate(zip(lower, comps))}
    want_min = ref.importance_minimality(upper, 0.9, 0.5, 1e-12)
    want_ci = ref.divergence("mse", ref.mlp_forward(x, layers, site_masks=det), ref.mlp_forward(x, layers))
    np.testing.assert_allclose(float(m["loss/importance_minimality"]), want_min, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["loss/ci_masked_recon"]), want_ci, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(total), 0.3 * want_min + 0.7 * want_ci, rtol=1e-5, atol=1e-6)


# ============================================================================= remat


@pytest.mark.parametrize("unroll", [None, 1], ids=["passes", "scan"])
def test_remat_same_loss_and_grads(unroll):
    terms = _terms_all()
    for t in ("stochastic_recon_layerwise", "ci_masked_recon_layerwise"):
        terms[t]["unroll"] = unroll
    cfg = LossConfig(terms=terms, n_mask_samples=2)
    on = dataclasses.replace(cfg, remat=True)
    assert on.remat and on.terms == cfg.terms
    (va, ma, ga), (vb, mb, gb) = _value_and_grad(cfg), _value_and_grad(on)
    np.testing.assert_allclose(va, vb, rtol=1e-6, atol=1e-6)
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-6, atol=1e-6, err_msg=k)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_remat_wraps_the_forward_passes_in_checkpoint():
    _, target, params, _, x = _build()
    cfg = LossConfig(coeffs=(("stochastic_recon", 1.0), ("importance_minimality", 1e-3)))

    def jaxpr(c):
        return str(jax.make_jaxpr(jax.grad(lambda p: losses.loss_fn(p, target, x, jax.random.key(0), c)[0]))(params))

    assert "checkpoint" not in jaxpr(cfg) and "remat" not in jaxpr(cfg)
    on = jaxpr(dataclasses.replace(cfg, remat=True))
    assert "checkpoint" in on or "remat" in on


# ============================================================================= a user's term


@dataclasses.dataclass(frozen=True)
class ComponentL2Options(TermOptions):
    scale: float = 1.0
    squared: bool = True


@pytest.fixture
def user_term():
    @register_term("component_l2", ComponentL2Options)
    def component_l2(ctx, opts):
        norms = [jnp.sum(c.U**2) + jnp.sum(c.V**2) for c in ctx.params.components.values()]
        total = sum(norms)
        return opts.scale * (total if opts.squared else jnp.sqrt(total))

    yield "component_l2"
    TERMS.pop("component_l2")
    TERM_OPTIONS.pop("component_l2")


def test_user_registered_term(user_term):
    _, target, params, _, x = _build()
    by_hand = sum(float(jnp.sum(c.U**2) + jnp.sum(c.V**2)) for c in params.components.values())
    cfg = LossConfig(terms={"stochastic_recon": {}, user_term: ComponentL2Options(coeff=0.5, scale=2.0)})
    parsed = loss_config_from(ml_collections.ConfigDict(dict(
        terms=dict(stochastic_recon=dict(coeff=1.0), component_l2=dict(coeff=0.5, scale=2.0)))))
    assert parsed.term_dict == cfg.term_dict
    for c in (cfg, parsed):
        (total, m), g = jax.jit(jax.value_and_grad(losses.loss_fn, has_aux=True))(params, target, x,
                                                                                  jax.random.key(0), c)
        np.testing.assert_allclose(float(m["loss/component_l2"]), 2.0 * by_hand, rtol=1e-5)
        np.testing.assert_allclose(float(total), float(m["loss/stochastic_recon"]) + by_hand, rtol=1e-5)
        # the term's gradient reaches U: d/dU of 0.5 * 2 * |U|^2 = 2 U, plus the recon term's
        _, g_recon = jax.jit(jax.value_and_grad(losses.loss_fn, has_aux=True))(
            params, target, x, jax.random.key(0), LossConfig(terms={"stochastic_recon": {}}))
        np.testing.assert_allclose(g.components["fc1"].U - g_recon.components["fc1"].U,
                                   2 * params.components["fc1"].U, rtol=1e-4, atol=1e-6)
    # as an evaluation-only term (its default options), and its own option errors
    _, m = losses.loss_fn(params, target, x, jax.random.key(0), LossConfig(), extra_terms=(user_term,))
    np.testing.assert_allclose(float(m["loss/component_l2"]), by_hand, rtol=1e-5)
    with pytest.raises(ValueError, match=r"config\.loss\.terms\.component_l2\.scal.*allowed.*'scale'"):
        loss_config_from(dict(terms=dict(component_l2=dict(scal=1.0))))
    with pytest.raises(ValueError, match=r"config\.loss\.terms\.component_l2\.squared must be of type bool"):
        loss_config_from(dict(terms=dict(component_l2=dict(squared=1))))
    # the name is taken
    with pytest.raises(ValueError, match="already registered"):
        register_term(user_term, TermOptions, lambda ctx, opts: 0.0)


def test_register_term_checks_its_arguments():
    with pytest.raises(TypeError, match="frozen dataclass"):
        register_term("bad_term", dict)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoDefault(TermOptions):
        k: int

    with pytest.raises(TypeError, match="need defaults"):
        register_term("bad_term", NoDefault)
    with pytest.raises(ValueError, match="identifier"):
        register_term("bad term", TermOptions)
    assert "bad_term" not in TERMS
