"""`w2sd eval` harness: a random-weight pipeline of a chosen UNet size, a tiny random CLIP scorer, and runs of
`w2sd eval --tune` with 1 and N processes (items per second, where the time goes, and whether the rows are the
same). Nothing is downloaded; the scores of random models mean nothing, only the plumbing, NFE and timings do.

    python benchmarks/eval/harness.py /tmp/w2sd-eval example       # the committed example (tiny, CPU)
    python benchmarks/eval/harness.py /tmp/w2sd-eval throughput     # 1 vs 2 processes (torchrun, CPU)
    python benchmarks/eval/harness.py /tmp/w2sd-eval throughput --unet sd15 --gpu --processes 8   # N GPUs, fp16
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
# at most 6 letters each: the tiny tokenizer reads a letter per token, 8 tokens with the start and end ones
PROMPTS = ['a cat', 'a dog', 'a sun', 'a fox', 'a car', 'an owl', 'a bee', 'a cow']


def text_encoder(hidden, projection=None, seed=0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=64,
                                         num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=8,
                                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def build(work, unet):
    """Write the pipeline, the CLIP scorer folder and the prompts under ``work``; returns their names in it."""
    import diffusers
    from test_adapters_vp import ddim
    from test_eval import tiny_clip
    from test_generate import sd_pipe, tiny_tokenizer, tiny_vae

    from w2sd_samplers.bench.overhead import build_unet
    work.mkdir(parents=True, exist_ok=True)
    model = work / f'model-{unet}'
    if not (model / 'model_index.json').exists():
        if unet == 'tiny':
            pipe = sd_pipe(work)
        elif unet == 'sd15':
            pipe = diffusers.StableDiffusionPipeline(
                vae=tiny_vae(), text_encoder=text_encoder(768), tokenizer=tiny_tokenizer(work),
                unet=build_unet('sd15'), scheduler=ddim(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        else:
            tok = tiny_tokenizer(work)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=tiny_vae(), text_encoder=text_encoder(768), text_encoder_2=text_encoder(1280, 1280, seed=1),
                tokenizer=tok, tokenizer_2=tok, unet=build_unet('sdxl'), scheduler=ddim())
        pipe.save_pretrained(model)
    clip = work / 'clip'
    if not clip.exists():
        tiny_clip(clip)
    (work / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return model.name, clip.name, 'prompts.txt'


def eval_args(model, clip, prompts, out, args):
    """The `w2sd eval` arguments, with paths relative to the scratch folder (the runs start there, so the
    summaries name no machine path)."""
    return [model, '--pair', 'cfg:1', '--prompts', prompts, '--seeds', str(args.seeds), '--methods', args.methods,
            '--steps', str(args.steps), '--nfe', str(args.nfe), '--cfg', '5.5', '--scorer', f'pickscore:{clip}',
            '--scorer', f'clip:{clip}', '--out', out, '--no-progress',
            *(['--tune', '--tune-seeds', str(args.tune_seeds)] if args.tune else []), *([] if args.gpu else ['--cpu'])]


def launch(processes, argv, gpu, work):
    """Run `w2sd eval` with ``processes`` processes in ``work``; returns (wall seconds, launch time, stdout)."""
    # one torch thread per process; MKL's results independent of memory alignment, so that process counts agree
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')
    if processes == 1:
        cmd = [sys.executable, '-m', 'w2sd_samplers.eval', *argv]
    elif gpu:
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', str(processes),
               '-m', 'w2sd_samplers.eval', *argv]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
               '-m', 'w2sd_samplers.eval', *argv]
    launched, start = time.time(), time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=work, check=True, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - start, launched, done.stdout


def phases(out, launched, wall):
    """Per process: wall and CPU seconds of each phase (timing-<rank>.json), with the start-up before the command's
    main() (interpreter, imports, launcher) and the exit after it."""
    per = {}
    for path in sorted(out.glob('timing-*.json')):
        t = json.loads(path.read_text())
        p = {'start-up': [t['start'] - launched, t['start_cpu']], **t['phases']}
        p['exit'] = [wall - sum(v[0] for v in p.values()), None]
        per[path.stem.split('-')[1]] = dict(phases=p, scoring_s=t['scoring_s'])
    return per


def same_rows(a, b):
    """Whether two runs wrote the same rows (keys, NFE, steps, scores) and the same image bytes."""
    def load(out):
        return {(r['prompt_index'], r['seed'], r['method']): r
                for r in map(json.loads, (out / 'results.jsonl').read_text().splitlines())}
    ra, rb = load(a), load(b)
    fields = ('nfe', 'nfe_roles', 'steps', 'scores', 'setting')
    return ra.keys() == rb.keys() and all(
        [ra[k][f] for f in fields] == [rb[k][f] for f in fields]
        and (a / ra[k]['image']).read_bytes() == (b / rb[k]['image']).read_bytes() for k in ra)


def example(args, names):
    """Run the example and copy summary.md, its plots, per_prompt.csv and the images summary.md shows."""
    out = args.work / 'example'
    shutil.rmtree(out, ignore_errors=True)
    _, _, printed = launch(1, eval_args(*names, 'example', args), args.gpu, args.work)
    dest = HERE / 'example'
    shutil.rmtree(dest, ignore_errors=True)
    (dest / 'images').mkdir(parents=True)
    summary = (out / 'summary.md').read_text()
    for name in ('summary.md', 'grid.png', 'paired.png', 'per_prompt.csv'):
        shutil.copy(out / name, dest / name)
    for image in sorted(set(re.findall(r'\((images/[^)]+\.png)\)', summary))):
        shutil.copy(out / image, dest / image)
    (dest / 'stdout.txt').write_text(printed)
    print(printed, end='')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('work', type=pathlib.Path, help='scratch folder for the models and the runs')
    p.add_argument('task', choices=('example', 'throughput'))
    p.add_argument('--unet', default='tiny', choices=('tiny', 'sd15', 'sdxl'))
    p.add_argument('--gpu', action='store_true', help='run on CUDA (fp16); N processes through accelerate launch')
    p.add_argument('--processes', type=int, default=2)
    p.add_argument('--seeds', type=int, default=2)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--nfe', type=int, default=12)
    p.add_argument('--no-tune', dest='tune', action='store_false', help='fixed settings instead of --tune')
    p.add_argument('--tune-seeds', type=int, default=1)
    p.add_argument('--methods', default='plain,plain-nfe,w2sd-paper,w2sd-anchored,autoguidance,'
                                        'autoguidance-interval,z-sampling')
    p.add_argument('--write', action='store_true', help='throughput: write the table to the committed '
                                                        'benchmarks/sections/eval-throughput-*.md')
    args = p.parse_args()
    args.work = args.work.resolve()
    names = build(args.work, args.unet)
    if args.task == 'example':
        return example(args, names)
    result = {}
    for n in (1, args.processes):
        out = args.work / f'throughput-{n}'
        shutil.rmtree(out, ignore_errors=True)
        wall, launched, printed = launch(n, eval_args(*names, out.name, args), args.gpu, args.work)
        rows = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
        result[n] = dict(wall_s=wall, rows=len(rows), items_per_s=len(rows) / wall, printed=printed.strip(),
                         per_process=phases(out, launched, wall))
    result['same_rows'] = same_rows(args.work / 'throughput-1', args.work / f'throughput-{args.processes}')
    result['load_average'] = os.getloadavg()
    print(json.dumps(result, indent=1))
    ratio = result[args.processes]['items_per_s'] / result[1]['items_per_s']
    print(f'items/s ratio, {args.processes} processes vs 1: {ratio:.2f}; same rows: {result["same_rows"]}')
    if args.write:
        write_section(result, args, ratio)


def write_section(result, args, ratio):
    """The throughput table, with the phase breakdown, as benchmarks/sections/eval-throughput-*.md (a section of
    benchmarks/RESULTS.md, which `w2sd bench` reassembles)."""
    device = 'cuda' if args.gpu else 'cpu'
    n = args.processes
    lines = [f'## `w2sd eval` throughput ({args.unet} pipeline, {device})', '',
             f'Rows (images) per second of one `w2sd eval{" --tune" if args.tune else ""}` command with 1 and {n} '
             f'processes: {len(PROMPTS)} prompts, {args.seeds} seeds, methods {args.methods}, Euler, T = {args.steps}, '
             f'NFE budget {args.nfe}, one torch thread per process; wall time of the whole command (start-up, '
             f'tuning, evaluation and summary). Rows of the two runs identical (scores, NFE, image bytes): '
             f'{result["same_rows"]}. Details: [eval/README.md](eval/README.md).', '',
             '| processes | wall time (s) | rows | rows/s | ratio to 1 process |', '|---|---|---|---|---|']
    lines += [f'| {k} | {result[k]["wall_s"]:.1f} | {result[k]["rows"]} | {result[k]["items_per_s"]:.3f} | '
              f'{result[k]["items_per_s"] / result[1]["items_per_s"]:.2f} |' for k in (1, n)]
    names = list(result[n]['per_process']['0']['phases'])
    lines += ['', 'Wall (CPU) seconds per phase and process:', '',
              '| run, process | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for k in (1, n):
        for rank, p in result[k]['per_process'].items():
            lines.append(f'| {k} proc., rank {rank} | ' + ' | '.join(
                f'{w:.1f}' + ('' if c is None else f' ({c:.1f})') for w, c in p['phases'].values()) + ' |')
    cpu = {k: max(sum(c for _, c in p['phases'].values() if c is not None) for p in result[k]['per_process'].values())
           for k in (1, n)}
    lines += ['', f'CPU seconds of the busiest process: {cpu[1]:.1f} with 1 process, {cpu[n]:.1f} with {n}. On an '
              'idle machine with a core per process, where wall time is CPU time, that predicts '
              f'{cpu[1] / cpu[n]:.2f}x the rows per second; the wall-time ratio above also holds the other jobs of '
              'the machine.']
    load = ', '.join(f'{v:.1f}' for v in result['load_average'])
    lines += ['', f'_Command: `PYTHONPATH=. python benchmarks/eval/harness.py WORK throughput --seeds {args.seeds} '
              f'--steps {args.steps} --nfe {args.nfe} --write`; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
              f'{os.cpu_count()} CPUs, load average {load} at the end; ratio {ratio:.2f}._', '']
    (HERE.parent / 'sections' / f'eval-throughput-{args.unet}-{device}.md').write_text('\n'.join(lines))


if __name__ == '__main__':
    main()
