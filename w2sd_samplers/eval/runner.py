"""Running settings on (prompt, seed) items of one pipeline pair, and writing a scored row per image.

Every setting of an item starts from the item's initial noise (``PipelinePair.sample`` with the seed); a row holds
the counted NFE, the seconds of sampling and decoding, the scores, or an ``error`` instead of scores when the image
is unscorable (:func:`~.scorers.unscorable`).
"""
import contextlib
import hashlib
import itertools
import time

import torch

from ..generate import pipeline_pair
from ..nfe import CallCounter
from . import methods as M
from .scorers import unscorable


@contextlib.contextmanager
def planner(pipe, prompt, pair_options, sampler, schedule, budget):
    """A context giving ``plan(method, params) -> steps or None``: the largest step count whose counted NFE fits
    ``budget`` (None: within it the method reflects or guides no step), on the pair of ``prompt`` (built and encoded
    once). Raises the pair's ValueError."""
    with pipeline_pair(pipe, prompt, **pair_options) as pair:
        yield lambda method, params: M.choose_steps(method, M.roles_for(method, pair),
                                                    lambda n: pair.sigmas(n, schedule), budget, sampler, params)


def image_name(stage, prompt_index, seed, name):
    tag = name if stage == 'eval' else hashlib.sha256(name.encode()).hexdigest()[:10]
    return f'{stage}-p{prompt_index:04d}-s{seed}-{tag}.png'


@torch.no_grad()
def work(writer, images, pipe, pair_options, prompts, units, settings, sampler, schedule, scorers, stage, bar=None):
    """Run each unit ``(prompt index, seed, name)`` (``prompts[index]``, ``settings[name]``, a Setting); each row
    goes to ``writer`` as soon as it is scored, each image into the ``images`` folder. Returns the seconds spent
    scoring."""
    scoring = 0.
    for (pi, seed), group in itertools.groupby(units, key=lambda u: u[:2]):
        with pipeline_pair(pipe, prompts[pi], **pair_options) as pair:      # the prompt encoded once per item
            for _, _, name in group:
                s = settings[name]
                counter = CallCounter()
                roles = M.counted(M.roles_for(s.method, pair), counter)
                start = time.perf_counter()
                latents = pair.sample(lambda x, sigmas: M.run(s.method, roles, x, sigmas, sampler, s.options),
                                      pair.sigmas(s.steps, schedule), seed)
                image = pair.decode(latents)[0]
                seconds = time.perf_counter() - start
                file = image_name(stage, pi, seed, name)
                image.save(images / file)
                row = dict(prompt_index=pi, seed=seed, method=name, stage=stage, prompt=prompts[pi],
                           setting=s.label(), params=s.options, steps=s.steps, nfe=counter.total,
                           nfe_roles=dict(counter.counts), seconds=seconds, image=f'images/{file}')
                problem = unscorable(image, latents)
                start = time.perf_counter()
                row['scores'] = None if problem else {k: float(sc.score([image], [prompts[pi]])[0])
                                                      for k, sc in scorers.items()}
                scoring += time.perf_counter() - start
                if problem:
                    row['error'] = f'not scored: {problem}'
                writer.write(row)
                if bar is not None:
                    bar.update()
    return scoring
