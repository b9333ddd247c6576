"""The node pack inside real ComfyUI code on CPU: a tiny random SD1-style UNet, no weights.

Runs when COMFYUI_PATH points to a ComfyUI checkout (docs/comfyui.md names the commit tested); skipped otherwise.
"""
import os
import sys

import pytest
import torch

COMFYUI_PATH = os.environ.get('COMFYUI_PATH')
if not COMFYUI_PATH:
    pytest.skip('set COMFYUI_PATH to a ComfyUI checkout to run the node pack against it', allow_module_level=True)
sys.path.insert(0, COMFYUI_PATH)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported

import comfy.hooks  # noqa: E402
import comfy.latent_formats  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models_base  # noqa: E402

from wrappers.comfyui import NODE_CLASS_MAPPINGS as NODES  # noqa: E402
from wrappers.comfyui.core import BIT_EXACT_TWINS, HOST_STEPS, REFUSED, ROLE_KEY, SAMPLER_NAMES, TWINS  # noqa: E402

STEPS, SEED = 3, 42


class TinySD1(comfy.supported_models_base.BASE):
    unet_config = {'context_dim': 32, 'model_channels': 32, 'use_linear_in_transformer': False,
                   'adm_in_channels': None, 'use_temporal_attention': False}
    unet_extra_config = {'num_heads': 2, 'num_head_channels': -1}
    latent_format = comfy.latent_formats.SD15


class TinyFlow(TinySD1):
    sampling_settings = {'shift': 3.0}

    def model_type(self, state_dict, prefix=''):
        return comfy.model_base.ModelType.FLOW


def tiny_model(seed, config_class=TinySD1):
    config = {'use_checkpoint': False, 'image_size': 8, 'out_channels': 4, 'use_spatial_transformer': True,
              'legacy': False, 'adm_in_channels': None, 'dtype': torch.float32, 'in_channels': 4,
              'model_channels': 32, 'num_res_blocks': [1, 1], 'transformer_depth': [1, 1], 'channel_mult': [1, 2],
              'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 32,
              'transformer_depth_output': [1, 1, 1, 1], 'use_temporal_attention': False,
              'use_temporal_resblock': False}
    model = config_class(config).get_model({}, device=torch.device('cpu'))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy.ops leaves weights uninitialized
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device('cpu'), offload_device=torch.device('cpu'))


def cond(seed):
    return [[torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope='module')
def setup():
    model = tiny_model(0)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = comfy.sample.prepare_noise(latent, SEED)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object('model_sampling'), 'karras', STEPS)
    return model, latent, noise, sigmas, cond(1), cond(2)


def w2sd_sampler(name, strength, form='paper', cfg_source='auto', strong_cfg=5.5, weak_cfg=0.0):
    return NODES['W2SDSampler']().get_sampler(name, -1, strength, 'current', form, 1, cfg_source, strong_cfg,
                                              weak_cfg)[0]


def test_every_sampler_of_comfyuis_list_is_offered_or_refused_with_a_reason():
    assert set(comfy.samplers.SAMPLER_NAMES) == set(SAMPLER_NAMES) | set(REFUSED)
    assert SAMPLER_NAMES == [n for n in comfy.samplers.SAMPLER_NAMES if n in SAMPLER_NAMES]


@pytest.mark.parametrize('name', SAMPLER_NAMES)
def test_reflection_off_equals_comfyuis_own_sampler_for_the_same_seed(setup, name):
    model, latent, noise, sigmas, pos, neg = setup

    def run(sampler):
        return comfy.sample.sample_custom(model, noise, 5.5, sampler, sigmas, pos, neg, latent, seed=SEED,
                                          disable_pbar=True)

    ref = run(comfy.samplers.sampler_object(name))
    off = run(w2sd_sampler(name, 0.0))
    print(f'{name}: max |off - host| = {(off - ref).abs().max().item():.3g}, max |host| = '
          f'{ref.abs().max().item():.3g}')
    if name in HOST_STEPS or name in BIT_EXACT_TWINS:  # ComfyUI's own step function, or the same arithmetic
        assert torch.equal(off, ref)
    else:  # same noise; ComfyUI writes some updates differently (half-log-SNR form, lms coefficients)
        torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    on = run(w2sd_sampler(name, 1.0))
    assert torch.isfinite(on).all() and (on - ref).abs().max() > 1e-2


