"""``w2sd bench [suite] [--quick]``: run the benchmark suites and write RESULTS.md, JSON and PNG plots.

``w2sd_samplers.cli`` wires ``add_parser`` in; ``python -m w2sd_samplers.bench`` runs it standalone.
"""
import argparse
import dataclasses
import importlib.util
import json
import multiprocessing
import pathlib
import platform
import resource
import time

import torch

from .common import UsageError, at_least, device as torch_device, output_folder, recorded_command, run

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
    p.add_argument('--jobs', type=at_least(1), default=1,
                   help='quality suites: run their cells in this many processes (the same numbers; the wall time '
                        'per sample is then each process\'s)')
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
        start, cpu = time.perf_counter(), _cpu_seconds()
        text = RUNNERS[name](args, out)
        took, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
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
                  'Protocol v3 (benchmarks/README.md, fixed before this run). Per pair and trained model, every '
                  'method family is tuned on the tuning seeds at an NFE no larger than the paper\'s W2SD setting '
                  '(3T - 2) in every sampler/T cell; the cell\'s family is the one with the lowest tuning-seed mean, '
                  'and a model\'s `use` is the family picked in the most cells (ties to the earlier of strong alone, '
                  'autoguidance, AG interval, Re-Sampling, Restart, W2SD). A row names a family only if every '
                  'retrained model picks it; otherwise it says "depends on the model". On the disjoint evaluation '
                  'seeds: ratios of means (median over cells, and the range over models); better / worse count cells '
                  'at Holm-adjusted p < 0.05 over the suite (raw p < 0.05 in parentheses). The key comparison, '
                  'W2SD (best variant and setting) against AG interval per cell: "better" at Holm-adjusted p < 0.05, '
                  '"equivalent" when TOST shows the difference within ±20% of AG interval\'s mean at Holm-adjusted '
                  'p < 0.05, otherwise "inconclusive"; with the power of the paired t-test for a 20% difference at '
                  'the observed spread. Wall time per sample (this shared machine, one run) beside the NFE match.',
                  '']
        parts += [f.read_text() for f in verdicts]
    # notes-*.md: what a run's operator adds by hand (e.g. time spent outside `w2sd bench`), kept across reruns
    for f in (sorted(sections.glob('notes-*.md')) + [sections / f'{name}.md' for name in QUALITY]
              + sorted(sections.glob('overhead-*.md')) + sorted(sections.glob('eval-*.md'))):
        if f.exists():
            parts.append(f.read_text())
    (out / 'RESULTS.md').write_text('\n'.join(parts))


def verdict_section(suite, verdict_table, groups, quick=False):
    """The suite's verdict table (see ``report.quality_section``) with its plain reading, row by row."""
    from ..bench.report import verdict_words
    warning = ['**Quick mode: smoke-test sizes. These numbers are not results, whatever they show (ties '
               'included).**', ''] if quick else []
    return '\n'.join([f'### {suite.name}', ''] + warning + verdict_table + [''] + verdict_words(groups) + ['', ''])


