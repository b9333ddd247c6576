"""The node pack in a real ComfyUI server, driven over its HTTP API on 127.0.0.1, as a user's workflow would.

Runs when COMFYUI_PATH points to a ComfyUI checkout (its requirements and pytest installed in the Python that
runs the tests, or in COMFYUI_PYTHON); skipped otherwise. The server loads a clone-style link to this repository
from custom_nodes/ and a tiny SD1.5-shaped checkpoint with random weights (built here, no download), runs on CPU
and is stopped by its PID. The pack's example workflows (``example_workflows/*.json``, ComfyUI's template
format) are fetched from the server's template routes, turned into API prompts and run.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get('COMFYUI_PATH')
if not COMFYUI_PATH:
    pytest.skip('set COMFYUI_PATH to a ComfyUI checkout to run the node pack in a ComfyUI server',
                allow_module_level=True)

sys.path.insert(0, COMFYUI_PATH)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before the pack imports comfy.model_management

import safetensors.torch  # noqa: E402

from wrappers.comfyui.core import BIT_EXACT_TWINS, HOST_STEPS, REFUSED, SAMPLER_NAMES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS, SEED = 3, 7


LORA_KEY = 'middle_block.1.transformer_blocks.0.attn2.to_k'


def tiny_sd15_state_dict():
    """An SD1.5 checkpoint's keys and widths (ComfyUI detects SD1.5 from them: 320 channels, 768-wide context)
    with one level, one res block and one transformer per block; the CLIP-L text encoder and the VAE at full size
    (ComfyUI builds both from fixed configs). Random weights."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel
    generator = torch.Generator().manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                     use_spatial_transformer=True, legacy=False, operations=comfy.ops.disable_weight_init)
    sd = {f'model.diffusion_model.{k}': torch.randn(v.shape, generator=generator) * 0.05
          for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act='quick_gelu'))
    sd.update({f'cond_stage_model.transformer.{k}': v for k, v in clip.state_dict().items()})
    vae = AutoencoderKL(embed_dim=4, ddconfig={'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3,
                                               'out_ch': 3, 'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2,
                                               'attn_resolutions': [], 'dropout': 0.0})
    sd.update({f'first_stage_model.{k}': v for k, v in vae.state_dict().items()})
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}


def tiny_lora():
    """A rank-2 LoRA on one attention projection of the tiny UNet, in the kohya key format."""
    generator = torch.Generator().manual_seed(9)
    name = 'lora_unet_' + LORA_KEY.replace('.', '_')
    return {f'{name}.lora_up.weight': torch.randn(320, 2, generator=generator),
            f'{name}.lora_down.weight': torch.randn(2, 768, generator=generator), f'{name}.alpha': torch.tensor(2.)}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base):
        self.base, self.port = base, free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log = open(base / 'server.log', 'w')
        self.proc = subprocess.Popen(
            [os.environ.get('COMFYUI_PYTHON', sys.executable), 'main.py', '--cpu', '--listen', '127.0.0.1',
             '--port', str(self.port), '--base-directory', str(base), '--disable-auto-launch',
             '--dont-print-server', '--database-url', 'sqlite:///:memory:'],
            cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT,
            # One thread, as tests/conftest.py sets for this process: OpenMP threads on a loaded CPU slow tiny
            # forward passes down by orders of magnitude.
            env={**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, 'OMP_NUM_THREADS': '1'})
        deadline = time.time() + 300
        while True:
            try:
                self.get('/system_stats')
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError('ComfyUI did not start: ' + (base / 'server.log').read_text()[-3000:])
                time.sleep(1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def request(self, path, data=None):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else None

    def get(self, path):
        return self.request(path)

    def queue(self, workflow):
        """POST /prompt; returns (prompt_id, None), or (None, the error body) when ComfyUI refuses the workflow."""
        try:
            return self.request('/prompt', {'prompt': workflow, 'client_id': uuid.uuid4().hex})['prompt_id'], None
        except urllib.error.HTTPError as e:
            return None, json.loads(e.read())

    def wait(self, prompt_id, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f'/history/{prompt_id}')
            if prompt_id in history and history[prompt_id].get('status', {}).get('completed') is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f'prompt {prompt_id} did not finish')

    def run(self, workflow):
        prompt_id, error = self.queue(workflow)
        assert error is None, error
        return self.wait(prompt_id)

    def latents(self, entry):
        """The latents the workflow's SaveLatent nodes wrote, by node id."""
        assert entry['status']['status_str'] == 'success', entry['status']
        out = {}
        for node, ui in entry['outputs'].items():
            for saved in ui.get('latents', []):
                path = self.base / 'output' / saved['subfolder'] / saved['filename']
                out[node] = safetensors.torch.load_file(path)['latent_tensor']
        return out


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp('comfyui')
    for folder in ('custom_nodes', 'models/checkpoints', 'models/loras', 'input', 'output', 'user', 'temp'):
        (base / folder).mkdir(parents=True)
    (base / 'custom_nodes' / 'w2sd-samplers').symlink_to(REPO, target_is_directory=True)  # a clone, as users do
    safetensors.torch.save_file(tiny_sd15_state_dict(), base / 'models' / 'checkpoints' / 'tiny_sd15.safetensors')
    safetensors.torch.save_file(tiny_lora(), base / 'models' / 'loras' / 'tiny_lora.safetensors')
    server = Server(base)
    stats = server.get('/system_stats')['system']
    print('ComfyUI', stats.get('comfyui_version'), 'python', stats.get('python_version', '')[:6])
    yield server
    server.stop()


