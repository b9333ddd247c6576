"""``w2sd demo``: W2SD on the paper's 2-D Gaussian-mixture toy (exact denoisers, no weights)."""
import time

import torch

from .common import HelpFormatter, UsageError, at_least, output_file, seed

# Below this the energy-distance estimate's own noise (std about 0.01 at 1000 samples, 0.1 at 100 for the ideal
# row) is as large as the differences between the methods, and single rows go negative.
MIN_DEMO_SAMPLES = 1000


def add_parser(subparsers):
    """Add the ``demo`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser('demo', help="W2SD on the paper's 2-D Gaussian-mixture toy (exact denoisers, no weights)",
                              formatter_class=HelpFormatter)
    p.add_argument('--seed', type=seed, default=0, help='seed of the noise and of the reference samples')
    p.add_argument('--steps', type=at_least(2), default=50, help='sampling steps T (the paper uses 50)')
    p.add_argument('--samples', type=at_least(MIN_DEMO_SAMPLES), default=4000,
                   help=f'samples per method (at least {MIN_DEMO_SAMPLES}: fewer make the energy distance noisier '
                        'than the differences it shows)')
    p.add_argument('--plot', metavar='FILE.png', help='draw the point clouds side by side (needs matplotlib)')
    p.set_defaults(func=demo)
    return p


def _demo_runs(args):
    from .. import _kdiff, guidance, pairs
    from ..nfe import CallCounter
    from ..sampling import sample_w2sd_euler
    from ..toy import four_modes

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
    # Difference guidance D_s + (D_s - D_w) is W2SD's first-order twin at 2 calls per step: give it the paper
    # form's NFE.
    sigmas_guided = K.get_sigmas_karras(nfe_w2sd // 2, 0.01, 40.).double()
    runs = [
        ('weak alone', lambda m: K.sample_euler(m['weak'], noise * sigmas[0], sigmas, disable=True)),
        ('strong alone', lambda m: K.sample_euler(m['strong'], noise * sigmas[0], sigmas, disable=True)),
        # the v3 benchmarks' two most frequent W2SD picks (benchmarks/RESULTS.md: 10 and 9 of 50 cells)
        *[(f'W2SD anchored lam={lam} s={strength:g}', lambda m, strength=strength: sample_w2sd_euler(
            m['strong'], noise * sigmas[0], sigmas, disable=True, weak=m['weak'], form='anchored', lam=lam,
            strength=strength)) for strength in (1., .5)],
        (f'W2SD paper lam={lam} s=1', lambda m: sample_w2sd_euler(m['strong'], noise * sigmas[0], sigmas,
                                                                  disable=True, weak=m['weak'], lam=lam)),
        ('strong, paper W2SD NFE', lambda m: K.sample_euler(m['strong'], noise * sigmas_matched[0], sigmas_matched,
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
    from ..toy import energy_distance, mode_stats

    if args.plot:
        _check_plot(args.plot)
    torch.set_num_threads(1)  # the exact mixture denoisers are tiny: thread start-up costs more than it saves
    start = time.perf_counter()
    ideal, reference, results = _demo_runs(args)
    labels = ['(-4,-4)', '(-4,+4)', '(+4,-4)', '(+4,+4)']
    print(f'W2SD demo: 2-D Gaussian mixture, modes at (+-4, +-4), ideal weights 0.25 each; strong weights '
          f'(0.1, 0.3, 0.3, 0.3); weak lacks (-4,-4).\nEuler, Karras schedule, {args.steps} steps, '
          f'{args.samples} samples, seed {args.seed}.\n')
    print(f'{"method":26s} {"NFE":>5s}  ' + ' '.join(f'{w:>8s}' for w in labels)
          + '   loc.err(-4,-4)  loc.err(max other)  energy dist.')
    for name, nfe, samples in results:
        weights, errors = mode_stats(samples, ideal.means)
        print(f'{name:26s} {nfe:5d}  ' + ' '.join(f'{w:8.3f}' for w in weights)
              + f'   {errors[0]:14.3f}  {max(errors[1:]):18.3f}  {energy_distance(samples, reference):12.4f}')
    print('\nper-mode weights: share of samples nearest each mode; loc.err: distance of that share\'s mean from '
          'the mode centre;\nenergy distance to exact ideal samples (lower is better; the ideal row shows the '
          'sampling floor against a second draw).')
    if args.plot:
        _plot(args, ideal, results)
        print(f'plot written to {args.plot}')
    print(f'({time.perf_counter() - start:.1f} s)')


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install matplotlib (in a w2sd-samplers checkout: '
                         'pip install -e ".[plot]")') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _check_plot(path):
    plt = _pyplot()
    output_file(path, '--plot', {f'.{ext}' for ext in plt.figure().canvas.get_supported_filetypes()})
    plt.close('all')


def _plot(args, ideal, results):
    plt = _pyplot()
    from matplotlib.lines import Line2D
    centres = ideal.means.numpy()
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 4.2), sharex=True, sharey=True,
                             layout='constrained')
    for ax, (name, nfe, samples) in zip(axes, results):
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=.3, color='C0')
        ax.scatter(centres[:, 0], centres[:, 1], marker='+', s=120, color='red', linewidths=1.5)
        ax.set_title(f'{name}\nNFE {nfe}' if nfe else f'{name}\n(exact samples)', fontsize=9)
        ax.set_xlabel('x1')
        ax.set_aspect('equal')
    axes[0].set_ylabel('x2')
    axes[0].set_xlim(-9, 9)
    axes[0].set_ylim(-9, 9)
    fig.legend(handles=[Line2D([], [], ls='', marker='o', markersize=4, color='C0', label='samples'),
                        Line2D([], [], ls='', marker='+', markersize=10, color='red', label='ideal mode centres')],
               loc='upper center', bbox_to_anchor=(0.5, 0), ncol=2, frameon=False)
    fig.suptitle(f'W2SD demo: 2-D Gaussian mixture, ideal weight 0.25 per mode; the strong model under-weights '
                 f'(-4,-4) (0.1), the weak one lacks it. Euler, T = {args.steps}, {args.samples} samples, '
                 f'seed {args.seed}', fontsize=10)
    fig.savefig(args.plot, dpi=110, bbox_inches='tight')  # the legend sits below the axes
    plt.close(fig)
