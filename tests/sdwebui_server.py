"""A real webui server (A1111 or Forge at ``SDWEBUI_PATH``) with the W2SD extension, on 127.0.0.1, for the live tests.

``SDWEBUI_PYTHON``: the webui venv's Python (default ``$SDWEBUI_PATH/venv/bin/python``). The server runs a tiny
random-weight SD 1.x checkpoint: A1111 one written by ``sdwebui_tiny_ldm.py``, Forge (on CPU, ``--always-cpu``)
an SD1-shaped one written by ``sdwebui_forge_ckpt.py`` (Forge's backend builds CLIP-L and the VAE from SD1.5's
configs, so those are full size); the extension is a symlink to this checkout's
``wrappers/sd_webui``, so the library is imported from the checkout (nothing installed, no ``PYTHONPATH``). A probe
extension saves each generation's latents, so results are compared exactly. Stopped by its PID.
"""
import json
import os
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))

PROBE = '''
import os

import torch
from modules import scripts
from safetensors.torch import save_file


class Probe(scripts.Script):
    def title(self):
        return 'W2SD test probe'

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def post_sample(self, p, ps, *args):
        # latents; after a hires pass A1111 hands over the decoded images (a list) instead
        samples = ps.samples if isinstance(ps.samples, torch.Tensor) else torch.stack(list(ps.samples))
        save_file({'samples': samples.detach().float().cpu().contiguous()},
                  os.path.join(os.environ['W2SD_PROBE_DIR'], 'latest.safetensors'))
'''


def is_forge(root):
    return os.path.isdir(os.path.join(root, 'modules_forge'))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root, data, ui=False):
        """Start the webui at ``root`` with its data folder ``data``; ``ui``: with the Gradio UI (else API only)."""
        python = os.environ.get('SDWEBUI_PYTHON', os.path.join(root, 'venv', 'bin', 'python'))
        (data / 'extensions').mkdir()
        (data / 'extensions' / 'w2sd').symlink_to(os.path.join(REPO, 'wrappers', 'sd_webui'))
        (data / 'extensions' / 'w2sd_probe' / 'scripts').mkdir(parents=True)
        (data / 'extensions' / 'w2sd_probe' / 'scripts' / 'probe.py').write_text(textwrap.dedent(PROBE))
        self.probe_dir, model = data / 'probe', data / 'model'
        self.probe_dir.mkdir()
        env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, 'OMP_NUM_THREADS': '1',
               'W2SD_PROBE_DIR': str(self.probe_dir)}
        self.forge = is_forge(root)
        writer, checkpoint = ('sdwebui_forge_ckpt.py', 'tiny_sd1.safetensors') if self.forge else \
            ('sdwebui_tiny_ldm.py', 'tiny.safetensors')
        subprocess.run([python, os.path.join(REPO, 'tests', writer), str(model)], cwd=root, env=env,
                       check=True, capture_output=True, timeout=900)
        port, self.log = free_port(), str(data / 'server.log')
        self.url = f'http://127.0.0.1:{port}'
        with open(self.log, 'w') as out:
            self.proc = subprocess.Popen(
                [python, 'launch.py', '--skip-prepare-environment', '--skip-torch-cuda-test', '--skip-version-check',
                 '--no-download-sd-model', '--do-not-download-clip', '--data-dir', str(data),
                 '--ckpt', str(model / checkpoint), '--use-cpu', 'all', '--precision', 'full', '--no-half',
                 '--no-half-vae', *(['--always-cpu'] if self.forge else []), '--api', *([] if ui else ['--nowebui']),
                 '--server-name', '127.0.0.1', '--port', str(port)],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 900
            # No request before the webui says it has started: A1111 adds its API middleware after the Gradio app
            # is up, which fails ("Cannot add middleware after an application has started") once a request came.
            while 'Startup time:' not in self.log_text():
                assert self.proc.poll() is None, f'the webui exited:\n{self.log_tail()}'
                assert time.time() < deadline, f'the webui did not start in time:\n{self.log_tail()}'
                time.sleep(2)
            while True:
                assert self.proc.poll() is None, f'the webui exited:\n{self.log_tail()}'
                assert time.time() < deadline, f'the webui did not answer in time:\n{self.log_tail()}'
                try:
                    if self.request('/sdapi/v1/samplers', timeout=10)[0] == 200:
                        break
                except OSError:
                    time.sleep(2)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        self.proc.terminate()  # by PID: only the server this helper started
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self, path, body=None, timeout=600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b'null')
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b'null')

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def log_tail(self):
        return self.log_text()[-4000:]
