"""Run by the webui at startup. A checkout needs nothing installed (``w2sd_sdwebui.library`` imports the library
from it); a wheel or other pip spec in ``$W2SD_SAMPLERS_SPEC`` is installed with ``--no-deps``, which leaves the
webui's torch and k-diffusion alone and, for a wheel file, needs no package index."""
import os
import sys

import launch

DIST = 'w2sd-samplers'
HERE = os.path.dirname(os.path.abspath(__file__))


def install(extension_dir, environ, run_pip, is_installed):
    sys.path.insert(0, extension_dir)
    try:
        from w2sd_sdwebui import library
    finally:
        sys.path.remove(extension_dir)
    spec = environ.get(library.SPEC)
    if library.checkout(extension_dir, environ) is not None or is_installed(DIST):
        return
    if not spec:
        print(library.missing(extension_dir))  # the script's import error then points here
        return
    run_pip(f'install --no-deps "{spec}"', f'{DIST} for the W2SD extension')


install(HERE, os.environ, launch.run_pip, launch.is_installed)
