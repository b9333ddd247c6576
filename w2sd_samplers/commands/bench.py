"""``w2sd bench [suite] [--quick]``: run the benchmark suites and write RESULTS.md, JSON and PNG plots.

``w2sd_samplers.cli`` wires ``add_parser`` in; ``python -m w2sd_samplers.bench`` runs it standalone.
"""
import argparse
import importlib.util
import json
import pathlib
import platform
import time

import torch

from .common import UsageError, device as torch_device, output_folder, recorded_command, run

SUITES = ('gmm', 'digits', 'shapes', 'overhead')
QUALITY = ('gmm', 'digits', 'shapes')
# the repository's committed results, which a run overwrites only with --force
COMMITTED = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks'
EXTRAS = {'gmm': ('matplotlib', 'scipy'), 'digits': ('matplotlib', 'scipy', 'safetensors'),
          'shapes': ('matplotlib', 'scipy', 'safetensors'), 'overhead': ('diffusers', 'peft')}


def add_parser(subparsers):
    p = subparsers.add_parser('bench', help='run the benchmarks, write benchmarks/RESULTS.md and plots',
                              description=__doc__.splitlines()[0])
    configure(p)
    p.set_defaults(func=main)
    return p


def configure(p):
    p.add_argument('suite', nargs='?', default='all', choices=('all',) + SUITES)
    p.add_argument('--quick', action='store_true', help='tiny configuration for CI smoke runs (about a minute)')
    p.add_argument('--out', default='w2sd-bench',
                   help='output folder for RESULTS.md, JSON and plots (default: ./w2sd-bench)')
    p.add_argument('--force', action='store_true',
                   help="allow overwriting the repository's committed benchmarks/ results")
    p.add_argument('--cache', default=None, help='folder for trained digit and shape models (default: <out>/cache)')
    p.add_argument('--unet', default='tiny', choices=('tiny', 'tiny-xl', 'sd15', 'sdxl'),
                   help='overhead suite: UNet size (sd15/sdxl: random weights at full size, for a GPU)')
    p.add_argument('--device', default='cpu', help='overhead suite: torch device (e.g. cuda)')
    p.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                   help='overhead suite: UNet dtype')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--from-json', action='store_true',
                   help='rewrite the tables and NFE plots of the quality suites from their saved <suite>.json '
                        'without sampling (other plots and the overhead section are kept)')


def check(args, suites):
    """Every problem with the options or the installed extras, before any suite starts."""
    missing = sorted({m for name in suites for m in EXTRAS[name] if importlib.util.find_spec(m) is None})
    if missing:
        raise UsageError(f'suite {args.suite}: needs {", ".join(missing)}; install them with pip install '
                         f'{" ".join(missing)} (in a w2sd-samplers checkout: pip install -e ".[bench]")')
    if 'overhead' in suites:
        try:                                  # the device matters to the overhead suite alone
            torch_device(args.device)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f'--device {args.device}: {e}') from None
    output_folder(args.out, '--out')
    output_folder(args.cache, '--cache')
    out = pathlib.Path(args.out)
    if out.resolve() == COMMITTED and (out / 'RESULTS.md').exists() and not args.force:
        raise UsageError(f'--out {args.out}: holds the committed benchmark results; pass --force to overwrite them, '
                         'or choose another --out')
    if args.from_json:
        saved = [name for name in suites if name != 'overhead' and (out / f'{name}.json').is_file()
                 and (out / 'sections' / f'{name}.md').is_file()]
        if not saved:
            raise UsageError(f'--from-json: {args.out} holds no saved quality suite ({", ".join(QUALITY)}: its '
                             '<suite>.json and sections/<suite>.md); run the suite without --from-json first')


