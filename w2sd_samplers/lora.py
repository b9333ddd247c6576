"""Switchable LoRA side branches read from safetensors: kohya/A1111 (LoCon included), LyCORIS LoHa/LoKr, PEFT.

W2SD's LoRA pair is one model at several LoRA scales (paper: main and strong 0.8, weak -1.5), so the scale changes
on every denoiser call. The LoRA is therefore attached as forward hooks that add ``scale * delta(input)`` to each
target layer's output; base weights are never written, so they stay bit-identical whatever happens, and scale 0
skips the branches (the output is the base model's, bit for bit). Plain LoRA/LoCon runs as two skinny layers
(``up(down(x))``); LoHa, LoKr and Tucker LoCon have no cheap factored form and run with their full delta weight.

The scale is part of the call, not of the model: the hooks read it from a context variable, local to the calling
thread or asyncio task, that :func:`scaled` / :meth:`SwitchableLoRA.run` set in a fresh copy of the context for
the call's duration. Two threads on one model never see each other's scale, and there is nothing to restore after
an exception or interrupt. A scale may be given per batch row (a list or 1-D tensor), so that legs at different
scales run as one batched forward; each target layer then sees its batch rows as contiguous blocks of the leading
dimension (``[B, ...]``, ``[B * frames, ...]``, ``[B * tokens, ...]``), as diffusers UNets and transformers do.

Adapters that are not additive in the scale (DoRA, OFT, GLoRA, ...) are rejected: a negative scale means nothing
for them.
"""
import contextvars
import json
import math
import os
import re

import torch
import torch.nn.functional as F

from .reflect import finite_number

PEFT_CONFIG_FILE = 'adapter_config.json'
PEFT_WEIGHTS_FILE = 'adapter_model.safetensors'

# kohya per-module keys are '<flattened module name>.<suffix>'.
KOHYA_SUFFIXES = ('lora_down.weight', 'lora_up.weight', 'lora_mid.weight', 'alpha',
                  'hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1', 'hada_t2',
                  'lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b', 'lokr_t2')
KOHYA_PREFIXES = ('lora_unet_', 'lora_te1_', 'lora_te2_', 'lora_te_', 'lora_transformer_', 'lora_')
# Leading components of PEFT/diffusers module paths that name the model inside a pipeline or PEFT wrapper.
PEFT_PREFIXES = ('base_model.model.', 'unet.', 'transformer.', 'text_encoder.', 'text_encoder_2.')

_PEFT_KEY = re.compile(r'(.+)\.lora_([AB])(?:\.[^.]+)?\.weight')  # optional adapter name: lora_A.default.weight
_LEGACY_ATTN_KEY = re.compile(r'(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight')
_LEGACY_LINEAR_KEY = re.compile(r'(.+)\.lora_linear_layer\.(down|up)\.weight')
_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
# {SwitchableLoRA: scale} of the current call; a fresh copy of the context per call keeps it thread/task local.
_SCALES = contextvars.ContextVar('w2sd_lora_scales', default={})


class LoRAFile:
    """The tensors of one LoRA file and its PEFT/diffusers config (``lora_alpha``, ``r``, patterns), if any."""

    def __init__(self, tensors, peft_config=None, source='the LoRA state dict'):
        bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f'a LoRA state dict maps str keys to tensors; bad entries: {bad[:5]}')
        if peft_config is not None and not isinstance(peft_config, dict):
            raise ValueError(f'{source}: the PEFT config must be a JSON object, got {type(peft_config).__name__}')
        self.tensors = dict(tensors)
        self.peft_config = peft_config
        self.source = source

    def __repr__(self):
        return f'LoRAFile({len(self.tensors)} tensors)'


