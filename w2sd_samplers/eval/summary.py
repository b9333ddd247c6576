"""summary.md of an eval run: the recommendation first, then the setup, the paired comparisons, the prompts where
W2SD helps and hurts most, a power table and (with ``--tune``) the tuning grid."""
import math

from ..tuning import select
from . import methods as M, report
from .recommend import instructions
from .scorers import ROLES


def best(families, score):
    """The family with the highest ``score`` (None when there is none); ties go to the earlier family."""
    families = [f for f in families if score(f) == score(f)]
    return select(families, lambda f: -score(f)) if families else None


def reference_plain(methods):
    return next((m for m in ('plain-nfe', 'plain') if m in methods), None)


def rank_score(rows, primary, tuning, plain):
    """How families are ranked: by mean tuning score with --tune, else by the mean paired difference against
    ``plain`` on the evaluation rows (the same rows that judge it: optimistic)."""
    if tuning is not None:
        return lambda f: tuning.scores.get(tuning.chosen.get(f), math.nan)
    return lambda f: report.compare(rows, primary, f, plain, math.nan).mean if plain else math.nan


def recommendation(rows, methods, primary, margins, tuning, run, budget):
    """Markdown lines of the recommendation block."""
    plain = reference_plain(methods)
    if plain is None:
        return ['No plain-sampling reference was run: add `plain-nfe` to `--methods` for a recommendation.']
    score = rank_score(rows, primary, tuning, plain)
    others = [m for m in methods if not m.startswith('plain')]
    top = best(others, score)
    how = ('chosen on the tuning prompts, judged on the evaluation prompts' if tuning is not None else
           'no --tune: chosen and judged on the same prompts, so optimistic; run with --tune for a fair choice')
    failed = {m: sum(r['method'] == m for r in rows if r.get('error')) for m in methods}
    lines = []
    if top is not None:
        c = report.compare(rows, primary, top, plain, margins[primary, plain])
        if c.verdict == 'better' and not failed[top]:
            lines.append(f'**On this pipeline and pair, at {budget} denoiser calls per image, use {top} '
                         f'({_setting(rows, top)}):** {primary} {report.cell(c)} against {plain} ({how}).')
        else:
            lines.append(f'**No method is reliably better than plain sampling at this budget** ({budget} calls; '
                         f'{plain}, {_setting(rows, plain)}): the best family, {top} ({_setting(rows, top)}), '
                         f'scores {report.cell(c)} against it on {primary} ({how})'
                         + (f' and gave {failed[top]} unscorable image(s).' if failed[top] else '.'))
    elif others:
        lines.append(f'**No method is reliably better than plain sampling at this budget**: no other family has a '
                     'scored image.')
    w2sd_methods = [m for m in methods if m in M.W2SD or m == 'z-sampling']
    w2sd = best(w2sd_methods, score)
    if w2sd is None:
        return lines + [f'{m} gave {failed[m]} unscorable image(s) (Rows not scored).' for m in w2sd_methods
                        if failed[m]]
    ag = best([m for m in methods if m in M.GUIDANCE], score)
    vs = [f'{ref}: {report.cell(report.compare(rows, primary, w2sd, ref, margins[primary, ref]))}'
          for ref in (plain, ag) if ref is not None]
    setting = next(r for r in rows if r['method'] == w2sd)
    lines += ['', f'W2SD\'s best setting here is **{w2sd}** ({_setting(rows, w2sd)}); on {primary} against '
              + ', against '.join(vs) + '.' + (f' It gave {failed[w2sd]} unscorable image(s) (Rows not scored).'
                                               if failed[w2sd] else '') + ' To use it:', '']
    lines += instructions(M.Setting.of(w2sd, setting['steps'], **setting['params']), run)
    return lines


def _setting(rows, method):
    r = next(r for r in rows if r['method'] == method)
    return r['setting'].split(' ', 1)[1]


def _image_pair(rows, pi, method, reference):
    by = {(r['method'], r['seed']): r for r in rows if r['prompt_index'] == pi}
    seed = min(s for m, s in by if m == method)
    return f'![{method}, seed {seed}]({by[method, seed]["image"]}) ![{reference}, seed {seed}]' \
           f'({by[reference, seed]["image"]})'