@pytest.mark.parametrize('name', [n for n in SAMPLER_NAMES if n in TWINS])
def test_twins_off_at_50_steps_of_the_simple_schedule(setup, name):
    """The paper's step count: the twins written in ComfyUI's order stay bit for bit; the SDE twins (ComfyUI writes
    them in a half-log-SNR form) differ by float32 rounding: a few roundings of 2**-24 per step over 50 steps,
    bounded here by 1e-5 of the latent's magnitude."""
    model, latent, noise, _, pos, neg = setup
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object('model_sampling'), 'simple', 50)

    def run(sampler):
        return comfy.sample.sample_custom(model, noise, 5.5, sampler, sigmas, pos, neg, latent, seed=SEED,
                                          disable_pbar=True)

    ref, off = run(comfy.samplers.sampler_object(name)), run(w2sd_sampler(name, 0.0))
    relative = ((off - ref).abs().max() / ref.abs().max()).item()
    print(f'{name}: 50 simple steps, max |off - host| / max |host| = {relative:.2g}')
    if name in BIT_EXACT_TWINS:
        assert torch.equal(off, ref)
    else:
        assert relative <= 1e-5


class BasicGuider(comfy.samplers.CFGGuider):
    """ComfyUI's Guider_Basic (comfy_extras/nodes_custom_sampler.py): positive only."""

    def set_conds(self, positive):
        self.inner_set_conds({'positive': positive})


def test_a_guider_without_negative_and_a_sampler_cfg_is_an_error_not_a_blow_up(setup):
    model, latent, noise, sigmas, pos, neg = setup
    guider = BasicGuider(model)
    guider.set_conds(pos)
    with pytest.raises(ValueError, match='no negative conditioning'):
        guider.sample(noise, latent, w2sd_sampler('euler', 1.0), sigmas, seed=SEED)


def test_a_w2sd_guider_whose_legs_coincide_is_refused_in_the_paper_form(setup):
    model, latent, noise, sigmas, pos, neg = setup
    guider = NODES['W2SDGuider']().get_guider(model, pos, neg, 5.5, 1.0, 1.0, pos, None)[0]
    with pytest.raises(ValueError, match='weak reflection leg equals the strong one'):
        guider.sample(noise, latent, w2sd_sampler('euler', 1.0, cfg_source='auto'), sigmas, seed=SEED)


def test_reflection_legs_go_through_wrappers_and_inpainting_with_one_callback_per_step(setup):
    model, latent, noise, sigmas, pos, neg = setup
    model = model.clone()
    seen = []

    def spy(executor, x, timestep, model_options, seed):
        seen.append((model_options.get(ROLE_KEY, 'main'), x.clone(), float(timestep[0])))
        return executor(x, timestep, model_options, seed)

    comfy.patcher_extension.add_wrapper(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, spy, model.model_options,
                                        is_model_options=True)
    mask = torch.ones(1, 1, 8, 8)
    mask[..., :4] = 0  # keep the left half of latent
    steps = []
    out = comfy.sample.sample_custom(model, noise, 5.5, w2sd_sampler('euler', 1.0), sigmas, pos, neg, latent,
                                     noise_mask=mask, callback=lambda i, d, x, total: steps.append((i, total)),
                                     seed=SEED)
    assert steps == [(i, STEPS) for i in range(STEPS)]
    assert [role for role, _, _ in seen] == ['strong', 'weak', 'main'] * (STEPS - 1) + ['main']
    kept = comfy.latent_formats.SD15().process_in(latent)[..., :4]
    for role, x, sigma in seen:  # every leg sees ComfyUI's inpaint blending in the kept region
        torch.testing.assert_close(x[..., :4], kept + sigma * noise[..., :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., :4], latent[..., :4], rtol=1e-4, atol=1e-4)


