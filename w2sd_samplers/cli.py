"""The ``w2sd`` command."""
import argparse
import sys
import time

import torch


class UsageError(Exception):
    """A user error in a command's options or files: ``main`` prints it as one line (name the flag) and exits 2."""


def _demo_runs(args):
    from . import _kdiff, guidance, pairs
    from .nfe import CallCounter
    from .sampling import sample_w2sd_euler
    from .toy import four_modes

    K = _kdiff.sampling()
    # The paper's 2-D toy (Fig. 5): the strong model under-weights the (-4,-4) mode, the weak one lacks it.
    ideal = four_modes([.25, .25, .25, .25])
    strong = four_modes([.1, .3, .3, .3])
    weak = four_modes([0., 1., 1., 1.])
    g = torch.Generator().manual_seed(args.seed)
    reference = ideal.sample(args.samples, g)
    sigmas = K.get_sigmas_karras(args.steps, 0.01, 40.).double()
    noise = torch.randn(args.samples, 2, generator=g, dtype=torch.float64)
    lam = args.steps - 1
    nfe_w2sd = args.steps + 2 * lam
    sigmas_matched = K.get_sigmas_karras(nfe_w2sd, 0.01, 40.).double()
    # Difference guidance D_s + (D_s - D_w) is W2SD's first-order twin at 2 calls per step: give it W2SD's NFE.
    sigmas_guided = K.get_sigmas_karras(nfe_w2sd // 2, 0.01, 40.).double()
    runs = [
        ('weak alone', lambda m: K.sample_euler(m['weak'], noise * sigmas[0], sigmas, disable=True)),
        ('strong alone', lambda m: K.sample_euler(m['strong'], noise * sigmas[0], sigmas, disable=True)),
        (f'W2SD (lambda={lam})', lambda m: sample_w2sd_euler(m['strong'], noise * sigmas[0], sigmas, disable=True,
                                                               weak=m['weak'], lam=lam)),
        ('strong, W2SD NFE', lambda m: K.sample_euler(m['strong'], noise * sigmas_matched[0], sigmas_matched,
                                                       disable=True)),
        ('diff. guidance w=1', lambda m: K.sample_euler(
            guidance.difference_guidance(pairs.weights(m['strong'], m['weak'])), noise * sigmas_guided[0],
            sigmas_guided, disable=True)),
    ]
    results = []
    for name, run in runs:
        counter = CallCounter()
        samples = run({'strong': counter.wrap(strong, 'strong'), 'weak': counter.wrap(weak, 'weak')})
        results.append((name, counter.total, samples))
    # A second exact draw shows the metrics' sampling floor.
    return ideal, reference, [('ideal (2nd draw)', 0, ideal.sample(args.samples, g))] + results


def demo(args):
    from .toy import energy_distance, mode_stats

    torch.set_num_threads(1)  # the exact mixture denoisers are tiny: thread start-up costs more than it saves
    start = time.perf_counter()
    ideal, reference, results = _demo_runs(args)
    labels = ['(-4,-4)', '(-4,+4)', '(+4,-4)', '(+4,+4)']
    print(f'W2SD demo: 2-D Gaussian mixture, modes at (+-4, +-4), ideal weights 0.25 each; strong weights '
          f'(0.1, 0.3, 0.3, 0.3); weak lacks (-4,-4).\nEuler, Karras schedule, {args.steps} steps, '
          f'{args.samples} samples, seed {args.seed}.\n')
    print(f'{"method":20s} {"NFE":>5s}  ' + ' '.join(f'{w:>8s}' for w in labels)
          + '   loc.err(-4,-4)  loc.err(max other)  energy dist.')
    for name, nfe, samples in results:
        weights, errors = mode_stats(samples, ideal.means)
        print(f'{name:20s} {nfe:5d}  ' + ' '.join(f'{w:8.3f}' for w in weights)
              + f'   {errors[0]:14.3f}  {max(errors[1:]):18.3f}  {energy_distance(samples, reference):12.4f}')
    print('\nper-mode weights: share of samples nearest each mode; loc.err: distance of that share\'s mean from '
          'the mode centre;\nenergy distance to exact ideal samples (lower is better; the ideal row shows the '
          'sampling floor against a second draw).')
    if args.plot:
        _plot(args.plot, reference, results)
        print(f'plot written to {args.plot}')
    print(f'({time.perf_counter() - start:.1f} s)')


def _plot(path, reference, results):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('--plot needs matplotlib: pip install "w2sd-samplers[plot]"')
    panels = results
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharex=True, sharey=True)
    for ax, (name, nfe, samples) in zip(axes, panels):
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=.3)
        ax.set_title(f'{name}' + (f'\nNFE {nfe}' if nfe else '\n'), fontsize=9)
        ax.set_aspect('equal')
    axes[0].set_xlim(-9, 9)
    axes[0].set_ylim(-9, 9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')


def _positive(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f'must be an integer >= 2, got {text}')
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog='w2sd', description='Weak-to-Strong Diffusion samplers on k-diffusion')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('demo', help="W2SD on the paper's 2-D Gaussian-mixture toy (exact denoisers, no weights)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--steps', type=_positive, default=50, help='sampling steps T (default 50, as the paper)')
    p.add_argument('--samples', type=_positive, default=4000)
    p.add_argument('--plot', metavar='FILE.png', help='draw the point clouds side by side (needs matplotlib)')
    p.set_defaults(func=demo)
    from .generate import add_parser as add_generate_parser
    add_generate_parser(sub)
    from .bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .eval.cli import add_parser as add_eval_parser
    add_eval_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        parser.exit(2, f'w2sd {args.command}: error: {e}\n')


if __name__ == '__main__':
    main()
