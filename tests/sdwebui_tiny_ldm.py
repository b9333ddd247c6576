"""Writes a tiny random-weight SD 1.x checkpoint that A1111 loads: ``<out>/tiny.safetensors`` with ``tiny.yaml``
beside it (A1111 reads a checkpoint's config from ``<name>.yaml``), and ``<out>/clip/``, a tiny CLIP text model
and tokenizer that the yaml names instead of ``openai/clip-vit-large-patch14`` (nothing is downloaded).

Run with the webui's Python from its root (it builds the model with the webui's own ``ldm``):
``python tests/sdwebui_tiny_ldm.py OUT``. The tokenizer's vocabulary is CLIP's BPE file that open_clip ships.
"""
import gzip
import json
import os
import sys

import torch
import yaml

UNET = {'image_size': 32, 'in_channels': 4, 'out_channels': 4, 'model_channels': 32, 'attention_resolutions': [1],
        'num_res_blocks': 1, 'channel_mult': [1, 2], 'num_heads': 2, 'use_spatial_transformer': True,
        'transformer_depth': 1, 'context_dim': 32, 'use_checkpoint': False, 'legacy': False}
VAE = {'double_z': True, 'z_channels': 4, 'resolution': 64, 'in_channels': 3, 'out_ch': 3, 'ch': 32,
       'ch_mult': [1, 2, 2, 2], 'num_res_blocks': 1, 'attn_resolutions': [], 'dropout': 0.0}


def config(clip_dir):
    return {'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': {
        'linear_start': 0.00085, 'linear_end': 0.012, 'num_timesteps_cond': 1, 'log_every_t': 200,
        'timesteps': 1000, 'first_stage_key': 'jpg', 'cond_stage_key': 'txt', 'image_size': 64, 'channels': 4,
        'cond_stage_trainable': False, 'conditioning_key': 'crossattn', 'monitor': 'val/loss_simple_ema',
        'scale_factor': 0.18215, 'use_ema': False,
        'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': UNET},
        'first_stage_config': {'target': 'ldm.models.autoencoder.AutoencoderKL', 'params': {
            'embed_dim': 4, 'monitor': 'val/rec_loss', 'ddconfig': VAE,
            'lossconfig': {'target': 'torch.nn.Identity'}}},
        'cond_stage_config': {'target': 'ldm.modules.encoders.modules.FrozenCLIPEmbedder',
                              'params': {'version': clip_dir, 'device': 'cpu'}}}}}


def write_clip(clip_dir):
    """A 2-layer, width-32 CLIP text model with CLIP's real tokenizer (built as openai's SimpleTokenizer builds it)."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    bpe = os.path.join(os.path.dirname(open_clip.__file__), 'bpe_simple_vocab_16e6.txt.gz')
    merges = gzip.open(bpe).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m.split()) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    os.makedirs(clip_dir, exist_ok=True)
    with open(os.path.join(clip_dir, 'vocab.json'), 'w') as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(clip_dir, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    CLIPTokenizer(os.path.join(clip_dir, 'vocab.json'), os.path.join(clip_dir, 'merges.txt')).save_pretrained(clip_dir)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(
        clip_dir, safe_serialization=True)


def main(out):
    from ldm.util import instantiate_from_config
    from safetensors.torch import save_file

    clip_dir = os.path.join(out, 'clip')
    write_clip(clip_dir)
    cfg = config(clip_dir)
    with open(os.path.join(out, 'tiny.yaml'), 'w') as f:
        yaml.safe_dump(cfg, f)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg['model'])
    with torch.no_grad():  # random UNet output layers start at zero; give the model something to say
        for p in model.model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, 'tiny.safetensors'))


if __name__ == '__main__':
    sys.path[:0] = [os.path.join('repositories', 'stable-diffusion-stability-ai')]
    main(os.path.abspath(sys.argv[1]))
