"""The suites of protocol v3 (benchmarks/README.md): pairs, cells, seeds and sample counts; ``quick`` gives smoke-test
sizes whose numbers are not results.

Evaluation seeds were sized before the committed run from the v2 run's per-seed numbers (the pilot): the paired
t-test of W2SD against AG interval reaches 80% power for a 20% difference in the median v2 cell with about 31 seeds
on the mixtures, 5 on digits and 9 on shapes (benchmarks/README.md, "Protocol v3").
"""
import pathlib

from ..stats import split_seeds
from .harness import Suite

QUICK = dict(w2sd_grid=((1., 0.5), (1., 1.)), ag_ws=(0.5, 1.), ag_windows=((0.28, 5.42),), resampling_fracs=(1.,),
             restarts=({'lo': 1., 'hi': 5., 'k': 1},), ladder=(4, 8, 16))
GMM_CELLS = (('euler', 10), ('euler', 25), ('euler', 50), ('euler_ancestral', 10), ('dpmpp_2m', 10))
GMM_ONE_CELL = ('1d-r5', '1d-r0.5', '2d-orthogonal', '2d-opposite', '2d-control', '16d-aligned')   # Euler T = 10 only
DIGITS_CELLS = (('euler', 10), ('euler', 50), ('euler_ancestral', 10))
SHAPES_CELLS = (('dpmpp_2m', 10),)
# trained shapes pairs run on every training seed; the class-conditional pair on seed 0 only, the opposite pair not
# at all (this CPU's budget)
SHAPES_RETRAINED = ('shapes-aligned', 'shapes-null')
SHAPES_ONE_MODEL = ('shapes-cfg',)
SHAPES_EXACT_CELLS = (('dpmpp_2m', 10), ('dpmpp_2m', 25), ('dpmpp_2m', 50), ('euler_ancestral', 10))


def _cells(cells):
    return tuple(dict.fromkeys(s for s, _ in cells)), tuple(sorted({t for _, t in cells}))


def gmm_suite(quick=False):
    from . import gmm
    pairs = gmm.cases()
    if quick:
        tune, ev = split_seeds(1, 2)
        return Suite('gmm', [p for p in pairs if p.name in ('1d-r2', '2d-missing')], gmm.metric, 'energy',
                     ('euler',), (6,), tune, ev, 100, 100, **QUICK)
    for p in pairs:
        p.cells = GMM_CELLS[:1] if p.name in GMM_ONE_CELL else GMM_CELLS
    tune, ev = split_seeds(1, 32)
    return Suite('gmm', pairs, gmm.metric, 'energy', *_cells(GMM_CELLS), tune, ev, 1000, 1000, full_cells=1)


def digits_suite(cache, quick=False):
    """The suite, its metric and the classifier."""
    from . import digits
    if quick:
        tune, ev = split_seeds(1, 2)
        pairs, metric, classifier = digits.cases(cache, tune, seeds=(0, 1), quick=True)
        return Suite('digits', pairs, metric, 'fd', ('euler',), (6,), tune, ev, 100, 100, **QUICK), metric, \
            classifier
    tune, ev = split_seeds(1, 8)
    pairs, metric, classifier = digits.cases(cache, tune)
    for p in pairs:
        p.cells = DIGITS_CELLS
    return Suite('digits', pairs, metric, 'fd', *_cells(DIGITS_CELLS), tune, ev, 300, 600, full_cells=1), metric, \
        classifier


def shapes_suite(cache, quick=False):
    """The suite and the classifier."""
    from . import shapes
    cache = pathlib.Path(cache)
    if quick:
        tune, ev = split_seeds(1, 2)
        pairs, metric, classifier = shapes.cases(cache, seeds=(0, 1), quick=True, exact_cells=(('euler', 4),))
        keep = [p for p in pairs if p.group in ('shapes-aligned', 'shapes-cfg', 'shapes-exact')]
        return Suite('shapes', keep, metric, 'class_tv', ('euler',), (4,), tune, ev, 16, 16,
                     **dict(QUICK, ladder=(4, 8))), classifier
    tune, ev = split_seeds(1, 8)
    pairs, metric, classifier = shapes.cases(cache, exact_cells=SHAPES_EXACT_CELLS)
    pairs = [p for p in pairs if p.group in SHAPES_RETRAINED or p.ideal is not None
             or p.group in SHAPES_ONE_MODEL and p.model == 0]
    for p in pairs:
        p.cells = p.cells or SHAPES_CELLS
    return Suite('shapes', pairs, metric, 'class_tv', *_cells(SHAPES_CELLS + SHAPES_EXACT_CELLS), tune, ev, 64,
                 256, full_groups=('shapes-aligned', 'shapes-exact'), full_cells=1), classifier
