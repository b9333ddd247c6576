"""``w2sd bench [suite] [--quick]``: run the benchmark suites and write RESULTS.md, JSON and PNG plots.

The lead wires ``add_parser`` / ``main`` into ``w2sd_samplers.cli``; ``python -m w2sd_samplers.bench`` runs it
standalone.
"""
import argparse
import json
import pathlib
import platform
import sys
import time

import torch

SUITES = ('gmm', 'digits', 'overhead')


def add_parser(subparsers):
    p = subparsers.add_parser('bench', help='run the benchmarks, write benchmarks/RESULTS.md and plots',
                              description=__doc__.splitlines()[0])
    configure(p)
    p.set_defaults(func=main)
    return p


def configure(p):
    p.add_argument('suite', nargs='?', default='all', choices=('all',) + SUITES)
    p.add_argument('--quick', action='store_true', help='tiny configuration for CI smoke runs (about a minute)')
    p.add_argument('--out', default='benchmarks', help='output folder for RESULTS.md and plots (default: benchmarks)')
    p.add_argument('--cache', default=None, help='folder for trained digit models (default: <out>/cache)')
    p.add_argument('--unet', default='tiny', choices=('tiny', 'tiny-xl', 'sd15', 'sdxl'),
                   help='overhead suite: UNet size (sd15/sdxl: random weights at full size, for a GPU)')
    p.add_argument('--device', default='cpu', help='overhead suite: torch device (e.g. cuda)')
    p.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                   help='overhead suite: UNet dtype')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--from-json', action='store_true',
                   help='rewrite the tables and NFE plots of the quality suites from their saved <suite>.json '
                        'without sampling (other plots and the overhead section are kept)')


def main(args):
    out = pathlib.Path(args.out)
    (out / 'sections').mkdir(parents=True, exist_ok=True)
    suites = SUITES if args.suite == 'all' else (args.suite,)
    for name in suites:
        # one overhead section per UNet and device, so a GPU run adds to the CPU one
        key = f'overhead-{args.unet}-{torch.device(args.device).type}' if name == 'overhead' else name
        section = out / 'sections' / f'{key}.md'
        if args.from_json and (name == 'overhead' or not section.exists()):
            continue
        start = time.perf_counter()
        text = RUNNERS[name](args, out)
        took = time.perf_counter() - start
        if args.from_json:              # keep the footer of the run that produced the numbers
            footer = [line for line in section.read_text().splitlines() if line.startswith('_Command:')]
            text += '\n' + '\n'.join(footer) + '\n'
        else:
            cmd = 'w2sd bench ' + ' '.join(sys.argv[sys.argv.index('bench') + 1:] if 'bench' in sys.argv
                                           else sys.argv[1:])
            text += (f'\n_Command: `{cmd.strip()}` (suite {name}); wall time {took / 60:.1f} min on '
                     f'{platform.machine()} with {torch.get_num_threads()} torch threads, '
                     f'torch {torch.__version__}; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}._'
                     + (' **Quick mode: smoke-test sizes, not results.**' if args.quick else '') + '\n')
        section.write_text(text)
    write_results(out)
    return 0


def write_results(out):
    parts = ['# W2SD benchmark results', '',
             'Written by `w2sd bench` (see [README.md](README.md) here for what is measured); every number below '
             'comes from the library\'s own samplers.', '']
    sections = out / 'sections'
    for f in [sections / 'gmm.md', sections / 'digits.md'] + sorted(sections.glob('overhead-*.md')):
        if f.exists():
            parts.append(f.read_text())
    (out / 'RESULTS.md').write_text('\n'.join(parts))


def _run_quality(suite, out, progress, from_json=False):
    from tqdm.auto import tqdm
    from .harness import Runner
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
    return {'method': r.method, 'steps': r.steps, 'params': r.params, 'nfe': r.nfe, 'values': r.values,
            'means': r.means}


def _from_jsonable(r):
    from .harness import Result
    if 'method' in r:
        return Result(**r)
    return {k: _from_jsonable(v) for k, v in r.items()}


def gmm_suite(quick):
    from . import gmm
    from .harness import Suite
    from .stats import split_seeds
    pairs = gmm.cases()
    if quick:
        tune, ev = split_seeds(1, 2)
        return Suite('gmm', [p for p in pairs if p.name in ('1d-r2', '2d-missing')], gmm.metric, 'energy',
                     ('euler',), (10,), tune, ev, 200, 200, [(0.5, 1.), (1., 1.)])
    tune, ev = split_seeds(2, 5)
    grid = [(f, st) for f in (0.3, 0.6, 1.) for st in (0.5, 1., 2.)]
    return Suite('gmm', pairs, gmm.metric, 'energy', ('euler', 'dpmpp_2m', 'euler_ancestral'), (10, 25, 50),
                 tune, ev, 1000, 1000, grid)


