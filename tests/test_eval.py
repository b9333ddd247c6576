"""`w2sd eval` on a tiny random SD pipeline and tiny random CLIP scorers built from configs (no downloads)."""
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')

from test_generate import noise, sd_pipe, tiny_tokenizer  # noqa: E402
from w2sd_samplers import cli  # noqa: E402
from w2sd_samplers.commands.eval import standalone  # noqa: E402
from w2sd_samplers.eval import methods as M, runner, scorers  # noqa: E402
from w2sd_samplers.generate import pipeline_pair  # noqa: E402

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


def swap(argv, option, value):
    i = argv.index(option)
    return argv[:i + 1] + [value] + argv[i + 2:]


def rows(out):
    return [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]


def keyed(rs):
    return {(r['prompt_index'], r['seed'], r['method']): r for r in rs}


def run_ok(argv):
    assert standalone(argv) == 0


def usage_error(capsys, argv, message, main=standalone):
    """Exit 2 with ``message`` on the last stderr line; our own errors are that one line, argparse's come after its
    usage lines."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1] and 'Traceback' not in err, err
    return err


@pytest.fixture(scope='module')
def one_process(setup):
    root, clip = setup
    out = root / 'one'
    run_ok(args(root, clip, out))
    return out


def test_rows_are_paired_and_nfe_matched(setup, one_process):
    root, clip = setup
    got = keyed(rows(one_process))
    assert len(got) == len(PROMPTS) * 2 * 5
    for r in got.values():
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
    assert summary.split('\n## ')[1].startswith('Recommendation')
    assert all(f'| {m} |' in summary for m in METHODS.split(',')) and 'Δ vs plain-nfe [95% CI]' in summary
    assert 'clip (alignment)' in summary and '## Where W2SD helps and hurts most' in summary
    assert (one_process / 'grid.png').stat().st_size and (one_process / 'paired.png').stat().st_size
    table = list(csv.DictReader(open(one_process / 'per_prompt.csv', encoding='utf-8')))
    assert len(table) == len(got)
    assert {(int(t['prompt_index']), int(t['seed']), t['method']): float(t['clip']) for t in table} == \
        {k: r['scores']['clip'] for k, r in got.items()}
    # the command it records runs from the results folder and names no folder of this machine
    assert str(root) not in summary
    assert (f'`w2sd eval ../model --pair cfg:1 --prompts ../prompts.txt --seeds 2 --methods {METHODS} --steps {STEPS} '
            f'--nfe {NFE} --cfg {CFG} --scorer clip:../clip --out . --cpu --no-progress` (paths relative to this '
            'folder)') in summary


def test_the_recommended_generate_command_reproduces_the_eval_image(setup, one_process, tmp_path):
    """The `w2sd generate` line of summary.md, run on the same model and prompt, gives the image eval scored."""
    from PIL import Image
    root, _ = setup
    summary = (one_process / 'summary.md').read_text()
    method = re.search(r"W2SD's best setting here is \*\*([\w-]+)\*\*", summary).group(1)
    command = re.search(r'\*\*w2sd generate\*\*: `w2sd (generate .*)`', summary).group(1)
    argv = [str(root / 'model') if a == 'MODEL' else PROMPTS[1] if a == 'PROMPT' else a for a in shlex.split(command)]
    out = tmp_path / 'g.png'
    cli.main(argv + ['--seed', '1', '--device', 'cpu', '--dtype', 'float32', '--no-progress', '--out', str(out)])
    ours = np.asarray(Image.open(out))
    scored = np.asarray(Image.open(one_process / keyed(rows(one_process))[1, 1, method]['image']))
    assert np.array_equal(ours, scored)          # the same operations on the same noise: the same 8-bit image


def test_resume_after_a_kill_on_any_byte_and_non_row_lines(setup, one_process, capsys, tmp_path):
    root, clip = setup
    reference = keyed(rows(one_process))
    lines = (one_process / 'shard-0.jsonl').read_bytes().split(b'\n')[:-1]
    for name, tail in (('newline', lines[7]), ('mid-row', lines[7][:20])):
        out = tmp_path / name
        shutil.copytree(one_process / 'images', out / 'images')
        (out / 'settings.json').write_bytes((one_process / 'settings.json').read_bytes())
        kept = [json.loads(line) for line in lines[:7]]
        kept[0]['scores']['clip'] = -123.                 # a sentinel: a skipped row keeps it
        junk = [b'{"prompt_index": 1}', b'[1, 2]', b'\x00\x00garbage']
        (out / 'shard-0.jsonl').write_bytes(b''.join(json.dumps(r).encode() + b'\n' for r in kept[:4]) + b'\n'.join(
            junk) + b'\n' + b''.join(json.dumps(r).encode() + b'\n' for r in kept[4:]) + tail)
        usage_error(capsys, args(root, clip, out), 'pass --resume')
        run_ok(args(root, clip, out, '--resume'))
        err = capsys.readouterr().err
        assert 'skipped 3 line(s) that are not rows (shard-0.jsonl line 5, shard-0.jsonl line 6' in err, err
        resumed = keyed(rows(out))
        assert resumed.keys() == reference.keys(), name          # the row cut before its newline is redone
        first = (kept[0]['prompt_index'], kept[0]['seed'], kept[0]['method'])
        assert resumed[first]['scores']['clip'] == -123.
        assert all(resumed[k]['scores'] == reference[k]['scores'] for k in reference if k != first)
    # another setting is refused by name; the same scorer folder spelled relative to the working directory is not
    err = usage_error(capsys, args(root, clip, out, '--resume', '--strength', '0.5'), '--strength 0.5')
    assert 'hash' not in err
    relative = os.path.relpath(clip)
    run_ok(swap(args(root, clip, out, '--resume'), '--scorer', f'clip:{relative}'))


def test_missing_rows_stop_the_summary(setup, monkeypatch, capsys, tmp_path):
    """If a process ends without an item's row, the merge says so instead of summarising fewer rows."""
    root, clip = setup
    work = runner.work

    def lossy(writer, images, pipe, pair_options, prompts, units, *rest, **kw):
        return work(writer, images, pipe, pair_options, prompts, units[:-1], *rest, **kw)
    monkeypatch.setattr(runner, 'work', lossy)
    out = tmp_path / 'out'
    argv = swap(swap(args(root, clip, out), '--methods', 'plain'), '--seeds', '1')
    usage_error(capsys, argv, '1 expected row(s) are missing (e.g. prompt 1, seed 0, plain)')
    assert not (out / 'summary.md').exists()
    monkeypatch.setattr(runner, 'work', work)
    run_ok(argv + ['--resume'])
    assert (out / 'summary.md').exists() and len(rows(out)) == 2
    assert f'w2sd eval: wrote {out / "summary.md"}' in capsys.readouterr().out