def main(args):
    out = pathlib.Path(args.out)
    suites = SUITES if args.suite == 'all' else (args.suite,)
    check(args, suites)
    (out / 'sections').mkdir(parents=True, exist_ok=True)
    for name in suites:
        # one overhead section per UNet and device, so a GPU run adds to the CPU one
        key = f'overhead-{args.unet}-{torch.device(args.device).type}' if name == 'overhead' else name
        section = out / 'sections' / f'{key}.md'
        if args.from_json and (name == 'overhead' or not section.exists() or not (out / f'{name}.json').exists()):
            continue
        start, cpu = time.perf_counter(), time.process_time()
        text = RUNNERS[name](args, out)
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        if args.from_json:              # keep the footer of the run that produced the numbers
            footer = [line for line in section.read_text().splitlines() if line.startswith('_Command:')]
            text += '\n' + '\n'.join(footer) + '\n'
        else:
            cmd = recorded_command('bench', args, [args.out, args.cache], out)
            text += (f'\n_Command: `{cmd}` (suite {name}, run in this folder); wall time {took / 60:.1f} min, CPU time '
                     f'{cpu / 60:.1f} min (a wall time far above the CPU time means the machine was shared) on '
                     f'{platform.machine()} with {torch.get_num_threads()} torch threads, '
                     f'torch {torch.__version__}; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}._'
                     + (' **Quick mode: smoke-test sizes, not results.**' if args.quick else '') + '\n')
        section.write_text(text)
    write_results(out)
    print(f'w2sd bench: results written to {(out / "RESULTS.md").resolve()} (JSON and PNG plots beside it)')
    return 0


def write_results(out):
    parts = ['# W2SD benchmark results', '',
             'Written by `w2sd bench` (see [README.md](README.md) here for what is measured); every number below '
             'comes from the library\'s own samplers.', '']
    sections = out / 'sections'
    verdicts = [sections / f'{name}-verdict.md' for name in QUALITY if (sections / f'{name}-verdict.md').exists()]
    if verdicts:
        parts += ['## Verdict: which method to use for which kind of pair', '',
                  'Per pair, every method family is tuned on the tuning seeds at an NFE no larger than the paper\'s '
                  'W2SD setting (3T - 2: every step but the last reflects) and scored on disjoint evaluation seeds in '
                  'every sampler/T cell of its suite. `use` is the family with the lowest mean in the most cells; '
                  '`next best` is the best other family of each cell; W2SD is the best of all its variants and '
                  'settings on the tuning seeds. Ratios are of evaluation-seed means (median over cells); better / '
                  'worse count cells at Holm-adjusted p < 0.05 over the suite (raw p < 0.05 in parentheses); the last '
                  'column gives means ± 95% t-intervals in one cell. Method details and every number: the suite '
                  'sections below.', '']
        parts += [f.read_text() for f in verdicts]
    for f in ([sections / f'{name}.md' for name in QUALITY] + sorted(sections.glob('overhead-*.md'))
              + sorted(sections.glob('eval-*.md'))):
        if f.exists():
            parts.append(f.read_text())
    (out / 'RESULTS.md').write_text('\n'.join(parts))


def verdict_section(suite, verdict_table, rows):
    """The suite's verdict table (see ``report.quality_section``) with the plain reading: where W2SD is the family
    to use and where it is not."""
    from ..bench.report import NAMES
    use = [r['pair'].name for r in rows if r['use'] == 'w2sd']
    other = [f'{r["pair"].name} ({r["pair"].kind}: {NAMES[r["use"]]})' for r in rows if r['use'] != 'w2sd']
    text = [f'### {suite.name}', ''] + verdict_table + ['',
            f'W2SD wins the most cells for: {", ".join(use) or "no pair"}. '
            f'W2SD is not the right tool for: {", ".join(other) or "no pair"}.', '']
    return '\n'.join(text)


def _run_quality(suite, out, progress, from_json=False):
    from tqdm.auto import tqdm
    from ..bench.harness import Runner
    if from_json:
        saved = json.loads((out / f'{suite.name}.json').read_text())
        return None, {p: {(k.split('/T=')[0], int(k.split('/T=')[1])): _from_jsonable(r) for k, r in v.items()}
                      for p, v in saved.items()}
    runner = Runner(suite)
    results = {}
    jobs = [(p, sampler, t) for p in suite.pairs for sampler in suite.samplers for t in suite.steps]
    for p, sampler, t in tqdm(jobs, desc=suite.name, disable=not progress):
        results.setdefault(p.name, {})[sampler, t] = runner.compare(p, sampler, t)
    dump = {p: {f'{s}/T={t}': _jsonable(r) for (s, t), r in v.items()} for p, v in results.items()}
    (out / f'{suite.name}.json').write_text(json.dumps(dump, separators=(',', ':')))
    return runner, results


