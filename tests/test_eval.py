

def test_lora_and_prompt_pairs(setup, tmp_path):
    peft = pytest.importorskip('peft')
    from peft.utils import get_peft_model_state_dict
    root, clip = setup
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / 'model')
    torch.manual_seed(5)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'],
                                          init_lora_weights=False))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    (tmp_path / 'one.txt').write_text('a cat\n')
    common = [str(root / 'model'), '--prompts', str(tmp_path / 'one.txt'), '--seeds', '1', '--methods',
              'w2sd-paper,autoguidance', '--steps', '2', '--nfe', '6', '--cfg', '5.5', '--strong-cfg', '1',
              '--weak-cfg', '1', '--scorer', f'clip:{clip}', '--cpu', '--no-progress']
    lora = f'lora:{tmp_path / "pytorch_lora_weights.safetensors"}:0.8:-1.5'
    for pair, out in ((lora, tmp_path / 'lora'), ('prompt:a dog', tmp_path / 'prompt')):
        run_ok(common + ['--pair', pair, '--out', str(out)])
        got = {r['method']: r for r in rows(out)}
        # the legs run at CFG 1, the main step at 5.5: strong is not main, so guidance costs 3 calls per step
        assert got['autoguidance']['nfe_roles'] == {'main': 2, 'strong': 2, 'weak': 2}
        assert got['w2sd-paper']['nfe_roles'] == {'main': 2, 'strong': 1, 'weak': 1}
