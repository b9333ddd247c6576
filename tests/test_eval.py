"""`w2sd eval` on a tiny random SD pipeline and tiny random CLIP scorers built from configs (no downloads)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')

from test_generate import noise, sd_pipe, tiny_tokenizer  # noqa: E402
from w2sd_samplers import cli  # noqa: E402
from w2sd_samplers.eval import scorers  # noqa: E402
from w2sd_samplers.commands.eval import standalone  # noqa: E402

PROMPTS = ['a cat', 'a dog']
STEPS, NFE, CFG = 3, 6, 4.
METHODS = 'plain,plain-nfe,w2sd-paper,autoguidance,z-sampling'


def tiny_clip(folder):
    folder.mkdir()
    torch.manual_seed(1)
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={'shortest_edge': 16},
                                                        crop_size={'height': 16, 'width': 16}),
        tokenizer=tiny_tokenizer(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    sd_pipe(root).save_pretrained(root / 'model')
    (root / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return root, tiny_clip(root / 'clip')


def args(root, clip, out, *extra):
    return [str(root / 'model'), '--pair', 'cfg:1', '--prompts', str(root / 'prompts.txt'), '--seeds', '2',
            '--methods', METHODS, '--steps', str(STEPS), '--nfe', str(NFE), '--cfg', str(CFG),
            '--scorer', f'clip:{clip}', '--out', str(out), '--cpu', '--no-progress', *extra]


def rows(out):
    return [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]


def run_ok(argv):
    assert standalone(argv) == 0


def usage_error(capsys, argv, message, main=standalone):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope='module')
def one_process(setup):
    root, clip = setup
    out = root / 'one'
    run_ok(args(root, clip, out))
    return out


def test_rows_are_paired_and_nfe_matched(setup, one_process):
    root, clip = setup
    got = {(r['prompt_index'], r['seed'], r['method']): r for r in rows(one_process)}
    assert len(got) == len(PROMPTS) * 2 * 5
    for (pi, seed, m), r in got.items():
        assert r['nfe'] == sum(r['nfe_roles'].values()) and os.path.isfile(one_process / r['image'])
    # Closed forms for Euler (one counted call per step; a CFG forward is one call):
    t_w2sd = (NFE + 2) // 3                                     # T + 2 (T - 1) reflection calls <= NFE
    expected = {'plain': (STEPS, STEPS), 'plain-nfe': (NFE, NFE), 'w2sd-paper': (t_w2sd, 3 * t_w2sd - 2),
                'autoguidance': (NFE // 2, NFE // 2 * 2), 'z-sampling': (t_w2sd, 3 * t_w2sd - 2)}
    for (pi, seed, m), r in got.items():
        assert (r['steps'], r['nfe']) == expected[m], m
    # Same initial noise per (prompt, seed): plain is the pipeline's own DDIM run on the seed's noise, and
    # Z-Sampling (guidance.z_sampling's roles) is W2SD-paper on the same CFG pair.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / 'model')
    clip_scorer = scorers.load(f'clip:{clip}', 'cpu')
    for pi, seed in ((0, 0), (1, 1)):
        image = pipe(PROMPTS[pi], num_inference_steps=STEPS, guidance_scale=CFG, latents=noise([1, 4, 8, 8], seed)
                     ).images[0]
        ref = float(clip_scorer.score([image], [PROMPTS[pi]])[0])
        assert got[pi, seed, 'plain']['scores']['clip'] == pytest.approx(ref, rel=1e-2)
        assert got[pi, seed, 'z-sampling']['scores'] == got[pi, seed, 'w2sd-paper']['scores']
    assert got[0, 0, 'plain']['scores'] != got[0, 1, 'plain']['scores']
    summary = (one_process / 'summary.md').read_text()
    assert all(f'| {m} |' in summary for m in METHODS.split(',')) and 'win rate vs autoguidance' in summary
    # the command it records runs from the results folder and names no folder of this machine
    assert str(root) not in summary
    assert (f'`w2sd eval ../model --pair cfg:1 --prompts ../prompts.txt --seeds 2 --methods {METHODS} --steps {STEPS} '
            f'--nfe {NFE} --cfg {CFG} --scorer clip:../clip --out . --cpu --no-progress` (paths relative to this '
            'folder)') in summary
    assert (one_process / 'grid.png').stat().st_size and (one_process / 'winrate.png').stat().st_size


def test_resume_skips_done_rows_and_settings_are_guarded(setup, one_process, capsys, tmp_path):
    root, clip = setup
    out = tmp_path / 'run'
    shutil.copytree(one_process / 'images', out / 'images')
    for name in ('settings.json', 'shard-0.jsonl'):
        (out / name).write_bytes((one_process / name).read_bytes())
    lines = (out / 'shard-0.jsonl').read_text().splitlines()
    kept = [json.loads(line) for line in lines[:7]]
    kept[0]['scores']['clip'] = -123.                      # a sentinel: a skipped row keeps it
    (out / 'shard-0.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in kept) + lines[7][:20])
    usage_error(capsys, args(root, clip, out), 'pass --resume')
    usage_error(capsys, args(root, clip, out, '--resume', '--strength', '0.5'), 'different settings')
    run_ok(args(root, clip, out, '--resume'))
    resumed = {(r['prompt_index'], r['seed'], r['method']): r for r in rows(out)}
    reference = {(r['prompt_index'], r['seed'], r['method']): r for r in rows(one_process)}
    assert resumed.keys() == reference.keys()
    assert len((out / 'shard-0.jsonl').read_text().splitlines()) == len(reference)   # torn line dropped
    first = (kept[0]['prompt_index'], kept[0]['seed'], kept[0]['method'])
    assert resumed[first]['scores']['clip'] == -123.
    assert all(resumed[k]['scores'] == reference[k]['scores'] for k in reference if k != first)


def test_two_processes_with_torchrun_match_one_process(setup, one_process):
    root, clip = setup
    out = root / 'two'
    argv = args(root, clip, out)
    argv[argv.index('--methods') + 1] = 'plain,w2sd-paper'
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'w2sd_samplers.eval', *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [[json.loads(line) for line in (out / f'shard-{r}.jsonl').read_text().splitlines()] for r in (0, 1)]
    keys = [{(r['prompt_index'], r['seed'], r['method']) for r in s} for s in shards]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    two = rows(out)
    one = [r for r in rows(one_process) if r['method'] in ('plain', 'w2sd-paper')]
    assert [(r['prompt_index'], r['seed'], r['method'], r['nfe']) for r in two] == \
        [(r['prompt_index'], r['seed'], r['method'], r['nfe']) for r in one]
    for a, b in zip(two, one):
        assert a['scores']['clip'] == pytest.approx(b['scores']['clip'], rel=1e-4, abs=1e-4)
    # a restart with another process count skips every done item
    before = [p.read_text() for p in sorted(out.glob('shard-*.jsonl'))]
    run_ok(argv + ['--resume'])
    assert [p.read_text() for p in sorted(out.glob('shard-*.jsonl'))] == before


def test_ctrl_c_is_one_line_saying_resume_continues(setup, tmp_path):
    root, clip = setup
    out = tmp_path / 'run'
    argv = args(root, clip, out)
    argv[argv.index('--seeds') + 1] = '20'              # far more rows than arrive before the interrupt
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1')
    run = subprocess.Popen([sys.executable, '-m', 'w2sd_samplers.eval', *argv], env=env, stderr=subprocess.PIPE,
                           text=True)
    shard, deadline = out / 'shard-0.jsonl', time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline and not (shard.exists() and shard.read_text()):
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=300)[1]
    assert run.returncode == 130 and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == f'w2sd eval: interrupted; --resume continues (the rows so far are in {out})'
    written = [json.loads(line) for line in shard.read_text().splitlines()]     # whole rows only
    assert written and all(r.keys() >= {'prompt_index', 'seed', 'method', 'scores'} for r in written)


def test_scorers_from_local_folders(setup, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file
    _, clip = setup
    images = [Image.new('RGB', (8, 8), c) for c in ('red', 'navy')]
    clip_s = scorers.load(f'clip:{clip}', 'cpu').score(images, PROMPTS)
    pick = scorers.load(f'pickscore:{clip}', 'cpu').score(images, PROMPTS)
    assert clip_s.shape == (2,) and ((clip_s >= 0) & (clip_s <= 100)).all()
    scale = float(transformers.CLIPModel.from_pretrained(clip).logit_scale.detach().exp())
    positive = clip_s > 0                     # CLIP score is max(100 cos, 0); PickScore is logit_scale * cos
    assert torch.allclose(pick[positive], clip_s[positive] * scale / 100, rtol=1e-4)
    # LAION's MLP layout (Linear layers at 0, 2; dropout between); a zero first layer leaves the last bias
    save_file({'layers.0.weight': torch.zeros(4, 8), 'layers.0.bias': torch.zeros(4),
               'layers.2.weight': torch.ones(1, 4), 'layers.2.bias': torch.tensor([3.5])}, tmp_path / 'mlp.safetensors')
    aes = scorers.load(f'aesthetic:{clip}:{tmp_path / "mlp.safetensors"}', 'cpu').score(images, PROMPTS)
    assert torch.equal(aes, torch.tensor([3.5, 3.5]))
    # FID against the reference folder: identical sets are at distance 0, different ones are not
    ref = tmp_path / 'ref'
    ref.mkdir()
    palette = ['red', 'navy', 'green', 'white', 'gray', 'yellow', 'purple', 'orange', 'black', 'pink']
    refs = [Image.new('RGB', (8, 8), c) for c in palette]
    for i, im in enumerate(refs):
        im.save(ref / f'{i}.png')
    fid = scorers.fid(str(ref), str(clip), {'same': refs, 'other': refs[:2] * 5}, (8, 8))
    assert abs(fid['same']) < 1e-3 and fid['other'] > 1e-3


def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, capsys, tmp_path):
    root, clip = setup
    out = tmp_path / 'out'
    base = args(root, clip, out)

    def swap(option, value, *more, argv=base):
        argv = argv[:argv.index(option) + 1] + [value] + argv[argv.index(option) + 2:]
        return swap(*more, argv=argv) if more else argv

    (tmp_path / 'empty.txt').write_text('\n \n')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    no_class = tmp_path / 'no_class'                      # a model_index.json without _class_name
    no_class.mkdir()
    (no_class / 'model_index.json').write_text('{}')
    small = tmp_path / 'small'
    small.mkdir()
    from PIL import Image
    for i in range(2):
        Image.new('RGB', (16, 16)).save(small / f'{i}.png')
    cases = [
        (swap('--prompts', str(tmp_path / 'empty.txt')), '--prompts'),
        (swap('--prompts', str(tmp_path / 'latin1.txt')), 'not UTF-8'),
        (swap('--methods', 'plain,w2sd-best'), "--methods: unknown method 'w2sd-best'"),
        (swap('--scorer', 'fancy:x'), "--scorer fancy:x: unknown scorer"),
        (swap('--scorer', f'clip:{tmp_path}'), 'config.json does not exist'),
        (swap('--scorer', f'aesthetic:{clip}:{tmp_path / "no.safetensors"}'), 'no.safetensors does not exist'),
        (swap('--pair', 'weights:' + str(tmp_path)), 'not a diffusers pipeline folder'),
        ([str(no_class)] + base[1:], f'MODEL {no_class}: model_index.json names no pipeline class'),
        (swap('--pair', f'weights:{no_class}', '--methods', 'w2sd-paper'),
         f'--pair weights: {no_class}: model_index.json names no pipeline'),
        (swap('--pair', 'cfg:4'), 'the weak CFG equals the strong one'),
        (swap('--pair', 'prompt:a bird'), 'z-sampling runs on a CFG pair only'),
        (swap('--pair', f'lora:{tmp_path / "bad.safetensors"}', '--methods', 'w2sd-paper'),
         'cannot load it into this pipeline'),
        (swap('--nfe', '2'), '--nfe 2: too small for w2sd-paper'),
        (base + ['--fid', str(small), '--fid-features', str(clip)], 'the generated images are 8x8'),
        (swap('--scorer', 'hpsv2:' + str(tmp_path / 'bad.safetensors')), 'needs the hpsv2 package'),
    ]
    import importlib.util
    for argv, message in cases:
        if 'hpsv2' in message and importlib.util.find_spec('hpsv2') is not None:
            continue                          # installed: the error case does not arise
        usage_error(capsys, argv, message)
        assert not out.exists(), message
    usage_error(capsys, ['eval'] + swap('--methods', 'nope'), '--methods', main=cli.main)


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
