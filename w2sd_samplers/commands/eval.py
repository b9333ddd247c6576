"""``w2sd eval``: paired, matched-NFE comparisons of W2SD and its relatives on a local diffusers pipeline.

Every method runs on the same initial noise per (prompt, seed) and within the same NFE budget (counted by wrapping
the denoisers); each image is scored, and one JSONL row per (prompt, seed, method) is written as it is produced.
Work items are split across processes with accelerate (``accelerate launch`` or ``torchrun``; one process without a
launcher); each process writes its own shard, the main process merges them and writes summary.md, grid.png and
winrate.png. ``--resume`` continues an interrupted run with the same settings.
"""
import argparse
import os
import sys
import time

import torch

from ..eval import methods as M, report, scorers as S
from ..eval.store import Store, key
from .common import UsageError, load_pipeline, quiet_loaders, recorded_command, run

PAIRS = ('cfg', 'prompt', 'weights', 'lora')
DEFAULT_METHODS = 'plain,plain-nfe,w2sd-paper,w2sd-anchored,autoguidance'


def configure(p):
    p.add_argument('model', help='local diffusers pipeline folder (SD 1.x/2.x or SDXL)')
    p.add_argument('--pair', required=True, metavar='KIND:VALUE',
                   help='the weak side: cfg:WEAK_SCALE | prompt:WEAK_PROMPT | weights:PIPELINE_DIR | '
                        'lora:FILE.safetensors[:STRONG:WEAK] (LoRA scales, default 1:-1)')
    p.add_argument('--prompts', required=True, metavar='FILE', help='UTF-8 text file, one prompt per line')
    p.add_argument('--seeds', type=int, default=4, help='seeds 0..N-1 per prompt (default 4)')
    p.add_argument('--methods', default=DEFAULT_METHODS, help=f'comma-separated, from {", ".join(M.METHODS)}')
    p.add_argument('--steps', type=int, default=50, help="the plain method's step count T (default 50)")
    p.add_argument('--nfe', type=int, default=50,
                   help='denoiser-call budget of every other method (one call = one batched CFG forward)')
    p.add_argument('--scorer', action='append', required=True, metavar='KIND:PATH',
                   help=f'repeatable; kinds: {", ".join(S.KINDS)} (local paths only; see docs/eval.md)')
    p.add_argument('--fid', metavar='REF_DIR', help='also FID per method against this folder of reference images')
    p.add_argument('--fid-features', metavar='CLIP_DIR', help="FID's feature extractor: a local CLIP folder")
    p.add_argument('--out', required=True, help='results folder')
    p.add_argument('--resume', action='store_true', help='continue the run in --out (same settings only)')
    p.add_argument('--sampler', default='euler', choices=sorted(M.SAMPLERS))
    p.add_argument('--schedule', default='native', choices=('native', 'karras', 'exponential'))
    p.add_argument('--cfg', type=float, default=7.5, help='CFG scale of the main step')
    p.add_argument('--strong-cfg', type=float, help='CFG of the strong leg (default --cfg)')
    p.add_argument('--weak-cfg', type=float, help='CFG of the weak leg (default --strong-cfg; cfg pairs set it)')
    p.add_argument('--negative-prompt')
    p.add_argument('--lam-frac', type=float, default=1., help='W2SD: reflected share of the T-1 reflectable steps')
    p.add_argument('--strength', type=float, default=1., help='W2SD reflection strength')
    p.add_argument('--w2sd-window', type=float, nargs=2, metavar=('LO', 'HI'),
                   help='W2SD: reflect the steps with LO <= sigma <= HI instead of --lam-frac')
    p.add_argument('--ag-w', type=float, default=1., help='autoguidance weight w in D + w (D_strong - D_weak)')
    p.add_argument('--ag-window', type=float, nargs=2, metavar=('LO', 'HI'), help='autoguidance sigma interval')
    p.add_argument('--height', type=int)
    p.add_argument('--width', type=int)
    p.add_argument('--cpu', action='store_true', help='run on the CPU (also what torchrun on a CPU machine needs)')
    p.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'),
                   help='pipeline dtype (default float16 on a GPU, float32 on the CPU)')
    p.add_argument('--no-progress', action='store_true')


