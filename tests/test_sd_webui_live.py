"""A real AUTOMATIC1111 webui server with the extension, driven over HTTP on 127.0.0.1 (skipped without SDWEBUI_PATH).

``SDWEBUI_PATH``: an A1111 checkout (v1.10.1 tested) with its ``repositories/`` in place (stable-diffusion-stability-ai,
generative-models, k-diffusion, BLIP; the server is started with ``--skip-prepare-environment``, so nothing is
cloned or installed). ``SDWEBUI_PYTHON``: the webui venv's Python (default ``$SDWEBUI_PATH/venv/bin/python``).
The server runs a tiny random-weight SD 1.x checkpoint written by ``sdwebui_tiny_ldm.py`` and this checkout's
library (``PYTHONPATH``); a probe extension saves each generation's latents, so results are compared exactly.
A Forge checkout is run by ``test_sd_webui_host.py`` only: Forge's backend does not load this tiny LDM checkpoint.
"""
import json
import os
import socket
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.environ.get('SDWEBUI_PATH')
pytestmark = pytest.mark.skipif(not ROOT, reason='SDWEBUI_PATH (an A1111 checkout) is not set')
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))

# A1111 v1.10.1's k-diffusion samplers; DPM adaptive has no twin (docs/sd_webui.md says why)
SAMPLERS = ['DPM++ 2M', 'DPM++ SDE', 'DPM++ 2M SDE', 'DPM++ 2M SDE Heun', 'DPM++ 2S a', 'DPM++ 3M SDE', 'Euler a',
            'Euler', 'LMS', 'Heun', 'DPM2', 'DPM2 a', 'DPM fast', 'Restart']
BASE = {'prompt': 'a red cube on a blue sphere', 'negative_prompt': 'blurry', 'steps': 8, 'width': 64, 'height': 64,
        'seed': 1234, 'cfg_scale': 5.5, 'send_images': False, 'save_images': False}

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