def extremes(rows, prompts, primary, method, reference, k=3):
    helps, hurts = report.extremes(rows, primary, method, reference, k)
    lines = [f'{method} against {reference} on {primary}, mean paired difference over the seeds of each prompt '
             f'(images: first seed, {method} left).', '']
    for title, chosen in (('Helps most', helps), ('Hurts most', hurts)):
        lines.append(f'{title}:' if chosen else f'{title}: no prompt.')
        lines += [f'- "{prompts[pi]}": {d:+.3g} {_image_pair(rows, pi, method, reference)}' for pi, d in chosen]
        lines.append('')
    return lines


def tuning_lines(tuning, primary):
    per = len(tuning.prompts) * len(tuning.seeds)
    lines = [f'{len(tuning.candidates)} settings on {len(tuning.prompts)} tuning prompts x {len(tuning.seeds)} '
             f'seeds ({len(tuning.candidates) * per} images, {tuning.nfe} denoiser calls, {tuning.seconds:.1f} s '
             f'of sampling); each family\'s setting is the one with the highest mean {primary} over its {per} '
             'tuning items (ties: the earlier setting in the grid; a setting with an unscorable image is out). '
             f'Tuning prompts: {", ".join(repr(p) for p in tuning.prompts)}.', '',
             f'| family | setting | mean {primary} (tuning) | chosen |', '|---|---|---|---|']
    for c in tuning.candidates:
        score = tuning.scores.get(c)
        lines.append(f'| {c.method} | {c.label().split(" ", 1)[1]} | '
                     f'{"unscorable image" if score is None else report.fmt(score)} | '
                     f'{"**chosen**" if tuning.chosen.get(c.method) == c else ""} |')
    return lines


def write(path, rows, *, title, setup, methods, prompts, scorers, primary, margins, margin_rule, references, tuning,
          run, budget, fid=None, command=''):
    """summary.md of the evaluation ``rows`` (every row of ``methods`` on the evaluation items)."""
    plain = reference_plain(methods)
    score = rank_score(rows, primary, tuning, plain)
    w2sd = best([m for m in methods if m in M.W2SD or m == 'z-sampling'], score)
    lines = [f'# {title}', '', '## Recommendation', '',
             *recommendation(rows, methods, primary, margins, tuning, run, budget), '', '## Setup', '', setup,
             'Scorers: ' + ', '.join(f'{s} ({ROLES[s]})' for s in scorers) + f'; the recommendation uses {primary}. '
             'Alignment scores measure whether the image shows the prompt; preference models are trained on human '
             'choices between images and mix alignment with quality and taste; use several, since a method can '
             'gain on one and lose on another.', '',
             '## Paired differences', '',
             'Every method of a (prompt, seed) starts from the same noise. Δ: mean paired difference of scores '
             '(method - reference) with its 95% interval from a bootstrap over prompts that keeps each prompt\'s '
             'seeds together. Verdict: better / worse when the interval excludes 0; equivalent when the 90% '
             f'interval lies within ±margin (two one-sided tests at 5%; margin: {margin_rule}); else inconclusive. '
             'Win rate: share of items where the method scores higher (ties half), Wilson 95% interval (items taken '
             'as independent).', '',
             report.tables(rows, methods, scorers, references, margins, fid)]
    if w2sd is not None and plain is not None:
        lines += ['## Where W2SD helps and hurts most', '', *extremes(rows, prompts, primary, w2sd, plain)]
        power = report.power_table(rows, primary, w2sd, plain, margins[primary, plain])
        if power:
            lines += ['## How many prompts a difference needs', '', *power, '']
    if tuning is not None:
        lines += ['## Tuning', '', *tuning_lines(tuning, primary), '']
    errors = [r for r in rows if r.get('error')]
    if errors:
        lines += ['## Rows not scored', '', *[f'- prompt {r["prompt_index"]} seed {r["seed"]} {r["method"]}: '
                                             f'{r["error"]}' for r in errors], '']
    lines += ['![image grid](grid.png)', '', '![paired differences](paired.png)', '',
              f'_Command: `{command}` (paths relative to this folder)_', '']
    path.write_text('\n'.join(lines), encoding='utf-8')