def _jsonable(r):
    if isinstance(r, dict):
        return {k: _jsonable(v) for k, v in r.items()}
    if isinstance(r, int):
        return r
    return {'method': r.method, 'steps': r.steps, 'params': r.params, 'nfe': r.nfe, 'values': r.values,
            'means': r.means}


def _from_jsonable(r):
    from ..bench.harness import Result
    if not isinstance(r, dict):
        return r
    if 'method' in r:
        return Result(**r)
    return {k: _from_jsonable(v) for k, v in r.items()}


def gmm_suite(quick):
    from ..bench import gmm
    from ..bench.harness import Suite
    from ..stats import split_seeds
    pairs = gmm.cases()
    if quick:
        tune, ev = split_seeds(1, 2)
        return Suite('gmm', [p for p in pairs if p.name in ('1d-r2', '2d-missing')], gmm.metric, 'energy',
                     ('euler',), (6,), tune, ev, 100, 100, [(0.5, 1.), (1., 1.)], ag_ws=(0.05, 1.),
                     ag_windows=((0.28, 5.42),), resampling_fracs=(1.,), restarts=({'lo': 1., 'hi': 5., 'k': 1},),
                     ladder=(4, 8, 16))
    tune, ev = split_seeds(1, 5)
    grid = [(f, st) for f in (0.3, 0.6, 1.) for st in (0.5, 1., 2.)]
    return Suite('gmm', pairs, gmm.metric, 'energy', ('euler', 'dpmpp_2m'), (10,), tune, ev, 500, 1000, grid)


def _write_quality(suite, runner, results, out, header, head=''):
    """The suite's section (with ``head`` after its title) and its verdict section; the NFE plot."""
    from ..bench import report
    report.plot_quality_vs_nfe(suite, results, out / f'{suite.name}_quality_vs_nfe.png')
    text, verdict, rows = report.quality_section(suite, results, header)
    (out / 'sections' / f'{suite.name}-verdict.md').write_text(verdict_section(suite, verdict, rows))
    return text.replace('\n\n', '\n\n' + head, 1) if head else text


def _listed(metric_values):
    from ..bench.report import fmt
    return ', '.join(f'{k} {fmt(v)}' for k, v in metric_values.items())


def _panels(runner, suite, pair, sampler, t, results, n):
    """(label, samples) of strong, weak, each W2SD variant and each baseline family at the paper's NFE."""
    from ..bench import report
    r = results[pair.name][sampler, t]
    seed = suite.eval_seeds[0]
    panels = [(f'strong, {t} steps', runner.sample(pair, sampler, 'strong', t, {}, seed, n)[0]),
              (f'weak, {t} steps', runner.sample(pair, sampler, 'weak', t, {}, seed, n)[0])]
    panels += [(f'W2SD {v} ({report.settings(c["w2sd"])})',
                runner.sample(pair, sampler, 'w2sd', t, c['w2sd'].params, seed, n)[0])
               for v, c in r['variants'].items()]
    for f, b in r['best'].items():
        if f != 'w2sd':
            panels.append((f'{report.NAMES[f]} ({report.settings(b)})',
                           runner.sample(pair, sampler, b.method, b.steps, b.params, seed, n)[0]))
    return panels


def run_gmm(args, out):
    from ..bench import report
    suite = gmm_suite(args.quick)
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json)
    text = _write_quality(suite, runner, results, out, 'Gaussian mixtures (exact denoisers, known ideal)')
    links = '\n![quality against NFE](gmm_quality_vs_nfe.png)\n\n![2-D point clouds](gmm_points_2d_missing.png)\n'
    if runner is None:
        return text + links
    pair = next(p for p in suite.pairs if p.name == '2d-missing')
    t = suite.steps[0]
    panels = _panels(runner, suite, pair, 'euler', t, results, suite.n_eval)
    panels.append(('ideal (exact samples)', pair.ideal.sample(suite.n_eval, torch.Generator().manual_seed(0))))
    report.plot_panels(panels, out / 'gmm_points_2d_missing.png',
                       f'2d-missing, euler T={t}: weak lacks the (-4,-4) mode (baselines at NFE <= {3 * t - 2})',
                       'points')
    return text + links


