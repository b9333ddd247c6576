"""Installs the w2sd-samplers library into the webui's venv; the webui runs this file at startup."""
import os

import launch

DIST = 'w2sd-samplers'


def requirement(extension_dir, environ):
    """What to pip-install: ``$W2SD_SAMPLERS_SPEC`` (a path, URL or version spec), else the w2sd-samplers checkout
    this extension lives in (when ``extensions/w2sd`` is a symlink to ``wrappers/sd_webui``), else the
    distribution name."""
    spec = environ.get('W2SD_SAMPLERS_SPEC')
    if spec:
        return spec
    root = os.path.dirname(os.path.dirname(os.path.realpath(extension_dir)))
    if os.path.isfile(os.path.join(root, 'setup.cfg')) and os.path.isdir(os.path.join(root, 'w2sd_samplers')):
        return root
    return DIST


def install(extension_dir, environ):
    if not launch.is_installed(DIST):
        # --no-deps: the webui already ships torch, torchsde, einops, safetensors and tqdm and its own k-diffusion
        # copy (which the samplers use); resolving install_requires could pull a different torch.
        launch.run_pip(f'install --no-deps "{requirement(extension_dir, environ)}"', f'{DIST} for the W2SD extension')


install(os.path.dirname(os.path.abspath(__file__)), os.environ)
