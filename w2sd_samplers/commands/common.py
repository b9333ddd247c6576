"""What every ``w2sd`` command shares: the help formatter, argparse types, output-file checks and the one-line
error. Imports no command."""
import argparse
import math
import os

import torch

from ..errors import UsageError
from ..generate import family

__all__ = ['UsageError', 'HelpFormatter', 'output_file', 'device', 'finite_float', 'at_least', 'load_pipeline', 'run']


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


def load_pipeline(folder, flag, device, dtype):
    """The diffusers pipeline saved in the local ``folder`` (a supported family; nothing downloaded, safetensors
    only), on ``device`` in ``dtype`` (a name); :class:`UsageError` naming ``flag`` otherwise."""
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {folder}: no such folder (give a local diffusers pipeline folder, e.g. one '
                         'written by pipe.save_pretrained)')
    if not os.path.isfile(os.path.join(folder, 'model_index.json')):
        raise UsageError(f'{flag} {folder}: not a diffusers pipeline folder (no model_index.json)')
    from ..adapters.vp import require_diffusers
    try:
        diffusers = require_diffusers()
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                           local_files_only=True, use_safetensors=True)
        family(pipe)
    except (ImportError, OSError, ValueError) as e:   # missing extra, missing/pickled weights, unsupported family
        raise UsageError(f'{flag} {folder}: {" ".join(str(e).split())}') from None
    except KeyError as e:                             # a model_index.json without the entries diffusers reads
        raise UsageError(f'{flag} {folder}: model_index.json has no {e} entry; not a diffusers pipeline folder') \
            from None
    return pipe.to(device)


def run(parser, args, prog):
    """Run ``args.func(args)``; a :class:`UsageError` becomes one line on stderr, ``prog: error: ...``, and exit
    status 2."""
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(2, f'{prog}: error: {e}\n')
