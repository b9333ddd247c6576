"""Wall time and peak memory per image of plain sampling, autoguidance and W2SD (paper; anchored with separate or
batched legs) as ratios to plain in one run, eager and with ``torch.compile``: markdown appended to ``--out``.

Run by benchmarks/gpu/run.sh; every leg is skipped (and says so) once ``--budget`` seconds are spent, so that the
script ends in time whatever the machine.
"""
import argparse
import time

import torch
from torch._dynamo.utils import counters

from w2sd_samplers.bench import overhead


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--unet', nargs='+', default=['sdxl', 'sd15'], choices=sorted(overhead.UNETS))
    p.add_argument('--batch', nargs='+', type=int, default=[1, 4])
    p.add_argument('--device', default='cuda')
    p.add_argument('--dtype', default='float16', choices=('float32', 'float16', 'bfloat16'))
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--lam', type=int, default=6, help='reflected steps (0.6 T: the issue\'s goal)')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--compile-backend', default='inductor', help="torch.compile backend ('none': eager only)")
    p.add_argument('--budget', type=float, default=400., help='seconds after which remaining legs are skipped')
    p.add_argument('--out', required=True, help='markdown file to append to')
    args = p.parse_args(argv)
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    lines = ['', f'## Per image: {args.dtype}, Euler T={args.steps}, λ={args.lam}, {args.device}', '',
             'Prompt pair (main step CFG 5.5, reflection legs CFG 1), random-weight UNets. Each method is a ratio to '
             'plain Euler measured in the same run: median of '
             f'{args.repeats} round-robin runs after an untimed warm-up (where a compiled UNet compiles). Peak '
             'memory: `torch.cuda.max_memory_allocated`, weights included. Compiled: `torch.compile(unet, '
             'dynamic=True)` (one graph for every batch size but 1, which dynamo always specializes).', '']
    backends = [None] + ([] if args.compile_backend == 'none' else [args.compile_backend])
    with open(args.out, 'a') as out:
        def write(text):                   # leg by leg: a run stopped at its deadline keeps the finished legs
            out.write('\n'.join(text) + '\n')
            out.flush()
        write(lines)
        for size in args.unet:             # per size, batch by batch, eager then compiled: the goal's leg first
            unet = overhead.build_unet(size, args.device, dtype)
            nets = {b: unet if b is None else torch.compile(unet, backend=b, dynamic=True) for b in backends}
            for batch in args.batch:
                for backend in backends:
                    head = f'### {size}, batch {batch}, ' + ('eager' if backend is None else
                                                             f'torch.compile ({backend})')
                    if time.perf_counter() - start > args.budget:
                        write([head, '', f'skipped: the {args.budget:.0f} s budget was spent', ''])
                        continue
                    graphs = counters['stats']['unique_graphs']
                    leg = time.perf_counter()
                    rows = overhead.per_image(nets[backend], batch, args.steps, args.lam, args.repeats)
                    took = time.perf_counter() - leg
                    write([head, ''] + overhead.per_image_table(rows) + [
                        '', f'{took:.0f} s for the leg; graphs compiled: '
                            f'{counters["stats"]["unique_graphs"] - graphs}; graph breaks so far: '
                            f'{sum(counters["graph_break"].values())}', ''])
                    print(head, f'{took:.0f} s', flush=True)
            del unet, nets
            torch._dynamo.reset()
            if torch.device(args.device).type == 'cuda':
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