def load_lora(path_or_state_dict):
    """Read a LoRA from a safetensors file, a PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``)
    or a state dict; returns a :class:`LoRAFile`. Pickled checkpoints are refused, never unpickled."""
    if isinstance(path_or_state_dict, LoRAFile):
        return path_or_state_dict
    if isinstance(path_or_state_dict, dict):
        return LoRAFile(path_or_state_dict)
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError(f'load_lora takes a path, a state dict or a LoRAFile, not {type(path_or_state_dict).__name__}')
    import safetensors
    path, config = os.fspath(path_or_state_dict), None
    if os.path.isdir(path):
        config_path = os.path.join(path, PEFT_CONFIG_FILE)
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = _json(config_path, f.read())
        path = os.path.join(path, PEFT_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no LoRA file at {path}')
    try:
        with safetensors.safe_open(path, 'pt') as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except safetensors.SafetensorError as e:
        raise ValueError(f'{path} is not a valid safetensors file ({e}). LoRAs are read from safetensors only; '
                         'pickled checkpoints (.ckpt, .pt, .bin) are never unpickled: convert them to '
                         'safetensors first') from None
    if config is None and metadata.get('lora_adapter_metadata'):
        config = _json(f"{path} (header key 'lora_adapter_metadata')", metadata['lora_adapter_metadata'])
    return LoRAFile(tensors, config, path)


def _json(where, text):
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ValueError(f'{where}: malformed PEFT config, not valid JSON ({e})') from None
    if not isinstance(config, dict):
        raise ValueError(f'{where}: the PEFT config must be a JSON object, got {type(config).__name__}')
    return config


def sgm_names(unet):
    """``{diffusers module name: SGM/LDM name}`` for a diffusers UNet2DConditionModel-layout module.

    SDXL kohya LoRAs name modules by the original SGM layout (``input_blocks.4.1...``); SD1 kohya LoRAs use the
    diffusers names. Inside attention blocks both layouts use the same names.
    """
    resnet = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1',
              'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection'}
    blocks = {'conv_in': 'input_blocks.0.0', 'time_embedding.linear_1': 'time_embed.0',
              'time_embedding.linear_2': 'time_embed.2', 'add_embedding.linear_1': 'label_emb.0.0',
              'add_embedding.linear_2': 'label_emb.0.2', 'conv_norm_out': 'out.0', 'conv_out': 'out.2',
              'mid_block.resnets.0': 'middle_block.0', 'mid_block.attentions.0': 'middle_block.1',
              'mid_block.resnets.1': 'middle_block.2'}
    i = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks[f'down_blocks.{b}.resnets.{j}'] = f'input_blocks.{i + j}.0'
            blocks[f'down_blocks.{b}.attentions.{j}'] = f'input_blocks.{i + j}.1'
        i += len(block.resnets)
        if getattr(block, 'downsamplers', None):
            blocks[f'down_blocks.{b}.downsamplers.0.conv'] = f'input_blocks.{i}.0.op'
            i += 1
    i = 0
    for b, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            blocks[f'up_blocks.{b}.resnets.{j}'] = f'output_blocks.{i + j}.0'
            blocks[f'up_blocks.{b}.attentions.{j}'] = f'output_blocks.{i + j}.1'
        i += len(block.resnets)
        if getattr(block, 'upsamplers', None):
            blocks[f'up_blocks.{b}.upsamplers.0.conv'] = \
                f'output_blocks.{i - 1}.{2 if getattr(block, "attentions", None) else 1}.conv'
    names = {}
    for name, _ in unet.named_modules():
        # The longest diffusers block path that prefixes the name decides its SGM spelling.
        parts = name.split('.')
        for cut in range(len(parts), 0, -1):
            head = '.'.join(parts[:cut])
            if head in blocks:
                tail = parts[cut:]
                if '.resnets.' in head and tail and tail[0] in resnet:
                    tail = [resnet[tail[0]]] + tail[1:]
                names[name] = '.'.join([blocks[head]] + tail)
                break
    return names


def _split_key(key):
    """(module key, kind, part) of one LoRA tensor key; kind is 'kohya', 'peft' or None (unsupported)."""
    m = _PEFT_KEY.fullmatch(key)
    if m:
        return m[1], 'peft', {'A': 'lora_down.weight', 'B': 'lora_up.weight'}[m[2]]
    m = _LEGACY_ATTN_KEY.fullmatch(key)
    if m:
        return f'{m[1]}.{"to_out.0" if m[2] == "to_out" else m[2]}', 'peft', f'lora_{m[3]}.weight'
    m = _LEGACY_LINEAR_KEY.fullmatch(key)
    if m:
        return m[1], 'peft', f'lora_{m[2]}.weight'
    module_key, _, suffix = key.partition('.')
    return module_key, ('kohya' if suffix in KOHYA_SUFFIXES else None), suffix


