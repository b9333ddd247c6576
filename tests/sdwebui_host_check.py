"""Runs every sampler of a webui checkout's ``samplers_k_diffusion`` table against its W2SD twin, reflection off,
on the same denoiser and noise, and prints one JSON object ``{label: max |twin - host|, ...}`` (``null`` for a
sampler without a twin) plus ``"_refused"``.

Run by ``test_sd_webui_host.py`` in a subprocess, because the host's ``k_diffusion`` must be imported under that
name: ``python tests/sdwebui_host_check.py SDWEBUI_PATH``. The host's functions come from its own files: the table
from ``modules/sd_samplers_kdiffusion.py`` (read with ``ast``, nothing of ``modules`` is imported but
``sd_samplers_extra``), the samplers from its k-diffusion copy.
"""
import ast
import importlib.util
import json
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def host_table(root):
    with open(os.path.join(root, 'modules', 'sd_samplers_kdiffusion.py')) as f:
        tree = ast.parse(f.read())
    node = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], 'id', None) == 'samplers_k_diffusion')
    # A1111's Restart is a function in the table (sd_samplers_extra.restart_sampler): keep its name
    return [(ast.literal_eval(label), ast.literal_eval(func) if isinstance(func, ast.Constant) else func.attr,
             ast.literal_eval(aliases), ast.literal_eval(options)) for label, func, aliases, options in
            (e.elts for e in node.elts)]


def import_host(root):
    forge = os.path.isdir(os.path.join(root, 'modules_forge'))
    sys.path[:0] = [root if forge else os.path.join(root, 'repositories', 'k-diffusion'),
                    os.path.join(HERE, '..'), os.path.join(HERE, '..', 'wrappers', 'sd_webui')]
    if forge:  # Forge's sampling.py checks for flow models through its backend; none here
        stub = types.ModuleType('backend.modules.k_prediction')
        stub.PredictionFlux = type('PredictionFlux', (), {})
        for name in ('backend', 'backend.modules'):
            sys.modules[name] = types.ModuleType(name)
        sys.modules['backend.modules.k_prediction'] = stub
    import k_diffusion.sampling as K
    spec = importlib.util.spec_from_file_location('sd_samplers_extra',
                                                  os.path.join(root, 'modules', 'sd_samplers_extra.py'))
    extra = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra)
    return K, extra


class Denoiser:
    """The exact denoiser of a two-Gaussian mixture, with the ``inner_model.predictor`` Forge's samplers look at."""
    inner_model = types.SimpleNamespace(predictor=None)

    def __call__(self, x, sigma, **kwargs):
        s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
        means = torch.tensor([-2., 2.])
        var = 0.25 + s2[..., None]
        post = torch.softmax(-(x[..., None] - means) ** 2 / (2 * var), -1)
        return (post * (0.25 * x[..., None] + s2[..., None] * means) / var).sum(-1)


def run(K, fn, options, sigmas, x, w2sd):
    """``fn`` called as the webui's ``KDiffusionSampler.sample`` calls it (kwargs chosen by signature)."""
    import inspect
    parameters = inspect.signature(fn).parameters
    kwargs = dict(w2sd)
    if 'n' in parameters:
        kwargs.update(n=len(sigmas) - 1, sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]))
    if 'sigmas' in parameters:
        kwargs['sigmas'] = sigmas
    if 'eta' in parameters:
        kwargs['eta'] = 1.0  # A1111's and Forge's default "Eta for ancestral samplers"
    if options.get('brownian_noise'):
        kwargs['noise_sampler'] = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[0])
    if options.get('solver_type') == 'heun':
        kwargs['solver_type'] = 'heun'
    torch.manual_seed(0)  # default noise samplers and A1111's restart noise draw from the global generator
    return fn(Denoiser(), x * sigmas[0], extra_args={}, disable=True, **kwargs)


def main(root):
    K, extra = import_host(root)
    from w2sd_sdwebui import registry
    from w2sd_samplers import _kdiff
    assert _kdiff.sampling() is K
    table = host_table(root)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = {'_refused': registry.refusals(table)}
    for label, name, _, options in table:
        twin = registry.twin(name)
        if twin is None:
            result[label] = None
            continue
        host_fn = getattr(extra, name) if name == 'restart_sampler' else getattr(K, name)
        steps = 24 if name == 'restart_sampler' else 12  # Restart plans its own restarts from 20 steps on
        sigmas = K.get_sigmas_karras(steps, 0.0292, 14.6146)
        if options.get('discard_next_to_last_sigma'):
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        host = run(K, host_fn, options, sigmas, x, {})
        off = run(K, twin, options, sigmas, x, {'weak': Denoiser(), 'lam': 0})
        on = run(K, twin, options, sigmas, x, {'weak': lambda x, s: 0.5 * Denoiser()(x, s)})
        result[label] = {'off_vs_host': float((off - host).abs().max()), 'on_vs_host': float((on - host).abs().max()),
                         'on_finite': bool(torch.isfinite(on).all())}
    print(json.dumps(result))


if __name__ == '__main__':
    main(os.path.abspath(sys.argv[1]))
