import copy
import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from w2sd_samplers.lora import SwitchableLoRA, load_lora, scaled, sgm_names
from w2sd_samplers.sampling import sample_w2sd_euler

SCALES = (0.8, -1.5, 0.37, 0.)


class Tiny(nn.Module):
    """Linear, 3x3, 1x1, strided and grouped convs under nested names."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict(dict(conv3=nn.Conv2d(3, 4, 3, padding=1), conv1=nn.Conv2d(4, 4, 1),
                                 strided=nn.Conv2d(4, 4, 3, stride=2, padding=1),
                                 grouped=nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)))
        self.fc = nn.Linear(4, 6)

    def forward(self, x, sigma=None):
        e = self.enc
        h = e.grouped(e.strided(e.conv1(nn.functional.silu(e.conv3(x)))))
        return self.fc(h.mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny()


def r(*shape):
    return torch.randn(*shape) * 0.5


def merged(model, deltas, scale):
    """A copy of model with W + scale * delta written into the named layers: the reference."""
    m = copy.deepcopy(model)
    for layer in m.modules():  # a deep copy would carry the LoRA hooks along
        layer._forward_hooks.clear()
    layers = dict(m.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            layers[name].weight += scale * delta.reshape(layers[name].weight.shape)
    return m


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, saved):
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def check_against_merged(model, path, deltas, run, atol=1e-5, **kwargs):
    """The module with the LoRA at several scales equals merged copies; ``run(module)`` is its output."""
    saved = weights_of(model)
    base = run(model)
    sl = SwitchableLoRA(model, load_lora(path), **kwargs)
    assert sorted(sl.targets) == sorted(deltas)
    for s in SCALES:
        with sl.scale(s):
            out = run(model)
        torch.testing.assert_close(out, run(merged(model, deltas, s)), atol=atol, rtol=1e-4)
        if s != 0:
            assert (out - base).abs().max() > 1e-3
    assert torch.equal(run(model), base)  # scale 0 and the default scale are the base model, bit for bit
    sl.remove()
    assert_same_weights(model, saved)
    assert torch.equal(run(model), base)


def runner(*args, **kwargs):
    return lambda m: m(*args, **kwargs)


def save(tmp_path, tensors, name='lora.safetensors', metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def lora_delta(down, up, alpha=None):
    rank = down.shape[0]
    return (1. if alpha is None else alpha / rank) * (up.flatten(1) @ down.flatten(1))


def test_kohya_lora_and_locon(tmp_path, tiny):
    parts = {'fc': (r(2, 4), r(6, 2), 3.), 'enc_conv1': (r(3, 4, 1, 1), r(4, 3, 1, 1), None),
             'enc_conv3': (r(2, 3, 3, 3), r(4, 2, 1, 1), 1.), 'enc_strided': (r(2, 4, 3, 3), r(4, 2, 1, 1), 8.),
             'enc_grouped': (r(2, 2, 3, 3), r(4, 2), 2.)}
    tensors, deltas = {}, {}
    for name, (down, up, alpha) in parts.items():
        tensors[f'lora_unet_{name}.lora_down.weight'] = down
        tensors[f'lora_unet_{name}.lora_up.weight'] = up
        if alpha is not None:
            tensors[f'lora_unet_{name}.alpha'] = torch.tensor(alpha)
        deltas[name.replace('enc_', 'enc.')] = lora_delta(down, up, alpha)
    check_against_merged(tiny, save(tmp_path, tensors), deltas, runner(torch.randn(2, 3, 6, 6)))


def tucker(t, wa, wb):
    """delta[p, q] = sum_ij t[i, j] * wa[i, p] * wb[j, q], written as explicit sums."""
    out = 0
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out = out + wa[i][:, None, None, None] * wb[j][None, :, None, None] * t[i, j][None, None]
    return out


def test_locon_tucker_and_loha(tmp_path, tiny):
    up, mid, down = r(4, 2, 1, 1), r(2, 2, 3, 3), r(2, 3, 1, 1)
    # LoCon Tucker: delta[o, i] = sum_rs up[o, r] mid[r, s] down[s, i]
    conv3 = tucker(mid, up.flatten(1).T, down.flatten(1)) * (3. / 2)
    loha = [r(6, 2), r(2, 4), r(6, 2), r(2, 4)]
    fc = (loha[0] @ loha[1]) * (loha[2] @ loha[3]) * (1.5 / 2)
    w1a, w1b, w2a, w2b, t1, t2 = r(3, 4), r(3, 4), r(3, 4), r(3, 4), r(3, 3, 3, 3), r(3, 3, 3, 3)
    strided = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)  # no alpha: factor 1
    tensors = {'lora_unet_enc_conv3.lora_up.weight': up, 'lora_unet_enc_conv3.lora_mid.weight': mid,
               'lora_unet_enc_conv3.lora_down.weight': down, 'lora_unet_enc_conv3.alpha': torch.tensor(3.),
               'lora_unet_fc.alpha': torch.tensor(1.5),
               **{f'lora_unet_fc.hada_{k}': v for k, v in zip(('w1_a', 'w1_b', 'w2_a', 'w2_b'), loha)},
               **{f'lora_unet_enc_strided.hada_{k}': v for k, v in
                  zip(('w1_a', 'w1_b', 'w2_a', 'w2_b', 't1', 't2'), (w1a, w1b, w2a, w2b, t1, t2))}}
    ga, gb = r(4, 2), r(2, 18)  # LoHa on the grouped conv, second factor flattened as LyCORIS stores conv
    tensors.update({'lora_unet_enc_grouped.hada_w1_a': ga, 'lora_unet_enc_grouped.hada_w1_b': gb,
                    'lora_unet_enc_grouped.hada_w2_a': ga.flip(0), 'lora_unet_enc_grouped.hada_w2_b': gb.flip(1)})
    grouped = (ga @ gb) * (ga.flip(0) @ gb.flip(1))
    check_against_merged(tiny, save(tmp_path, tensors),
                         {'enc.conv3': conv3, 'fc': fc, 'enc.strided': strided, 'enc.grouped': grouped},
                         runner(torch.randn(2, 3, 6, 6)))


def kron_blocks(w1, w2):
    """Kronecker product built block by block: block (a, b) is w1[a, b] * w2."""
    return torch.cat([torch.cat([w1[a, b] * w2 for b in range(w1.shape[1])], 1) for a in range(w1.shape[0])], 0)


def test_lokr(tmp_path, tiny):
    fc_w1, fc_w2a, fc_w2b = r(2, 2), r(3, 1), r(1, 2)  # w2 low-rank (rank 1): factor alpha / 1
    c3_w1a, c3_w1b, c3_w2 = r(2, 1), r(1, 1), r(2, 3, 3, 3)  # w1 low-rank, conv w2 full
    st_w1, st_t2, st_w2a, st_w2b = r(2, 2), r(2, 2, 3, 3), r(2, 2), r(2, 2)  # Tucker w2
    c1_w1, c1_w2 = r(2, 2), r(2, 2, 1, 1)  # both factors full: alpha ignored, factor 1
    tensors = {'lora_unet_fc.lokr_w1': fc_w1, 'lora_unet_fc.lokr_w2_a': fc_w2a, 'lora_unet_fc.lokr_w2_b': fc_w2b,
               'lora_unet_fc.alpha': torch.tensor(0.5),
               'lora_unet_enc_conv3.lokr_w1_a': c3_w1a, 'lora_unet_enc_conv3.lokr_w1_b': c3_w1b,
               'lora_unet_enc_conv3.lokr_w2': c3_w2, 'lora_unet_enc_conv3.alpha': torch.tensor(2.),
               'lora_unet_enc_strided.lokr_w1': st_w1, 'lora_unet_enc_strided.lokr_t2': st_t2,
               'lora_unet_enc_strided.lokr_w2_a': st_w2a, 'lora_unet_enc_strided.lokr_w2_b': st_w2b,
               'lora_unet_enc_strided.alpha': torch.tensor(1.),
               'lora_unet_enc_conv1.lokr_w1': c1_w1, 'lora_unet_enc_conv1.lokr_w2': c1_w2,
               'lora_unet_enc_conv1.alpha': torch.tensor(7.)}
    deltas = {'fc': kron_blocks(fc_w1, fc_w2a @ fc_w2b) * 0.5,
              'enc.conv3': kron_blocks(c3_w1a @ c3_w1b, c3_w2) * 2.,
              'enc.strided': kron_blocks(st_w1, tucker(st_t2, st_w2a, st_w2b)) * 0.5,
              'enc.conv1': kron_blocks(c1_w1, c1_w2)}
    check_against_merged(tiny, save(tmp_path, tensors), deltas, runner(torch.randn(2, 3, 6, 6)))


@pytest.mark.parametrize('use_rslora', [False, True])
def test_peft_format_against_peft(tmp_path, tiny, use_rslora):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    config = LoraConfig(r=2, lora_alpha=3, target_modules=['fc', 'conv3', 'strided'], alpha_pattern={'fc': 5},
                        use_rslora=use_rslora)
    reference = inject_adapter_in_model(config, copy.deepcopy(tiny))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if 'lora_' in name:
                p.copy_(torch.randn_like(p) * 0.5)
    state = get_peft_model_state_dict(reference)
    folder = tmp_path / 'peft'
    config.save_pretrained(str(folder))
    save(folder, {f'base_model.model.{k}': v for k, v in state.items()}, 'adapter_model.safetensors')
    # diffusers writes the same config flat under the model's prefix into the safetensors header.
    flat = {f'unet.{k}': v for k, v in {'r': 2, 'lora_alpha': 3, 'alpha_pattern': {'fc': 5},
                                         'use_rslora': use_rslora}.items()}
    diffusers_file = save(tmp_path, {f'unet.{k}': v for k, v in state.items()},
                          metadata={'format': 'pt', 'lora_adapter_metadata': json.dumps(flat)})
    x = torch.randn(2, 3, 6, 6)
    for source in (folder, diffusers_file):
        saved = weights_of(tiny)
        with SwitchableLoRA(tiny, source) as sl:
            for s in SCALES:
                for layer in reference.modules():
                    if isinstance(layer, LoraLayer):
                        layer.set_scale('default', s)
                with sl.scale(s):
                    torch.testing.assert_close(tiny(x), reference(x), atol=1e-5, rtol=1e-4)
        assert_same_weights(tiny, saved)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(4, 4)
        self.to_out = nn.ModuleList([nn.Linear(4, 4)])
        self.text = nn.Linear(4, 3)

    def forward(self, x):
        return self.text(self.to_out[0](self.to_q(x)))


def test_legacy_diffusers_attention_names(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.attn = Attention()
    q, o, t = (r(2, 4), r(4, 2)), (r(1, 4), r(4, 1)), (r(2, 4), r(3, 2))
    tensors = {'unet.attn.processor.to_q_lora.down.weight': q[0], 'unet.attn.processor.to_q_lora.up.weight': q[1],
               'unet.attn.processor.to_out_lora.down.weight': o[0], 'unet.attn.processor.to_out_lora.up.weight': o[1],
               'attn.text.lora_linear_layer.down.weight': t[0], 'attn.text.lora_linear_layer.up.weight': t[1]}
    deltas = {'attn.to_q': lora_delta(*q), 'attn.to_out.0': lora_delta(*o), 'attn.text': lora_delta(*t)}
    check_against_merged(model, save(tmp_path, tensors), deltas, runner(torch.randn(3, 4)))


def tiny_unet(**kwargs):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, norm_num_groups=8, cross_attention_dim=32, **kwargs).eval()


def kohya_lora(names, layers):
    """Random LoRA/LoCon tensors keyed 'lora_unet_<name with . -> _>' and the deltas they add to each layer."""
    tensors, deltas = {}, {}
    for key, target in names.items():
        w = layers[target].weight
        down, up = r(2, *w.shape[1:]) * 0.3, r(w.shape[0], 2, *[1] * (w.dim() - 2)) * 0.3
        prefix = 'lora_unet_' + key.replace('.', '_')
        tensors.update({f'{prefix}.lora_down.weight': down, f'{prefix}.lora_up.weight': up,
                        f'{prefix}.alpha': torch.tensor(1.)})
        deltas[target] = lora_delta(down, up, 1.)
    return tensors, deltas


def test_kohya_names_on_sd1_unet(tmp_path):
    unet = tiny_unet(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                     down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                     up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
    layers = dict(unet.named_modules())
    targets = ['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k', 'down_blocks.0.attentions.0.proj_in',
               'down_blocks.0.resnets.0.conv1', 'up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2',
               'mid_block.resnets.0.time_emb_proj', 'down_blocks.0.downsamplers.0.conv']
    tensors, deltas = kohya_lora({t: t for t in targets}, layers)
    run = runner(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32), return_dict=False)
    with torch.no_grad():
        check_against_merged(unet, save(tmp_path, tensors), deltas, lambda m: run(m)[0], atol=2e-5)


def sdxl_unet():
    return tiny_unet(block_out_channels=(32, 64, 64), layers_per_block=2,
                     down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                     up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                     transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
                     addition_embed_type='text_time', addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=64)


def test_sgm_names_on_sd1_layout():
    # Spellings of the original SD1.5 checkpoint (LDM): 12 input blocks, downsamplers at 3, 6, 9; upsamplers after
    # output blocks 2 (no attention), 5 and 8.
    unet = tiny_unet(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=2)
    names = sgm_names(unet)
    assert {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))} <= names.keys()
    expected = {'down_blocks.0.attentions.0.proj_in': 'input_blocks.1.1.proj_in',
                'down_blocks.0.downsamplers.0.conv': 'input_blocks.3.0.op',
                'down_blocks.2.downsamplers.0.conv': 'input_blocks.9.0.op',
                'down_blocks.3.resnets.1.conv2': 'input_blocks.11.0.out_layers.3',
                'mid_block.attentions.0.transformer_blocks.0.attn1.to_q':
                    'middle_block.1.transformer_blocks.0.attn1.to_q',
                'up_blocks.0.upsamplers.0.conv': 'output_blocks.2.1.conv',
                'up_blocks.1.upsamplers.0.conv': 'output_blocks.5.2.conv',
                'up_blocks.1.resnets.0.conv_shortcut': 'output_blocks.3.0.skip_connection',
                'up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2':
                    'output_blocks.11.1.transformer_blocks.0.ff.net.2',
                'time_embedding.linear_2': 'time_embed.2', 'conv_out': 'out.2'}
    assert {k: names[k] for k in expected} == expected


def test_sgm_names_agree_with_diffusers_converter():
    # diffusers' converter matches block ids by substring, so it is only right below 10 input blocks: SDXL's layout.
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    unet = sdxl_unet()
    layers = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = sgm_names(unet)
    assert layers <= names.keys()
    # Hand-checked spellings from the SGM layout (research/adapters.md 6.2).
    assert names['down_blocks.0.downsamplers.0.conv'] == 'input_blocks.3.0.op'
    assert names['up_blocks.0.upsamplers.0.conv'] == 'output_blocks.2.2.conv'
    assert names['mid_block.resnets.1.time_emb_proj'] == 'middle_block.2.emb_layers.1'
    assert names['up_blocks.2.resnets.2.conv_shortcut'] == 'output_blocks.8.0.skip_connection'
    sgm_keyed = {}
    for n in layers:
        key = 'lora_unet_' + names[n].replace('.', '_')
        sgm_keyed.update({f'{key}.lora_down.weight': torch.zeros(1), f'{key}.lora_up.weight': torch.zeros(1)})
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sgm_keyed, unet.config))
    # The converter writes '<path>.lora.down.weight' and, for attention, '<attn>.processor.to_q_lora.down.weight'.
    back = {re.sub(r'\.processor\.(to_[qkv]|to_out)_lora$', lambda m: '.' + m[1].replace('to_out', 'to_out.0'),
                   k[len('unet.'):-len('.down.weight')]).removesuffix('.lora')
            for k in converted if k.endswith('.down.weight')}
    assert back == layers


def test_kohya_sgm_names_on_sdxl_unet(tmp_path):
    unet = sdxl_unet()
    layers = dict(unet.named_modules())
    names = sgm_names(unet)
    targets = ['down_blocks.0.downsamplers.0.conv', 'up_blocks.0.upsamplers.0.conv',
               'mid_block.resnets.1.time_emb_proj', 'up_blocks.2.resnets.2.conv_shortcut',
               'down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q', 'add_embedding.linear_1']
    tensors, deltas = kohya_lora({names[t]: t for t in targets}, layers)
    added = {'text_embeds': torch.randn(2, 16), 'time_ids': torch.randn(2, 6)}
    run = runner(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32), added_cond_kwargs=added,
                 return_dict=False)
    with torch.no_grad():
        check_against_merged(unet, save(tmp_path, tensors), deltas, lambda m: run(m)[0], atol=2e-5)


def simple_lora(prefix='lora_unet_'):
    torch.manual_seed(1)
    return {f'{prefix}fc.lora_down.weight': r(2, 4), f'{prefix}fc.lora_up.weight': r(6, 2),
            f'{prefix}enc_conv3.lora_down.weight': r(2, 3, 3, 3), f'{prefix}enc_conv3.lora_up.weight': r(4, 2, 1, 1)}


def test_weights_bit_identical_after_switches_exceptions_and_interrupts(tiny):
    saved, params = weights_of(tiny), dict(tiny.named_parameters())
    x = torch.randn(2, 3, 6, 6)
    base = tiny(x)
    sl = SwitchableLoRA(tiny, simple_lora())
    assert sl.current_scale == 0
    outputs = {}
    for i in range(20):
        sl.set_scale(SCALES[i % 4])
        outputs.setdefault(SCALES[i % 4], tiny(x))
        assert torch.equal(tiny(x), outputs[SCALES[i % 4]])  # no drift however often it switches
    sl.set_scale(0.8)
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with sl.scale(-1.5):
                tiny(x)
                raise error('interrupted')
        assert sl.current_scale == 0.8
    denoiser = scaled(tiny, sl, -1.5)

    def interrupted(x, sigma):
        denoiser(x, sigma)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        scaled(interrupted, sl, 0.3)(x, torch.ones(2))
    assert sl.current_scale == 0.8 and torch.equal(tiny(x), outputs[0.8])
    assert_same_weights(tiny, saved)
    assert dict(tiny.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in tiny.named_parameters())
    sl.remove()
    sl.remove()
    assert not any(m._forward_hooks for m in tiny.modules())
    assert torch.equal(tiny(x), base)


def test_lora_pair_in_a_w2sd_sampler_equals_merged_models(tiny):
    # The paper's LoRA pair: one model, strong at scale 0.8, weak at -1.5.
    class Denoiser(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, sigma):
            gain = self.net(x.reshape(-1, 3, 2, 2).repeat(1, 1, 3, 3)).mean(1, keepdim=True)
            return x * gain / (1 + sigma[:, None] ** 2)
    lora = simple_lora()
    deltas = {'fc': lora_delta(lora['lora_unet_fc.lora_down.weight'], lora['lora_unet_fc.lora_up.weight']),
              'enc.conv3': lora_delta(lora['lora_unet_enc_conv3.lora_down.weight'],
                                      lora['lora_unet_enc_conv3.lora_up.weight'])}
    model, saved = Denoiser(tiny), weights_of(tiny)
    sl = SwitchableLoRA(tiny, lora)
    x, sigmas = torch.randn(2, 12), torch.tensor([3., 2., 1., 0.])
    strong = scaled(model, sl, 0.8)
    out = sample_w2sd_euler(strong, x, sigmas, strong=strong, weak=scaled(model, sl, -1.5), disable=True)
    strong_ref = Denoiser(merged(tiny, deltas, 0.8))
    ref = sample_w2sd_euler(strong_ref, x, sigmas, weak=Denoiser(merged(tiny, deltas, -1.5)), disable=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert (out - sample_w2sd_euler(strong_ref, x, sigmas, weak=strong_ref, disable=True)).abs().max() > 1e-4
    assert sl.current_scale == 0
    assert_same_weights(tiny, saved)


def test_name_map_and_skip(tiny):
    lora = simple_lora('custom_')
    lora.update({'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight': r(2, 4)})
    sl = SwitchableLoRA(tiny, lora, name_map={'custom_fc': 'fc', 'custom_enc_conv3': 'enc.conv3'}, skip='lora_te')
    assert sl.targets == ['enc.conv3', 'fc']
    sl.remove()
    sl = SwitchableLoRA(tiny, lora, name_map=lambda key: key.replace('custom_', '').replace('_', '.'),
                        skip=('lora_te',))
    assert sl.targets == ['enc.conv3', 'fc']
    sl.remove()


def test_bad_loras_give_clear_errors(tmp_path, tiny):
    unmatched = {**simple_lora(), 'lora_unet_nothing_here.lora_down.weight': r(2, 4),
                 'lora_te_text_model_x.alpha': torch.tensor(1.)}
    with pytest.raises(ValueError, match=r"2 LoRA keys match no .*lora_te_text_model_x\.alpha.*nothing_here"):
        SwitchableLoRA(tiny, unmatched)
    assert not any(m._forward_hooks for m in tiny.modules())
    with pytest.raises(ValueError, match='DoRA.*lora_unet_fc.dora_scale'):
        SwitchableLoRA(tiny, {**simple_lora(), 'lora_unet_fc.dora_scale': r(6, 1)})
    with pytest.raises(ValueError, match="'lora_unet_fc'.*do not fit"):
        SwitchableLoRA(tiny, {'lora_unet_fc.lora_down.weight': r(2, 5), 'lora_unet_fc.lora_up.weight': r(6, 2)})
    with pytest.raises(ValueError, match="'lora_unet_fc'.*lacks the tensor 'lora_up.weight'"):
        SwitchableLoRA(tiny, {'lora_unet_fc.lora_down.weight': r(2, 4)})
    with pytest.raises(ValueError, match="'lora_unet_fc'.*lacks the tensor 'hada_w1_a'"):
        SwitchableLoRA(tiny, {f'lora_unet_fc.hada_{k}': r(2, 2) for k in ('w1_b', 'w2_a', 'w2_b')})
    with pytest.raises(ValueError, match="'lora_unet_fc'.*one adapter kind"):
        SwitchableLoRA(tiny, {'lora_unet_fc.lora_up.weight': r(6, 2), 'lora_unet_fc.lokr_w1': r(2, 2)})
    with pytest.raises(ValueError, match='same layers'):
        SwitchableLoRA(tiny, {**simple_lora(), 'fc.lora_A.weight': r(2, 4), 'fc.lora_B.weight': r(6, 2)})
    with pytest.raises(TypeError, match='finite'):
        SwitchableLoRA(tiny, simple_lora()).set_scale(float('nan'))
    with pytest.raises(TypeError, match='finite'):
        scaled(tiny, SwitchableLoRA(tiny, simple_lora()), '0.8')
    with pytest.raises(ValueError, match='no tensors'):
        SwitchableLoRA(tiny, simple_lora(), skip='lora_unet')
    with pytest.raises(ValueError, match="'custom_fc' to 'enc'"):
        SwitchableLoRA(tiny, simple_lora('custom_'), name_map={'custom_fc': 'enc'})
    garbage = tmp_path / 'garbage.safetensors'
    garbage.write_bytes(b'\x00' * 7 + b'not a safetensors file' * 10)
    with pytest.raises(ValueError, match='not a valid safetensors file.*never unpickled'):
        load_lora(garbage)
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / 'missing.safetensors')


class Trap:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_pickles_are_refused_unopened(tmp_path, tiny):
    marker = tmp_path / 'unpickled'
    for name, write in (('trap.pt', lambda f: torch.save({'lora_unet_fc.alpha': Trap(str(marker))}, f)),
                        ('trap.ckpt', lambda f: pickle.dump(Trap(str(marker)), f))):
        with open(tmp_path / name, 'wb') as f:
            write(f)
        with pytest.raises(ValueError, match='not a valid safetensors file'):
            SwitchableLoRA(tiny, str(tmp_path / name))
    assert not marker.exists()


def in_scope(model, enter, value):
    """``model`` called inside ``with enter(value):`` (a with-form scope helper such as ``sl.scale``)."""
    def call(*args):
        with enter(value):
            return model(*args)
    return call


@pytest.mark.parametrize('form', [scaled, lambda model, sl, s: in_scope(model, sl.scale, s)])
def test_two_threads_with_different_scales_get_exactly_their_own_outputs(tiny, form):
    import threading
    saved = weights_of(tiny)
    sl = SwitchableLoRA(tiny, simple_lora())
    x = torch.randn(2, 3, 6, 6)
    legs = {s: form(tiny, sl, s) for s in (0.8, -1.5)}
    alone = {s: d(x, torch.ones(2)) for s, d in legs.items()}
    barrier, mismatches = threading.Barrier(2), []

    def work(s):
        barrier.wait()
        for _ in range(200):
            if not torch.equal(legs[s](x, torch.ones(2)), alone[s]):
                mismatches.append(s)
    threads = [threading.Thread(target=work, args=(s,)) for s in legs]
    for t in threads:
        t.start()
    assert torch.equal(tiny(x), tiny(x))  # meanwhile, this thread sees the module at its default scale
    for t in threads:
        t.join()
    assert mismatches == [] and sl.current_scale == 0
    assert_same_weights(tiny, saved)


def test_per_row_scales_equal_separate_calls(tiny):
    sl = SwitchableLoRA(tiny, simple_lora())
    x = torch.randn(2, 3, 6, 6)
    rows = sl.run([0.8, 0.8, -1.5, -1.5], tiny, torch.cat([x, x]))
    torch.testing.assert_close(rows, torch.cat([scaled(tiny, sl, s)(x, None) for s in (0.8, -1.5)]))
    with pytest.raises(ValueError, match='per-row LoRA scales for 3 rows'):
        sl.run([0.8, 0.8, -1.5], tiny, x)


def test_an_interrupt_inside_a_forward_leaves_nothing_changed(tiny):
    saved, x = weights_of(tiny), torch.randn(2, 3, 6, 6)
    base = tiny(x)
    sl = SwitchableLoRA(tiny, simple_lora())

    def interrupt(module, args, output):
        raise KeyboardInterrupt
    handle = tiny.fc.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        scaled(tiny, sl, 0.8)(x, None)
    with pytest.raises(KeyboardInterrupt):
        with sl.scale(-1.5):
            tiny(x)
    handle.remove()
    assert sl.current_scale == 0 and torch.equal(tiny(x), base)
    assert_same_weights(tiny, saved)


@pytest.mark.parametrize('bad, match', [
    ({'lora_unet_fc.lora_down.weight': r(2, 4), 'lora_unet_fc.lora_up.weight': torch.full((6, 2), float('nan'))},
     r"'lora_unet_fc'.*\['lora_up.weight'\] hold inf or nan"),
    ({'lora_unet_fc.lora_down.weight': r(2, 4), 'lora_unet_fc.lora_up.weight': r(6, 2),
      'lora_unet_fc.alpha': torch.tensor(float('inf'))}, r"'lora_unet_fc'.*\['alpha'\] hold inf or nan"),
    ({'lora_unet_fc.lora_down.weight': r(0, 4), 'lora_unet_fc.lora_up.weight': r(6, 0)}, "'lora_unet_fc'.*rank 0"),
    ({f'lora_unet_fc.hada_{k}': r(*shape) for k, shape in
      (('w1_a', (6, 2)), ('w1_b', (3, 4)), ('w2_a', (6, 2)), ('w2_b', (2, 4)))}, "'lora_unet_fc'.*do not fit"),
    ({'lora_unet_fc.lokr_w1': r(2, 2), 'lora_unet_fc.lokr_w2_a': r(3, 1), 'lora_unet_fc.lokr_w2_b': r(2, 2)},
     "'lora_unet_fc'.*do not fit"),
])
def test_bad_tensors_are_value_errors_naming_the_file_and_key(tmp_path, tiny, bad, match):
    path = save(tmp_path, bad)
    with pytest.raises(ValueError, match=f'{re.escape(str(path))}: LoRA entry {match}'):
        SwitchableLoRA(tiny, str(path))
    assert not any(m._forward_hooks for m in tiny.modules())


def test_malformed_peft_configs_are_value_errors_naming_the_file(tmp_path, tiny):
    folder = tmp_path / 'peft'
    folder.mkdir()
    save(folder, {'fc.lora_A.weight': r(2, 4), 'fc.lora_B.weight': r(6, 2)}, 'adapter_model.safetensors')
    (folder / 'adapter_config.json').write_text('{"lora_alpha": 4,')
    with pytest.raises(ValueError, match='adapter_config.json: malformed PEFT config'):
        load_lora(folder)
    (folder / 'adapter_config.json').write_text('{"lora_alpha": "four", "r": 2}')
    with pytest.raises(ValueError, match="adapter_model.safetensors: LoRA entry 'fc'.*lora_alpha"):
        SwitchableLoRA(tiny, folder)
    (folder / 'adapter_config.json').write_text('[1, 2]')
    with pytest.raises(ValueError, match='adapter_config.json.*must be a JSON object'):
        load_lora(folder)


@pytest.mark.parametrize('family', ['sdxl', 'animatediff', 'flux'])
def test_batched_legs_at_two_scales_equal_separate_calls_on_diffusers_models(family):
    # Per-row scales rely on every target layer seeing batch rows as contiguous blocks: checked on every Linear of
    # real architectures (attention, motion modules, time and text embeddings).
    pytest.importorskip('diffusers')
    from test_adapters_vp import sdxl_cond, tiny_animatediff, tiny_sdxl_unet
    from w2sd_samplers.adapters import unet_denoiser
    from w2sd_samplers.pairs import SharedCFG
    if family == 'flux':
        from test_adapters_flow import tiny_flux
        net, den, x, (cond, _), shared = tiny_flux()
    else:
        net = tiny_sdxl_unet() if family == 'sdxl' else tiny_animatediff()
        den = unet_denoiser(net, family=family)
        cond, shared = sdxl_cond(2, 1) if family == 'sdxl' else {'encoder_hidden_states': torch.randn(2, 5, 32)}, {}
        x = torch.randn(2, 4, 3, 8, 8) if family == 'animatediff' else torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    state = {f'{name}.lora_{p}.weight': torch.randn(*shape, generator=g) * 0.2
             for name, m in net.named_modules() if isinstance(m, nn.Linear)
             for p, shape in (('A', (2, m.in_features)), ('B', (m.out_features, 2)))}
    sl = SwitchableLoRA(net, state)
    sigma = torch.full([2], 3.)
    with torch.no_grad():
        legs = [dict(cond=cond, uncond=None, cond_scale=1., variant=s, **shared) for s in (0.8, -1.5)]
        batched = SharedCFG(den, sl).joint(x * 3, sigma, legs)
        separate = [scaled(den, sl, s)(x * 3, sigma, **cond, **shared) for s in (0.8, -1.5)]
    assert (separate[0] - separate[1]).abs().max() > 1e-3
    for b, s in zip(batched, separate):
        torch.testing.assert_close(b, s, rtol=1e-4, atol=1e-5)