def _module_table(module):
    """Every spelling of every target layer's name a LoRA key may use -> qualified module name."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, _LAYERS)}
    table = {}
    if all(hasattr(module, a) for a in ('down_blocks', 'up_blocks', 'mid_block')):
        table.update({sgm.replace('.', '_'): name for name, sgm in sgm_names(module).items() if name in layers})
    for name in layers:
        table[name] = name
        table[name.replace('.', '_')] = name
    return layers, table


def _lookup(module_key, kind, table):
    if kind == 'peft':
        candidates = [module_key] + [module_key[len(p):] for p in PEFT_PREFIXES if module_key.startswith(p)]
    else:
        candidates = [module_key] + [module_key[len(p):] for p in KOHYA_PREFIXES if module_key.startswith(p)]
    return next((table[c] for c in candidates if c in table), None)


def _peft_alpha(config, module_key, rank):
    """alpha / r for a PEFT module from its adapter config (diffusers stores it flat as 'unet.lora_alpha')."""
    if not config:
        return 1.
    for p in sorted({k.rpartition('.')[0] for k in config if k.endswith('.lora_alpha')}, key=len, reverse=True):
        if module_key.startswith(p + '.'):
            config = {k[len(p) + 1:]: v for k, v in config.items() if k.startswith(p + '.')}
            break
    alpha = config.get('lora_alpha', rank)
    patterns = config.get('alpha_pattern') or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"the PEFT config's alpha_pattern must map patterns to numbers, got {patterns!r}")
    for pattern, value in patterns.items():
        if re.fullmatch(rf'(.*\.)?(?:{pattern})', module_key):
            alpha = value
    if not finite_number(alpha):
        raise ValueError(f"the PEFT config's lora_alpha (or alpha_pattern entry) must be a finite number, "
                         f'got {alpha!r}')
    return alpha / (math.sqrt(rank) if config.get('use_rslora') else rank)


def _check_parts(parts):
    empty = sorted(k for k, v in parts.items() if v.numel() == 0)
    if empty:
        raise ValueError(f'the tensors {empty} are empty (rank 0): a LoRA needs rank >= 1')
    bad = sorted(k for k, v in parts.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ValueError(f'the tensors {bad} hold inf or nan values')


def _mm(a, b):
    return a.flatten(1) @ b.flatten(1)


def _tucker(t, wa, wb):
    # LyCORIS CP/Tucker factor: delta[p, r, k, l] = sum_ij t[i, j, k, l] wb[j, r] wa[i, p].
    return torch.einsum('ijkl,jr,ip->prkl', t, wb.flatten(1), wa.flatten(1))


def _full_delta(family, parts, weight, factor):
    """Full delta weight (float32, scale factor folded in) of one module's adapter, shaped like weight."""
    p = {k: v.float() for k, v in parts.items()}
    if family == 'lora':
        up, down = p['lora_up.weight'].flatten(1), p['lora_down.weight'].flatten(1)
        delta = up @ down if 'lora_mid.weight' not in p else \
            torch.einsum('or,rskl,si->oikl', up, p['lora_mid.weight'], down)
    elif family == 'hada':
        factor = p['alpha'].item() / p['hada_w1_b'].shape[0] if 'alpha' in p else 1.
        if 'hada_t1' in p:
            delta = _tucker(p['hada_t1'], p['hada_w1_a'], p['hada_w1_b']) * \
                _tucker(p['hada_t2'], p['hada_w2_a'], p['hada_w2_b'])
        else:
            delta = _mm(p['hada_w1_a'], p['hada_w1_b']) * _mm(p['hada_w2_a'], p['hada_w2_b'])
    else:
        # LoKr: alpha / rank applies only when a factor is low-rank (the w2 rank wins), else the factor is 1.
        rank = None
        w1 = p.get('lokr_w1')
        if w1 is None:
            rank = p['lokr_w1_b'].shape[0]
            w1 = _mm(p['lokr_w1_a'], p['lokr_w1_b'])
        w2 = p.get('lokr_w2')
        if w2 is None:
            rank = p['lokr_w2_b'].shape[0]
            w2 = _tucker(p['lokr_t2'], p['lokr_w2_a'], p['lokr_w2_b']) if 'lokr_t2' in p else \
                _mm(p['lokr_w2_a'], p['lokr_w2_b'])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1.contiguous(), w2.contiguous())
        factor = p['alpha'].item() / rank if rank is not None and 'alpha' in p else 1.
    if delta.numel() != weight.numel():
        raise ValueError(f'its delta has shape {tuple(delta.shape)}, which does not fit the layer weight of shape '
                         f'{tuple(weight.shape)}')
    return delta.reshape(weight.shape) * factor


