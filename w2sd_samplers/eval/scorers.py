"""Scorers: ``scorer.score(images, prompts) -> tensor`` of one value per image (higher is better).

Everything loads from local paths (nothing is downloaded); a missing file is a :class:`~w2sd_samplers.cli.UsageError`
naming ``--scorer`` and the file. Specs (``--scorer KIND:PATH[:PATH]``):

- ``clip:DIR``: CLIP score, ``max(100 cos(image, prompt), 0)`` (torchmetrics' definition) with a transformers CLIP
  folder (``CLIPModel`` + ``CLIPProcessor`` ``save_pretrained``; safetensors weights).
- ``pickscore:DIR``: PickScore (Kirstain et al. 2023), a fine-tuned CLIP: ``logit_scale * cos(image, prompt)``.
- ``aesthetic:CLIP_DIR:MLP.safetensors``: the LAION aesthetic predictor, an MLP on L2-normalised CLIP image
  embeddings (``layers.N.weight`` / ``layers.N.bias`` Linear layers; other indices are dropout).
- ``hpsv2:CHECKPOINT`` and ``imagereward:CHECKPOINT[:MED_CONFIG]``: through the ``hpsv2`` / ``image-reward``
  packages (their own checkpoint formats and loaders; set HF_HUB_OFFLINE=1 so their code downloads nothing).
"""
import importlib
import os

import torch

from ..errors import UsageError

KINDS = ('clip', 'pickscore', 'aesthetic', 'hpsv2', 'imagereward')
# What each scorer measures. Alignment: does the image show the prompt (CLIP similarity, not trained on human
# judgements). Preference: trained on human choices between images of one prompt (PickScore on Pick-a-Pic, HPSv2 on
# HPD v2, ImageReward on its 137k expert comparisons), so it mixes alignment with quality and taste. Aesthetic: a
# regressor on human aesthetic ratings of images alone; it ignores the prompt.
ROLES = {'clip': 'alignment', 'pickscore': 'preference', 'hpsv2': 'preference', 'imagereward': 'preference',
         'aesthetic': 'aesthetic (ignores the prompt)'}


def _need(spec, path):
    if not os.path.exists(path):
        raise UsageError(f'--scorer {spec}: {path} does not exist')
    return path


def check(spec):
    """``(kind, paths)`` of a scorer spec; every named file must exist. Loads nothing."""
    kind, _, rest = spec.partition(':')
    if kind not in KINDS:
        raise UsageError(f'--scorer {spec}: unknown scorer {kind!r}; choose from {", ".join(KINDS)} (KIND:PATH)')
    paths = rest.split(':') if rest else []
    wanted = {'aesthetic': (2, 2), 'imagereward': (1, 2)}.get(kind, (1, 1))
    if not wanted[0] <= len(paths) <= wanted[1]:
        usage = {'aesthetic': 'aesthetic:CLIP_DIR:MLP.safetensors',
                 'imagereward': 'imagereward:CHECKPOINT[:MED_CONFIG]'}.get(kind, f'{kind}:PATH')
        raise UsageError(f'--scorer {spec}: expected {usage}')
    if kind in ('clip', 'pickscore', 'aesthetic'):
        for name in ('config.json', 'model.safetensors'):
            _need(spec, os.path.join(paths[0], name))
        _check_clip_folder(spec, paths[0])
    for p in paths[1:] if kind in ('clip', 'pickscore', 'aesthetic') else paths:
        _need(spec, p)
    if kind == 'aesthetic' and not paths[1].endswith('.safetensors'):
        raise UsageError(f'--scorer {spec}: the aesthetic MLP must be a .safetensors file')
    return kind, paths


def load(spec, device):
    """The scorer of ``spec`` (see the module docstring) on ``device``."""
    kind, paths = check(spec)
    if kind in ('hpsv2', 'imagereward'):
        return _PackageScorer(spec, kind, paths, device)
    model, processor = _clip(spec, paths[0], device)
    if kind == 'aesthetic':
        return _Aesthetic(model, processor, _mlp(spec, paths[1], model.config.projection_dim).to(device))
    return _CLIPSimilarity(model, processor, kind)


def _check_clip_folder(spec, folder):
    """A CLIP model (both towers) with its processor, read from config.json before anything is loaded."""
    import json
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != 'clip':
        raise UsageError(f'--scorer {spec}: {folder} holds a {model_type or "non-transformers"} model, not a CLIP '
                         'model with image and text towers (CLIPModel.save_pretrained)')
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ('processor_config.json',
                                                                  'preprocessor_config.json')):
        raise UsageError(f'--scorer {spec}: {folder} has no CLIP processor (processor_config.json); save one into '
                         'it with CLIPProcessor.save_pretrained')


def _clip(spec, folder, device):
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()      # its load reports would bury the one-line error
    try:
        model, info = transformers.CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                             output_loading_info=True)
        processor = transformers.CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f'--scorer {spec}: {folder} is not a transformers CLIP folder with its processor '
                         f'({str(e).splitlines()[0]})') from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info['missing_keys']:
        raise UsageError(f'--scorer {spec}: {folder} lacks {len(info["missing_keys"])} of the CLIP model\'s weights '
                         f'(e.g. {sorted(info["missing_keys"])[0]}); it would score with random weights')
    return model.eval().to(device), processor


def _pixels(processor, images, device):
    return processor(images=images, return_tensors='pt')['pixel_values'].to(device)