def test_guider_weak_conds_with_a_model_hook_and_weights_restored(setup):
    model, latent, noise, sigmas, pos, neg = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    other = comfy.hooks.get_patch_weights_from_model(tiny_model(1))
    hook = comfy.hooks.create_hook_model_as_lora(other, None, 1.0, 0.0)

    def run(guider):
        return guider.sample(noise, latent, w2sd_sampler('euler', 1.0, 'anchored', 'guider'), sigmas, seed=SEED)

    def guider(weak_pos, weak_neg):
        return NODES['W2SDGuider']().get_guider(model, pos, neg, 5.5, 1.0, 1.0, weak_pos, weak_neg)[0]

    plain = comfy.sample.sample_custom(model, noise, 5.5, comfy.samplers.ksampler('euler'), sigmas, pos, neg, latent,
                                       seed=SEED)
    # anchored form with weak == strong is exactly the identity: the guider's main step is the plain sampler
    assert torch.equal(run(guider(None, None)), plain)
    hooked = run(guider(comfy.hooks.set_hooks_for_conditioning(pos, hook),
                        comfy.hooks.set_hooks_for_conditioning(neg, hook)))
    assert torch.isfinite(hooked).all() and (hooked - plain).abs().max() > 1e-2
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def denoise_once(model, positive, negative, cfg, x, sigma):
    """ComfyUI's CFG denoiser of ``model`` at (x, sigma), through a KSAMPLER that makes a single call."""
    def one_call(model_k, _, sigmas, extra_args=None, callback=None, disable=None):
        return model_k(x, sigma * x.new_ones([x.shape[0]]), **extra_args)

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = guider.sample(torch.zeros_like(x), torch.zeros_like(x), comfy.samplers.KSAMPLER(one_call),
                        torch.tensor([sigma, 0.]), seed=SEED)
    return model.model.process_latent_in(out)  # undo inner_sample's process_latent_out


def test_hooked_weak_leg_is_the_other_checkpoints_prediction(setup):
    model, latent, noise, sigmas, pos, neg = setup
    other = tiny_model(1)
    hook = comfy.hooks.create_hook_model_as_lora(comfy.hooks.get_patch_weights_from_model(other), None, 1.0, 0.0)
    model = model.clone()
    weak_calls = []

    def spy(executor, x, timestep, model_options, seed):
        out = executor(x, timestep, model_options, seed)
        if model_options.get(ROLE_KEY) == 'weak':
            weak_calls.append((x.clone(), float(timestep[0]), out.clone()))
        return out

    comfy.patcher_extension.add_wrapper(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, spy, model.model_options,
                                        is_model_options=True)
    guider = NODES['W2SDGuider']().get_guider(model, pos, neg, 5.5, 1.0, 3.0,
                                              comfy.hooks.set_hooks_for_conditioning(cond(3), hook),
                                              comfy.hooks.set_hooks_for_conditioning(neg, hook))[0]
    guider.sample(noise, latent, w2sd_sampler('euler', 1.0, cfg_source='guider'), sigmas, seed=SEED)
    assert len(weak_calls) == STEPS - 1
    for x, sigma, out in weak_calls:
        expected = denoise_once(other, cond(3), neg, 3.0, x, sigma)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert (out - denoise_once(model, cond(3), neg, 3.0, x, sigma)).abs().max() > 1e-2


@pytest.mark.parametrize('name', ['euler', 'dpm_2'])
def test_ksampler_node(setup, name):
    model, latent, noise, sigmas, pos, neg = setup
    node = NODES['W2SDKSampler']()

    def run(strength, **weak):
        return node.sample(model, SEED, STEPS, 5.5, name, 'karras', pos, neg, {'samples': latent}, 0.8, 1.0, 1.0,
                           -1, strength, 'current', 'paper', 1, **weak)[0]['samples']

    ref = comfy.sample.sample(model, noise, STEPS, 5.5, name, 'karras', pos, neg, latent, denoise=0.8, seed=SEED)
    assert torch.equal(run(0.0), ref)
    prompt_pair = run(1.0, weak_positive=cond(3))
    assert torch.isfinite(prompt_pair).all() and (prompt_pair - ref).abs().max() > 1e-2


def test_an_interrupt_from_the_callback_stops_sampling(setup):
    import comfy.model_management
    model, latent, noise, sigmas, pos, neg = setup
    steps = []

    def callback(i, denoised, x, total):
        steps.append(i)
        if i == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample_custom(model, noise, 5.5, w2sd_sampler('euler', 1.0), sigmas, pos, neg, latent,
                                   callback=callback, seed=SEED)
    assert steps == [0, 1]