def check_scale(name, scale):
    """``scale`` as a float, or a TypeError naming the argument ``name``."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if not finite_number(scale):
        raise TypeError(f'{name} must be a finite number, got {scale!r}')
    return float(scale)


class Scope:
    """``with Scope(entry, attributes):`` inside the block, the dict in the context variable of ``entry = (var,
    key, value)`` maps key to value (this thread/task only) and each ``(obj, name, value)`` of ``attributes`` is
    set; on exit both are as they were, whatever interrupts entry, block or exit.

    Every change is made inside the region whose exit undoes it, and the undo, safe to repeat, runs a second time
    when something (a KeyboardInterrupt) cuts the first pass short. ``result`` is what ``with ... as`` gets.
    """

    def __init__(self, entry=None, attributes=(), result=None):
        self._entry, self._attributes, self._result = entry, attributes, result
        self._token, self._saved = None, []

    def __enter__(self):
        if self._token is not None or self._saved:
            raise RuntimeError('this scope is already entered; make a new one for a nested block')
        try:
            for obj, name, value in self._attributes:
                self._saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, value)
            if self._entry is not None:
                var, key, value = self._entry
                self._token = var.set({**var.get(), key: value})
            return self._result
        except BaseException:
            self.__exit__()
            raise

    # Some statements share a line below: an interrupt (a signal, a tracer) lands where a new line starts, and a
    # 'try:' or a with-exit on a line of its own starts one outside the protection. That closes every such point
    # on CPython 3.11+; on 3.10, whose try costs an instruction of its own line, the exit's first line remains one.
    def __exit__(self, *exc):
        try: self._undo()  # noqa: E701
        finally: self._undo()  # noqa: E701

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` inside the scope."""
        with self: return fn(*args, **kwargs)  # noqa: E701

    def _undo(self):
        if self._token is not None:
            self._token = self._entry[0].reset(self._token)  # reset returns None: the token is spent and cleared
        while self._saved:
            obj, name, value = self._saved[-1]
            setattr(obj, name, value)
            self._saved.pop()  # after the setattr: an interrupt between the two repeats the setattr, harmlessly


