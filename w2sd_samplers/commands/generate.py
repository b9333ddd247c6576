"""``w2sd generate``: W2SD text-to-image/video on a local diffusers model folder, through
:func:`w2sd_samplers.generate.generate`."""
import importlib.util
import os
import re

import torch

from .. import generate as pipelines
from ..generate import SCHEDULES, family, generate
from ..sampling import SAMPLERS
from .common import (HelpFormatter, UsageError, at_least, device, finite_float, load_pipeline, output_file,
                     quiet_loaders, seed)


def add_parser(subparsers):
    """Add the ``generate`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser('generate', help='W2SD text-to-image/video on a local diffusers model folder',
                              description=pipelines.__doc__, formatter_class=HelpFormatter)
    p.add_argument('model', metavar='MODEL',
                   help='local diffusers pipeline folder (SD, SDXL or AnimateDiff; nothing is downloaded)')
    p.add_argument('--prompt', required=True, help='the text prompt')
    p.add_argument('--negative-prompt', help='negative prompt of the CFG branches (default: empty)')
    p.add_argument('--steps', type=at_least(1), default=30, help='sampling steps T')
    p.add_argument('--sampler', default='euler', choices=sorted(SAMPLERS), help='W2SD sampler')
    p.add_argument('--schedule', default='native', choices=SCHEDULES,
                   help="sigma schedule ('native': the pipeline scheduler's timestep spacing)")
    p.add_argument('--cfg', type=finite_float, default=7.5, help='CFG scale of the main step')
    p.add_argument('--seed', type=seed, default=0, help='seed of the initial noise and of sampler noise')
    p.add_argument('--height', type=at_least(1), help="image height in pixels (default: the model's own size)")
    p.add_argument('--width', type=at_least(1), help="image width in pixels (default: the model's own size)")
    p.add_argument('--frames', type=at_least(1), default=16, help='video frames (AnimateDiff)')
    p.add_argument('--plain', action='store_true', help='no reflection: the baseline with the same noise')
    p.add_argument('--parity', action='store_true', help="the official code's reflection and DDIM grid")
    p.add_argument('--strong-cfg', type=finite_float, help='CFG of the reflection strong leg (default: --cfg)')
    p.add_argument('--weak-cfg', type=finite_float, help='CFG of the weak leg (default: --strong-cfg)')
    p.add_argument('--weak-prompt', help='prompt of the weak leg (default: --prompt)')
    p.add_argument('--weak-model', metavar='FOLDER',
                   help='local diffusers pipeline folder of the weak model, same family (default: MODEL)')
    p.add_argument('--lora', metavar='FILE.safetensors', help='LoRA file, applied at --lora-scales')
    p.add_argument('--lora-scales', type=finite_float, nargs=2, default=[1., -1.], metavar=('STRONG', 'WEAK'),
                   help='LoRA scales of the strong leg (and main step) and of the weak leg')
    p.add_argument('--form', choices=('paper', 'anchored'), default='paper',
                   help="reflection form: 'paper' (Eq. 5) or 'anchored' (both legs at (x, sigma); the form the "
                        'benchmarks favour, with a smaller --strength and --lam)')
    p.add_argument('--lam', type=at_least(0), help="reflect the first LAM steps (default: all but the last, "
                                                   "the paper's T - 1)")
    p.add_argument('--strength', type=finite_float, default=1., help='scale of each reflection (1: the paper)')
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device')
    p.add_argument('--dtype', default='float16' if torch.cuda.is_available() else 'float32',
                   choices=('float32', 'float16', 'bfloat16'), help='model dtype')
    p.add_argument('--out', default='w2sd.png', help='output file (.png, .jpg, ... for images, .gif or .mp4 for '
                                                    'video; several images get _0, _1, ... suffixes)')
    p.add_argument('--no-progress', action='store_true', help="no progress bars (also none from diffusers' loaders)")
    p.set_defaults(func=main)
    return p


# generate()'s argument names -> the flags that set them, so that the library's errors name the flags.
_FLAGS = {'w2sd=False': '--plain', 'guidance_scale': '--cfg', 'num_frames': '--frames',
          'negative_prompt': '--negative-prompt', 'weak_model': '--weak-model', 'weak_prompt': '--weak-prompt',
          'strong_cfg': '--strong-cfg', 'weak_cfg': '--weak-cfg', 'lora_scales': '--lora-scales', 'lora': '--lora',
          'steps': '--steps', 'sampler': '--sampler', 'schedule': '--schedule', 'seed': '--seed',
          'height': '--height', 'width': '--width', 'lam': '--lam', 'strength': '--strength', 'form': '--form',
          'parity': '--parity'}
_FLAG_RE = re.compile(r'(?<![\w-])(' + '|'.join(sorted(map(re.escape, _FLAGS), key=len, reverse=True)) + r')\b')


def _flags(message):
    return _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], ' '.join(message.split()))


def _check_out(path, video):
    if not video:
        from PIL import Image
        Image.init()
        return output_file(path, '--out', {e for e, f in Image.registered_extensions().items() if f in Image.SAVE})
    output_file(path, '--out', {'.gif', '.mp4'})
    if path.lower().endswith('.mp4') and not (importlib.util.find_spec('imageio') or importlib.util.find_spec('cv2')):
        raise UsageError(f'--out {path}: writing .mp4 needs imageio: pip install imageio imageio-ffmpeg (or write '
                         'a .gif)')


def main(args):
    """Run ``w2sd generate`` from parsed arguments; prints and returns the list of files written."""
    output_file(args.out, '--out')                      # a bad path fails now, not after loading and sampling
    if args.lora and not os.path.isfile(args.lora):
        raise UsageError(f'--lora {args.lora}: no such file')
    w2sd_options = {} if args.lam is None else {'lam': args.lam}
    if args.strength != 1 or args.form != 'paper':
        if args.parity:
            raise UsageError("--parity runs the official code's reflection, which has no --strength or --form")
        w2sd_options.update(strength=args.strength, form=args.form)
    if args.no_progress:
        quiet_loaders()
    pipe = load_pipeline(args.model, 'MODEL', args.device, args.dtype)
    video = family(pipe) == 'animatediff'
    _check_out(args.out, video)
    weak = load_pipeline(args.weak_model, '--weak-model', args.device, args.dtype) if args.weak_model else None
    lora = None
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora, adapter_name='w2sd_lora')
        except (OSError, ValueError) as e:
            raise UsageError(f'--lora {args.lora}: {" ".join(str(e).split())}') from None
        lora = 'w2sd_lora'
    try:
        result = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                          sampler=args.sampler, schedule=args.schedule, guidance_scale=args.cfg, seed=args.seed,
                          height=args.height, width=args.width, num_frames=args.frames, w2sd=not args.plain,
                          weak_model=weak, weak_prompt=args.weak_prompt, strong_cfg=args.strong_cfg,
                          weak_cfg=args.weak_cfg, lora=lora, lora_scales=tuple(args.lora_scales),
                          parity=args.parity, progress=not args.no_progress, **w2sd_options)
    except ValueError as e:                              # generate() checks its inputs before sampling
        raise UsageError(_flags(str(e))) from None
    outputs = result.images
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if len(outputs) == 1 else [f'{stem}_{i}{ext}' for i in range(len(outputs))]
    for path, item in zip(paths, outputs):
        if video:
            from diffusers.utils import export_to_gif, export_to_video
            (export_to_gif if ext.lower() == '.gif' else export_to_video)(item, path)
        else:
            item.save(path)
        print(f'wrote {path}')
    return paths