def base_workflow():
    return {
        'ckpt': {'class_type': 'CheckpointLoaderSimple', 'inputs': {'ckpt_name': 'tiny_sd15.safetensors'}},
        'pos': {'class_type': 'CLIPTextEncode', 'inputs': {'clip': ['ckpt', 1], 'text': 'a red fox in the snow'}},
        'neg': {'class_type': 'CLIPTextEncode', 'inputs': {'clip': ['ckpt', 1], 'text': 'blurry'}},
        'weak': {'class_type': 'CLIPTextEncode', 'inputs': {'clip': ['ckpt', 1], 'text': 'a fox'}},
        'latent': {'class_type': 'EmptyLatentImage', 'inputs': {'width': 32, 'height': 32, 'batch_size': 1}},
    }


def ksampler(sampler_name, steps=STEPS, scheduler='karras'):
    return {'model': ['ckpt', 0], 'seed': SEED, 'steps': steps, 'cfg': 5.5, 'sampler_name': sampler_name,
            'scheduler': scheduler, 'positive': ['pos', 0], 'negative': ['neg', 0], 'latent_image': ['latent', 0],
            'denoise': 1.0}


def w2sd_inputs(strength, **changes):
    return {'strong_cfg': 5.5, 'weak_cfg': 0.0, 'lam': -1, 'strength': strength, 'weak_sigma': 'current',
            'form': 'paper', 'reflections': 1, **changes}


def save(node, prefix):
    return {'class_type': 'SaveLatent', 'inputs': {'samples': [node, 0], 'filename_prefix': prefix}}


def test_the_server_offers_the_nodes_with_descriptions_and_tooltips(server):
    info = server.get('/object_info')
    for name in ('W2SDSampler', 'W2SDGuider', 'W2SDKSampler'):
        node = info[name]
        assert node['description'] and node['category'].startswith(info['KSampler']['category'])
        inputs = {**node['input']['required'], **node['input'].get('optional', {})}
        assert [k for k, v in inputs.items() if 'tooltip' not in (v[1] if len(v) > 1 else {})] == []
    assert info['W2SDSampler']['input']['required']['sampler_name'][0] == SAMPLER_NAMES
    host = info['KSampler']['input']['required']['sampler_name'][0]
    assert set(host) == set(SAMPLER_NAMES) | set(REFUSED)
    defaults = {name: {k: v[1].get('default') for k, v in info[name]['input']['required'].items()
                       if k in ('strong_cfg', 'weak_cfg')} for name in ('W2SDSampler', 'W2SDGuider', 'W2SDKSampler')}
    assert len({json.dumps(d, sort_keys=True) for d in defaults.values()}) == 1, defaults
    # the main cfg's range is the stock KSampler's
    stock_cfg = info['KSampler']['input']['required']['cfg'][1]
    cfg = info['W2SDKSampler']['input']['required']['cfg'][1]
    assert (cfg['min'], cfg['max']) == (stock_cfg['min'], stock_cfg['max'])


