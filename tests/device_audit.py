"""A test mode that flags every tensor the library creates off the sampling state's device or dtype.

Inside ``Audit(x, sigmas)`` the *default* device is ``meta`` and the default floating dtype float64, while x, the
schedule and the model live on the CPU in their own dtype (bfloat16, float16 or float32). A tensor made without
following x (``torch.tensor(...)``, ``torch.zeros(n)``, ``torch.linspace(...)`` with no ``device=`` / ``dtype=``)
therefore lands on meta or in float64, and a ``TorchDispatchMode`` records every op's output: its op, device,
dtype and shape. Allowed are tensors on x's device in x's dtype, and schedule values (at most ``len(sigmas)``
elements, 0-dim step sizes included) in the schedule's dtype, since the samplers keep sigmas at the schedule's
precision as k-diffusion does, and ``network_dtype`` where the code under test casts to the network's dtype
(the adapters), and with ``table_len`` 1-D float64 CPU tables of that many entries at most (the adapters build
their noise tables so, before sampling, as diffusers does). Anything else is a finding. ``syncs`` counts the values read back to the host
(``.item()``, ``float(t)``, ``bool(t)``): each one waits for the device on an accelerator.

The user's model is not the library's: ``audit.user(denoiser)`` runs a denoiser with recording paused and the
defaults back to the CPU and float32 (a diffusers UNet computes its time embedding in float32 by design), and
``audit.library(fn)`` resumes both for library code called from inside the model (LoRA branches, MoE gate hooks).
"""
import contextlib
import functools
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

IGNORED_OPS = {'aten._local_scalar_dense.default', 'aten.is_nonzero.default', 'aten.equal.default'}


def _frames():
    """The innermost stack frame outside torch and this file, as 'file:line function'."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if 'torch/' not in f.filename and not f.filename.endswith('device_audit.py'):
            return f'{f.filename.rpartition("/")[2]}:{f.lineno} {f.name}'
    return '?'


class Audit(TorchDispatchMode):
    def __init__(self, x, sigmas=None, network_dtype=None, table_len=0):
        super().__init__()
        self.device, self.dtype, self.network_dtype, self.table_len = x.device, x.dtype, network_dtype, table_len
        self.schedule_dtype = sigmas.dtype if sigmas is not None else x.dtype
        self.schedule_len = len(sigmas) if sigmas is not None else 1
        self.findings, self.seen, self.paused, self.syncs = [], 0, 0, 0

    def allowed(self, t):
        if t.device != self.device:
            return False
        if not t.is_floating_point() or t.dtype in (self.dtype, self.network_dtype):
            return True
        if t.dtype == torch.float64 and t.device.type == 'cpu' and t.ndim <= 1 and t.numel() <= self.table_len:
            return True
        return t.dtype == self.schedule_dtype and t.ndim <= 1 and t.numel() <= self.schedule_len

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and str(func) == 'aten._local_scalar_dense.default':
            self.syncs += 1                          # .item(), float(), bool(): a host sync on an accelerator
        if not self.paused and str(func) not in IGNORED_OPS:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.seen += 1
                    if not self.allowed(t):
                        self.findings.append((str(func), str(t.device), str(t.dtype).replace('torch.', ''),
                                              tuple(t.shape), _frames()))
        return out

    @contextlib.contextmanager
    def _defaults(self, device, dtype, pause):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        self.paused += pause
        try:
            with torch.device(device):
                yield
        finally:
            self.paused -= pause
            torch.set_default_dtype(old)

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._defaults('meta', torch.float64, 0))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def user(self, fn):
        """``fn`` (the user's model) run unrecorded, with the CPU and float32 as defaults."""
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self._defaults('cpu', torch.float32, 1):
                return fn(*args, **kwargs)
        return call

    def library(self, fn):
        """``fn`` (library code the model calls: hook functions) recorded again, with meta and float64 defaults."""
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self._defaults('meta', torch.float64, -1):
                return fn(*args, **kwargs)
        return call

    def report(self):
        """One line per distinct finding: op, device, dtype, shape, where."""
        return sorted({' '.join(map(str, f)) for f in self.findings})