def digits_suite(args):
    from ..bench import digits
    from ..bench.harness import Suite
    from ..stats import split_seeds
    cache = args.cache or pathlib.Path(args.out) / 'cache'
    if args.quick:
        tune, ev = split_seeds(1, 2)
        pairs, metric, classifier = digits.cases(cache, tune, quick=True)
        suite = Suite('digits', pairs, metric, 'fd', ('euler',), (6,), tune, ev, 100, 100, [(1., 1.)],
                      ag_ws=(1.,), ag_windows=((0.28, 5.42),), resampling_fracs=(1.,),
                      restarts=({'lo': 1., 'hi': 5., 'k': 1},), ladder=(4, 8, 16))
    else:
        tune, ev = split_seeds(1, 3)
        pairs, metric, classifier = digits.cases(cache, tune)
        grid = [(f, st) for f in (0.3, 0.6, 1.) for st in (0.5, 1.)]
        suite = Suite('digits', pairs, metric, 'fd', ('euler', 'dpmpp_2m'), (10, 25), tune, ev, 300, 600, grid)
    return suite, metric, classifier


def run_digits(args, out):
    from ..bench import digits, report
    suite, metric, classifier = digits_suite(args)
    floor = metric.floor()
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json)
    head = (f'Data: scikit-learn `load_digits` (UCI Optical Recognition of Handwritten Digits, Alpaydin & Kaynak '
            f'1998, CC BY 4.0), {digits.N_HELD_OUT} held out: half the reference for the tuning seeds, half for the '
            f'evaluation seeds. Classifier held-out accuracy {digits.classifier_accuracy(classifier):.3f}. Floor '
            f'(real training digits against the evaluation reference): {_listed(floor)}.\n\n')
    text = _write_quality(suite, runner, results, out, 'Handwritten digits (small denoisers trained on CPU)', head)
    links = '\n![quality against NFE](digits_quality_vs_nfe.png)\n\n![digit samples](digits_grid.png)\n'
    if runner is None:
        return text + links
    pair, t = suite.pairs[0], suite.steps[0]
    panels = [('held-out digits', digits.load('held_out')[0])]
    panels += _panels(runner, suite, pair, 'euler', t, results, 100)
    report.plot_panels(panels, out / 'digits_grid.png',
                       f'{pair.name}, euler T={t} (baselines at NFE <= {3 * t - 2})', 'digits')
    return text + links


def shapes_suite(args):
    from ..bench import shapes
    from ..bench.harness import Suite
    from ..stats import split_seeds
    cache = args.cache or pathlib.Path(args.out) / 'cache'
    pairs, metric, classifier = shapes.cases(cache, quick=args.quick)
    if args.quick:
        tune, ev = split_seeds(1, 2)
        return Suite('shapes', pairs[:2], metric, 'ratio_err', ('euler',), (4,), tune, ev, 16, 16, [(1., 1.)],
                     ag_ws=(1.,), ag_windows=((0.28, 5.42),), resampling_fracs=(1.,),
                     restarts=({'lo': 1., 'hi': 5., 'k': 1},), ladder=(4, 8)), classifier
    tune, ev = split_seeds(1, 3)
    return Suite('shapes', pairs, metric, 'ratio_err', ('euler',), (10,), tune, ev, 128, 256,
                 [(0.5, 1.), (0.5, 2.), (1., 0.5), (1., 1.), (1., 2.)], variants=('paper', 'next', 'anchored'),
                 ag_windows=((0.28, 5.42), (1., 80.)), resampling_fracs=(0.5, 1.),
                 restarts=({'lo': 0.3, 'hi': 2., 'k': 2}, {'lo': 1., 'hi': 5., 'k': 2}),
                 ladder=(6, 8, 10, 13, 17, 22, 28)), classifier


