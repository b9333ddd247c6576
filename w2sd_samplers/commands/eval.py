"""``w2sd eval``: paired, matched-NFE comparisons of W2SD and its relatives on a local diffusers pipeline.

Every method runs on the same initial noise per (prompt, seed) and within the same NFE budget (counted by wrapping
the denoisers); each image is scored, and one JSONL row per (prompt, seed, method) is written as it is produced.
With --tune, each family's setting is first chosen on tuning prompts from a small grid, then run on the other
prompts only. Work items are split across processes with accelerate (``accelerate launch`` or ``torchrun``; one
process without a launcher); each process writes its own shard, the main process merges them and writes
summary.md (the recommendation first), per_prompt.csv, grid.png and paired.png. --resume continues an interrupted
run, or extends it with more seeds, prompts appended to --prompts, or more methods.
"""
import argparse
import json
import os
import sys
import time

import torch

from ..eval import methods as M, recommend, report, runner, scorers as S, summary, tune
from ..eval.store import Store, flag, key
from .common import (HelpFormatter, UsageError, at_least, finite_float, load_pipeline, quiet_loaders,
                     recorded_command, run)

PAIRS = ('cfg', 'prompt', 'weights', 'lora')
DEFAULT_METHODS = 'plain,plain-nfe,w2sd-paper,w2sd-anchored,autoguidance,autoguidance-interval'
# Fixed-setting flags, which --tune replaces by its grid.
FIXED = {'lam_frac': 1., 'strength': 1., 'w2sd_window': None, 'ag_w': 1., 'ag_window': [0.28, 5.42]}


def fraction(low_open):
    """argparse type: a number in (0, 1) (``low_open``) or [0, 1]."""
    def parse(text):
        value = float(text)
        if not (0 < value < 1 if low_open else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f'must be a number in {"(0, 1)" if low_open else "[0, 1]"}, got {text}')
        return value
    return parse


def seed_list(text):
    """argparse type: 'N' (seeds 0..N-1), 'A-B' (A..B) or a comma-separated list of seeds and ranges."""
    if text.strip().isdigit():
        seeds = list(range(int(text)))
    else:
        seeds = []
        for part in text.split(','):
            a, dash, b = part.strip().partition('-')
            if not a.isdigit() or (dash and not b.isdigit()) or (dash and int(b) < int(a)):
                raise argparse.ArgumentTypeError(f'expected N, A-B or a list like 0,3,8-11, got {text!r}')
            seeds += range(int(a), int(b) + 1) if dash else [int(a)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f'needs at least one seed and no seed twice, got {text!r}')
    return seeds


