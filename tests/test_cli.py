"""The `w2sd` command: demo output, --version and --help, one-line user errors, no third-party warnings."""
import argparse
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import w2sd_samplers
from w2sd_samplers import cli
from w2sd_samplers.commands import demo
from w2sd_samplers.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(capsys, *args):
    main(['demo', '--samples', '1000', '--steps', '10', *args])
    out = capsys.readouterr().out
    return [line for line in out.splitlines() if not line.startswith('(')]  # drop the timing line


def usage_error(capsys, argv):
    """Run the command, expect exit code 2 and return its one-line message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'Traceback' not in '\n'.join(err)
    return err[-1]


def test_demo_reports_every_method_with_its_nfe_and_is_deterministic(capsys, tmp_path):
    plot = tmp_path / 'demo.png'
    lines = run_demo(capsys, '--seed', '3', '--plot', str(plot))
    rows = {line[:26].strip(): line[26:].split() for line in lines if line[26:33].strip().isdigit()}
    paper, anchored, half = 'W2SD paper lam=9 s=1', 'W2SD anchored lam=9 s=1', 'W2SD anchored lam=9 s=0.5'
    assert set(rows) == {'ideal (2nd draw)', 'weak alone', 'strong alone', anchored, half, paper,
                         'strong, paper W2SD NFE', 'diff. guidance w=1'}
    nfe = {name: int(cols[0]) for name, cols in rows.items()}
    assert nfe[paper] == 10 + 2 * 9 == nfe['strong, paper W2SD NFE'] == nfe['diff. guidance w=1']
    assert nfe['strong alone'] == 10 == nfe['weak alone'] and nfe[anchored] == nfe[half] == 10 + 2 * 9
    assert float(rows['weak alone'][1]) == 0.0  # the weak model lacks the (-4,-4) mode
    # Energy distance: far from the ideal for the weak model, near the sampling floor for a second ideal draw.
    assert float(rows['weak alone'][-1]) > 0.3 > abs(float(rows['ideal (2nd draw)'][-1]))
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert run_demo(capsys, '--seed', '3') == [line for line in lines if 'plot written' not in line]
    assert run_demo(capsys, '--seed', '4') != run_demo(capsys, '--seed', '3')


def test_demo_plot_reads_without_the_readme(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from w2sd_samplers.toy import four_modes
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)             # keep the figure to look at it
    ideal = four_modes([.25] * 4)
    args = type('Args', (), {'plot': str(tmp_path / 'p.png'), 'steps': 7, 'seed': 1, 'samples': 1000})
    demo._plot(args, ideal, [('ideal (2nd draw)', 0, ideal.sample(50)), ('strong alone', 7, ideal.sample(50))])
    fig, = figures
    assert 'T = 7' in fig._suptitle.get_text()
    assert [ax.get_xlabel() for ax in fig.axes] == ['x1', 'x1'] and fig.axes[0].get_ylabel() == 'x2'
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ['samples', 'ideal mode centres']
    centres = fig.axes[1].collections[1].get_offsets()
    assert sorted(map(tuple, centres.tolist())) == [(-4, -4), (-4, 4), (4, -4), (4, 4)]


def test_package_version_matches_the_metadata():
    # pyproject.toml keeps a static version (ComfyUI's registry reads it); the package must report the same one.
    text = open(os.path.join(os.path.dirname(__file__), '..', 'pyproject.toml'), encoding='utf-8').read()
    assert re.search(r'^version = "(.+)"$', text, re.M).group(1) == w2sd_samplers.__version__


def test_version_and_every_default_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'w2sd {w2sd_samplers.__version__}'
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == 'command').choices
    for name in ('demo', 'generate'):
        text = ' '.join(sub[name].format_help().split())
        for action in sub[name]._actions:
            if action.option_strings and action.default not in (None, False, '==SUPPRESS=='):
                assert f'(default: {action.default})' in text, (name, action.option_strings)
            elif action.option_strings and action.dest != 'help':
                assert action.help, (name, action.option_strings)       # says what happens when not given
    text = ' '.join(sub['generate'].format_help().split())
    assert '--cfg CFG CFG scale of the main step (default: 7.5)' in text
    assert '(default: [1.0, -1.0])' in text


@pytest.mark.parametrize('argv, flag', [
    (['demo', '--samples', '2'], '--samples'),
    (['demo', '--steps', '1'], '--steps'),
    (['demo', '--plot', '/no/such/folder/demo.png'], '--plot'),
    (['demo', '--plot', 'demo.txt'], '--plot'),
    (['demo', '--seed', str(2 ** 70)], '--seed'),
    (['generate', 'MODEL', '--prompt', 'x', '--seed', str(2 ** 70)], '--seed'),
    (['generate', 'MODEL', '--prompt', 'x', '--steps', '0'], '--steps'),
    (['generate', 'MODEL', '--prompt', 'x', '--lam', '-1'], '--lam'),
    (['generate', 'MODEL', '--prompt', 'x', '--cfg', 'nan'], '--cfg'),
    (['generate', 'MODEL', '--prompt', 'x', '--weak-cfg', 'inf'], '--weak-cfg'),
    (['generate', 'MODEL', '--prompt', 'x', '--device', 'cdua'], '--device'),
    (['generate', 'MODEL', '--prompt', 'x', '--out', '/no/such/folder/a.png'], '--out'),
    (['generate', 'MODEL', '--prompt', 'x', '--lora', 'no_such.safetensors'], '--lora'),
    (['generate', 'MODEL', '--prompt', 'x', '--parity', '--form', 'anchored'], '--parity'),
    (['generate', '/no/such/model', '--prompt', 'x'], 'MODEL'),
])
def test_user_errors_are_one_line_naming_the_flag_before_any_work(capsys, monkeypatch, argv, flag):
    def no_work(*args, **kwargs):
        raise AssertionError('the error should come before any sampling or model loading')
    monkeypatch.setattr(demo, '_demo_runs', no_work)
    monkeypatch.setattr('w2sd_samplers.commands.generate.generate', no_work)
    if 'MODEL' in argv:                                  # a stand-in folder name: it must not even be opened
        monkeypatch.setattr('w2sd_samplers.commands.generate.load_pipeline', no_work)
    assert flag in usage_error(capsys, argv)


def test_a_model_folder_whose_index_names_no_pipeline_is_a_usage_error(capsys, tmp_path):
    (tmp_path / 'model_index.json').write_text('{}')
    message = usage_error(capsys, ['generate', str(tmp_path), '--prompt', 'x', '--out', str(tmp_path / 'a.png')])
    assert message == f'w2sd generate: error: MODEL {tmp_path}: model_index.json names no pipeline class ' \
                      '(_class_name); give a folder written by pipe.save_pretrained'


def test_recorded_command_writes_paths_relative_to_the_results_folder(tmp_path):
    from w2sd_samplers.commands.common import recorded_command
    out = tmp_path / 'runs' / 'first'
    lora = str(tmp_path / 'my lora.safetensors')
    argv = [str(tmp_path / 'model'), '--pair', f'lora:{lora}:1:-1', '--scorer', f'clip:{tmp_path}/clip',
            f'--out={out}', '--negative-prompt', 'model', '--cache', 'cache']
    args = argparse.Namespace(command_line=argv)
    text = recorded_command('eval', args, [str(tmp_path / 'model'), lora, f'{tmp_path}/clip', str(out), 'cache'], out)
    cwd = os.path.relpath(os.getcwd(), out)
    assert text == ("w2sd eval ../../model --pair 'lora:../../my lora.safetensors:1:-1' --scorer clip:../../clip "
                    f"--out=. --negative-prompt model --cache {cwd}/cache")


def test_device_that_this_machine_lacks_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')  # every CPU-only run checks it
    assert '--device' in usage_error(capsys, ['generate', 'MODEL', '--prompt', 'x', '--device', 'cuda'])


def test_generate_names_flags_checks_paths_before_sampling_and_prints_what_it_wrote(capsys, tmp_path):
    pytest.importorskip('diffusers')
    from test_generate import sd_pipe
    sd_pipe(tmp_path).save_pretrained(tmp_path / 'model')
    base = ['generate', str(tmp_path / 'model'), '--prompt', 'a cat', '--steps', '2', '--device', 'cpu',
            '--dtype', 'float32', '--no-progress']
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        message = usage_error(capsys, base)                       # no pair: the library's error, in flags
        assert '--weak-model' in message and '--plain' in message and 'weak_model' not in message
        assert '--out' in usage_error(capsys, base + ['--weak-cfg', '1', '--out', str(tmp_path / 'a.mp3')])
        out = tmp_path / 'cat.png'
        main(base + ['--weak-cfg', '1', '--out', str(out)])
    printed = capsys.readouterr()
    assert printed.out.strip().endswith(f'wrote {out}') and out.stat().st_size > 0
    assert 'Loading pipeline components' not in printed.err           # --no-progress: no loader bars either
    assert not [w for w in caught if 'torch_dtype' in str(w.message)]   # loads with diffusers' current dtype=


def test_public_api_is_the_samplers_not_their_imports():
    assert set(w2sd_samplers.__all__) >= {f'sample_w2sd_{name}' for name in w2sd_samplers.SAMPLERS}
    assert all(getattr(w2sd_samplers, name) is not None for name in w2sd_samplers.__all__)
    namespace = {}
    exec('from w2sd_samplers import *', namespace)
    assert set(namespace) - {'__builtins__'} == set(w2sd_samplers.__all__)
    assert not {'torch', 'trange', 'functools', 'inspect'} & set(dir(w2sd_samplers))


def test_commands_and_sde_samplers_print_no_third_party_warnings():
    # A fresh process: clip's pkg_resources warning fires only on k-diffusion's first import.
    code = ('import torch, w2sd_samplers.toy as toy\n'
            'from w2sd_samplers import sample_w2sd_dpmpp_sde, sample_w2sd_dpmpp_3m_sde, _kdiff\n'
            'from w2sd_samplers.cli import main\n'
            'K = _kdiff.sampling()\n'
            'strong, weak = toy.four_modes([.1, .3, .3, .3]), toy.four_modes([0., 1., 1., 1.])\n'
            'sigmas = K.get_sigmas_karras(6, 0.01, 40.)\n'
            'for sampler in (sample_w2sd_dpmpp_sde, sample_w2sd_dpmpp_3m_sde):\n'
            '    sampler(strong, torch.randn(64, 2) * sigmas[0], sigmas, weak=weak, disable=True)\n'
            "main(['demo', '--samples', '1000', '--steps', '3'])\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, 'PYTHONPATH': ROOT})
    assert out.returncode == 0, out.stderr
    assert 'energy dist.' in out.stdout and out.stderr == ''