def call_in_context(var, key, value, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a copy of the current context where ``var``'s dict maps ``key`` to ``value``:
    nothing to reset afterwards, whatever interrupts the call."""
    def call():
        var.set({**var.get(), key: value})
        return fn(*args, **kwargs)
    return contextvars.copy_context().run(call)


def _row_scales(scale):
    """A number, or a float32 tensor of per-row scales."""
    if isinstance(scale, (list, tuple)) or (isinstance(scale, torch.Tensor) and scale.ndim == 1):
        rows = torch.as_tensor(scale, dtype=torch.float32)
        if not torch.isfinite(rows).all():
            raise TypeError(f'scale must hold finite numbers, got {scale!r}')
        return rows
    return check_scale('scale', scale)


def _per_row(scale, y):
    """``scale`` shaped to multiply ``y``: per-row scales repeated over the blocks of y's leading dimension."""
    if not isinstance(scale, torch.Tensor):
        return scale
    if y.shape[0] % len(scale):
        raise ValueError(f'per-row LoRA scales for {len(scale)} rows do not fit a layer input of batch {y.shape[0]}')
    return scale.to(y).repeat_interleave(y.shape[0] // len(scale)).reshape(-1, *[1] * (y.dim() - 1))


class _Branch:
    """One target layer's side branch: ``layer(x) + scale * delta(x)``, delta linear in x.

    ``factor`` is the LoRA's alpha / rank where the file's config gives it (PEFT); kohya files carry it per module.
    """

    def __init__(self, owner, layer, parts, factor=None):
        self.owner, self.layer = owner, layer
        w = layer.weight
        self.conv = None if isinstance(layer, torch.nn.Linear) else getattr(F, f'conv{w.dim() - 2}d')
        if self.conv is not None and layer.padding_mode != 'zeros':
            raise ValueError(f'padding_mode {layer.padding_mode!r} is not supported')
        families = {k.partition('_')[0] for k in parts if k != 'alpha'}  # lora, hada (LoHa) or lokr
        if len(families) != 1:
            raise ValueError(f'expected the tensors of one adapter kind, got {sorted(parts)}')
        family = families.pop()
        if family == 'lora':
            down, up = parts['lora_down.weight'], parts['lora_up.weight']
            rank = down.shape[0]
            if factor is None:
                factor = parts['alpha'].item() / rank if 'alpha' in parts else 1.
        self.down = self.up = self.delta = None
        if family == 'lora' and 'lora_mid.weight' not in parts and (self.conv is None or layer.groups == 1):
            # Plain LoRA/LoCon: two skinny layers, the down one with the target's stride/padding/dilation.
            if up.shape[0] != w.shape[0] or up[0].numel() != rank or down[0].numel() != w[0].numel():
                raise ValueError(f'down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer weight '
                                 f'of shape {tuple(w.shape)}')
            self.down = down.reshape(rank, *w.shape[1:]).to(w)
            self.up = (up.reshape(w.shape[0], rank, *[1] * (w.dim() - 2)).float() * factor).to(w)
        else:
            self.delta = _full_delta(family, parts, w, factor).to(w)

    def hook(self, layer, args, kwargs, output):
        scale = self.owner.current_scale
        if not isinstance(scale, torch.Tensor) and scale == 0:
            return output
        x, c = args[0] if args else kwargs['input'], self.layer  # some models pass the input by keyword
        if self.delta is not None:
            d = self.delta.to(x)
            y = F.linear(x, d) if self.conv is None else \
                self.conv(x, d, None, c.stride, c.padding, c.dilation, c.groups)
        elif self.conv is None:
            y = F.linear(F.linear(x, self.down.to(x)), self.up.to(x))
        else:
            y = self.conv(self.conv(x, self.down.to(x), None, c.stride, c.padding, c.dilation), self.up.to(x))
        return output + _per_row(scale, y) * y


class SwitchableLoRA:
    """A LoRA attached to ``module`` as side branches whose scale is chosen per call (default 0: off).

    ``lora`` is a path, a state dict or a :class:`LoRAFile`. Keys are matched to the module's Linear/Conv layers
    by kohya names (``lora_unet_`` + qualified name with '.' -> '_', or the SGM/LDM spelling for diffusers UNets),
    PEFT/diffusers names (``unet.<qualified name>.lora_A.weight``) or legacy diffusers attention-processor names.
    ``name_map`` (a dict or a function of the key's module part) names the target module for keys these rules do
    not cover. Keys starting with one of the ``skip`` prefixes are ignored (e.g. ``('lora_te',)`` for the text
    encoder parts of a UNet+TE file: attach those to the text encoder with a second SwitchableLoRA).
    """

    def __init__(self, module, lora, *, name_map=None, skip=()):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f'module must be a torch.nn.Module, not {type(module).__name__}')
        if isinstance(skip, str):
            skip = (skip,)
        lora = load_lora(lora)
        layers, table = _module_table(module)
        groups, unsupported, unmatched = {}, [], []
        for key, tensor in lora.tensors.items():
            if key.startswith(tuple(skip)):
                continue
            module_key, kind, part = _split_key(key)
            if kind is None:
                unsupported.append(key)
                continue
            mapped = name_map.get(module_key) if isinstance(name_map, dict) else \
                name_map(module_key) if callable(name_map) else None
            if mapped is not None and mapped not in layers:
                raise ValueError(f'name_map maps {module_key!r} to {mapped!r}, which is not a Linear/Conv layer of '
                                 f'the module')
            target = mapped or _lookup(module_key, kind, table)
            if target is None:
                unmatched.append(key)
                continue
            groups.setdefault((target, module_key, kind), {})[part] = tensor
        if unsupported:
            raise ValueError(f'{len(unsupported)} LoRA keys are of a kind this loader does not apply (only LoRA, '
                             f'LoCon, LoHa and LoKr are additive in the scale; DoRA, OFT, GLoRA, full diffs and '
                             f'bias deltas are not supported): {sorted(unsupported)}')
        if unmatched:
            raise ValueError(f'{len(unmatched)} LoRA keys match no Linear/Conv layer of the module (pass name_map= '
                             f'to map them, or skip= to leave them out): {sorted(unmatched)}')
        if not groups:
            raise ValueError('the LoRA has no tensors to apply' + (f' once keys starting with {skip} are skipped'
                                                                   if skip else ''))
        targets = [t for t, _, _ in groups]
        doubled = sorted({t for t in targets if targets.count(t) > 1})
        if doubled:
            raise ValueError(f'several LoRA entries target the same layers: {doubled}')
        self._branches, self._handles = [], []
        try:
            for (target, module_key, kind), parts in sorted(groups.items()):
                try:
                    _check_parts(parts)
                    factor = _peft_alpha(lora.peft_config, module_key, parts['lora_down.weight'].shape[0]) \
                        if kind == 'peft' else None
                    branch = _Branch(self, layers[target], parts, factor)
                except KeyError as e:
                    raise ValueError(f'{lora.source}: LoRA entry {module_key!r} for layer {target!r} lacks the '
                                     f'tensor {e}; it has {sorted(parts)}') from None
                except ValueError as e:
                    raise ValueError(f'{lora.source}: LoRA entry {module_key!r} for layer {target!r}: {e}') from None
                except RuntimeError as e:  # torch's matmul/kron on factors that do not fit together
                    raise ValueError(f'{lora.source}: LoRA entry {module_key!r} for layer {target!r}: its factors '
                                     f'{ {k: tuple(v.shape) for k, v in parts.items()} } do not fit together '
                                     f'({str(e).splitlines()[0]})') from None
                self._branches.append(branch)
                self._handles.append(layers[target].register_forward_hook(branch.hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        self.targets = [t for t, _, _ in sorted(groups)]
        self._default = 0.

    @property
    def current_scale(self):
        """The scale this thread/task's calls run at: the innermost ``scale()`` / ``run()``, else the default."""
        return _SCALES.get().get(self, self._default)

    def set_scale(self, scale):
        """Set the default scale, used by calls outside ``scale()`` / ``run()`` (0 = off; negative scales subtract
        the LoRA). It is shared by all threads: give per-call scales with :func:`scaled` or ``run`` instead."""
        self._default = check_scale('scale', scale)

    def scale(self, scale):
        """``with sl.scale(s):`` runs the block at LoRA scale s in this thread/task only; the previous scale is
        back on exit, errors and interrupts included."""
        return Scope((_SCALES, self, _row_scales(scale)), result=self)

    def run(self, scale, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with the LoRA at ``scale`` (a number, or one per batch row), in a copy of the
        current context: nothing to reset afterwards, whatever interrupts the call."""
        return call_in_context(_SCALES, self, _row_scales(scale), fn, *args, **kwargs)

    def remove(self):
        """Detach every branch; the module is then exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._branches = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def scaled(denoiser, switchable_lora, scale):
    """A k-diffusion denoiser that runs ``denoiser`` with the LoRA at ``scale`` for each call (thread-safe)."""
    if not isinstance(switchable_lora, SwitchableLoRA):
        raise TypeError(f'switchable_lora must be a SwitchableLoRA, not {type(switchable_lora).__name__}')
    scale = check_scale('scale', scale)

    def call(x, sigma, **extra_args):
        return switchable_lora.run(scale, denoiser, x, sigma, **extra_args)
    return call