def configure(p):
    p.add_argument('model', help='local diffusers pipeline folder (SD 1.x/2.x or SDXL)')
    p.add_argument('--pair', required=True, metavar='KIND:VALUE',
                   help='the weak side: cfg:WEAK_SCALE | prompt:WEAK_PROMPT | weights:PIPELINE_DIR | '
                        'lora:FILE.safetensors[:STRONG:WEAK] (LoRA scales, default 1:-1)')
    p.add_argument('--prompts', required=True, metavar='FILE', help='UTF-8 text file, one prompt per line')
    p.add_argument('--seeds', type=seed_list, default='4', metavar='SEEDS',
                   help='seeds per prompt: N (0..N-1), A-B, or a list like 0,3,8-11; a later run with more seeds '
                        'on the same --out (with --resume) adds only the new ones')
    p.add_argument('--methods', default=DEFAULT_METHODS, help=f'comma-separated, from {", ".join(M.METHODS)}')
    p.add_argument('--steps', type=at_least(1), default=50, help="the plain method's step count T")
    p.add_argument('--nfe', type=at_least(1), default=50,
                   help='denoiser-call budget of every other method (one call = one batched CFG forward)')
    p.add_argument('--scorer', action='append', required=True, metavar='KIND:PATH',
                   help=f'repeatable; kinds: {", ".join(S.KINDS)} (local paths only; see docs/eval.md)')
    p.add_argument('--primary', metavar='KIND', help='the scorer that tunes and recommends (default: the first '
                                                     '--scorer)')
    p.add_argument('--margin', action='append', metavar='[KIND:]VALUE',
                   help='equivalence margin of the paired differences: VALUE standard deviations of the '
                        f"reference's scores (default {report.DEFAULT_MARGIN}), or KIND:VALUE in that scorer's "
                        'units; repeatable')
    p.add_argument('--tune', action='store_true',
                   help='choose each family\'s setting from a small grid on tuning prompts, then run the chosen '
                        'settings on the other prompts (see docs/eval.md for the grid)')
    p.add_argument('--tune-fraction', type=fraction(True), default=0.25,
                   help='share of --prompts used for tuning (every 1/F-th prompt)')
    p.add_argument('--tune-prompts', metavar='FILE', help='tuning prompts from this file instead (then every '
                                                          '--prompts prompt is an evaluation prompt)')
    p.add_argument('--tune-seeds', type=at_least(1), default=2, help='seeds 0..N-1 of each tuning prompt')
    p.add_argument('--fid', metavar='REF_DIR', help='also FID per method against this folder of reference images')
    p.add_argument('--fid-features', metavar='CLIP_DIR', help="FID's feature extractor: a local CLIP folder")
    p.add_argument('--out', required=True, help='results folder')
    p.add_argument('--resume', action='store_true',
                   help='continue or extend the run in --out (same settings; more seeds, prompts or methods)')
    p.add_argument('--sampler', default='euler', choices=sorted(M.SAMPLERS), help='k-diffusion sampler')
    p.add_argument('--schedule', default='native', choices=('native', 'karras', 'exponential'),
                   help="sigma schedule ('native': the pipeline scheduler's timestep spacing)")
    p.add_argument('--cfg', type=finite_float, default=7.5, help='CFG scale of the main step')
    p.add_argument('--strong-cfg', type=finite_float, help='CFG of the strong leg (default --cfg)')
    p.add_argument('--weak-cfg', type=finite_float,
                   help='CFG of the weak leg (default --strong-cfg; cfg pairs set it)')
    p.add_argument('--negative-prompt', help='negative prompt of the CFG branches (default: empty)')
    p.add_argument('--lam-frac', type=fraction(False), default=FIXED['lam_frac'],
                   help='W2SD without --tune: reflected share of the T-1 reflectable steps (1 = the paper)')
    p.add_argument('--strength', type=finite_float, default=FIXED['strength'],
                   help='W2SD without --tune: reflection strength')
    p.add_argument('--w2sd-window', type=finite_float, nargs=2, metavar=('LO', 'HI'),
                   help='W2SD without --tune: reflect the steps with LO <= sigma <= HI instead of --lam-frac')
    p.add_argument('--ag-w', type=finite_float, default=FIXED['ag_w'],
                   help='autoguidance without --tune: weight w in D + w (D_strong - D_weak)')
    p.add_argument('--ag-window', type=finite_float, nargs=2, default=FIXED['ag_window'], metavar=('LO', 'HI'),
                   help='autoguidance-interval without --tune: the sigma interval')
    p.add_argument('--height', type=at_least(8), help="image height (default: the model's)")
    p.add_argument('--width', type=at_least(8), help="image width (default: the model's)")
    p.add_argument('--cpu', action='store_true', help='run on the CPU (also what torchrun on a CPU machine needs)')
    p.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'),
                   help='pipeline dtype (default float16 on a GPU, float32 on the CPU)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')


def add_parser(subparsers):
    p = subparsers.add_parser('eval', help='paired, matched-NFE evaluation on a local diffusers pipeline',
                              description=__doc__, formatter_class=HelpFormatter)
    configure(p)
    p.set_defaults(func=interruptible)
    return p


def standalone(argv=None):
    """``python -m w2sd_samplers.eval`` (what ``accelerate launch`` / ``torchrun -m`` run)."""
    p = argparse.ArgumentParser(prog='w2sd eval', description=__doc__, formatter_class=HelpFormatter)
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


