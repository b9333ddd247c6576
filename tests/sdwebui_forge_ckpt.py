"""Writes ``<out>/tiny_sd1.safetensors``, a random-weight checkpoint that Forge's backend loads as SD 1.x: SD1.5's
key names and widths (a 320-channel UNet with one level, 768-wide context; CLIP-L and the VAE at full size, as
Forge builds both from the SD1.5 configs it ships). Random weights, fp16 (about 0.5 GB).

Run with Forge's Python from Forge's root (it builds the UNet and VAE with Forge's own ``backend.nn`` classes):
``python tests/sdwebui_forge_ckpt.py OUT``.
"""
import os
import sys

import torch


def main(out):
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = IntegratedUNet2DConditionModel(
        in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=(1,), num_heads=8,
        transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
        use_linear_in_transformer=False, use_spatial_transformer=True)
    generator = torch.Generator().manual_seed(0)
    sd = {f'model.diffusion_model.{k}': torch.randn(v.shape, generator=generator) * 0.05
          for k, v in unet.state_dict().items()}
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act='quick_gelu'))
    sd.update({f'cond_stage_model.transformer.{k}': v for k, v in clip.state_dict().items()})
    vae = IntegratedAutoencoderKL.from_config(
        IntegratedAutoencoderKL.load_config(os.path.join('backend', 'huggingface', 'runwayml', 'stable-diffusion-v1-5',
                                                         'vae')))
    sd.update({f'first_stage_model.{k}': v for k, v in vae.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, os.path.join(out, 'tiny_sd1.safetensors'))


if __name__ == '__main__':
    sys.argv, out = sys.argv[:1] + ['--always-cpu'], os.path.abspath(sys.argv[1])  # Forge's backend reads argv
    sys.path[:0] = ['.', os.path.join('repositories', 'huggingface_guess')]
    main(out)