@pytest.mark.parametrize('linked', ['wrappers/comfyui', '.'])
def test_pack_loads_the_way_comfyui_loads_custom_nodes(tmp_path, linked):
    """A link to the pack, or a clone of the whole repository, in custom_nodes/ with the library not installed:
    the pack finds the checkout it lives in."""
    import pathlib
    import subprocess
    pack = (pathlib.Path(__file__).parents[1] / linked).resolve()
    (tmp_path / 'w2sd_nodes').symlink_to(pack, target_is_directory=True)
    # nodes.load_custom_node's import, without importing nodes.py (which needs ComfyUI's full requirements)
    script = f'''
import importlib.util, sys
sys.path.insert(0, {COMFYUI_PATH!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
installed = importlib.util.find_spec('w2sd_samplers') is not None
path = {str(tmp_path / 'w2sd_nodes')!r}
spec = importlib.util.spec_from_file_location(path.replace('.', '_x_'), path + '/__init__.py')
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print(sorted(module.NODE_CLASS_MAPPINGS), module.NODE_CLASS_MAPPINGS['W2SDSampler'].RETURN_TYPES)
checkout = {str(pathlib.Path(__file__).parents[1].resolve())!r}
found = {{n: importlib.util.find_spec(n) for n in ('tests', 'benchmarks', 'wrappers')}}
print('exposed:', [n for n, spec in found.items()
                   if spec and any(p.startswith(checkout) for p in spec.submodule_search_locations or [])],
      installed or sys.modules['w2sd_samplers'].__file__.startswith(checkout))
'''
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['W2SDGuider', 'W2SDKSampler', 'W2SDSampler'] ('SAMPLER',)" in done.stdout
    assert 'exposed: [] True' in done.stdout  # the checkout's library, and none of its other folders


def test_flow_model_deterministic_samplers_work_and_ve_noise_is_refused():
    model = tiny_model(0, TinyFlow)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object('model_sampling'), 'simple', STEPS)
    pos, neg = cond(1), cond(2)

    def run(sampler):
        return comfy.sample.sample_custom(model, noise, 5.5, sampler, sigmas, pos, neg, latent, seed=SEED)

    for name in ('euler', 'euler_ancestral', 'dpmpp_2m'):  # ComfyUI runs euler_ancestral in a flow form here
        ref = run(comfy.samplers.ksampler(name))
        assert torch.equal(run(w2sd_sampler(name, 0.0)), ref)
        on = run(w2sd_sampler(name, 1.0))
        assert torch.isfinite(on).all() and (on - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match='flow'):
        run(w2sd_sampler('dpmpp_2m_sde', 1.0))


def test_lora_hooks_give_each_role_its_lora_strength(setup):
    """The documented recipe: LoRA hook at 0.8 on positive/negative, at -1.5 on the weak conds."""
    model, latent, noise, sigmas, pos, neg = setup
    key = 'middle_block.1.transformer_blocks.0.attn2.to_k'
    generator = torch.Generator().manual_seed(9)
    rows, cols = model.model.get_parameter(f'diffusion_model.{key}.weight').shape
    up, down = torch.randn(rows, 2, generator=generator), torch.randn(2, cols, generator=generator)
    lora = {f'lora_unet_{key.replace(".", "_")}.lora_up.weight': up,
            f'lora_unet_{key.replace(".", "_")}.lora_down.weight': down,
            f'lora_unet_{key.replace(".", "_")}.alpha': torch.tensor(2.)}

    def with_lora(strength):  # the reference: the LoRA merged by hand into a copy of the weights
        merged = tiny_model(0)
        with torch.no_grad():
            merged.model.get_parameter(f'diffusion_model.{key}.weight').add_(strength * (up @ down))
        return merged

    def hooked(conds, strength):
        return comfy.hooks.set_hooks_for_conditioning(conds, comfy.hooks.create_hook_lora(lora, strength, 0.0))

    model = model.clone()
    calls = []

    def spy(executor, x, timestep, model_options, seed):
        out = executor(x, timestep, model_options, seed)
        calls.append((model_options.get(ROLE_KEY, 'main'), x.clone(), float(timestep[0]), out.clone()))
        return out

    comfy.patcher_extension.add_wrapper(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, spy, model.model_options,
                                        is_model_options=True)
    guider = NODES['W2SDGuider']().get_guider(model, hooked(pos, 0.8), hooked(neg, 0.8), 5.5, 1.0, 1.0,
                                              hooked(cond(3), -1.5), hooked(neg, -1.5))[0]
    guider.sample(noise, latent, w2sd_sampler('euler', 1.0, cfg_source='guider'), sigmas, seed=SEED)
    strong_model, weak_model = with_lora(0.8), with_lora(-1.5)
    expected = {'main': (strong_model, pos, 5.5), 'strong': (strong_model, pos, 1.0),
                'weak': (weak_model, cond(3), 1.0)}
    assert sorted({role for role, *_ in calls}) == ['main', 'strong', 'weak']
    for role, x, sigma, out in calls:
        reference, positive, scale = expected[role]
        torch.testing.assert_close(out, denoise_once(reference, positive, neg, scale, x, sigma), rtol=1e-4,
                                   atol=1e-4)
