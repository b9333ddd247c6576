"""``--tune``: each family's setting chosen on tuning prompts, then judged on the other prompts.

The grid is small and fixed (:data:`GRID`); every candidate runs at the largest step count whose counted NFE fits
the budget (plain sampling: its step count is the tuned parameter). A candidate is scored by the mean of the primary
scorer over the tuning items (tuning prompts x tuning seeds); a candidate with an unscored row (a black or NaN image)
is out. Each family's choice is made by :func:`w2sd_samplers.tuning.select`, the rule ``w2sd bench`` uses.
"""
import dataclasses
import math

from ..tuning import select
from . import methods as M

# The tuning grid, per family. W2SD: reflected share of the T - 1 reflectable steps x strength (the v3 benchmarks'
# most frequent W2SD picks, anchored at share 1 with strength 1 or 0.5, are in it; strength 1 is its top, so a pick
# there may sit at the grid's edge: the benchmarks tune strength up to 2). Autoguidance: Karras et al.'s weight
# w (1 = the paper's baseline), and for the interval version Kynkaanniemi et al.'s interval (0.28, 5.42) or the
# high-noise half (sigma >= 1). Plain: fractions of the budget as step counts.
W2SD_GRID = [dict(lam_frac=f, strength=s) for f in (0.3, 0.6, 1.) for s in (0.25, 0.5, 1.)]
GRID = {
    'plain-nfe': [dict(budget_frac=f) for f in (0.25, 0.5, 0.75, 1.)],
    **{m: W2SD_GRID for m in M.W2SD},
    'z-sampling': [dict(lam_frac=f, strength=1.) for f in (0.3, 0.6, 1.)],
    'autoguidance': [dict(w=w) for w in (0.25, 0.5, 1., 2.)],
    'autoguidance-interval': [dict(w=w, window=win) for w in (0.5, 1., 2., 4.) for win in ((0.28, 5.42), (1., 1e3))],
}


def split(n, fraction):
    """Indices of the tuning prompts among ``n``: prompt i when floor((i + 1) f) > floor(i f), i.e. every 1/f-th
    prompt, spread over the file (prompts appended later never move an earlier prompt's side)."""
    return [i for i in range(n) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]


def candidates(methods, plan, budget):
    """The :class:`~.methods.Setting` candidates of the tuned families in ``methods``: ``plan(method, params)``
    gives the step count within the budget (None: the candidate reflects or guides nothing, and is left out)."""
    out, planned = [], {}
    for m in methods:
        for params in GRID.get(m, ()):
            if m == 'plain-nfe':
                steps = max(1, round(params['budget_frac'] * budget))
                params = {}
            else:
                # a nonzero strength or w scales a step; which steps call which denoiser, hence the step count,
                # does not depend on its value: plan once per the rest of the setting
                key = (m, *sorted((k, bool(v) if k in ('strength', 'w') else v) for k, v in params.items()))
                if key not in planned:
                    planned[key] = plan(m, params)
                steps = planned[key]
            if steps is not None:
                setting = M.Setting.of(m, steps, **params)
                if setting not in out:
                    out.append(setting)
    return out


def scores(rows, scorer, candidates):
    """``{setting: mean tuning score}`` of the candidates whose every tuning row was scored."""
    by = {}
    for r in rows:
        by.setdefault(r['method'], []).append(r)
    out = {}
    for c in candidates:
        mine = by.get(c.label(), [])
        if mine and all(r.get('scores') for r in mine):
            out[c] = math.fsum(r['scores'][scorer] for r in mine) / len(mine)
    return out


@dataclasses.dataclass
class Tuning:
    """``--tune``'s outcome: ``candidates`` (Settings in grid order), ``scores`` ({Setting: mean tuning score}),
    ``chosen`` ({family: Setting}), the tuning ``prompts`` and ``seeds``, and the grid's NFE and sampling seconds."""
    candidates: list
    scores: dict
    chosen: dict
    prompts: list
    seeds: list
    nfe: int
    seconds: float


def choose(rows, candidates, scorer, prompts, seeds):
    """Each family's best candidate on the tuning rows: :func:`w2sd_samplers.tuning.select` (lowest first, ties to
    the earlier candidate) on minus the mean score."""
    rows = [r for r in rows if r.get('stage') == 'tune']
    means = scores(rows, scorer, candidates)
    chosen = {}
    for family in dict.fromkeys(c.method for c in candidates):
        mine = [c for c in candidates if c.method == family and c in means]
        if mine:
            chosen[family] = select(mine, lambda c: -means[c])
    labels = {c.label() for c in candidates}
    mine = [r for r in rows if r['method'] in labels]
    return Tuning(candidates, means, chosen, prompts, list(range(seeds)), sum(r['nfe'] for r in mine),
                  sum(r['seconds'] for r in mine))