def _cpu_seconds():
    """CPU time of this process and of its finished child processes (``--jobs``)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


_JOBS = None         # (runner, cells) for the forked workers of ``--jobs``


def _compare(i):
    runner, cells = _JOBS
    return runner.compare(*cells[i])


def _run_quality(suite, out, progress, from_json=False, jobs=1):
    from tqdm.auto import tqdm
    from ..bench.harness import Runner
    if from_json:
        saved = json.loads((out / f'{suite.name}.json').read_text())
        return None, {p: {(k.split('/T=')[0], int(k.split('/T=')[1])): _from_jsonable(r) for k, r in v.items()}
                      for p, v in saved.items()}
    global _JOBS
    runner = Runner(suite)
    cells = [(p, sampler, t) for p in suite.pairs for sampler, t in suite.cells(p)]
    _JOBS = runner, cells
    if jobs > 1:        # forked workers share the trained models; imap keeps the cells' order
        pool = multiprocessing.get_context('fork').Pool(jobs)
        done = list(tqdm(pool.imap(_compare, range(len(cells))), total=len(cells), desc=suite.name,
                         disable=not progress))
        pool.close()
        pool.join()
    else:
        done = [_compare(i) for i in tqdm(range(len(cells)), desc=suite.name, disable=not progress)]
    results = {}
    for (p, sampler, t), r in zip(cells, done):
        results.setdefault(p.name, {})[sampler, t] = r
    dump = {p: {f'{s}/T={t}': _jsonable(r) for (s, t), r in v.items()} for p, v in results.items()}
    (out / f'{suite.name}.json').write_text(json.dumps(dump, separators=(',', ':')))
    return runner, results


def _jsonable(r):
    if isinstance(r, dict):
        return {k: _jsonable(v) for k, v in r.items()}
    if isinstance(r, int):
        return r
    return dataclasses.asdict(r)


def _from_jsonable(r):
    from ..bench.harness import Result
    if not isinstance(r, dict):
        return r
    if 'method' in r:
        return Result(**r)
    return {k: _from_jsonable(v) for k, v in r.items()}


def _write_quality(suite, runner, results, out, header, head='', quick=False):
    """The suite's section (with ``head`` after its title) and its verdict section; the NFE plot."""
    from ..bench import report
    report.plot_quality_vs_nfe(suite, results, out / f'{suite.name}_quality_vs_nfe.png')
    text, verdict, rows = report.quality_section(suite, results, header)
    (out / 'sections' / f'{suite.name}-verdict.md').write_text(verdict_section(suite, verdict, rows, quick))
    return text.replace('\n\n', '\n\n' + head, 1) if head else text


def _listed(metric_values):
    from ..bench.report import fmt
    return ', '.join(f'{k} {fmt(v)}' for k, v in metric_values.items())


def _panels(runner, suite, pair, sampler, t, results, n):
    """(label, samples) of strong and weak at T, each W2SD variant (where run) and each family at the paper's NFE."""
    from ..bench import report
    r = results[pair.name][sampler, t]
    seed = suite.eval_seeds[0]
    panels = [(f'strong, {t} steps', runner.sample(pair, sampler, 'strong', t, {}, seed, n)[0]),
              (f'weak, {t} steps', runner.sample(pair, sampler, 'weak', t, {}, seed, n)[0])]
    panels += [(f'W2SD {v} ({report.settings(c["w2sd"])})',
                runner.sample(pair, sampler, 'w2sd', t, c['w2sd'].params, seed, n)[0])
               for v, c in r.get('variants', {}).items()]
    for f, b in r['best'].items():
        if f != 'w2sd' or 'variants' not in r:     # else W2SD's best is one of its variants above
            panels.append((f'{report.NAMES[f]} ({report.settings(b)})',
                           runner.sample(pair, sampler, b.method, b.steps, b.params, seed, n)[0]))
    return panels


def run_gmm(args, out):
    from ..bench import report
    from ..bench.suites import gmm_suite
    suite = gmm_suite(args.quick)
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json, args.jobs)
    text = _write_quality(suite, runner, results, out, 'Gaussian mixtures (exact denoisers, known ideal)',
                          quick=args.quick)
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


def run_digits(args, out):
    from ..bench import digits, report
    from ..bench.suites import digits_suite
    suite, metric, classifier = digits_suite(args.cache or pathlib.Path(args.out) / 'cache', args.quick)
    floor = metric.floor()
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json, args.jobs)
    head = (f'Data: scikit-learn `load_digits` (UCI Optical Recognition of Handwritten Digits, Alpaydin & Kaynak '
            f'1998, CC BY 4.0), {digits.N_HELD_OUT} held out: half the reference for the tuning seeds, half for the '
            f'evaluation seeds. Classifier held-out accuracy {digits.classifier_accuracy(classifier):.3f}. Floor '
            f'(real training digits against the evaluation reference): {_listed(floor)}.\n\n')
    text = _write_quality(suite, runner, results, out, 'Handwritten digits (small denoisers trained on CPU)', head,
                          args.quick)
    links = '\n![quality against NFE](digits_quality_vs_nfe.png)\n\n![digit samples](digits_grid.png)\n'
    if runner is None:
        return text + links
    pair, t = suite.pairs[0], suite.steps[0]
    panels = [('held-out digits', digits.load('held_out')[0])]
    panels += _panels(runner, suite, pair, 'euler', t, results, 100)
    report.plot_panels(panels, out / 'digits_grid.png',
                       f'{pair.name}, euler T={t} (baselines at NFE <= {3 * t - 2})', 'digits')
    return text + links


