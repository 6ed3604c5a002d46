"""The architecture search (Puzzle, arXiv 2411.19146): one budget, every structure. Per decoder layer a
library of attention and MLP variants (secateurs.search.library), each scored by the KL divergence of
the model with that one block replaced (secateurs.search.scoring), and a mixed-integer program that
picks one attention and one MLP variant per layer under the budget (secateurs.search.choice); the
program's choice and its choices among MLP variants only, attention variants only and uniform shapes are
then measured whole on calibration samples the scores did not see, and the least KL is kept (`candidates`).

--ratio is what the budget removes: of all parameters (`params`), of the KV cache per token (`kv`), or
of the decode time per token (`decode`). The plan records every score, the choice and the scoring
tokens. Each narrower block is scored with the dense re-fit (fitted alone, on the dense model's inputs);
the chosen plan is applied with the sequential re-fit (each layer fitted on the inputs the pruned
layers below produce), AMP's default.
"""

from __future__ import annotations

from dataclasses import replace

from secateurs.adapters import get_adapter
from secateurs.calibration.statistics import Statistics
from secateurs.calibration.streaming import streamed_statistics
from secateurs.errors import SecateursError
from secateurs.methods.base import Method, Needs, PlanContext, provenance
from secateurs.methods.options import SearchOptions
from secateurs.planning.budget import Geometry, target_params
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.runtime.offload import weights_in_memory
from secateurs.runtime.progress import phase, status
from secateurs.search.choice import Budget, Choice, Constraints, LayerOptions, Table, Variant, choose
from secateurs.search.costs import DecodeCosts, decode_costs
from secateurs.search.library import Library, build_library, dense_block_params, fit_value_alpha
from secateurs.search.scoring import (
    ScoringData,
    after_samples,
    cache_scoring_data,
    kl_with,
    score_library,
    scoring_calibration,
)


class Search(Method):
    name = "search"
    summary = "architecture search: per-layer attention and MLP variants scored by KL, chosen by a MILP"
    options = SearchOptions
    needs = Needs(calibration=True, lm_head=True)

    def make_plan(self, context: PlanContext, options: SearchOptions, *, scores: dict | None = None) -> PruningPlan:
        """scores: {(layer, block, variant id): KL} measured before (recorded_scores; choose_again) in
        place of scoring the library."""
        given = scores is not None
        if given and options.rounds == 2:
            raise SecateursError("scores measured before are a first round's; a second round scores around one "
                                 "budget's choice, so it cannot reuse them")
        options = with_kept_layers(options)
        model = context.model
        calibration = context.calibration_data()
        count = len(get_adapter(model).decoder_layers(model))
        scored = [i for i in range(options.keep_first, count - options.keep_last)]
        if not scored:
            raise SecateursError(f"keep_first {options.keep_first} and keep_last {options.keep_last} keep all "
                                 f"{count} layers dense: nothing to search")
        data, library = scoring_library(context, options, scored, calibration)
        costs = None
        if options.budget == "decode":
            with phase("search: measuring decode costs"):
                costs = decode_costs(model)
        budget, head = search_budget(model, library, context, options, costs)
        constraints = Constraints(options.keep_first, options.keep_last, options.uniform,
                                  options.max_attention_free)
        scores = given_scores(library, scores) if given else score_library(model, library, data,
                                                                           progress=context.progress)
        rows = score_rows(library, scores, 1)
        choice = choose(search_table(model, library, scores, costs), budget, constraints)
        if options.rounds == 2:
            chosen = chosen_plans(library, choice)
            around = [library.module(chosen[i]) for i in range(count)]
            data = cache_scoring_data(model, data.calibration, around, reference=data.reference,
                                      progress=context.progress)
            scores = score_library(model, library, data, context={i: chosen[i] for i in scored},
                                   progress=context.progress)
            rows += score_rows(library, scores, 2)
            choice = choose(search_table(model, library, scores, costs), budget, constraints)
        checked = None
        if options.candidates:
            table = search_table(model, library, scores, costs)
            with phase("search: measuring the candidate architectures"):
                held_out = candidate_data(model, calibration, data, options.scoring_tokens, context.progress)
                choice, checked = best_candidate(model, library, held_out, table, budget, constraints, choice)
            head.update(candidate_tokens=held_out.tokens, candidate_samples_held_out=held_out is not data)
        plan = identity_plan(model)
        plan.layers = list(chosen_plans(library, choice).values())
        head.update(achieved_params_removed=Geometry.of(model).total_params - int(choice.costs["params"]),
                    scoring_tokens=data.tokens, scoring_samples=data.calibration.description["scoring_samples"],
                    rounds=options.rounds, keep_first=options.keep_first, keep_last=options.keep_last,
                    uniform=options.uniform, max_attention_free=options.max_attention_free,
                    **({"scores_measured_before": True} if given else {}))
        found = {"library": library.settings, "choice": choice.to_dict(), "scores": rows}
        plan.provenance = provenance(self.name, plan, context.seed, calibration.description, calibration.hash, head,
                                     found | ({"candidates": checked} if checked is not None else {}))
        return plan


