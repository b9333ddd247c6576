"""generate() and `w2sd generate` on tiny diffusers pipelines built from configs (no downloads)."""
import argparse
import json
import string
import types

import pytest
import torch

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from test_adapters_vp import ddim, tiny_sd_unet, tiny_sdxl_unet  # noqa: E402
from w2sd_samplers.commands.generate import add_parser, main  # noqa: E402
from w2sd_samplers.errors import UsageError  # noqa: E402
from w2sd_samplers.generate import family, generate  # noqa: E402

PROMPT = 'a cat'


def tiny_tokenizer(tmp_path):
    vocab = ['<|startoftext|>', '<|endoftext|>'] + list(string.ascii_lowercase) + \
        [c + '</w>' for c in string.ascii_lowercase]
    (tmp_path / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
    return transformers.CLIPTokenizer(str(tmp_path / 'vocab.json'), str(tmp_path / 'merges.txt'),
                                      model_max_length=8)


def tiny_text_encoder(hidden, projection=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=37,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=8,
                                         projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=('DownEncoderBlock2D',),
                                   up_block_types=('UpDecoderBlock2D',), latent_channels=4, norm_num_groups=8,
                                   sample_size=8).eval()


def sd_pipe(tmp_path, unet=None):
    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(32), tokenizer=tiny_tokenizer(tmp_path),
        unet=unet or tiny_sd_unet(), scheduler=ddim(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_pipe(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(16), text_encoder_2=tiny_text_encoder(16, True, seed=1),
        tokenizer=tok, tokenizer_2=tok, unet=tiny_sdxl_unet(), scheduler=ddim())


def noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_plain_generate_reproduces_the_pipelines_own_ddim_sd_and_sdxl(tmp_path):
    for pipe in (sd_pipe(tmp_path), sdxl_pipe(tmp_path)):
        ref = pipe(PROMPT, num_inference_steps=5, guidance_scale=3., latents=noise([1, 4, 8, 8], 7),
                   output_type='latent').images
        got = generate(pipe, PROMPT, steps=5, guidance_scale=3., seed=7, w2sd=False, output_type='latent',
                       progress=False)
        assert rel(got.latents, ref) < 1e-4
        assert got.nfe == {'main': 5}


def test_w2sd_cfg_pair_is_reproducible_counts_calls_and_decodes(tmp_path):
    pipe = sd_pipe(tmp_path)
    kw = dict(steps=6, guidance_scale=5.5, strong_cfg=5.5, weak_cfg=1., seed=3, progress=False)
    a, b = generate(pipe, PROMPT, **kw), generate(pipe, PROMPT, **kw)
    plain = generate(pipe, PROMPT, w2sd=False, **kw)
    assert torch.equal(a.latents, b.latents) and rel(a.latents, plain.latents) > 1e-3
    assert a.nfe == {'main': 6, 'strong': 5, 'weak': 5}       # lambda = T - 1 reflections
    assert a.images[0].size == (8, 8)
    with pytest.raises(ValueError, match='weak denoiser equals the strong'):
        generate(pipe, PROMPT, steps=3, progress=False)
    with pytest.raises(ValueError, match='sampler'):
        generate(pipe, PROMPT, sampler='ddim', weak_cfg=1., progress=False)
    with pytest.raises(ValueError, match='steps'):
        generate(pipe, PROMPT, steps=0, weak_cfg=1., progress=False)


def test_sdxl_prompt_pair_other_samplers_schedules_and_parity(tmp_path):
    pipe = sdxl_pipe(tmp_path)
    base = dict(steps=4, guidance_scale=4., seed=1, progress=False, output_type='latent')
    for sampler, schedule in (('dpmpp_2m', 'karras'), ('euler_ancestral', 'exponential')):
        a = generate(pipe, PROMPT, sampler=sampler, schedule=schedule, weak_prompt='a dog', strong_cfg=1.,
                     **base)
        b = generate(pipe, PROMPT, sampler=sampler, schedule=schedule, weak_prompt='a dog', strong_cfg=1.,
                     **base)
        assert torch.equal(a.latents, b.latents) and torch.isfinite(a.latents).all()
    par = generate(pipe, PROMPT, parity=True, weak_cfg=1., **base)
    assert par.nfe == {'main': 4, 'strong': 3, 'weak': 3}


def add_lora(unet):
    torch.manual_seed(5)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'],
                                     init_lora_weights=False), adapter_name='style')


