import sys

import pytest
import torch

# Two OpenMP threads on a loaded 2-core machine made tiny forward passes up to 1000x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _standalone_k_diffusion(request, monkeypatch):
    # Once the ComfyUI tests (COMFYUI_PATH set) have imported comfy.k_diffusion, the library resolves to that copy
    # in this process; every other test is about the standalone (PyPI or A1111-style) k_diffusion.
    if not request.module.__name__.startswith('test_comfyui'):
        monkeypatch.delitem(sys.modules, 'comfy.k_diffusion.sampling', raising=False)