def test_two_processes_with_torchrun_match_one_process_bit_for_bit(setup, one_process, tmp_path):
    root, clip = setup
    # MKL's float results depend on the memory alignment of their inputs (which differs between processes) unless
    # its conditional numerical reproducibility is strict: then 1 and 2 processes give the same bits.
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')
    runs = {}
    for n in (1, 2):
        out = tmp_path / f'{n}'
        argv = swap(args(root, clip, out), '--methods', 'plain,w2sd-paper')
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n),
               '-m', 'w2sd_samplers.eval', *argv]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = out
    out = runs[2]
    shards = [[json.loads(line) for line in (out / f'shard-{r}.jsonl').read_text().splitlines()] for r in (0, 1)]
    keys = [{(r['prompt_index'], r['seed'], r['method']) for r in s} for s in shards]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    one, two = keyed(rows(runs[1])), keyed(rows(out))
    assert two.keys() == one.keys()
    for k, r in one.items():
        assert {f: two[k][f] for f in ('scores', 'nfe', 'nfe_roles', 'steps')} == \
            {f: r[f] for f in ('scores', 'nfe', 'nfe_roles', 'steps')}
        assert (out / two[k]['image']).read_bytes() == (runs[1] / r['image']).read_bytes() == \
            (one_process / r['image']).read_bytes()
    assert '2 process(es)' in (out / 'summary.md').read_text()
    # a restart with another process count skips every done item
    before = [p.read_text() for p in sorted(out.glob('shard-*.jsonl'))]
    run_ok(swap(args(root, clip, out), '--methods', 'plain,w2sd-paper') + ['--resume'])
    assert [p.read_text() for p in sorted(out.glob('shard-*.jsonl'))] == before