def add_parser(subparsers):
    p = subparsers.add_parser('eval', help='paired, matched-NFE evaluation on a local diffusers pipeline',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(func=interruptible)
    return p


def standalone(argv=None):
    """``python -m w2sd_samplers.eval`` (what ``accelerate launch`` / ``torchrun -m`` run)."""
    p = argparse.ArgumentParser(prog='w2sd eval', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(func=interruptible)
    args = p.parse_args(argv)
    args.command_line = sys.argv[1:] if argv is None else list(argv)
    run(p, args, 'w2sd eval')
    return 0


def _methods(text):
    names = [m.strip() for m in text.split(',') if m.strip()]
    unknown = [m for m in names if m not in M.METHODS]
    if unknown or not names:
        raise UsageError(f'--methods: unknown method {unknown[0] if unknown else text!r}; choose from '
                         f'{", ".join(M.METHODS)}')
    if len(set(names)) != len(names):
        raise UsageError(f'--methods: a method is listed twice in {text!r}')
    return names


def _prompts(path):
    try:
        with open(path, encoding='utf-8') as f:
            prompts = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UsageError(f'--prompts {path}: no such file') from None
    except UnicodeDecodeError:
        raise UsageError(f'--prompts {path}: not UTF-8 text; save it as UTF-8, one prompt per line') from None
    except IsADirectoryError:
        raise UsageError(f'--prompts {path}: is a folder; give a text file, one prompt per line') from None
    if not prompts:
        raise UsageError(f'--prompts {path}: holds no prompts; write one prompt per line')
    return prompts


def _pair_spec(spec, args):
    """``(kind, value, lora_scales)`` of --pair, with its files checked; loads nothing."""
    kind, _, value = spec.partition(':')
    if kind not in PAIRS or not value:
        raise UsageError(f'--pair {spec}: expected one of cfg:WEAK_SCALE, prompt:WEAK_PROMPT, weights:DIR, '
                         'lora:FILE.safetensors[:STRONG:WEAK]')
    scales = None
    if kind == 'cfg':
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f'--pair {spec}: the weak CFG scale must be a number') from None
        if args.weak_cfg is not None:
            raise UsageError(f'--pair {spec}: a cfg pair sets the weak CFG; drop --weak-cfg')
        strong = args.cfg if args.strong_cfg is None else args.strong_cfg
        if value == strong:
            raise UsageError(f'--pair {spec}: the weak CFG equals the strong one ({strong}); W2SD needs a difference')
    elif kind == 'weights' and not os.path.isfile(os.path.join(value, 'model_index.json')):
        raise UsageError(f'--pair {spec}: {value} is not a diffusers pipeline folder (no model_index.json)')
    elif kind == 'lora':
        value, *rest = value.split(':')
        try:
            scales = tuple(float(s) for s in rest) if rest else (1., -1.)
        except ValueError:
            scales = ()
        if len(scales) != 2 or scales[0] == scales[1]:
            raise UsageError(f'--pair {spec}: LoRA scales must be two different numbers, lora:FILE:STRONG:WEAK')
        if not value.endswith('.safetensors') or not os.path.isfile(value):
            raise UsageError(f'--pair {spec}: {value} is not an existing .safetensors LoRA file')
    return kind, value, scales


def _pair_options(pipe, kind, value, scales, args, device, dtype):
    """``pipeline_pair`` keyword arguments of the pair; loads the weak model or the LoRA."""
    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   guidance_scale=args.cfg, strong_cfg=args.strong_cfg, weak_cfg=args.weak_cfg)
    if kind == 'cfg':
        options['weak_cfg'] = value
    elif kind == 'prompt':
        options['weak_prompt'] = value
    elif kind == 'weights':
        options['weak_model'] = load_pipeline(value, '--pair weights:', device, dtype)
    else:
        try:
            pipe.load_lora_weights(value, adapter_name='w2sd_lora')
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise UsageError(f'--pair lora:{value}: cannot load it into this pipeline '
                             f'({str(e).splitlines()[0] if str(e) else type(e).__name__})') from None
        options.update(lora='w2sd_lora', lora_scales=scales)
    return options


