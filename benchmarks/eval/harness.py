"""`w2sd eval` harness: a random-weight pipeline of a chosen UNet size, a tiny random CLIP scorer, and runs of
`w2sd eval` with 1 and N processes (items per second). Nothing is downloaded; the scores of random models mean
nothing, only the plumbing, NFE and timings do.

    python benchmarks/eval/harness.py /tmp/w2sd-eval example       # the committed example summary (tiny, CPU)
    python benchmarks/eval/harness.py /tmp/w2sd-eval throughput     # items/s, 1 vs 2 processes (torchrun, CPU)
    python benchmarks/eval/harness.py /tmp/w2sd-eval throughput --unet sd15 --gpu --processes 8   # N GPUs, fp16
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
PROMPTS = ['a cat', 'a dog', 'a red car', 'a sun']


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
    """Write the pipeline, the CLIP scorer folder and the prompts under ``work``; returns their paths."""
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
    prompts = work / 'prompts.txt'
    prompts.write_text('\n'.join(PROMPTS) + '\n')
    return model, clip, prompts


def eval_args(model, clip, prompts, out, args):
    return [str(model), '--pair', 'cfg:1', '--prompts', str(prompts), '--seeds', str(args.seeds), '--methods',
            args.methods, '--steps', str(args.steps), '--nfe', str(args.nfe), '--cfg', '5.5', '--scorer',
            f'clip:{clip}', '--out', str(out), '--no-progress'] + ([] if args.gpu else ['--cpu'])


def launch(processes, argv, gpu):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    if processes == 1:
        cmd = [sys.executable, '-m', 'w2sd_samplers.eval', *argv]
    elif gpu:
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', str(processes),
               '-m', 'w2sd_samplers.eval', *argv]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
               '-m', 'w2sd_samplers.eval', *argv]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


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
    p.add_argument('--methods', default='plain,plain-nfe,w2sd-paper,w2sd-anchored,autoguidance,z-sampling')
    p.add_argument('--write', action='store_true', help='throughput: add the table to the committed '
                                                        'benchmarks/RESULTS.md')
    args = p.parse_args()
    model, clip, prompts = build(args.work, args.unet)
    if args.task == 'example':
        out = args.work / 'example'
        shutil.rmtree(out, ignore_errors=True)
        launch(1, eval_args(model, clip, prompts, out, args), args.gpu)
        dest = HERE / 'example'
        dest.mkdir(exist_ok=True)
        for name in ('summary.md', 'grid.png', 'winrate.png'):
            shutil.copy(out / name, dest / name)
        return
    result = {}
    for n in (1, args.processes):
        out = args.work / f'throughput-{n}'
        shutil.rmtree(out, ignore_errors=True)
        wall = launch(n, eval_args(model, clip, prompts, out, args), args.gpu)
        rows = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
        result[n] = dict(wall_s=wall, rows=len(rows), items_per_s=len(rows) / wall,
                         s_per_image={m: sum(r['seconds'] for r in rows if r['method'] == m) /
                                      sum(r['method'] == m for r in rows) for m in args.methods.split(',')})
    print(json.dumps(result, indent=1))
    ratio = result[args.processes]['items_per_s'] / result[1]['items_per_s']
    print(f'items/s ratio, {args.processes} processes vs 1: {ratio:.2f}')
    if args.write:
        write_section(result, args, ratio)


def write_section(result, args, ratio):
    """The throughput table as a section of the committed benchmarks/RESULTS.md, which is then reassembled."""
    from w2sd_samplers.commands.bench import write_results
    device = 'cuda' if args.gpu else 'cpu'
    lines = [f'## `w2sd eval` throughput ({args.unet} pipeline, {device})', '',
             f'Items (prompt x seed x method rows) per second of one `w2sd eval` command with 1 and {args.processes} '
             f'processes: {len(PROMPTS)} prompts x {args.seeds} seeds x {len(args.methods.split(","))} methods, '
             f'Euler, T = {args.steps}, NFE budget {args.nfe}, one torch thread per process; wall time of the whole '
             'command (start-up and model loading included). Details: [eval/README.md](eval/README.md).', '',
             '| processes | wall time (s) | items/s | ratio to 1 process |', '|---|---|---|---|']
    lines += [f'| {n} | {r["wall_s"]:.1f} | {r["items_per_s"]:.3f} | '
              f'{r["items_per_s"] / result[1]["items_per_s"]:.2f} |' for n, r in result.items()]
    lines += ['', f'_Command: `PYTHONPATH=. python benchmarks/eval/harness.py WORK throughput --seeds {args.seeds} '
              f'--steps {args.steps} --nfe {args.nfe} --write`; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
              f'{os.cpu_count()} CPUs; ratio {ratio:.2f}._', '']
    (HERE.parent / 'sections' / f'eval-throughput-{args.unet}-{device}.md').write_text('\n'.join(lines))
    write_results(HERE.parent)


if __name__ == '__main__':
    main()