@pytest.mark.parametrize('name', SAMPLER_NAMES)
def test_strength_0_equals_the_stock_ksampler_and_strength_1_changes_the_latent(server, name):
    workflow = {**base_workflow(),
                'stock': {'class_type': 'KSampler', 'inputs': ksampler(name)},
                'off': {'class_type': 'W2SDKSampler', 'inputs': {**ksampler(name), **w2sd_inputs(0.0)}},
                'on': {'class_type': 'W2SDKSampler', 'inputs': {**ksampler(name), **w2sd_inputs(1.0)}},
                'save_stock': save('stock', f'{name}_stock'), 'save_off': save('off', f'{name}_off'),
                'save_on': save('on', f'{name}_on')}
    out = server.latents(server.run(workflow))
    stock, off, on = out['save_stock'], out['save_off'], out['save_on']
    print(f'{name}: max |off - stock| = {(off - stock).abs().max().item():.3g}, max |stock| = '
          f'{stock.abs().max().item():.3g}')
    if name in HOST_STEPS or name in BIT_EXACT_TWINS:
        assert torch.equal(off, stock)
    else:
        torch.testing.assert_close(off, stock, rtol=1e-5, atol=1e-6 * stock.abs().max().item())
    assert torch.isfinite(on).all() and (on - stock).abs().max() > 1e-3


def custom_advanced(guider, sampler_inputs, steps=STEPS):
    return {**base_workflow(),
            'noise': {'class_type': 'RandomNoise', 'inputs': {'noise_seed': SEED}},
            'sigmas': {'class_type': 'BasicScheduler', 'inputs': {'model': ['ckpt', 0], 'scheduler': 'karras',
                                                                  'steps': steps, 'denoise': 1.0}},
            'sampler': {'class_type': 'W2SDSampler', 'inputs': sampler_inputs},
            'guider': guider,
            'sample': {'class_type': 'SamplerCustomAdvanced',
                       'inputs': {'noise': ['noise', 0], 'guider': ['guider', 0], 'sampler': ['sampler', 0],
                                  'sigmas': ['sigmas', 0], 'latent_image': ['latent', 0]}},
            'save': {'class_type': 'SaveLatent', 'inputs': {'samples': ['sample', 0],
                                                            'filename_prefix': 'advanced'}}}


def sampler_inputs(name='euler', cfg_source='auto', strength=1.0):
    return {'sampler_name': name, 'lam': -1, 'strength': strength, 'weak_sigma': 'current', 'form': 'paper',
            'reflections': 1, 'cfg_source': cfg_source, 'strong_cfg': 5.5, 'weak_cfg': 0.0}


def error_message(entry):
    assert entry['status']['status_str'] == 'error', entry['status']
    return ' '.join(m[1].get('exception_message', '') for m in entry['status']['messages']
                    if m[0] == 'execution_error')


def test_basic_guider_without_negative_gives_the_documented_error(server):
    guider = {'class_type': 'BasicGuider', 'inputs': {'model': ['ckpt', 0], 'conditioning': ['pos', 0]}}
    entry = server.wait(server.queue(custom_advanced(guider, sampler_inputs()))[0])
    assert 'no negative conditioning' in error_message(entry)


def test_prompt_pair_through_the_w2sd_guider(server):
    guider = {'class_type': 'W2SDGuider', 'inputs': {'model': ['ckpt', 0], 'positive': ['pos', 0],
                                                     'negative': ['neg', 0], 'cfg': 5.5, 'strong_cfg': 1.0,
                                                     'weak_cfg': 1.0, 'weak_positive': ['weak', 0]}}
    on = server.latents(server.run(custom_advanced(guider, sampler_inputs())))['save']
    off = server.latents(server.run(custom_advanced(guider, sampler_inputs(strength=0.0))))['save']
    assert torch.isfinite(on).all() and (on - off).abs().max() > 1e-3
    # no weak conds and equal leg CFGs: the paper form would reflect the model onto itself
    del guider['inputs']['weak_positive']
    entry = server.wait(server.queue(custom_advanced(guider, sampler_inputs()))[0])
    assert 'weak reflection leg equals the strong one' in error_message(entry)


