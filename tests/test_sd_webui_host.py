"""Every sampler of a real webui checkout (``SDWEBUI_PATH``: A1111 or Forge) against its W2SD twin, reflection off,
with the host's own k-diffusion copy and functions: bit for bit, or the refusal the docs list.

``SDWEBUI_PYTHON`` names the Python to run the host's code with (default: this one); A1111's k-diffusion copy
imports its training extras (clip, clean-fid, resize-right), so give the webui's venv there.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.environ.get('SDWEBUI_PATH')
pytestmark = pytest.mark.skipif(not ROOT, reason='SDWEBUI_PATH (an A1111 or Forge checkout) is not set')
CHECK = os.path.join(os.path.dirname(__file__), 'sdwebui_host_check.py')


@pytest.fixture(scope='module')
def report():
    out = subprocess.run([os.environ.get('SDWEBUI_PYTHON', sys.executable), CHECK, ROOT], capture_output=True,
                         text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_twin_off_is_the_hosts_sampler_bit_for_bit(report):
    twins = {label: r for label, r in report.items() if isinstance(r, dict) and 'off_vs_host' in r}
    assert {label: r['off_vs_host'] for label, r in twins.items()} == {label: 0.0 for label in twins}
    assert all(r['on_finite'] and r['on_vs_host'] > 1e-3 for r in twins.values())


def test_only_dpm_adaptive_is_refused(report):
    assert [label for label, r in report.items() if r is None] == ['DPM adaptive'] == list(report['_refused'])
    assert 'adaptive step size' in report['_refused']['DPM adaptive']