def scoring_library(context: PlanContext, options: SearchOptions, scored: list[int],
                    calibration) -> tuple[ScoringData, Library]:
    """The scoring inputs cached on the first samples of `calibration` and the block library of the `scored`
    layers, built from the statistics pass and the value path's alphas fitted on those inputs."""
    model = context.model
    stats = search_statistics(context)
    with phase("search: caching the scoring inputs"):
        data = cache_scoring_data(model, scoring_calibration(calibration, options.scoring_tokens),
                                  progress=context.progress)
    status(f"search: {data.tokens:,} scoring tokens; dense log-probabilities hold "
           f"{data.reference_bytes() / 2**20:,.1f} MiB")
    with phase("search: building the block library"):
        alphas = {} if options.uniform else {
            i: fit_value_alpha(model, i, data.inputs[i], data.kwargs[i], data.masks) for i in scored}
        library = build_library(model, stats, scored, alphas=alphas, mlp_fractions=tuple(options.mlp_fractions),
                                sized_only=options.uniform)
    return data, library


def with_kept_layers(options: SearchOptions) -> SearchOptions:
    """keep_first resolved (1, or 0 with uniform); uniform with layers kept dense refused: one shape in every
    layer leaves none dense."""
    keep_first = options.keep_first if options.keep_first is not None else (0 if options.uniform else 1)
    if options.uniform and (keep_first or options.keep_last):
        raise SecateursError(f"--uniform keeps one attention shape and one MLP width in every layer, so no layer can "
                             f"stay dense (keep_first {keep_first}, keep_last {options.keep_last}): drop --keep-first "
                             "and --keep-last, or drop --uniform")
    return replace(options, keep_first=keep_first)


def search_statistics(context: PlanContext) -> Statistics:
    """The one statistics pass the library is built from (AMP's scores and the Gram matrices): the
    statistics given when they hold Gram matrices, else a calibration pass (layer by layer when the
    weights are not all in memory)."""
    given = context.statistics
    if isinstance(given, Statistics) and all(s.gram is not None for s in given.attention + given.mlp):
        return given
    if weights_in_memory(context.model):
        return context.activation_statistics(gram=True)
    return streamed_statistics(context.model, context.calibration_data(), gram=True, progress=context.progress)


def search_budget(model, library: Library, context: PlanContext, options: SearchOptions,
                  costs: DecodeCosts | None = None) -> tuple[Budget, dict]:
    """The budget --ratio asks for and its record: parameters of the whole model (secateurs.planning.budget's
    target), or the dense model's KV cache per token or decode seconds per token (LM head included)
    scaled by 1 - ratio."""
    geo = Geometry.of(model)
    if options.budget == "params":
        target, settings = target_params(geo, None if context.layers_equivalent is not None else context.ratio,
                                         context.ratio_of, context.layers_equivalent)
        return (Budget("params", geo.total_params - target),
                {"budget": "params", **settings, "requested_params_removed": target})
    if options.budget == "kv":
        if context.ratio is None:
            raise SecateursError("the kv budget takes --ratio: the share of the KV cache per token removed")
        dense = sum(library.get(i, "attention", "dense").kv_bytes for i in library.variants)
        return (Budget("kv", (1 - context.ratio) * dense),
                {"budget": "kv", "ratio": context.ratio, "dense_kv_bytes_per_token": dense})
    if context.ratio is None or costs is None:
        raise SecateursError("the decode budget takes --ratio: the share of the decode time per token removed")
    dense = costs.head + sum(costs.block(v.block, v.kind, v.size) for i in library.variants
                             for v in library.variants[i] if v.kind == "dense")
    return (Budget("decode", (1 - context.ratio) * dense),
            {"budget": "decode", "ratio": context.ratio, "dense_decode_seconds": dense,
             "decode_context": costs.context})


