"""A real A1111 or Forge webui server with the extension, driven over HTTP on 127.0.0.1 (skipped without SDWEBUI_PATH).

``SDWEBUI_PATH``: an A1111 checkout (v1.10.1 tested) with its ``repositories/`` in place (stable-diffusion-stability-ai,
generative-models, k-diffusion, BLIP), or a Forge checkout (dfdcbab tested; ``repositories/huggingface_guess``,
BLIP); the server is started with ``--skip-prepare-environment``, so nothing is cloned or installed, and Forge with
``--always-cpu``. ``SDWEBUI_PYTHON``: the webui venv's Python (default ``$SDWEBUI_PATH/venv/bin/python``).
The server (``sdwebui_server.py``) runs a tiny random-weight SD 1.x checkpoint written by ``sdwebui_tiny_ldm.py``,
and the extension as a symlink into this checkout, which imports the library from the checkout (nothing installed,
no ``PYTHONPATH``); a probe extension saves each generation's latents, so results are compared exactly.
"""
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import sdwebui_server

ROOT = os.environ.get('SDWEBUI_PATH')
pytestmark = pytest.mark.skipif(not ROOT, reason='SDWEBUI_PATH (an A1111 checkout) is not set')

# A1111 v1.10.1's k-diffusion samplers, and the ones Forge adds; DPM adaptive has no twin (docs/sd_webui.md says why)
SAMPLERS = ['DPM++ 2M', 'DPM++ SDE', 'DPM++ 2M SDE', 'DPM++ 2M SDE Heun', 'DPM++ 2S a', 'DPM++ 3M SDE', 'Euler a',
            'Euler', 'LMS', 'Heun', 'DPM2', 'DPM2 a', 'DPM fast', 'Restart']
FORGE_SAMPLERS = ['HeunPP2', 'IPNDM', 'IPNDM_V', 'DEIS']
FORGE = bool(ROOT) and sdwebui_server.is_forge(ROOT)
BASE = {'prompt': 'a red cube on a blue sphere', 'negative_prompt': 'blurry', 'steps': 8, 'width': 64, 'height': 64,
        'seed': 1234, 'cfg_scale': 5.5, 'send_images': False, 'save_images': False}

class Server(sdwebui_server.Server):
    def txt2img(self, sampler, w2sd=None, **extra):
        latest = self.probe_dir / 'latest.safetensors'
        if latest.exists():
            latest.unlink()
        body = {**BASE, 'sampler_name': sampler, **extra}
        if w2sd is not None:
            body['alwayson_scripts'] = {'W2SD': {'args': w2sd}}
        code, out = self.request('/sdapi/v1/txt2img', body)
        if code != 200:
            return code, out, None
        return code, json.loads(out['info']), load_file(latest)['samples']


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    s = Server(ROOT, tmp_path_factory.mktemp('sdwebui'))
    yield s
    s.stop()


def test_the_sampler_list_has_a_twin_for_every_wrappable_sampler(server):
    code, samplers = server.request('/sdapi/v1/samplers')
    names = {s['name'] for s in samplers}
    twins = SAMPLERS + (FORGE_SAMPLERS if FORGE else [])
    assert set(twins) | {'DPM adaptive'} <= names
    assert {n for n in names if n.startswith('W2SD ')} == {'W2SD ' + s for s in twins}
    assert 'no "W2SD DPM adaptive" sampler: adaptive step size' in server.log_text()  # said at startup


@pytest.mark.parametrize('sampler', SAMPLERS + FORGE_SAMPLERS)
def test_off_is_the_hosts_sampler_bit_for_bit(server, sampler):
    if sampler in FORGE_SAMPLERS and not server.forge:
        pytest.skip(f'{sampler} is a Forge sampler')
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
    _, _, padded = server.txt2img('W2SD ' + sampler, [True])  # A1111 pads a short list with the panel's defaults
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    assert torch.equal(on, again) and torch.equal(on, ui) and torch.equal(on, padded)
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
    if server.forge:  # Forge's API fails a hires request without it (TypeError in processing.sample)
        hires['hr_additional_modules'] = ['Use same choices']
    code, info, on = server.txt2img('W2SD Euler', [{'enabled': True}], **hires)
    assert code == 200, info
    assert on.shape[-2:] == (96, 96) and 'W2SD: cfg' in info['infotexts'][0]  # decoded after the hires pass
    _, _, off = server.txt2img('W2SD Euler', **hires)
    _, _, host = server.txt2img('Euler', **hires)
    assert torch.equal(off, host) and not torch.equal(on, off)


@pytest.mark.parametrize('settings, message', [
    ([{'enabled': 'false'}], "enabled (the Enable checkbox) must be true or false, got 'false'"),
    ([{'enabled': True, 'lam': 2.5}], 'lam (reflected steps'),
    ([{'enabled': True, 'strength': 'strong'}], 'strength (Reflection strength) must be a finite number'),
    ([{'enabled': True, 'strength': 11}], 'W2SD: strength (Reflection strength) must be a finite number in [-10, 10]'),
    ([{'enabled': True, 'weak_cfg': 31}], 'W2SD: weak_cfg (Weak CFG) must be a finite number in [-5, 30]'),
    ([{'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'x.safetensors'}],
     "W2SD: Weak checkpoint 'x.safetensors' not found" if FORGE else "weak='checkpoint' needs Forge"),
    ([{'enabled': True, 'weak': 'lora'}], "weak='lora' needs A1111" if FORGE else 'needs a LoRA in the prompt'),
    ([{'enabled': True, 'lamda': 3}], 'unknown settings'),
])
def test_bad_settings_fail_the_generation_with_the_setting_named(server, settings, message):
    code, out, _ = server.txt2img('W2SD Euler', settings)
    assert code == 500 and message in out.get('errors', out.get('message', '')), out  # Forge: 'message'
    code, info, _ = server.txt2img('W2SD Euler', [{'enabled': True}])  # the server is fine afterwards
    assert code == 200, info


def test_forge_weak_checkpoint_runs_and_is_recorded(server):
    if not server.forge:
        pytest.skip("weak='checkpoint' is Forge's (A1111 refuses it: test_bad_settings_...)")
    _, checkpoints = server.request('/sdapi/v1/sd-models')
    title = checkpoints[0]['title']  # the loaded one as its own weak checkpoint: Forge loads it a second time
    settings = [{'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': title, 'reflection_cfg': 1.0}]
    code, info, on = server.txt2img('W2SD Euler', settings)
    assert code == 200, info
    _, _, off = server.txt2img('W2SD Euler')
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    assert 'W2SD: checkpoint' in info['infotexts'][0] and f'W2SD weak checkpoint: {title}' in info['infotexts'][0]


def test_no_w2sd_settings_in_the_infotext_of_a_sampler_that_is_not_a_w2sd_twin(server):
    code, info, out = server.txt2img('Euler', [{'enabled': True}])
    assert code == 200 and 'W2SD' not in info['infotexts'][0]
    _, _, host = server.txt2img('Euler')
    assert torch.equal(out, host)
    assert 'W2SD: enabled, but no "W2SD ..." sampler is selected' in server.log_text()


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