def _strong_model_table(suite, results):
    """Each trained strong model at its tuned step count: valid fraction and the class ratio it learned."""
    from ..bench.report import fmt
    rows = ['| model | sampler | T | strong alone (tuned steps) | valid | squares among valid | class_tv |',
            '|---|---|---|---|---|---|---|']
    for p in suite.pairs:
        if p.group == 'shapes-aligned' or p.ideal is not None:
            for sampler, t in suite.cells(p):
                b = results[p.name][sampler, t]['best']['strong']
                rows.append(f'| {p.name} | {sampler} | {t} | {b.steps} | {fmt(b.means["valid"])} | '
                            f'{fmt(b.means["squares"])} | {fmt(b.means["class_tv"])} |')
    return '\n'.join(rows)


def run_shapes(args, out):
    from ..bench import report, shapes
    from ..bench.suites import shapes_suite
    start = time.perf_counter()
    suite, classifier = shapes_suite(args.cache or pathlib.Path(args.out) / 'cache', args.quick)
    trained = time.perf_counter() - start
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json, args.jobs)
    ideal = shapes.sample(4096, shapes.IDEAL_SQUARES, torch.Generator().manual_seed(0))[0]
    floor = shapes.ShapesMetric(classifier)(None, ideal[:suite.n_eval], -1)
    head = ('Data: procedural 16x16 RGB images (`w2sd_samplers/bench/shapes.py`), '
            f'{len(shapes.TEMPLATES)} templates with known probabilities; read off exactly by the nearest template '
            f'(valid if its RMS distance is below {shapes.VALID_RMS}; the two closest templates are 0.433 apart, so '
            'a valid image\'s template is unique and a blend of two is invalid). Primary metric `class_tv`: TV '
            'between the frequencies of (square, plus, invalid) and the ideal (1/2, 1/2, 0), so invalid images '
            'count against a method; for the class-conditional pair, TV of (label asked, read-off) against every '
            'image being of its label. Secondary: `valid`, `squares` (fraction of squares among valid images), '
            '`ratio_err` (|squares - 1/2|), `attr_tv` (colour and position against the ideal) and `fd` (a small '
            'CNN\'s features). '
            f'Training or loading the models took {trained / 60:.1f} min of this run. '
            f'Floor (ideal images against the ideal): {_listed(floor)}.\n\n'
            'The strong models (every training seed) at the step count strong alone was tuned to, and the exact '
            'strong denoiser: the fraction of valid images and the class ratio they learned (trained on 35% '
            f'squares):\n\n{_strong_model_table(suite, results)}\n\n')
    text = _write_quality(suite, runner, results, out, 'Shapes (conv UNets trained on CPU, known ideal)', head,
                          args.quick)
    links = '\n![quality against NFE](shapes_quality_vs_nfe.png)\n'
    shown = [p for p in suite.pairs if p.model in suite.full_models]
    if runner is not None:
        for p in shown:
            sampler, t = suite.cells(p)[0]
            panels = [('ideal', ideal[:16])] + _panels(runner, suite, p, sampler, t, results, 16)
            report.plot_image_rows(panels, out / f'shapes_grid_{p.group}.png',
                                   f'{p.name}, {sampler} T={t}: one row per method, the same 16 seeds')
    return text + links + ''.join(f'\n![{p.group}](shapes_grid_{p.group}.png)\n' for p in shown)


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