def _settings(args, methods, prompts):
    """Everything that changes a row: its hash guards --out."""
    return dict(model=os.path.abspath(args.model), pair=args.pair, prompts=prompts, seeds=args.seeds,
                methods=methods, steps=args.steps, nfe=args.nfe, sampler=args.sampler, schedule=args.schedule,
                cfg=args.cfg, strong_cfg=args.strong_cfg, weak_cfg=args.weak_cfg,
                negative_prompt=args.negative_prompt, lam_frac=args.lam_frac, strength=args.strength,
                w2sd_window=args.w2sd_window, ag_w=args.ag_w, ag_window=args.ag_window, height=args.height,
                width=args.width, dtype=args.dtype, scorers=args.scorer)


def interruptible(args):
    """:func:`main`, with Ctrl-C said in one line: every row on disk is whole or dropped on resume."""
    try:
        return main(args)
    except KeyboardInterrupt:
        sys.stderr.write(f'w2sd eval: interrupted; --resume continues (the rows so far are in {args.out})\n')
        raise SystemExit(130) from None


def main(args):
    """Run ``w2sd eval``; returns the summary path (main process) or None."""
    methods, prompts = _methods(args.methods), _prompts(args.prompts)
    for name, value, low in (('--seeds', args.seeds, 1), ('--steps', args.steps, 1), ('--nfe', args.nfe, 1)):
        if value < low:
            raise UsageError(f'{name} must be >= {low}, got {value}')
    for name, window in (('--w2sd-window', args.w2sd_window), ('--ag-window', args.ag_window)):
        if window is not None and not 0 <= window[0] <= window[1]:
            raise UsageError(f'{name} {window[0]} {window[1]}: needs 0 <= LO <= HI (sigmas)')
    kinds = [S.check(spec)[0] for spec in args.scorer]
    if len(set(kinds)) != len(kinds):
        raise UsageError('--scorer: each scorer kind at most once')
    kind, value, scales = _pair_spec(args.pair, args)
    if 'z-sampling' in methods and kind != 'cfg':
        raise UsageError('--methods: z-sampling runs on a CFG pair only (--pair cfg:WEAK_SCALE)')
    if (args.fid is None) != (args.fid_features is None):
        raise UsageError('--fid and --fid-features go together (reference images and a CLIP feature folder)')
    if args.fid_features:
        S.check(f'clip:{args.fid_features}')
    settings = _settings(args, methods, prompts)
    store = Store(args.out)
    store.check(settings, args.resume)

    from accelerate import PartialState
    if args.no_progress:
        quiet_loaders()
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    device = state.device
    dtype = args.dtype or ('float16' if device.type == 'cuda' else 'float32')
    pipe = load_pipeline(args.model, 'MODEL', device, dtype)
    from ..generate import family
    if family(pipe) == 'animatediff':
        raise UsageError(f'model {args.model}: an AnimateDiff (video) pipeline; w2sd eval scores SD and SDXL images')
    pair_options = _pair_options(pipe, kind, value, scales, args, device, dtype)
    o = M.Options(args.sampler, args.lam_frac, args.strength, args.w2sd_window and tuple(args.w2sd_window),
                  args.ag_w, args.ag_window and tuple(args.ag_window))
    steps = _plan(pipe, prompts[0], pair_options, methods, args, o)
    size = (pair_options['width'] or pipe.unet.config.sample_size * pipe.vae_scale_factor,
            pair_options['height'] or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    if args.fid:
        S.reference_images(args.fid, size)
    scorers = {k: S.load(spec, device) for k, spec in zip(kinds, args.scorer)}

    state.wait_for_everyone()           # every process has checked --out before the main one writes to it
    if state.is_main_process:
        store.create(settings)
    state.wait_for_everyone()
    items = [(pi, seed) for pi in range(len(prompts)) for seed in range(args.seeds)]
    done = {key(r) for r in store.rows()}
    with state.split_between_processes(items) as mine, torch.no_grad():
        _work(state, store, pipe, prompts, mine, done, methods, steps, pair_options, o, args, scorers)
    state.wait_for_everyone()
    if state.is_main_process:
        return _summarise(store, args, methods, prompts, size, state.num_processes)
    return None


def _plan(pipe, prompt, pair_options, methods, args, o):
    """Steps per method: --steps for plain, the largest count within --nfe for the others."""
    from ..generate import pipeline_pair
    try:
        with pipeline_pair(pipe, prompt, **pair_options) as pair:
            steps = {}
            for m in methods:
                if m == 'plain':
                    steps[m] = args.steps
                    continue
                n = M.choose_steps(m, M.roles_for(m, pair), lambda n: pair.sigmas(n, args.schedule), args.nfe, o)
                if n is None:
                    raise UsageError(f'--nfe {args.nfe}: too small for {m}, whose runs within it reflect or guide '
                                     'no step; raise --nfe (or widen --w2sd-window / --ag-window)')
                steps[m] = n
    except ValueError as e:
        raise UsageError(f'--pair {args.pair}: cannot be built for this pipeline ({e})') from None
    return steps


def _work(state, store, pipe, prompts, items, done, methods, steps, pair_options, o, args, scorers):
    from tqdm.auto import tqdm

    from ..generate import pipeline_pair
    from ..nfe import CallCounter
    todo = [(pi, seed, m) for pi, seed in items for m in methods if (pi, seed, m) not in done]
    bar = tqdm(total=len(todo), desc=f'w2sd eval [{state.process_index}]', position=state.process_index,
               disable=args.no_progress)
    writer = store.writer(state.process_index)
    try:
        for pi, seed in items:
            mine = [m for m in methods if (pi, seed, m) in todo]
            if not mine:
                continue
            with pipeline_pair(pipe, prompts[pi], **pair_options) as pair:
                for m in mine:
                    counter = CallCounter()
                    roles = M.counted(M.roles_for(m, pair), counter)
                    start = time.perf_counter()
                    latents = pair.sample(lambda x, sigmas: M.run(m, roles, x, sigmas, o),
                                          pair.sigmas(steps[m], args.schedule), seed)
                    image = pair.decode(latents)[0]
                    seconds = time.perf_counter() - start
                    name = f'p{pi:04d}-s{seed}-{m}.png'
                    image.save(store.images / name)
                    scores = {k: float(s.score([image], [prompts[pi]])[0]) for k, s in scorers.items()}
                    writer.write(dict(prompt_index=pi, seed=seed, method=m, prompt=prompts[pi], steps=steps[m],
                                      nfe=counter.total, nfe_roles=dict(counter.counts), seconds=seconds,
                                      scores=scores, image=f'images/{name}'))
                    bar.update()
    finally:
        writer.close()
        bar.close()


def _summarise(store, args, methods, prompts, size, processes):
    import json

    from PIL import Image
    rows = store.rows()
    with open(store.out / 'results.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    fid = None
    if args.fid:
        images = {m: [Image.open(store.out / r['image']) for r in rows if r['method'] == m] for m in methods}
        fid = S.fid(args.fid, args.fid_features, {m: v for m, v in images.items() if len(v) > 1}, size)
    scorer_names = list(rows[0]['scores']) if rows else []
    expected = len(prompts) * args.seeds * len(methods)
    kind, value, _ = _pair_spec(args.pair, args)
    paths = [args.model, args.prompts, args.out, args.fid, args.fid_features, value if kind in ('weights', 'lora')
             else None] + [spec.partition(':')[2] for spec in args.scorer]
    text = '\n'.join([
        f'# w2sd eval: {os.path.basename(os.path.normpath(args.model))}, pair {args.pair}', '',
        f'{len(prompts)} prompts x {args.seeds} seeds, {len(rows)} of {expected} rows; sampler {args.sampler}, '
        f'schedule {args.schedule}, CFG {args.cfg}; NFE budget {args.nfe} (plain at T = {args.steps}); '
        f'{processes} process(es). Win rate: share of (prompt, seed) items where the method scores higher than the '
        'reference on the same noise (ties count half), with a 95% bootstrap interval over items.', '',
        report.tables(rows, methods, scorer_names, fid),
        '![image grid](grid.png)', '', '![win rates](winrate.png)', '',
        f'_Command: `{recorded_command("eval", args, paths, store.out)}` (paths relative to this folder)_', ''])
    path = store.out / 'summary.md'
    path.write_text(text, encoding='utf-8')
    if rows:
        report.grid(store.out / 'grid.png', rows, methods, prompts, lambda p: Image.open(store.out / p))
        report.winrate_plot(store.out / 'winrate.png', rows, methods, scorer_names[0])
    return path