def search_table(model, library: Library, scores: dict, costs: DecodeCosts | None = None) -> Table:
    """The choice's table: every layer's variants with their scores and costs (decode seconds from
    `costs` when given), and what lies outside the decoder layers' blocks (embeddings, final norm, LM
    head) as the fixed cost."""
    layers = []
    for i in sorted(library.variants):
        blocks = {b: tuple(Variant(v.id, v.block, v.kind, scores[(i, v.block, v.id)], v.params, v.kv_bytes,
                                   costs.block(v.block, v.kind, v.size) if costs is not None else 0.0, v.size)
                           for v in library.of(i, b)) for b in ("attention", "mlp")}
        layers.append(LayerOptions(blocks["attention"], blocks["mlp"]))
    adapter = get_adapter(model)
    blocks = sum(sum(dense_block_params(adapter, layer)) for layer in adapter.decoder_layers(model))
    return Table(tuple(layers), fixed_params=Geometry.of(model).total_params - blocks,
                 fixed_decode=costs.head if costs is not None else 0.0)


def candidate_choices(table: Table, budget: Budget, constraints: Constraints, choice: Choice) -> dict[str, Choice]:
    """The architectures whose whole-model KL is measured: the program's choice, and the program's choice
    among the MLP variants alone (every attention dense), among the attention variants alone (every MLP
    dense) and with uniform shapes; those the budget leaves infeasible are left out."""
    out = {"program": choice}
    for name, dense_block in (("mlp only", "attention"), ("attention only", "mlp")):
        layers = tuple(replace(lo, **{dense_block: tuple(v for v in getattr(lo, dense_block) if v.kind == "dense")})
                       for lo in table.layers)
        try:
            out[name] = choose(replace(table, layers=layers), budget, constraints)
        except SecateursError:  # infeasible under this budget: not a candidate
            continue
    try:
        out["uniform"] = _uniform_choice(table, budget, constraints)
    except SecateursError:
        pass
    return out


def _uniform_choice(table: Table, budget: Budget, constraints: Constraints) -> Choice:
    """The program's choice with one attention shape and one MLP width in every layer it may change (the
    layers kept dense stay dense: AMP's uniform cut, as near as the library's sizes come)."""
    kept = constraints.kept_dense(len(table.layers))
    if not kept:
        return choose(table, budget, replace(constraints, uniform=True))
    dense = {i: (lo.attention[lo.by_kind("attention", ("dense",))[0]], lo.mlp[lo.by_kind("mlp", ("dense",))[0]])
             for i, lo in enumerate(table.layers) if i in kept}
    fixed = {kind: sum(a.cost(kind) + m.cost(kind) for a, m in dense.values()) for kind in ("params", "kv", "decode")}
    rest = replace(table, layers=tuple(lo for i, lo in enumerate(table.layers) if i not in kept),
                   fixed_params=table.fixed_params + int(fixed["params"]),
                   fixed_kv_bytes=table.fixed_kv_bytes + int(fixed["kv"]),
                   fixed_decode=table.fixed_decode + fixed["decode"])
    part = choose(rest, budget, replace(constraints, keep_first=0, keep_last=0, uniform=True))
    chosen = iter(zip(part.attention, part.mlp))
    pairs = [dense[i] if i in kept else next(chosen) for i in range(len(table.layers))]
    return replace(part, attention=tuple(a for a, _ in pairs), mlp=tuple(m for _, m in pairs))


def candidate_data(model, calibration, data: ScoringData, tokens: int, progress: bool) -> ScoringData:
    """What the candidates are measured on: the calibration samples after the scoring ones (as many tokens
    as the scoring's), which no score has seen, so that the choice that fits the scoring tokens best is not
    favoured for that alone; the scoring tokens when the calibration holds no more samples."""
    rest = after_samples(calibration, data.calibration.description["scoring_samples"])
    if not rest.batches:
        return data
    return cache_scoring_data(model, scoring_calibration(rest, tokens), progress=progress)


def best_candidate(model, library: Library, data: ScoringData, table: Table, budget: Budget,
                   constraints: Constraints, choice: Choice) -> tuple[Choice, list[dict]]:
    """The candidate architecture (candidate_choices) of least measured KL: each built from the library's
    re-fitted blocks and run whole on `data` (candidate_data), since the program adds single-block scores as
    if the blocks hurt independently. Returns it and every candidate's record (name, summed score, KL,
    parameters, picked)."""
    measured, records = {}, []
    for name, candidate in candidate_choices(table, budget, constraints, choice).items():
        if any(candidate.attention == c.attention and candidate.mlp == c.mlp for c in measured.values()):
            continue  # the same architecture as a candidate measured already
        plans = chosen_plans(library, candidate)
        modules = [library.module(plans[i]) for i in range(len(plans))]
        measured[name] = candidate
        records.append({"name": name, "summed_score": float(f"{candidate.objective:.8g}"),
                        "kl": float(f"{kl_with(model, data, 0, modules[0], modules):.8g}"),
                        "params": int(candidate.costs["params"])})
    best = min(records, key=lambda r: r["kl"])
    for r in records:
        r["picked"] = r is best
    status("search: candidates' KL " + ", ".join(f"{r['name']} {r['kl']:.4f}" for r in records)
           + f"; kept {best['name']}")
    return measured[best["name"]], records