def _image_embeds(model, pixels):
    embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return embeds / embeds.norm(dim=-1, keepdim=True)


class _CLIPSimilarity:
    def __init__(self, model, processor, kind):
        self.model, self.processor, self.kind = model, processor, kind

    @torch.no_grad()
    def score(self, images, prompts):
        device = self.model.device
        text = self.processor(text=list(prompts), return_tensors='pt', padding=True, truncation=True)
        out = self.model(input_ids=text['input_ids'].to(device), attention_mask=text['attention_mask'].to(device),
                         pixel_values=_pixels(self.processor, images, device))
        cos = (out.image_embeds * out.text_embeds).sum(-1)           # both come normalised
        if self.kind == 'clip':
            return (100 * cos).clamp(min=0).float().cpu()
        return (self.model.logit_scale.exp() * cos).float().cpu()


def _mlp(spec, path, dim):
    from safetensors.torch import load_file
    state = load_file(path)
    idx = sorted({int(k.split('.')[1]) for k in state if k.startswith('layers.') and k.endswith('.weight')})
    if not idx or any(f'layers.{i}.bias' not in state for i in idx):
        raise UsageError(f'--scorer {spec}: {path} holds no layers.N.weight / layers.N.bias MLP weights')
    layers = [torch.nn.Identity() for _ in range(idx[-1] + 1)]
    for i in idx:
        out_f, in_f = state[f'layers.{i}.weight'].shape
        layers[i] = torch.nn.Linear(in_f, out_f)
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(*layers)
    if layers[idx[0]].in_features != dim or layers[idx[-1]].out_features != 1:
        raise UsageError(f'--scorer {spec}: the MLP maps {layers[idx[0]].in_features} -> '
                         f'{layers[idx[-1]].out_features} features; it must map the CLIP embedding ({dim}) -> 1')
    mlp.load_state_dict(state)
    return mlp.layers.eval()


class _Aesthetic:
    def __init__(self, model, processor, mlp):
        self.model, self.processor, self.mlp = model, processor, mlp

    @torch.no_grad()
    def score(self, images, prompts):
        embeds = _image_embeds(self.model, _pixels(self.processor, images, self.model.device))
        return self.mlp(embeds).squeeze(-1).float().cpu()


class _PackageScorer:
    """HPSv2 / ImageReward through their own packages (imported only when asked for)."""
    PACKAGES = {'hpsv2': ('hpsv2', 'hpsv2'), 'imagereward': ('ImageReward', 'image-reward')}

    def __init__(self, spec, kind, paths, device):
        module, pip = self.PACKAGES[kind]
        try:
            self.lib = importlib.import_module(module)
        except ImportError:
            raise UsageError(f'--scorer {spec}: needs the {pip} package (pip install {pip})') from None
        self.kind, self.paths = kind, paths
        if kind == 'imagereward':
            options = {'med_config': paths[1]} if len(paths) > 1 else {}
            self.model = self.lib.load(paths[0], device=device, **options)

    @torch.no_grad()
    def score(self, images, prompts):
        if self.kind == 'hpsv2':
            values = [self.lib.score([im], p, cp=self.paths[0], hps_version='v2.1')[0]
                      for im, p in zip(images, prompts)]
        else:
            values = [self.model.score(p, [im]) for im, p in zip(images, prompts)]
        return torch.tensor([float(v) for v in values])


def fid(reference_dir, features_dir, method_images, size):
    """FID of each method's images (``{method: [PIL images]}``) against the PNG/JPEG images of ``reference_dir``,
    with torchmetrics on the image embeddings of the CLIP folder ``features_dir`` (a user-chosen feature space)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    refs = reference_images(reference_dir, size)
    model, processor = _clip(f'--fid-features {features_dir}', features_dir, 'cpu')

    class Features(torch.nn.Module):
        num_features = model.config.projection_dim

        def forward(self, imgs):
            return _image_embeds(model, _pixels(processor, list(imgs), 'cpu')).double()

    def batch(images):
        import numpy as np
        return torch.from_numpy(np.stack([np.asarray(im.convert('RGB')) for im in images])).permute(0, 3, 1, 2)

    out = {}
    for method, images in method_images.items():
        metric = FrechetInceptionDistance(feature=Features())
        metric.update(batch(refs), real=True)
        metric.update(batch(images), real=False)
        out[method] = float(metric.compute())
    return out


def reference_images(folder, size):
    """The images of ``folder``, all of ``size`` (width, height); a UsageError naming --fid otherwise."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise UsageError(f'--fid {folder}: not a folder of reference images')
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
    if len(names) < 2:
        raise UsageError(f'--fid {folder}: needs at least 2 reference images (.png/.jpg/.webp)')
    images = []
    for n in names:
        with Image.open(os.path.join(folder, n)) as im:
            if im.size != tuple(size):
                raise UsageError(f'--fid {folder}: {n} is {im.size[0]}x{im.size[1]}, the generated images are '
                                 f'{size[0]}x{size[1]}; resize the reference images to the generated size')
            images.append(im.convert('RGB'))
    return images


def unscorable(image, latents):
    """Why ``image`` must not be scored, or None: a scorer gives a black or NaN-born image a number like any other
    (CLIP even rates it above real images), which would count a failed sample as a result."""
    import torch
    if not torch.isfinite(latents).all():
        return 'the sampler produced NaN or inf latents'
    if max(hi for _, hi in image.getextrema()) == 0:
        return 'the image is black'
    return None
