"""The ``w2sd`` command: the entry point, which dispatches to the subcommands in :mod:`w2sd_samplers.commands`."""
import argparse

from . import __version__
from .commands import bench, common, demo, eval, generate


def build_parser():
    parser = argparse.ArgumentParser(prog='w2sd', description='Weak-to-Strong Diffusion samplers on k-diffusion',
                                     formatter_class=common.HelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)
    for command in (demo, generate, bench, eval):
        command.add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    common.run(parser, args, f'w2sd {args.command}')


if __name__ == '__main__':
    main()