def run_shapes(args, out):
    from ..bench import report, shapes
    start = time.perf_counter()
    suite, classifier = shapes_suite(args)
    trained = time.perf_counter() - start
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json)
    ideal = shapes.sample(4096, shapes.IDEAL_SQUARES, torch.Generator().manual_seed(0))[0]
    floor = shapes.ShapesMetric(classifier)(None, ideal[:suite.n_eval], -1)
    head = ('Data: procedural 16x16 RGB images (`w2sd_samplers/bench/shapes.py`), '
            f'{len(shapes.TEMPLATES)} templates with known probabilities; read off exactly by the nearest template '
            f'(valid if its RMS distance is below {shapes.VALID_RMS}). Primary metric `ratio_err`: |fraction of '
            'squares among the valid images - 1/2|, the class balance the strong model learned wrongly (35% squares '
            'in its training data); `valid`, `attr_tv` (colour, side, x, y against the ideal), `class_tv` (square, '
            'plus, invalid against 1/2, 1/2, 0) and `fd` (a small CNN\'s features) in the all-metrics tables. '
            f'Training or loading the models took {trained / 60:.1f} min of this run. '
            f'Floor (ideal images against the ideal): {_listed(floor)}.\n\n')
    text = _write_quality(suite, runner, results, out, 'Shapes (conv UNets trained on CPU, known ideal)', head)
    links = '\n![quality against NFE](shapes_quality_vs_nfe.png)\n'
    if runner is None:
        return text + ''.join(f'\n![{p.name}](shapes_grid_{p.name}.png)\n' for p in suite.pairs) + links
    for p in suite.pairs:
        panels = [('ideal', ideal[:16])] + _panels(runner, suite, p, 'euler', suite.steps[0], results, 16)
        report.plot_image_rows(panels, out / f'shapes_grid_{p.name}.png',
                               f'{p.name}, euler T={suite.steps[0]}: one row per method, the same 16 seeds')
        links += f'\n![{p.name}](shapes_grid_{p.name}.png)\n'
    return text + links


def run_overhead(args, out):
    from ..bench import overhead
    dtype = getattr(torch, args.dtype)
    quick = args.quick
    steps = 4 if quick else 10
    samplers = ['euler', 'dpmpp_2m'] if quick else None
    rows = overhead.time_per_nfe(args.unet, steps, device=args.device, dtype=dtype, samplers=samplers,
                                 progress=not args.no_progress)
    T, lam = (10, 9) if quick else (50, 49)
    plain, w2sd = overhead.unet_passes(args.unet, T, lam, device=args.device, dtype=dtype)
    text = [f'## Overhead ({args.unet} UNet, {args.device}, {args.dtype})', '',
            f'Wall time per NFE of each W2SD sampler ({steps} steps, all reflections on, batch 1, one timed run; '
            'the weak role is the same UNet on another prompt, so every NFE is one UNet pass) against '
            'as many bare denoiser calls, timed right after it. A ratio near 1 means the sampler adds nothing beyond '
            'its model calls.', '',
            '| sampler | NFE | ms per NFE | ×bare calls |', '|---|---|---|---|']
    text += [f'| {name} | {nfe} | {per * 1e3:.2f} | {ratio:.2f} |' for name, nfe, per, ratio in rows]
    text += ['', f'UNet passes per image, Euler T={T}, λ={lam}, main step at CFG 5.5, reflection legs at CFG 1 '
             '(counted batch rows through the UNet):', '',
             '| sampler | UNet passes |', '|---|---|',
             f'| plain Euler, CFG 5.5 | {plain} |',
             f'| w2sd_samplers W2SD (CFGDenoiser skips uncond at scale 1) | {w2sd} |',
             f'| official W2SD code (uncond + cond on every leg; 2T + 4λ: its sampling loop counted by hand, not run here) | '
             f'{2 * T + 4 * lam} |', '',
             'Parameter memory of a LoRA pair (rank 4 on attention q/k/v/out, as side branches; float32 bytes, '
             'counted on the meta device):', '', '| UNet | base | LoRA | base + LoRA | ×base |', '|---|---|---|---|---|']
    for size in ('tiny', 'sd15', 'sdxl'):
        base, lora = overhead.lora_memory(size)
        text.append(f'| {size} | {base / 2**20:.1f} MiB | {lora / 2**20:.2f} MiB | {(base + lora) / 2**20:.1f} MiB | '
                    f'{(base + lora) / base:.4f} |')
    text += ['', 'A weight pair made of two full checkpoints would instead hold 2× the base.', '']
    text += overhead.pair_batching_table(args.unet, steps, device=args.device, dtype=dtype)
    return '\n'.join(text)


RUNNERS = {'gmm': run_gmm, 'digits': run_digits, 'shapes': run_shapes, 'overhead': run_overhead}


def standalone(argv=None):
    p = argparse.ArgumentParser(prog='python -m w2sd_samplers.bench', description=__doc__.splitlines()[0])
    configure(p)
    p.set_defaults(func=main)
    return run(p, p.parse_args(argv), 'w2sd bench')