def run_gmm(args, out):
    from . import report
    suite = gmm_suite(args.quick)
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json)
    report.plot_quality_vs_nfe(suite, results, out / 'gmm_quality_vs_nfe.png')
    text = report.quality_section(suite, results, 'Gaussian mixtures (exact denoisers, known ideal)')
    links = '\n![quality against NFE](gmm_quality_vs_nfe.png)\n\n![2-D point clouds](gmm_points_2d_missing.png)\n'
    if runner is None:
        return text + links
    pair = next(p for p in suite.pairs if p.name == '2d-missing')
    t = suite.steps[len(suite.steps) // 2]
    variants = results[pair.name]['euler', t]['variants']
    panels = [(m, runner.sample(pair, 'euler', m, t, {}, suite.eval_seeds[0], suite.n_eval)[0])
              for m in ('strong', 'weak')]
    panels += [(f'W2SD {v} ({report.settings(variants[v]["w2sd"])})',
                runner.sample(pair, 'euler', 'w2sd', t, variants[v]['w2sd'].params, suite.eval_seeds[0],
                              suite.n_eval)[0]) for v in ('paper', 'next', 'anchored')]
    ag = variants['next']['ag']
    panels.append((f'autoguidance w={ag.params["w"]:g}, {ag.steps} steps',
                   runner.sample(pair, 'euler', 'autoguidance', ag.steps, ag.params, suite.eval_seeds[0],
                                 suite.n_eval)[0]))
    panels.append(('ideal (exact samples)', pair.ideal.sample(suite.n_eval, torch.Generator().manual_seed(0))))
    report.plot_panels(panels, out / 'gmm_points_2d_missing.png',
                       f'2d-missing, euler T={t}: weak lacks the (-4,-4) mode', 'points')
    return text + links


def digits_suite(args):
    from . import digits
    from .harness import Suite
    from .stats import split_seeds
    cache = args.cache or pathlib.Path(args.out) / 'cache'
    pairs, metric, classifier = digits.cases(cache, quick=args.quick)
    if args.quick:
        tune, ev = split_seeds(1, 2)
        suite = Suite('digits', pairs, metric, 'fd', ('euler',), (10,), tune, ev, 100, 200, [(1., 1.)],
                      ag_ws=(1.,))
    else:
        tune, ev = split_seeds(1, 3)
        grid = [(f, st) for f in (0.3, 0.6, 1.) for st in (0.5, 1.)]
        suite = Suite('digits', pairs, metric, 'fd', ('euler', 'dpmpp_2m', 'euler_ancestral'), (10, 25, 50),
                      tune, ev, 300, 600, grid, ag_ws=(0.25, 0.5, 1., 2.))
    return suite, metric, classifier


def run_digits(args, out):
    from . import digits, report
    suite, metric, classifier = digits_suite(args)
    floor = metric.floor()
    runner, results = _run_quality(suite, out, not args.no_progress, args.from_json)
    report.plot_quality_vs_nfe(suite, results, out / 'digits_quality_vs_nfe.png')
    text = report.quality_section(suite, results, 'Handwritten digits (small denoisers trained on CPU)')
    head = (f'Data: scikit-learn `load_digits` (UCI Optical Recognition of Handwritten Digits, Alpaydin & Kaynak '
            f'1998, CC BY 4.0), {digits.N_HELD_OUT} held out as the reference. Classifier held-out accuracy '
            f'{digits.classifier_accuracy(classifier):.3f}. Floor (real training digits against the held-out ones): '
            + ', '.join(f'{k} {report.fmt(v)}' for k, v in floor.items()) + '.\n\n')
    text = text.replace('\n\n', '\n\n' + head, 1)
    links = '\n![quality against NFE](digits_quality_vs_nfe.png)\n\n![digit samples](digits_grid.png)\n'
    if runner is None:
        return text + links
    pair, t = suite.pairs[0], suite.steps[len(suite.steps) // 2]
    variants = results[pair.name]['euler', t]['variants']
    seed, n = suite.eval_seeds[0], suite.n_eval
    ag, strong_nfe = variants['next']['ag'], variants['next']['strong_nfe'].nfe
    panels = [('held-out digits', digits.load('held_out')[0]),
              (f'strong, {t} steps', runner.sample(pair, 'euler', 'strong', t, {}, seed, n)[0])]
    panels += [(f'W2SD {v} ({report.settings(variants[v]["w2sd"])})',
                runner.sample(pair, 'euler', 'w2sd', t, variants[v]['w2sd'].params, seed, n)[0])
               for v in ('paper', 'next', 'anchored')]
    panels += [(f'strong, {strong_nfe} steps', runner.sample(pair, 'euler', 'strong', strong_nfe, {}, seed, n)[0]),
               (f'autoguidance w={ag.params["w"]:g}, {ag.steps} steps',
                runner.sample(pair, 'euler', 'autoguidance', ag.steps, ag.params, seed, n)[0])]
    report.plot_panels(panels, out / 'digits_grid.png',
                       f'{pair.name}, euler (the NFE-matched baselines are those of W2SD next)', 'digits')
    return text + links


def run_overhead(args, out):
    from . import overhead
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
             f'| official W2SD code (uncond + cond on every leg; 2T + 4λ, paper.md 1.9, not run here) | '
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


RUNNERS = {'gmm': run_gmm, 'digits': run_digits, 'overhead': run_overhead}


def standalone(argv=None):
    p = argparse.ArgumentParser(prog='python -m w2sd_samplers.bench', description=__doc__.splitlines()[0])
    configure(p)
    return main(p.parse_args(argv))
