import pytest

from w2sd_samplers.cli import main


def run_demo(capsys, *args):
    main(['demo', '--samples', '400', '--steps', '10', *args])
    out = capsys.readouterr().out
    return [line for line in out.splitlines() if not line.startswith('(')]  # drop the timing line


def test_demo_reports_every_method_with_its_nfe_and_is_deterministic(capsys, tmp_path):
    plot = tmp_path / 'demo.png'
    lines = run_demo(capsys, '--seed', '3', '--plot', str(plot))
    rows = {line[:20].strip(): line[20:].split() for line in lines if line[:20].strip() and line[20:27].strip()
            and line[20:27].strip().isdigit()}
    assert set(rows) == {'ideal (2nd draw)', 'weak alone', 'strong alone', 'W2SD (lambda=9)', 'strong, W2SD NFE',
                         'diff. guidance w=1'}
    nfe = {name: int(cols[0]) for name, cols in rows.items()}
    assert nfe['W2SD (lambda=9)'] == 10 + 2 * 9 == nfe['strong, W2SD NFE'] == nfe['diff. guidance w=1']
    assert nfe['strong alone'] == 10 == nfe['weak alone']
    assert float(rows['weak alone'][1]) == 0.0  # the weak model lacks the (-4,-4) mode
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert run_demo(capsys, '--seed', '3') == [line for line in lines if 'plot written' not in line]
    assert run_demo(capsys, '--seed', '4') != run_demo(capsys, '--seed', '3')


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(['demo', '--steps', '1'])
    assert 'must be an integer >= 2' in capsys.readouterr().err