def _prompts(path, option='--prompts'):
    try:
        with open(path, encoding='utf-8') as f:
            prompts = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UsageError(f'{option} {path}: no such file') from None
    except UnicodeDecodeError:
        raise UsageError(f'{option} {path}: not UTF-8 text; save it as UTF-8, one prompt per line') from None
    except IsADirectoryError:
        raise UsageError(f'{option} {path}: is a folder; give a text file, one prompt per line') from None
    if not prompts:
        raise UsageError(f'{option} {path}: holds no prompts; write one prompt per line')
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
            value = finite_float(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise UsageError(f'--pair {spec}: the weak CFG scale must be a finite number') from None
        if args.weak_cfg is not None:
            raise UsageError(f'--pair {spec}: a cfg pair sets the weak CFG; drop --weak-cfg')
        strong = args.cfg if args.strong_cfg is None else args.strong_cfg
        if value == strong:
            raise UsageError(f'--pair {spec}: the weak CFG equals the strong one ({strong}); W2SD needs a difference')
    elif kind == 'weights':
        if not os.path.isfile(os.path.join(value, 'model_index.json')):
            raise UsageError(f'--pair {spec}: {value} is not a diffusers pipeline folder (no model_index.json)')
        value = os.path.realpath(value)
    elif kind == 'lora':
        value, *rest = value.split(':')
        try:
            scales = tuple(finite_float(s) for s in rest) if rest else (1., -1.)
        except (ValueError, argparse.ArgumentTypeError):
            scales = ()
        if len(scales) != 2 or scales[0] == scales[1]:
            raise UsageError(f'--pair {spec}: LoRA scales must be two different finite numbers, '
                             'lora:FILE:STRONG:WEAK')
        if not value.endswith('.safetensors') or not os.path.isfile(value):
            raise UsageError(f'--pair {spec}: {value} is not an existing .safetensors LoRA file')
        value = os.path.realpath(value)
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


def _scorer_spec(spec):
    """A --scorer spec with its paths made absolute and resolved, so that spellings of one file hash alike."""
    kind, paths = S.check(spec)
    return ':'.join([kind, *(os.path.realpath(p) for p in paths)])


def _margins(specs, kinds):
    """``{'sd': default, KIND: absolute}`` from the --margin values."""
    out = {}
    for spec in specs or ():
        kind, _, value = spec.rpartition(':')
        try:
            number = finite_float(value)
        except (ValueError, argparse.ArgumentTypeError):
            number = -1.
        if number <= 0 or (kind and kind not in kinds):
            raise UsageError(f'--margin {spec}: expected a positive number, or KIND:VALUE for one of the scorers '
                             f'({", ".join(kinds)})')
        out[kind or 'sd'] = number
    return out


def _settings(args, pair, scorers, tune_prompts):
    """Everything that changes a row (its hash guards --out); not the items (prompts, seeds) or the methods, which
    a later run may extend. Paths are resolved first."""
    settings = dict(model=os.path.realpath(args.model), pair=pair, steps=args.steps, nfe=args.nfe,
                    sampler=args.sampler, schedule=args.schedule, cfg=args.cfg, strong_cfg=args.strong_cfg,
                    weak_cfg=args.weak_cfg, negative_prompt=args.negative_prompt, height=args.height,
                    width=args.width, dtype=args.dtype, scorer=sorted(scorers), tune=args.tune)
    if args.tune:
        settings.update(primary=args.primary, tune_fraction=None if tune_prompts else args.tune_fraction,
                        tune_prompts=tune_prompts, tune_seeds=args.tune_seeds, grid=tune.GRID)
    else:
        settings.update({k: getattr(args, k) for k in FIXED})
    return json.loads(json.dumps(settings))             # tuples as lists, as settings.json gives them back


def _check(args):
    """Every check that needs no model: returns what the run needs. Writes nothing."""
    methods, prompts = _methods(args.methods), _prompts(args.prompts)
    kinds = [S.check(spec)[0] for spec in args.scorer]
    if len(set(kinds)) != len(kinds):
        raise UsageError('--scorer: each scorer kind at most once')
    args.primary = args.primary or kinds[0]
    if args.primary not in kinds:
        raise UsageError(f'--primary {args.primary}: not one of the --scorer kinds ({", ".join(kinds)})')
    margins = _margins(args.margin, kinds)
    for name, window in (('--w2sd-window', args.w2sd_window), ('--ag-window', args.ag_window)):
        if window is not None and not 0 <= window[0] <= window[1]:
            raise UsageError(f'{name} {window[0]:g} {window[1]:g}: needs 0 <= LO <= HI (sigmas)')
    if args.tune:
        changed = [k for k, v in FIXED.items() if getattr(args, k) != v]
        if changed:
            raise UsageError(f'{flag(changed[0])}: --tune chooses the settings from its grid; drop {flag(changed[0])}'
                             ' (or drop --tune to run that fixed setting)')
    elif args.tune_prompts:
        raise UsageError('--tune-prompts: add --tune (tuning prompts are used only when tuning)')
    kind, value, scales = _pair_spec(args.pair, args)
    if 'z-sampling' in methods and kind != 'cfg':
        raise UsageError('--methods: z-sampling runs on a CFG pair only (--pair cfg:WEAK_SCALE)')
    if (args.fid is None) != (args.fid_features is None):
        raise UsageError('--fid and --fid-features go together (reference images and a CLIP feature folder)')
    if args.fid_features:
        S.check(f'clip:{args.fid_features}')
    tune_prompts = _prompts(args.tune_prompts, '--tune-prompts') if args.tune_prompts else None
    pair = f'{kind}:{value:g}' if kind == 'cfg' else f'{kind}:{value}' + (
        f':{scales[0]:g}:{scales[1]:g}' if scales else '')
    settings = _settings(args, pair, [_scorer_spec(s) for s in args.scorer], tune_prompts)
    return methods, prompts, tune_prompts, kinds, margins, (kind, value, scales), settings


def _split(args, prompts, tune_prompts, stored):
    """(tuning prompts, evaluation prompt indices, the split to store): --tune-prompts, else the stored split of
    the run that created --out, else every 1/F-th prompt."""
    if not args.tune:
        return [], list(range(len(prompts))), None
    if tune_prompts:
        return tune_prompts, list(range(len(prompts))), None
    split = stored['split'] if stored else tune.split(len(prompts), args.tune_fraction)
    rest = [i for i in range(len(prompts)) if i not in split]
    if not split or len(rest) < 2:
        raise UsageError(f'--tune-fraction {args.tune_fraction:g}: leaves {len(split)} tuning and {len(rest)} '
                         f'evaluation prompts of {len(prompts)}; needs at least 1 and 2 (add prompts or change the '
                         'fraction)')
    return [(stored['prompts'] if stored else prompts)[i] for i in split], rest, split


def interruptible(args):
    """:func:`main`, with Ctrl-C said in one line: every row on disk is whole or dropped on resume."""
    try:
        return main(args)
    except KeyboardInterrupt:
        sys.stderr.write(f'w2sd eval: interrupted; --resume continues (the rows so far are in {args.out})\n')
        raise SystemExit(130) from None


def main(args):
    """Run ``w2sd eval``; returns the summary path (main process) or None."""
    clock = {'start': _now()}
    methods, prompts, tune_prompts, kinds, margin_spec, (kind, value, scales), settings = _check(args)
    store = Store(args.out)
    stored = store.check(settings, prompts, args.resume)
    tuning_prompts, eval_indices, split = _split(args, prompts, tune_prompts, stored)

    from accelerate import PartialState
    if args.no_progress:
        quiet_loaders()
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    _warn_single_cpu_process(state)
    device = state.device
    dtype = args.dtype or ('float16' if device.type == 'cuda' else 'float32')
    pipe = load_pipeline(args.model, 'MODEL', device, dtype)
    from ..generate import family
    if family(pipe) == 'animatediff':
        raise UsageError(f'MODEL {args.model}: an AnimateDiff (video) pipeline; w2sd eval scores SD and SDXL images')
    pair_options = _pair_options(pipe, kind, value, scales, args, device, dtype)
    size = (pair_options['width'] or pipe.unet.config.sample_size * pipe.vae_scale_factor,
            pair_options['height'] or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    if args.fid:
        S.reference_images(args.fid, size)
    scorers = {k: S.load(spec, device) for k, spec in zip(kinds, args.scorer)}
    clock['loaded'] = _now()
    try:
        with runner.planner(pipe, prompts[0], pair_options, args.sampler, args.schedule, args.nfe) as plan:
            candidates = tune.candidates(methods, plan, args.nfe) if args.tune else []
            fixed = {m: _fixed(m, plan, args) for m in methods if not args.tune or m == 'plain'}
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f'--pair {args.pair}: cannot be built for this pipeline ({e})') from None
    clock['planned'] = _now()

    state.wait_for_everyone()           # every process has checked --out before the main one writes to it
    if state.is_main_process:
        store.create(settings, prompts, split)
    state.wait_for_everyone()
    shards = store.read()
    if state.is_main_process and shards.skipped:
        print(f'w2sd eval: --out {args.out}: {shards.report()}; their items are redone', file=sys.stderr)
    done = {key(r) for r in shards.rows}
    writer = store.writer(state.process_index)
    bar = _bar(state, args)
    scoring = 0.

    def run_stage(stage, stage_prompts, items, settings):
        # units, not items, are split: a resumed run's remaining work is shared evenly, whatever is done
        units = [(pi, seed, name) for pi, seed in items for name in settings if (pi, seed, name) not in done]
        with state.split_between_processes(units) as mine:
            return runner.work(writer, store.images, pipe, pair_options, stage_prompts, mine, settings,
                               args.sampler, args.schedule, scorers, stage, bar)
    tuning = None
    try:
        if args.tune:
            scoring += run_stage('tune', tuning_prompts, [(pi, seed) for pi in range(len(tuning_prompts))
                                                          for seed in range(args.tune_seeds)],
                                 {c.label(): c for c in candidates})
            clock['tuned'] = _now()
            state.wait_for_everyone()
            clock['tune_wait'] = _now()
            tuning = tune.choose(store.rows(), candidates, args.primary, tuning_prompts, args.tune_seeds)
            fixed.update(tuning.chosen)
        items = [(pi, seed) for pi in eval_indices for seed in args.seeds]
        scoring += run_stage('eval', prompts, items, {m: fixed[m] for m in methods if m in fixed})
    finally:
        writer.close()
        bar.close()
    clock['worked'] = _now()
    state.wait_for_everyone()
    clock['waited'] = _now()
    path = None
    if state.is_main_process:
        path = _summarise(store, args, methods, prompts, items, fixed, tuning, candidates, kinds, margin_spec,
                          (kind, value, scales), size, state.num_processes)
    clock['end'] = _now()
    _write_timing(store, state.process_index, clock, scoring)
    if path is not None:
        if tuning is not None:
            wall = clock['tune_wait'][0] - clock['planned'][0]
            print(f'w2sd eval: tuning grid: {len(candidates)} settings x {len(tuning.prompts) * len(tuning.seeds)} '
                  f'items, {tuning.nfe} denoiser calls in all, {wall:.1f} s wall')
        print(f'w2sd eval: wrote {path} (with per_prompt.csv, results.jsonl, grid.png and paired.png in '
              f'{store.out})')
    return path


def _now():
    return time.time(), time.process_time()


def _warn_single_cpu_process(state):
    """accelerate launch starts one process on a machine without GPUs whatever --num_processes says: say so."""
    launched = any(k.startswith('ACCELERATE_DYNAMO') for k in os.environ)
    if launched and state.num_processes == 1 and state.is_main_process and not torch.cuda.is_available():
        print('w2sd eval: warning: accelerate launch started a single process (on a machine without GPUs it ignores '
              '--num_processes); for N CPU processes run torchrun --nproc_per_node N -m w2sd_samplers.eval ... '
              '--cpu', file=sys.stderr)


def _bar(state, args):
    from tqdm.auto import tqdm
    return tqdm(desc=f'w2sd eval [{state.process_index}]', position=state.process_index, disable=args.no_progress,
                unit='image')


def _fixed(method, plan, args):
    """The :class:`~w2sd_samplers.eval.methods.Setting` of ``method`` from the fixed-setting flags."""
    if method == 'plain':
        return M.Setting.of(method, args.steps)
    if method == 'plain-nfe':
        params = {}
    elif method in M.GUIDANCE:
        params = dict(w=args.ag_w, **({'window': tuple(args.ag_window)} if method != 'autoguidance' else {}))
    elif method == 'z-sampling':
        params = dict(lam_frac=1., strength=1.)        # Z-Sampling's own setting: every step but the last
    elif args.w2sd_window is not None:
        params = dict(window=tuple(args.w2sd_window), strength=args.strength)
    else:
        params = dict(lam_frac=args.lam_frac, strength=args.strength)
    steps = plan(method, params)
    if steps is None:
        window = '--ag-window' if method in M.GUIDANCE else '--w2sd-window'
        raise UsageError(f'--nfe {args.nfe}: too small for {method}, whose runs within it reflect or guide no step; '
                         f'raise --nfe (or widen {window})')
    return M.Setting.of(method, steps, **params)


def _expected(args, candidates, tuning_prompts, items, settings):
    keys = [(pi, seed, c.label()) for pi in range(len(tuning_prompts)) for seed in range(args.tune_seeds)
            for c in candidates]
    return keys + [(pi, seed, m) for pi, seed in items for m in settings]


def _summarise(store, args, methods, prompts, items, settings, tuning, candidates, kinds, margin_spec, pair, size,
               processes):
    from PIL import Image
    rows = store.rows()
    present = {key(r) for r in rows}
    missing = [k for k in _expected(args, candidates, tuning.prompts if tuning else [], items, settings)
               if k not in present]
    if missing:
        pi, seed, m = missing[0]
        raise UsageError(f'--out {store.out}: {len(missing)} expected row(s) are missing (e.g. prompt {pi}, seed '
                         f'{seed}, {m}); the summary is not written: run the same command with --resume')
    with open(store.out / 'results.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    wanted = {(pi, seed) for pi, seed in items}
    ev = [r for r in rows if r.get('stage', 'eval') == 'eval' and (r['prompt_index'], r['seed']) in wanted
          and r['method'] in settings]
    ran = [m for m in methods if m in settings]
    report.per_prompt_csv(store.out / 'per_prompt.csv', [r for r in rows if r.get('stage') == 'tune'] + ev, kinds)
    fid = None
    if args.fid:
        images = {m: [Image.open(store.out / r['image']) for r in ev if r['method'] == m] for m in ran}
        fid = S.fid(args.fid, args.fid_features, {m: v for m, v in images.items() if len(v) > 1}, size)
    plain = summary.reference_plain(ran)
    score = summary.rank_score(ev, args.primary, tuning, plain)
    references = [r for r in (plain, summary.best([m for m in ran if m in M.GUIDANCE], score)) if r]
    margins = {(s, ref): report.margin(ev, s, ref, margin_spec) for s in kinds for ref in references}
    kind, value, scales = pair
    strong = args.cfg if args.strong_cfg is None else args.strong_cfg
    weak = value if kind == 'cfg' else (strong if args.weak_cfg is None else args.weak_cfg)
    recipe = recommend.Run(kind, value, scales, args.cfg, strong, weak, args.sampler, args.schedule,
                           args.negative_prompt)
    n_prompts = len({pi for pi, _ in items})
    seeds = sorted({s for _, s in items})
    setup = (f'{n_prompts} evaluation prompts x {len(seeds)} seeds ({_seeds_text(seeds)}), {len(ev)} rows; sampler '
             f'{args.sampler}, schedule {args.schedule}, CFG {args.cfg:g}; NFE budget {args.nfe} (`plain`: '
             f'T = {args.steps}, not matched); {processes} process(es).' +
             (' No --tune: every method at its fixed setting (--lam-frac, --strength, --ag-w, --ag-window).'
              if tuning is None else f' Settings tuned on {len(tuning.prompts)} other prompts (see Tuning).'))
    pair_path = args.pair.partition(':')[2].split(':')[0] if kind in ('weights', 'lora') else None
    paths = [args.model, args.prompts, args.out, args.fid, args.fid_features, args.tune_prompts, pair_path] + \
        [spec.partition(':')[2].split(':')[0] for spec in args.scorer]
    path = store.out / 'summary.md'
    summary.write(path, ev, title=f'w2sd eval: {os.path.basename(os.path.normpath(args.model))}, pair {args.pair}',
                  setup=setup, methods=ran, prompts=prompts, scorers=kinds, primary=args.primary, margins=margins,
                  margin_rule=report.margin_rule(margin_spec), references=references, tuning=tuning, run=recipe,
                  budget=args.nfe, fid=fid,
                  command=recorded_command('eval', args, paths, store.out))
    if ev:
        report.grid(store.out / 'grid.png', ev, ran, prompts, lambda p: Image.open(store.out / p))
        report.paired_plot(store.out / 'paired.png', ev, ran, kinds, references, margins)
    return path


def _seeds_text(seeds):
    return f'{seeds[0]}-{seeds[-1]}' if seeds == list(range(seeds[0], seeds[-1] + 1)) else ','.join(map(str, seeds))


def _write_timing(store, rank, clock, scoring):
    """timing-<rank>.json: this process's wall and CPU seconds per phase, when main() started and the CPU seconds
    spent before (interpreter and imports): where a run's time goes (benchmarks/eval/harness.py reads it)."""
    marks = ['start', 'loaded', 'planned', *(['tuned', 'tune_wait'] if 'tuned' in clock else []), 'worked',
             'waited', 'end']
    names = {'loaded': 'load', 'planned': 'plan', 'tuned': 'tune', 'tune_wait': 'tune_wait',
             'worked': 'evaluate', 'waited': 'wait', 'end': 'summary'}
    phases = {names[b]: [clock[b][0] - clock[a][0], clock[b][1] - clock[a][1]] for a, b in zip(marks, marks[1:])}
    (store.out / f'timing-{rank}.json').write_text(json.dumps(
        {'start': clock['start'][0], 'start_cpu': clock['start'][1], 'phases': phases, 'scoring_s': scoring}) + '\n')