@pytest.mark.parametrize('change, where', [
    ({'sampler_name': 'uni_pc'}, "sampler_name - W2SD: sampler_name 'uni_pc' cannot run with W2SD reflections: "
                                 "multistep"),
    ({'sampler_name': 'dpm_adaptive'}, 'it chooses its own step sizes'),
    ({'sampler_name': 'euler_x'}, "sampler_name must be one of"),
    ({'lam': -2}, 'lam'),
    ({'form': 'mirror'}, 'form'),
    ({'strength': 11.0}, 'strength'),
    ({'cfg': -1.0}, 'cfg'),
])
def test_bad_inputs_are_refused_before_running(server, change, where):
    workflow = {**base_workflow(), 'w2sd': {'class_type': 'W2SDKSampler',
                                            'inputs': {**ksampler('euler'), **w2sd_inputs(1.0), **change}},
                'save': save('w2sd', 'bad')}
    prompt_id, error = server.queue(workflow)
    assert prompt_id is None and where in json.dumps(error['node_errors']['w2sd']), error


def test_a_refused_samplers_reason_is_in_the_w2sd_samplers_validation_error(server):
    inputs = sampler_inputs('uni_pc')
    guider = {'class_type': 'CFGGuider', 'inputs': {'model': ['ckpt', 0], 'positive': ['pos', 0],
                                                    'negative': ['neg', 0], 'cfg': 5.5}}
    prompt_id, error = server.queue(custom_advanced(guider, inputs))
    assert prompt_id is None
    assert 'cannot run with W2SD reflections' in json.dumps(error['node_errors']['sampler']), error


NAN = float('nan')


@pytest.mark.parametrize('node, change', [
    ('W2SDKSampler', {'cfg': NAN}), ('W2SDKSampler', {'cfg': NAN, 'strength': 0.0}),
    ('W2SDKSampler', {'strong_cfg': NAN}), ('W2SDKSampler', {'weak_cfg': NAN}), ('W2SDKSampler', {'denoise': NAN}),
    ('W2SDGuider', {'cfg': NAN}), ('W2SDGuider', {'strong_cfg': NAN}), ('W2SDGuider', {'weak_cfg': NAN}),
    ('W2SDSampler', {'strong_cfg': NAN}), ('W2SDSampler', {'weak_cfg': NAN}),
])
def test_a_nan_in_a_number_widget_is_a_node_error_not_a_nan_latent(server, node, change):
    """ComfyUI's own range check lets NaN through (JSON NaN parses; every comparison with it is false)."""
    name = next(iter(change))
    if node == 'W2SDKSampler':
        workflow = {**base_workflow(), 'w2sd': {'class_type': 'W2SDKSampler',
                                                'inputs': {**ksampler('euler'), **w2sd_inputs(1.0), **change}},
                    'save': save('w2sd', 'nan')}
    else:
        guider = {'class_type': 'W2SDGuider', 'inputs': {'model': ['ckpt', 0], 'positive': ['pos', 0],
                                                         'negative': ['neg', 0], 'cfg': 5.5, 'strong_cfg': 5.5,
                                                         'weak_cfg': 0.0, 'weak_positive': ['weak', 0]}}
        sampler = sampler_inputs(cfg_source='sampler')
        if node == 'W2SDGuider':
            guider['inputs'].update(change)
        else:
            sampler.update(change)
        workflow = custom_advanced(guider, sampler)
    prompt_id, error = server.queue(workflow)
    assert error is None, error  # ComfyUI's validation passes it ...
    message = error_message(server.wait(prompt_id))
    assert f'W2SD: {name} must be a finite number in [' in message and ', got nan' in message  # ... the node not


def test_anchored_legs_at_cfg_1_run_under_a_basic_guider(server):
    """The anchored form with coinciding legs is the identity: allowed, and no negative is needed at CFG 1."""
    guider = {'class_type': 'BasicGuider', 'inputs': {'model': ['ckpt', 0], 'conditioning': ['pos', 0]}}
    anchored = {**sampler_inputs(), 'form': 'anchored', 'strong_cfg': 1.0, 'weak_cfg': 1.0}
    on = server.latents(server.run(custom_advanced(guider, anchored)))['save']
    off = server.latents(server.run(custom_advanced(guider, {**anchored, 'strength': 0.0})))['save']
    assert torch.isfinite(on).all() and torch.equal(on, off)