def chosen_plans(library: Library, choice: Choice) -> dict:
    """{layer: its LayerPlan} of a choice."""
    return {i: library.layer_plan(i, a.id, m.id) for i, (a, m) in enumerate(zip(choice.attention, choice.mlp))}


def score_rows(library: Library, scores: dict, round_number: int) -> list[dict]:
    """The provenance's score table: one row per scored variant."""
    return [{"layer": i, "block": v.block, "variant": v.id, "params": v.params, "kv_bytes": v.kv_bytes,
             "kl": float(f"{scores[(i, v.block, v.id)]:.8g}"), "round": round_number}
            for i in sorted(library.variants) for v in library.variants[i] if len(library.variants[i]) > 2]


def recorded_scores(plan: PruningPlan) -> dict[tuple[int, str, str], float]:
    """{(layer, block, variant id): KL} of the first scoring round a search plan's provenance records (every
    variant of every scored layer; the dense blocks of a layer kept dense score 0 and are not recorded)."""
    rows = plan.provenance.get("scores") if plan.provenance.get("method") == "search" else None
    if not rows:
        raise SecateursError("the plan records no search scores (make it with --method search)")
    return {(int(r["layer"]), str(r["block"]), str(r["variant"])): float(r["kl"]) for r in rows
            if r.get("round", 1) == 1}


def given_scores(library: Library, scores: dict) -> dict[tuple[int, str, str], float]:
    """The library's scores read from a table measured before; a variant of a scored layer without a
    score is refused (the table came from another model or other library settings)."""
    out, missing = {}, []
    for i, variants in library.variants.items():
        for v in variants:
            key = (i, v.block, v.id)
            if key in scores:
                out[key] = float(scores[key])
            elif len(variants) == 2:  # a layer kept dense holds its dense blocks alone
                out[key] = 0.0
            else:
                missing.append(key)
    if missing:
        raise SecateursError(f"the scores given hold no score for {len(missing)} variants of this library (the "
                             f"first: layer {missing[0][0]} {missing[0][1]} {missing[0][2]}); they were measured "
                             "on another model or with other mlp_fractions, uniform or keep_first / keep_last")
    return out


def choose_again(model, plan: PruningPlan, ratio: float | None = 0.2, *, tokenizer=None, calibration=None,
                 statistics=None, ratio_of: str = "all", progress: bool = True, **options) -> PruningPlan:
    """A search plan for another budget chosen from the scores an earlier search plan records, without
    scoring again: the scores do not depend on the budget, and the choice takes seconds where the scoring
    takes many forward passes. The library is rebuilt as the earlier search built it (the statistics
    pass, or `statistics` given, and the value path's alphas on the same scoring tokens), so
    `calibration` must be the data the plan was scored on (its hash is checked). options: the search's
    (budget, keep_first, max_attention_free, ...), each defaulting to what the plan records."""
    recorded = plan.provenance
    scores = recorded_scores(plan)
    defaults = {"budget": recorded.get("budget"), "keep_first": recorded.get("keep_first"),
                "keep_last": recorded.get("keep_last"), "uniform": recorded.get("uniform"),
                "max_attention_free": recorded.get("max_attention_free"),
                "mlp_fractions": (recorded.get("library") or {}).get("mlp_fractions"),
                "scoring_tokens": recorded.get("scoring_tokens")}
    context = PlanContext(model, tokenizer, ratio=ratio, ratio_of=ratio_of, calibration=calibration,
                          statistics=statistics, progress=progress)
    used = context.calibration_data().hash
    if used != recorded.get("calibration_hash"):
        raise SecateursError(f"the plan was scored on other calibration data ({recorded.get('calibration_hash')}) "
                             f"than given ({used}); choose again on the same data")
    keywords = {k: v for k, v in defaults.items() if v is not None} | options
    return Search().make_plan(context, SearchOptions.from_keywords("search", keywords), scores=scores)