class Server:
    def __init__(self, port, probe_dir, proc, log):
        self.url, self.probe_dir, self.proc, self.log = f'http://127.0.0.1:{port}', probe_dir, proc, log

    def request(self, path, body=None, timeout=600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b'null')
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b'null')

    def txt2img(self, sampler, w2sd=None, **extra):
        latest = os.path.join(self.probe_dir, 'latest.safetensors')
        if os.path.exists(latest):
            os.remove(latest)
        body = {**BASE, 'sampler_name': sampler, **extra}
        if w2sd is not None:
            body['alwayson_scripts'] = {'W2SD': {'args': w2sd}}
        code, out = self.request('/sdapi/v1/txt2img', body)
        if code != 200:
            return code, out, None
        return code, json.loads(out['info']), load_file(latest)['samples']

    def log_tail(self):
        with open(self.log) as f:
            return f.read()[-4000:]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    if os.path.isdir(os.path.join(ROOT, 'modules_forge')):
        pytest.skip('SDWEBUI_PATH is Forge: its backend does not load the tiny LDM checkpoint; '
                    'test_sd_webui_host.py runs its samplers')
    python = os.environ.get('SDWEBUI_PYTHON', os.path.join(ROOT, 'venv', 'bin', 'python'))
    data = tmp_path_factory.mktemp('sdwebui')
    (data / 'extensions').mkdir()
    (data / 'extensions' / 'w2sd').symlink_to(os.path.join(REPO, 'wrappers', 'sd_webui'))
    (data / 'extensions' / 'w2sd_probe' / 'scripts').mkdir(parents=True)
    (data / 'extensions' / 'w2sd_probe' / 'scripts' / 'probe.py').write_text(textwrap.dedent(PROBE))
    probe, model = data / 'probe', data / 'model'
    probe.mkdir()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': REPO, 'W2SD_PROBE_DIR': str(probe)}
    subprocess.run([python, os.path.join(REPO, 'tests', 'sdwebui_tiny_ldm.py'), str(model)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)
    port, log = free_port(), data / 'server.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            [python, 'launch.py', '--skip-prepare-environment', '--skip-torch-cuda-test', '--skip-version-check',
             '--no-download-sd-model', '--do-not-download-clip', '--data-dir', str(data),
             '--ckpt', str(model / 'tiny.safetensors'), '--use-cpu', 'all', '--precision', 'full', '--no-half',
             '--no-half-vae', '--api', '--nowebui', '--server-name', '127.0.0.1', '--port', str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    s = Server(port, str(probe), proc, str(log))
    try:
        deadline = time.time() + 900
        while True:
            assert proc.poll() is None, f'the webui exited:\n{s.log_tail()}'
            assert time.time() < deadline, f'the webui did not start in time:\n{s.log_tail()}'
            try:
                if s.request('/sdapi/v1/samplers', timeout=10)[0] == 200:
                    break
            except OSError:
                time.sleep(2)
        yield s
    finally:
        proc.terminate()  # by PID: only the server this fixture started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_sampler_list_has_a_twin_for_every_wrappable_sampler(server):
    code, samplers = server.request('/sdapi/v1/samplers')
    names = {s['name'] for s in samplers}
    assert set(SAMPLERS) | {'DPM adaptive'} <= names
    assert {'W2SD ' + s for s in SAMPLERS} <= names and 'W2SD DPM adaptive' not in names
    with open(server.log) as f:
        assert 'no "W2SD DPM adaptive" sampler: adaptive step size' in f.read()  # said at startup


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_off_is_the_hosts_sampler_bit_for_bit(server, sampler):
    code, info, host = server.txt2img(sampler)
    assert code == 200, info
    code, info, twin = server.txt2img('W2SD ' + sampler)
    assert code == 200, info
    assert 'W2SD:' not in info['infotexts'][0]  # no W2SD settings in the infotext of a run without reflection
    assert torch.equal(twin, host), float((twin - host).abs().max())


@pytest.mark.parametrize('sampler', ['Euler', 'Euler a', 'DPM++ 2M SDE', 'DPM fast', 'Restart'])
def test_on_reflects_repeats_and_writes_the_infotext(server, sampler):
    _, _, off = server.txt2img('W2SD ' + sampler)
    code, info, on = server.txt2img('W2SD ' + sampler, [{'enabled': True}])
    assert code == 200, info
    _, _, again = server.txt2img('W2SD ' + sampler, [{'enabled': True}])
    positional = [True, 'cfg', 0.0, '', '', -1.5, '', '', 1.0, -1, 1.0, 'current']  # the UI's order
    _, _, ui = server.txt2img('W2SD ' + sampler, positional)
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    assert torch.equal(on, again) and torch.equal(on, ui)
    text = info['infotexts'][0]
    assert 'W2SD: cfg' in text and 'W2SD weak CFG: 0.0' in text and 'W2SD lambda: -1' in text


def test_prompt_pair_and_hires_fix(server):
    # (the tiny model's random CLIP gives NaN conds for some prompts, e.g. 'a green cone', with or without W2SD)
    settings = [{'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a cat'}]
    code, info, prompt = server.txt2img('W2SD Euler', settings)
    assert code == 200, info
    assert 'W2SD weak prompt: a cat' in info['infotexts'][0]
    _, _, cfg = server.txt2img('W2SD Euler', [{'enabled': True}])
    assert not torch.equal(prompt, cfg)
    hires = {'enable_hr': True, 'hr_scale': 1.5, 'hr_upscaler': 'Latent', 'hr_second_pass_steps': 4,
             'denoising_strength': 0.5}
    code, info, on = server.txt2img('W2SD Euler', [{'enabled': True}], **hires)
    assert code == 200, info
    assert on.shape[-2:] == (96, 96) and 'W2SD: cfg' in info['infotexts'][0]  # decoded after the hires pass
    _, _, off = server.txt2img('W2SD Euler', **hires)
    _, _, host = server.txt2img('Euler', **hires)
    assert torch.equal(off, host) and not torch.equal(on, off)


@pytest.mark.parametrize('settings, message', [
    ([{'enabled': 'false'}], "enabled (the Enable checkbox) must be true or false, got 'false'"),
    ([{'enabled': True, 'lam': 2.5}], 'lam (reflected steps'),
    ([{'enabled': True, 'strength': 'strong'}], 'strength must be a finite number'),
    ([{'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'x.safetensors'}], "weak='checkpoint' needs Forge"),
    ([{'enabled': True, 'weak': 'lora'}], 'needs a LoRA in the prompt'),
    ([{'enabled': True, 'lamda': 3}], 'unknown settings'),
])
def test_bad_settings_fail_the_generation_with_the_setting_named(server, settings, message):
    code, out, _ = server.txt2img('W2SD Euler', settings)
    assert code == 500 and message in out['errors'], out
    code, info, _ = server.txt2img('W2SD Euler', [{'enabled': True}])  # the server is fine afterwards
    assert code == 200, info


def test_interrupt_during_a_reflection_run_leaves_the_next_run_unchanged(server):
    _, _, before = server.txt2img('W2SD Euler a', [{'enabled': True}])
    results = []
    worker = threading.Thread(target=lambda: results.append(
        server.txt2img('W2SD Euler a', [{'enabled': True}], steps=150)))
    worker.start()
    time.sleep(3)
    assert server.request('/sdapi/v1/interrupt', {})[0] == 200
    worker.join(600)
    assert results and results[0][0] == 200
    _, _, after = server.txt2img('W2SD Euler a', [{'enabled': True}])
    assert torch.equal(before, after)
