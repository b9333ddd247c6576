"""Installs the w2sd-samplers library into the webui's venv; the webui runs this file at startup."""
import os
import shutil
import tempfile

import launch

DIST = 'w2sd-samplers'
# What a build of the library reads from a checkout (pyproject.toml's metadata, licence files, package and data).
SOURCES = ('pyproject.toml', 'README.md', 'LICENSE', 'NOTICE', 'w2sd_samplers')


def is_checkout(path):
    return os.path.isfile(os.path.join(path, 'pyproject.toml')) and os.path.isdir(os.path.join(path, 'w2sd_samplers'))


def checkout(extension_dir):
    """The w2sd-samplers checkout the extension lives in (``extensions/w2sd`` a symlink to, or the extension a
    folder inside, ``<checkout>/wrappers/sd_webui``), or ``None``."""
    path = os.path.realpath(extension_dir)
    while not is_checkout(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def requirement(extension_dir, environ):
    """What to install: ``$W2SD_SAMPLERS_SPEC`` (a checkout path, URL or version spec), else the checkout the
    extension lives in. A copied extension without either is an error that says what to do: the library is not on
    a package index."""
    spec = environ.get('W2SD_SAMPLERS_SPEC')
    if spec:
        return spec
    root = checkout(extension_dir)
    if root is None:
        raise RuntimeError(f'W2SD: {extension_dir} is not inside a w2sd-samplers checkout, so there is no library '
                           'to install (it is not on a package index). Symlink the checkout\'s wrappers/sd_webui to '
                           'extensions/w2sd, or set W2SD_SAMPLERS_SPEC=/path/to/w2sd-samplers, and restart the webui')
    return root


def install_spec(spec, run_pip):
    """``pip install --no-deps`` of ``spec``; a checkout is built from a temporary copy of its sources, so no
    ``build/`` or ``*.egg-info`` is left in it (setuptools writes both next to the sources)."""
    if not (os.path.isdir(spec) and is_checkout(spec)):
        run_pip(f'install --no-deps "{spec}"', f'{DIST} for the W2SD extension')
        return
    with tempfile.TemporaryDirectory(prefix='w2sd-install-') as tmp:
        for name in SOURCES:
            source = os.path.join(spec, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(tmp, name), ignore=shutil.ignore_patterns('__pycache__'))
            elif os.path.isfile(source):
                shutil.copy2(source, tmp)
        run_pip(f'install --no-deps "{tmp}"', f'{DIST} for the W2SD extension')


def install(extension_dir, environ):
    if not launch.is_installed(DIST):
        # --no-deps: the webui already ships torch, torchsde, einops, safetensors and tqdm and its own k-diffusion
        # copy (which the samplers use); resolving install_requires could pull a different torch.
        install_spec(requirement(extension_dir, environ), launch.run_pip)


install(os.path.dirname(os.path.abspath(__file__)), os.environ)