def test_extending_a_run_adds_seeds_prompts_and_methods_without_redoing_items(setup, one_process, tmp_path):
    root, clip = setup
    out = tmp_path / 'ext'
    shutil.copytree(one_process, out)
    before = (out / 'shard-0.jsonl').read_bytes()
    (tmp_path / 'more.txt').write_text('\n'.join(PROMPTS + ['a red car']) + '\n')
    argv = swap(swap(swap(args(root, clip, out, '--resume'), '--seeds', '0-2'), '--prompts',
                     str(tmp_path / 'more.txt')), '--methods', 'plain,w2sd-paper')
    run_ok(argv)
    after = (out / 'shard-0.jsonl').read_bytes()
    assert after.startswith(before)                       # nothing redone: the old rows are untouched
    new = [json.loads(line) for line in after[len(before):].decode().splitlines()]
    assert sorted((r['prompt_index'], r['seed']) for r in new if r['method'] == 'plain') == \
        [(0, 2), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert len(new) == 2 * 5
    summary = (out / 'summary.md').read_text()
    assert '3 evaluation prompts x 3 seeds (0-2), 18 rows' in summary
    # a changed earlier prompt is not an extension
    (tmp_path / 'other.txt').write_text('a cow\na dog\n')
    with pytest.raises(SystemExit):
        standalone(swap(argv, '--prompts', str(tmp_path / 'other.txt')))


def test_tune_chooses_on_tuning_prompts_and_judges_on_the_others(setup, capsys, tmp_path):
    root, clip = setup
    (tmp_path / 'p.txt').write_text('a cat\na dog\na red car\na sun\n')
    out = tmp_path / 'tuned'
    argv = swap(swap(swap(args(root, clip, out, '--tune', '--tune-seeds', '1'), '--methods',
                          'plain-nfe,w2sd-anchored,autoguidance'), '--prompts', str(tmp_path / 'p.txt')),
                '--seeds', '1')
    run_ok(argv)
    printed = capsys.readouterr().out
    results = rows(out)
    tuning = [r for r in results if r['stage'] == 'tune']
    ev = [r for r in results if r['stage'] == 'eval']
    assert {r['prompt'] for r in tuning} == {'a sun'}                # every 4th prompt (fraction 0.25)
    assert {r['prompt'] for r in ev} == {'a cat', 'a dog', 'a red car'}
    assert all(r['nfe'] <= NFE for r in tuning + ev)
    n_settings = len({round(f * NFE) for f in (0.25, 0.5, 0.75, 1.)}) + 9 + 4   # plain step counts, W2SD, AG
    assert len(tuning) == n_settings
    # each family's choice is its best tuning score, ties to the earlier grid entry
    for family in ('plain-nfe', 'w2sd-anchored', 'autoguidance'):
        mine = [r for r in tuning if r['method'].split(' ')[0] == family]
        best = max(mine, key=lambda r: (r['scores']['clip'], -mine.index(r)))
        chosen = {r['setting'] for r in ev if r['method'] == family}
        assert chosen == {best['setting']}, family
    summary = (out / 'summary.md').read_text()
    assert '## Tuning' in summary and summary.count('**chosen**') == 3
    total = sum(r['nfe'] for r in tuning)
    assert re.search(rf'tuning grid: {n_settings} settings x 1 items, {total} denoiser calls in all, [\d.]+ s wall',
                     printed)
    timing = json.loads((out / 'timing-0.json').read_text())
    assert set(timing['phases']) == {'load', 'plan', 'tune', 'tune_wait', 'evaluate', 'wait', 'summary'}
    assert 0 < timing['scoring_s'] < timing['phases']['tune'][0] + timing['phases']['evaluate'][0]
    # fixed-setting flags are refused with --tune
    usage_error(capsys, argv + ['--resume', '--strength', '0.5'], '--strength: --tune chooses')


@pytest.mark.filterwarnings('ignore:invalid value encountered in cast')      # diffusers decoding NaN latents
def test_unscorable_images_are_rows_with_an_error_and_accelerate_on_cpu_is_flagged(setup, monkeypatch, capsys,
                                                                                   tmp_path):
    root, clip = setup
    real = M.run

    def nan_w2sd(method, roles, x, sigmas, sampler, params):
        out = real(method, roles, x, sigmas, sampler, params)
        return out * float('nan') if method == 'w2sd-paper' else out
    monkeypatch.setattr(M, 'run', nan_w2sd)
    monkeypatch.setenv('ACCELERATE_DYNAMO_BACKEND', 'NO')            # what `accelerate launch` sets
    out = tmp_path / 'nan'
    run_ok(swap(swap(args(root, clip, out), '--methods', 'plain-nfe,w2sd-paper'), '--seeds', '1'))
    err = capsys.readouterr().err
    assert 'accelerate launch started a single process' in err and 'torchrun --nproc_per_node' in err
    bad = [r for r in rows(out) if r['method'] == 'w2sd-paper']
    assert bad and all(r['scores'] is None and r['error'] == 'not scored: the sampler produced NaN or inf latents'
                       for r in bad)
    summary = (out / 'summary.md').read_text()
    assert '## Rows not scored' in summary and '| w2sd-paper | 2 | 4 | n/a | - |' in summary
    assert 'w2sd-paper gave 2 unscorable image(s)' in summary and 'use w2sd-paper' not in summary


def test_unscorable_detects_black_and_nan():
    from PIL import Image
    assert scorers.unscorable(Image.new('RGB', (8, 8)), torch.zeros(1)) == 'the image is black'
    assert 'NaN' in scorers.unscorable(Image.new('RGB', (8, 8), 'red'), torch.tensor([0., float('nan')]))
    assert scorers.unscorable(Image.new('RGB', (8, 8), (0, 0, 1)), torch.zeros(1)) is None


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')             # no wrapping inside a default
    with pytest.raises(SystemExit):
        standalone(['--help'])
    entries = re.split(r'\n  (?=-)', capsys.readouterr().out.split('options:')[1])   # one per option
    for option, default in (('--methods', 'plain,plain-nfe,w2sd-paper'), ('--nfe', '50'), ('--cfg', '7.5'),
                            ('--sampler', 'euler'), ('--schedule', 'native'), ('--lam-frac', '1.0'),
                            ('--strength', '1.0'), ('--ag-w', '1.0'), ('--seeds', '4'), ('--tune-fraction', '0.25')):
        entry = next(e for e in entries if e.startswith(f'{option} '))
        assert f'(default: {default}' in ' '.join(entry.split()), option


def test_pipeline_pair_refuses_non_finite_cfg(tmp_path):
    pipe = sd_pipe(tmp_path)
    for name in ('guidance_scale', 'strong_cfg', 'weak_cfg'):
        for bad in (float('nan'), float('inf')):
            with pytest.raises(ValueError, match=f'{name} must be a finite number'):
                with pipeline_pair(pipe, 'a cat', **{name: bad}):
                    pass


def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, capsys, tmp_path):
    root, clip = setup
    out = tmp_path / 'out'
    base = args(root, clip, out)

    def with_(*pairs, argv=base):
        for option, value in zip(pairs[::2], pairs[1::2]):
            argv = swap(argv, option, value)
        return argv

    (tmp_path / 'empty.txt').write_text('\n \n')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    empty_index = tmp_path / 'empty_index'
    empty_index.mkdir()
    (empty_index / 'model_index.json').write_text('{}')
    small = tmp_path / 'small'
    small.mkdir()
    from PIL import Image
    for i in range(2):
        Image.new('RGB', (16, 16)).save(small / f'{i}.png')
    cases = [
        (with_('--prompts', str(tmp_path / 'empty.txt')), '--prompts'),
        (with_('--prompts', str(tmp_path / 'latin1.txt')), 'not UTF-8'),
        (with_('--methods', 'plain,w2sd-best'), "--methods: unknown method 'w2sd-best'"),
        (with_('--scorer', 'fancy:x'), "--scorer fancy:x: unknown scorer"),
        (with_('--scorer', f'clip:{tmp_path}'), 'config.json does not exist'),
        (with_('--scorer', f'aesthetic:{clip}:{tmp_path / "no.safetensors"}'), 'no.safetensors does not exist'),
        (with_('--pair', 'weights:' + str(tmp_path)), 'not a diffusers pipeline folder'),
        (with_('--pair', 'cfg:4'), 'the weak CFG equals the strong one'),
        (with_('--pair', 'cfg:nan'), '--pair cfg:nan: the weak CFG scale must be a finite number'),
        (with_('--pair', 'prompt:a bird'), 'z-sampling runs on a CFG pair only'),
        (with_('--pair', f'lora:{tmp_path / "bad.safetensors"}', '--methods', 'w2sd-paper'),
         'cannot load it into this pipeline'),
        (with_('--nfe', '2'), '--nfe 2: too small for w2sd-paper'),
        (base + ['--fid', str(small), '--fid-features', str(clip)], 'the generated images are 8x8'),
        (with_('--scorer', 'hpsv2:' + str(tmp_path / 'bad.safetensors')), 'needs the hpsv2 package'),
        (base + ['--strength', 'nan'], 'argument --strength: must be a finite number'),
        (base + ['--ag-w', 'inf'], 'argument --ag-w: must be a finite number'),
        (base + ['--cfg', 'nan'], 'argument --cfg: must be a finite number'),
        (base + ['--weak-cfg', 'inf'], 'argument --weak-cfg: must be a finite number'),
        (base + ['--lam-frac', '-1'], 'argument --lam-frac: must be a number in [0, 1]'),
        (base + ['--lam-frac', '2'], 'argument --lam-frac: must be a number in [0, 1]'),
        (with_('--seeds', '3-1'), 'argument --seeds: expected N, A-B'),
        (base + ['--margin', '-1'], '--margin -1: expected a positive number'),
        (base + ['--primary', 'pickscore'], '--primary pickscore: not one of the --scorer kinds'),
        (base + ['--tune', '--tune-fraction', '0.25'], '--tune-fraction 0.25: leaves 0 tuning'),
        (base + ['--tune-prompts', str(root / 'prompts.txt')], '--tune-prompts: add --tune'),
        ([str(empty_index)] + base[1:], f'MODEL {empty_index}: model_index.json names no pipeline class'),
        (with_('--pair', f'weights:{empty_index}', '--methods', 'w2sd-paper'),
         f'--pair weights: {empty_index}: model_index.json names no pipeline'),
    ]
    import importlib.util
    for argv, message in cases:
        if 'hpsv2' in message and importlib.util.find_spec('hpsv2') is not None:
            continue                          # installed: the error case does not arise
        err = usage_error(capsys, argv, message)
        if not message.startswith('argument'):
            assert len(err.strip().splitlines()) == 1, err
        assert not out.exists(), message
    usage_error(capsys, ['eval'] + with_('--methods', 'nope'), '--methods', main=cli.main)


def test_a_wrong_scorer_folder_is_one_line_without_third_party_chatter(setup, capfd, tmp_path):
    """transformers logs a load report of dozens of lines to the real stderr (hence capfd) when a CLIP model is
    loaded from another model's folder: the check comes first, the error stays the only line."""
    root, clip = setup
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        standalone(swap(args(root, clip, out), '--scorer', f'clip:{root / "model" / "text_encoder"}'))
    err = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert 'holds a clip_text_model model, not a CLIP model' in err[0] and not out.exists()


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
    assert set(scorers.ROLES) == set(scorers.KINDS)