def lora_state(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [(dict(m.scaling), m.active_adapters, [p.requires_grad for p in m.parameters()])
            for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def test_lora_pair_switches_scales_and_restores_the_adapter_state(tmp_path):
    pipe = sd_pipe(tmp_path)
    add_lora(pipe.unet)
    pipe.set_adapters('style', adapter_weights=0.7)
    before = lora_state(pipe.unet)
    kw = dict(steps=4, guidance_scale=3., seed=2, progress=False, output_type='latent', lora='style')
    a = generate(pipe, PROMPT, lora_scales=(1., -1.), **kw)
    assert lora_state(pipe.unet) == before
    b = generate(pipe, PROMPT, lora_scales=(1., 0.5), **kw)
    plain = generate(pipe, PROMPT, lora_scales=(1., -1.), w2sd=False, **kw)
    plain_at_07 = generate(pipe, PROMPT, lora_scales=(0.7, 0.7), w2sd=False, **kw)
    assert rel(a.latents, b.latents) > 1e-3 and rel(a.latents, plain.latents) > 1e-3
    assert rel(plain.latents, plain_at_07.latents) > 1e-3     # the main step runs at the strong scale

    def interrupt(d):
        if d['i'] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, PROMPT, lora_scales=(2., -2.), sampler_options={'callback': interrupt}, **kw)
    assert lora_state(pipe.unet) == before
    with pytest.raises(ValueError, match='no LoRA adapter'):
        generate(pipe, PROMPT, lora='missing', **{k: v for k, v in kw.items() if k != 'lora'})


@pytest.mark.parametrize('first_lora', ['style', None])
def test_a_lora_run_refuses_to_overlap_another_run_on_the_same_pipeline(tmp_path, first_lora):
    """PEFT switches adapters on the shared pipeline, so generate(lora=...) needs the pipeline to itself: a second
    call while it runs (or a lora= call while another runs) is refused by name, and the first is unharmed."""
    import threading
    pipe = sd_pipe(tmp_path)
    add_lora(pipe.unet)
    pipe.set_adapters('style', adapter_weights=0.7)
    before = lora_state(pipe.unet)
    kw = dict(steps=3, guidance_scale=3., seed=2, progress=False, output_type='latent')
    first_kw = dict(lora='style', lora_scales=(1., -1.)) if first_lora else dict(weak_cfg=0.)
    alone = generate(pipe, PROMPT, **first_kw, **kw).latents
    plain = generate(pipe, PROMPT, w2sd=False, **kw).latents
    started, go, result = threading.Event(), threading.Event(), {}

    def pause(d):
        if d['i'] == 1:
            started.set()
            go.wait(60)

    def first():
        result['latents'] = generate(pipe, PROMPT, sampler_options={'callback': pause}, **first_kw, **kw).latents
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(ValueError, match=r"lora='style': another generate\(\) call is running"):
            generate(pipe, PROMPT, lora='style', lora_scales=(1., 0.5), **kw)
        if first_lora:
            with pytest.raises(ValueError, match=r"another generate\(\) call with lora='style' is running"):
                generate(pipe, PROMPT, w2sd=False, **kw)
        else:  # runs without lora= switch nothing and may overlap
            assert torch.equal(generate(pipe, PROMPT, w2sd=False, **kw).latents, plain)
    finally:
        go.set()
        thread.join()
    assert torch.equal(result['latents'], alone) and lora_state(pipe.unet) == before
    generate(pipe, PROMPT, lora='style', lora_scales=(1., 0.5), **kw)  # the pipeline is free again


def test_weights_pair_with_a_second_unet(tmp_path):
    pipe = sd_pipe(tmp_path)
    torch.manual_seed(9)
    weak_unet = tiny_sd_unet()
    with torch.no_grad():
        for p in weak_unet.parameters():
            p.mul_(0.9)
    kw = dict(steps=4, guidance_scale=3., seed=2, progress=False, output_type='latent')
    a = generate(pipe, PROMPT, weak_model=weak_unet, strong_cfg=1., weak_cfg=1., **kw)
    plain = generate(pipe, PROMPT, w2sd=False, **kw)
    assert rel(a.latents, plain.latents) > 1e-3


def test_animatediff_text_to_video(tmp_path):
    torch.manual_seed(3)
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=2, motion_norm_num_groups=8,
                                      motion_max_seq_length=16, use_motion_mid_block=True)
    sched = ddim('linear')
    pipe = diffusers.AnimateDiffPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(32),
                                         tokenizer=tiny_tokenizer(tmp_path), unet=tiny_sd_unet(),
                                         motion_adapter=adapter, scheduler=sched)
    assert family(pipe) == 'animatediff'
    ref = pipe(PROMPT, num_frames=3, num_inference_steps=4, guidance_scale=3., latents=noise([1, 4, 3, 8, 8], 4),
               output_type='latent').frames
    plain = generate(pipe, PROMPT, num_frames=3, steps=4, guidance_scale=3., seed=4, w2sd=False,
                     output_type='latent', progress=False)
    assert rel(plain.latents, ref) < 1e-4
    video = generate(pipe, PROMPT, num_frames=3, steps=4, guidance_scale=3., weak_cfg=1., seed=4, progress=False)
    assert len(video.images) == 1 and len(video.images[0]) == 3 and video.images[0][0].size == (8, 8)


def test_family_rejects_unsupported_pipelines():
    fake = types.SimpleNamespace(encode_prompt=None, unet=torch.nn.Linear(1, 1), image_processor=None)
    with pytest.raises(ValueError, match='not supported'):
        family(fake)
    with pytest.raises(ValueError, match='not supported'):
        family(types.SimpleNamespace(transformer=None))


def test_cli_generates_from_a_local_folder_and_reports_bad_folders(tmp_path):
    pipe = sd_pipe(tmp_path)
    pipe.save_pretrained(tmp_path / 'model')
    parser = argparse.ArgumentParser(prog='w2sd')
    add_parser(parser.add_subparsers(dest='command'))
    out = tmp_path / 'img.png'
    args = parser.parse_args(['generate', str(tmp_path / 'model'), '--prompt', PROMPT, '--steps', '3',
                              '--weak-cfg', '1', '--out', str(out), '--no-progress', '--device', 'cpu',
                              '--dtype', 'float32'])
    assert args.func(args) == [str(out)] and out.stat().st_size > 0
    for folder, message in ((tmp_path / 'nope', 'no such folder'), (tmp_path, 'no model_index.json')):
        args = parser.parse_args(['generate', str(folder), '--prompt', PROMPT, '--device', 'cpu'])
        with pytest.raises(UsageError, match=message):
            main(args)


@pytest.mark.parametrize('option', ['guidance_scale', 'strong_cfg', 'weak_cfg'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_cfg_scales_are_rejected_by_name(tmp_path, option, value):
    with pytest.raises(ValueError, match=f'{option} must be a finite number'):
        generate(sd_pipe(tmp_path), PROMPT, steps=2, progress=False, **{option: value})
