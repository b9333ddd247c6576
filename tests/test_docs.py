"""Every ```python block of README.md and docs/*.md runs.

Each file's blocks run in order in one namespace, as a reader would paste them, from a scratch working folder.
Where a doc names a real model (an SDXL folder, a LoRA file, "your UNet"), STANDINS below puts a tiny random-weight
stand-in under that name, or makes the named checkpoint load as one; nothing else is changed or skipped, so a
block that uses an undefined name or a stale API fails here. Shell commands belong in ```bash or plain blocks.
"""
import glob
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
BLOCK = re.compile(r'^```python[ \t]*\n(.*?)^```[ \t]*$', re.S | re.M)


def python_blocks(doc):
    """(first line number, code) of each ```python block."""
    text = open(os.path.join(ROOT, doc), encoding='utf-8').read()
    return [(text.count('\n', 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


# ---- stand-ins --------------------------------------------------------------------------------------------------

def gaussian_denoiser(mean):
    """The exact denoiser of data N(mean, I): a stand-in for a model, cheap at any latent shape."""
    def denoiser(x, sigma, **extra_args):
        s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
        return (x + s2 * mean) / (1 + s2)
    return denoiser


def text_denoiser(x, sigma, encoder_hidden_states):
    """Stand-in for a text-conditioned UNet denoiser: exact for data N(m, I), m the mean of the text embedding."""
    mean = encoder_hidden_states.mean((1, 2)).view(-1, *[1] * (x.ndim - 1))
    return gaussian_denoiser(mean)(x, sigma)


def text_conds():
    g = torch.Generator().manual_seed(0)
    return {'encoder_hidden_states': torch.randn(1, 5, 8, generator=g)}, {'encoder_hidden_states': torch.zeros(1, 5, 8)}


def readme(tmp_path, monkeypatch):
    cond, uncond = text_conds()
    return {'unet': text_denoiser, 'cond': cond, 'uncond': uncond}


def pairs_and_relatives(tmp_path, monkeypatch):
    cond, uncond = text_conds()
    sigma_max = 14.6
    return {'unet': text_denoiser, 'cond': cond, 'uncond': uncond,
            'strong': gaussian_denoiser(1.), 'weak': gaussian_denoiser(2.), 'reference_denoiser': gaussian_denoiser(0.),
            'x_T': torch.randn(8, 4, 8, 8) * sigma_max, 'clean_latents': torch.randn(8, 4, 8, 8),
            'g': torch.Generator().manual_seed(0)}


def adapters(tmp_path, monkeypatch):
    diffusers = pytest.importorskip('diffusers')
    from test_adapters_vp import ddim, sdxl_cond, tiny_sd_unet
    from test_generate import add_lora, sdxl_pipe, tiny_text_encoder, tiny_tokenizer, tiny_vae
    from w2sd_samplers import generate as generate_module
    pipe = sdxl_pipe(tmp_path)
    add_lora(pipe.unet)                                   # the doc's LoRA adapter 'style', as load_lora_weights adds
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, 'from_pretrained', lambda *a, **kw: pipe)
    motion = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                     motion_num_attention_heads=2, motion_norm_num_groups=8,
                                     motion_max_seq_length=16, use_motion_mid_block=True)
    animatediff_pipe = diffusers.AnimateDiffPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(32), tokenizer=tiny_tokenizer(tmp_path), unet=tiny_sd_unet(),
        motion_adapter=motion, scheduler=ddim('linear'))
    # On CPU a tiny pipeline's step costs nearly what a real one's does: the doc's generate() calls run as written
    # (every argument checked) but with at most 3 steps and 2 frames.
    real = generate_module.generate
    monkeypatch.setattr(generate_module, 'generate', lambda pipe, prompt, *, steps=30, num_frames=16, **kw: real(
        pipe, prompt, steps=min(steps, 3), num_frames=min(num_frames, 2), **kw))
    return {'cond': sdxl_cond(1, 0), 'uncond': sdxl_cond(1, 1), 'base_sdxl_pipe': sdxl_pipe(tmp_path),
            'animatediff_pipe': animatediff_pipe}


def adapters_flow(tmp_path, monkeypatch):
    diffusers = pytest.importorskip('diffusers')
    transformers = pytest.importorskip('transformers')
    from test_adapters_flow import tiny_sd3
    from test_generate import tiny_tokenizer

    def clip(seed):   # two CLIP encoders: hidden 16 + 16 = joint_attention_dim 32, pooled 8 + 8 = 16
        torch.manual_seed(seed)
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=54, hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=('DownEncoderBlock2D',),
                                  up_block_types=('UpDecoderBlock2D',), latent_channels=4, norm_num_groups=8,
                                  sample_size=8, scaling_factor=1.5305, shift_factor=0.0609).eval()
    tok = tiny_tokenizer(tmp_path)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3()[0], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.), vae=vae,
        text_encoder=clip(1), tokenizer=tok, text_encoder_2=clip(2), tokenizer_2=tok, text_encoder_3=None,
        tokenizer_3=None)
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, 'from_pretrained', lambda *a, **kw: pipe)
    return {}


STANDINS = {'README.md': readme, 'docs/pairs_and_relatives.md': pairs_and_relatives, 'docs/adapters.md': adapters,
            'docs/adapters_flow.md': adapters_flow}


# ---- the test ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('doc', [doc for doc in DOCS if python_blocks(doc)])
def test_python_blocks_run_in_order(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # blocks that save images write here
    namespace = STANDINS.get(doc, lambda *args: {})(tmp_path, monkeypatch)
    for line, code in python_blocks(doc):
        exec(compile(code, f'{doc}, python block at line {line}', 'exec'), namespace)


def test_stand_ins_are_for_docs_that_exist_and_no_code_hides_in_other_fences():
    assert set(STANDINS) <= set(DOCS)
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding='utf-8').read()
        assert not re.search(r'^```(py|python3|pycon)\s*$', text, re.M), doc   # would escape this test
