"""What every ``w2sd`` command shares: the help formatter, argparse types, output-file checks and the one-line
error. Imports no command."""
import argparse
import json
import math
import os
import shlex
import sys

import torch

from ..errors import UsageError
from ..generate import SEED_RANGE, family

__all__ = ['UsageError', 'HelpFormatter', 'output_file', 'output_folder', 'device', 'finite_float', 'at_least',
           'seed', 'load_pipeline', 'quiet_loaders', 'recorded_command', 'run']


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in ``--help`` (an unset or off option's help says what happens instead), and
    descriptions printed with their own line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def output_file(path, flag, extensions=None):
    """Check before a long run that ``path`` can be written (its folder exists and is writable, and its extension is
    one of ``extensions`` when given); raise :class:`UsageError` naming ``flag`` otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path}: is a folder; give a file name')
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {path}: folder {folder} does not exist')
    if not os.access(folder, os.W_OK):
        raise UsageError(f'{flag} {path}: folder {folder} is not writable')
    ext = os.path.splitext(path)[1].lower()
    if extensions is not None and ext not in extensions:
        raise UsageError(f'{flag} {path}: unsupported file type {ext or "(none)"}; use one of '
                         f'{", ".join(sorted(extensions))}')


def output_folder(path, flag):
    """Refuse an existing file where a folder is needed (before any work), naming ``flag``."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'{flag} {path}: is a file; give a folder')


def device(text):
    """argparse type: a torch device that exists on this machine."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f'unknown device {text!r}; e.g. cpu, cuda, cuda:1 or mps') from None
    try:
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError) as e:          # a backend this torch lacks, or no such GPU here
        reason = str(e).split('. ')[0][:100]             # torch's messages run to many lines
        raise argparse.ArgumentTypeError(f'{text} is not available here ({reason}); use --device cpu') from None
    return text


def finite_float(text):
    """argparse type: a finite float (no nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
    return value


def at_least(minimum):
    """argparse type: an integer >= ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'must be an integer >= {minimum}, got {text}')
        return value
    return parse


def seed(text):
    """argparse type: an integer seed that torch's generators take (64 bits)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f'must be an integer from -2**63 to 2**64 - 1, got {text}')
    return value


def quiet_loaders():
    """No progress bars from diffusers' and transformers' loaders (``--no-progress``): an error stays the only
    line on stderr."""
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(folder, flag, device, dtype):
    """The diffusers pipeline saved in the local ``folder`` (a supported family; nothing downloaded, safetensors
    only), on ``device`` in ``dtype`` (a name); :class:`UsageError` naming ``flag`` otherwise."""
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {folder}: no such folder (give a local diffusers pipeline folder, e.g. one '
                         'written by pipe.save_pretrained)')
    index = os.path.join(folder, 'model_index.json')
    if not os.path.isfile(index):
        raise UsageError(f'{flag} {folder}: not a diffusers pipeline folder (no model_index.json)')
    try:
        with open(index, encoding='utf-8') as f:
            pipeline_class = json.load(f).get('_class_name')
    except (ValueError, AttributeError):                # not JSON, or not a JSON object
        pipeline_class = None
    if not isinstance(pipeline_class, str):
        raise UsageError(f'{flag} {folder}: model_index.json names no pipeline class (_class_name); give a folder '
                         'written by pipe.save_pretrained')
    from ..adapters.vp import require_diffusers
    try:
        diffusers = require_diffusers()
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                           local_files_only=True, use_safetensors=True)
        family(pipe)
    except (ImportError, OSError, ValueError) as e:   # missing extra, missing/pickled weights, unsupported family
        raise UsageError(f'{flag} {folder}: {" ".join(str(e).split())}') from None
    return pipe.to(device)


def recorded_command(name, args, paths, folder):
    """``w2sd NAME ...`` as a results file in ``folder`` records the command that wrote it: each argument that is
    one of ``paths`` (as given; also the PATH of a ``KIND:PATH[:...]`` value) is written relative to ``folder``,
    so that the command runs from there and names no folder of the machine it ran on."""
    argv = getattr(args, 'command_line', None)          # set by `python -m w2sd_samplers.NAME`
    if argv is None:
        argv = sys.argv[sys.argv.index(name) + 1:] if name in sys.argv else sys.argv[1:]
    base, paths = os.path.abspath(folder), {p for p in paths if p}

    def relative(path):
        try:
            return os.path.relpath(os.path.abspath(path), base)
        except ValueError:                              # another drive (Windows): no relative form
            return path

    def portable(value):
        if value in paths:
            return relative(value)
        kind, colon, rest = value.partition(':')
        path = next((p for p in paths if rest == p or rest.startswith(p + ':')), None)
        return value if path is None else f'{kind}:{relative(path)}{rest[len(path):]}'

    def token(arg):
        flag, eq, value = arg.partition('=') if arg.startswith('--') else ('', '', arg)
        return f'{flag}={portable(value)}' if eq else portable(arg)
    return shlex.join(['w2sd', name] + [token(a) for a in argv])


def run(parser, args, prog):
    """Run ``args.func(args)``; a :class:`UsageError` becomes one line on stderr, ``prog: error: ...``, and exit
    status 2."""
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(2, f'{prog}: error: {e}\n')
