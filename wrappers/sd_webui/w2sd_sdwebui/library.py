"""Where the extension gets the ``w2sd_samplers`` library: the checkout it lives in (or ``$W2SD_SAMPLERS_SPEC``
names), imported in place, so the library always matches the extension; else an installed copy.

A checkout needs no build and no package index (webui machines are often offline): the webui's venv already has
what the library imports (torch, torchsde, einops, safetensors, tqdm), and the library uses the webui's own
k-diffusion copy. This module imports nothing of the library, so the script can call it first.
"""
import importlib.util
import os
import sys

SPEC = 'W2SD_SAMPLERS_SPEC'


def is_checkout(path):
    return os.path.isfile(os.path.join(path, 'pyproject.toml')) and os.path.isdir(os.path.join(path, 'w2sd_samplers'))


def checkout(extension_dir, environ):
    """The w2sd-samplers checkout to import from: ``$W2SD_SAMPLERS_SPEC`` when it is one, else the checkout the
    extension lives in (``extensions/w2sd`` a symlink to, or a folder inside, ``<checkout>/wrappers/sd_webui``),
    else ``None``."""
    spec = environ.get(SPEC, '')
    if os.path.isdir(spec) and is_checkout(spec):
        return os.path.realpath(spec)
    path = os.path.realpath(extension_dir)
    while not is_checkout(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def missing(extension_dir):
    return (f'W2SD: {extension_dir} is not inside a w2sd-samplers checkout and the w2sd-samplers library is not '
            'installed in the webui\'s venv. Symlink the checkout\'s wrappers/sd_webui to extensions/w2sd, or set '
            f'{SPEC} to a checkout folder or a wheel, and restart the webui')


def load(extension_dir, environ):
    """Import ``w2sd_samplers`` from the checkout, without putting the checkout on ``sys.path`` (its ``tests``,
    ``benchmarks`` and ``wrappers`` folders would become importable webui-wide), else the installed one."""
    if 'w2sd_samplers' in sys.modules:
        return
    root = checkout(extension_dir, environ)
    if root is None:
        if importlib.util.find_spec('w2sd_samplers') is None:
            raise ImportError(missing(extension_dir))
        return
    package = os.path.join(root, 'w2sd_samplers')
    spec = importlib.util.spec_from_file_location('w2sd_samplers', os.path.join(package, '__init__.py'),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules['w2sd_samplers'] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules['w2sd_samplers']
        raise