EXAMPLES = sorted(p.stem for p in (REPO / 'example_workflows').glob('*.json'))
# What the examples leave to the user, set to this test's files and sizes.
EXAMPLE_CHANGES = {'ckpt_name': 'tiny_sd15.safetensors', 'lora_name': 'tiny_lora.safetensors', 'width': 32,
                   'height': 32, 'steps': STEPS}


def api_prompt(workflow, object_info):
    """The API prompt the frontend queues for a UI-format workflow: links become [node id, slot], widget values
    fill the node's widget inputs in ``/object_info`` order (a seed's control_after_generate value is skipped)."""
    links = {link[0]: link for link in workflow['links']}
    prompt = {}
    for node in workflow['nodes']:
        spec = object_info[node['type']]['input']
        linked = {i['name']: links[i['link']] for i in node['inputs'] if i.get('link') is not None}
        values, inputs = iter(node['widgets_values']), {}
        for name, (kind, *options) in {**spec['required'], **spec.get('optional', {})}.items():
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(kind, list) or kind in ('INT', 'FLOAT', 'STRING', 'BOOLEAN', 'COMBO'):
                inputs[name] = EXAMPLE_CHANGES.get(name, next(values))
                if options and options[0].get('control_after_generate'):
                    assert next(values) in ('fixed', 'increment', 'decrement', 'randomize')
        assert next(values, None) is None, f'{node["type"]}: widget values left over'
        prompt[str(node['id'])] = {'class_type': node['type'], 'inputs': inputs}
    return prompt


def test_the_example_workflows_are_offered_as_templates(server):
    assert len(EXAMPLES) == 3
    assert sorted(server.get('/workflow_templates')['w2sd-samplers']) == EXAMPLES


@pytest.mark.parametrize('name', EXAMPLES)
def test_an_example_workflow_loads_and_runs(server, name):
    workflow = server.get(f'/api/workflow_templates/w2sd-samplers/{name}.json')
    assert workflow == json.loads((REPO / 'example_workflows' / f'{name}.json').read_text())
    prompt = api_prompt(workflow, server.get('/object_info'))
    assert {'W2SDKSampler', 'W2SDGuider', 'W2SDSampler'} & {n['class_type'] for n in prompt.values()}
    entry = server.run(prompt)
    assert entry['status']['status_str'] == 'success', entry['status']
    images = [image for ui in entry['outputs'].values() for image in ui.get('images', [])]
    assert len(images) == 1 and (server.base / 'output' / images[0]['subfolder'] / images[0]['filename']).is_file()


def test_cfg_source_guider_without_a_w2sd_guider_fails_with_a_clear_error(server):
    guider = {'class_type': 'CFGGuider', 'inputs': {'model': ['ckpt', 0], 'positive': ['pos', 0],
                                                    'negative': ['neg', 0], 'cfg': 5.5}}
    entry = server.wait(server.queue(custom_advanced(guider, sampler_inputs(cfg_source='guider')))[0])
    assert 'cfg_source = guider needs a W2SD Guider' in error_message(entry)


def test_an_interrupt_stops_a_run_and_leaves_the_model_as_it_was(server):
    stock = {**base_workflow(), 'stock': {'class_type': 'KSampler', 'inputs': ksampler('euler')},
             'save': save('stock', 'before')}
    before = server.latents(server.run(stock))['save']
    long = {**base_workflow(), 'w2sd': {'class_type': 'W2SDKSampler',
                                        'inputs': {**ksampler('euler', steps=2000), **w2sd_inputs(1.0)}},
            'save': save('w2sd', 'long')}
    prompt_id, error = server.queue(long)
    assert error is None
    deadline = time.time() + 120
    while not server.get('/queue')['queue_running'] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # into the sampling loop
    server.request('/interrupt', {})
    entry = server.wait(prompt_id, timeout=120)
    assert [m[0] for m in entry['status']['messages']][-1] == 'execution_interrupted'
    # A node ComfyUI has not cached yet, equal to the stock one (strength 0): the weights were left as they were.
    after = {**base_workflow(), 'w2sd': {'class_type': 'W2SDKSampler',
                                         'inputs': {**ksampler('euler'), **w2sd_inputs(0.0, lam=5)}},
             'save': save('w2sd', 'after')}
    assert torch.equal(server.latents(server.run(after))['save'], before)
