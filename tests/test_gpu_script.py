"""benchmarks/gpu/run.sh --tiny: the GPU script run on the CPU at tiny size, so that it cannot rot before a GPU runs
it (about two minutes here)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip('diffusers')
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_script_runs_tiny_on_the_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / 'results.md'
    env = {**os.environ, 'PYTHON': sys.executable, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    run = subprocess.run(['bash', str(ROOT / 'benchmarks/gpu/run.sh'), '--tiny', str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    text = out.read_text()
    assert run.returncode == 0, text + run.stderr[-2000:]
    assert 'FAILED' not in text and 'skipped' not in text
    assert '## device and dtype tests on cpu (float16 and bfloat16): ok' in text and '1 passed' in text
    assert '## w2sd bench overhead --unet tiny --device cpu --dtype float32 --quick: ok' in text
    assert '## Overhead (tiny UNet, cpu, float32)' in text
    for leg in ('eager', 'torch.compile (eager)'):
        table = text.split(f'### tiny, batch 1, {leg}')[1].split('###')[0]
        rows = re.findall(r'^\| (plain|autoguidance|w2sd [^|]+) \| (\d+) \| (\d+) \|', table, re.M)
        # Euler T=2, lambda=1, CFG 5.5 main step (2 rows), legs at CFG 1 (1 row each): counted, not timed
        assert rows == [('plain', '4', '2'), ('autoguidance', '6', '2'), ('w2sd paper', '6', '4'),
                        ('w2sd anchored, separate legs', '6', '4'), ('w2sd anchored, batched legs', '6', '3')]
        graphs = int(re.search(r'graphs compiled: (\d+); graph breaks so far: 0', table)[1])
        assert (graphs > 0) == (leg != 'eager')
