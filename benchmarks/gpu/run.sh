#!/usr/bin/env bash
# The GPU check of issue 18, one command, one results file, sized for under 8 minutes on one H200 (not yet run):
#   benchmarks/gpu/run.sh [RESULTS_FILE]          (default benchmarks/gpu/RESULTS-gpu.md; CUDA, float16/bfloat16)
#   benchmarks/gpu/run.sh --tiny [RESULTS_FILE]   (CPU, tiny UNets: what tests/test_gpu_script.py runs)
# Sections: the device/dtype tests on CUDA (float16 and bfloat16), `w2sd bench overhead` at SD 1.5 size, and
# benchmarks/gpu/ratios.py (SDXL and SD 1.5 size, batch 1 and 4, eager and torch.compile; legs past the time
# budget are skipped and say so). Exits non-zero when a section failed, after writing the file.
set -uo pipefail
cd "$(dirname "$0")/../.."
tiny=0
if [ "${1:-}" = --tiny ]; then tiny=1; shift; fi
out=${1:-benchmarks/gpu/RESULTS-gpu.md}
py=${PYTHON:-python}
if command -v w2sd >/dev/null; then w2sd=(w2sd); else w2sd=("$py" -m w2sd_samplers.cli); fi
start=$SECONDS
failed=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ $tiny = 1 ]; then
  device=cpu; test_env=(W2SD_TEST_DEVICE=cpu); tests=(-k 'every_sampler and bfloat16 and paper')
  overhead=(--unet tiny --device cpu --dtype float32)
  ratios=(--unet tiny --batch 1 --device cpu --dtype float32 --steps 2 --lam 1 --repeats 1 --compile-backend eager)
else
  device=cuda; test_env=(W2SD_TEST_DEVICE=cuda); tests=()
  overhead=(--unet sd15 --device cuda --dtype float16)
  ratios=(--unet sdxl sd15 --batch 1 4 --device cuda --dtype float16 --steps 10 --lam 6 --repeats 2)
fi

section() {  # section TITLE COMMAND...: run it, keep its last lines in the results file
  local title=$1; shift
  echo "== $title" >&2
  if "$@" >"$work/log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
  { echo "## $title: $status"; echo; echo '```'; tail -n 15 "$work/log"; echo '```'; echo; } >>"$out"
}

{
  echo "# GPU check (issue 18)"; echo
  echo "Written by \`benchmarks/gpu/run.sh$([ $tiny = 1 ] && echo ' --tiny')\` on $(date -u '+%Y-%m-%d %H:%M UTC'):"
  "$py" -c "import torch; d = '$device'; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if d == 'cuda' else 'CPU')"
  [ $tiny = 1 ] && echo && echo '**Tiny mode: CPU smoke test of the script, not results.**'
  echo
} >"$out"

section "device and dtype tests on $device (float16 and bfloat16)" \
  env "${test_env[@]}" "$py" -m pytest -q -p no:cacheprovider tests/test_device_dtype.py "${tests[@]}"
section "w2sd bench overhead ${overhead[*]} --quick" \
  "${w2sd[@]}" bench overhead "${overhead[@]}" --quick --no-progress --out "$work/bench"
cat "$work"/bench/sections/overhead-*.md >>"$out" 2>/dev/null
# ratios.py starts no leg after 4m40s of the run (an SDXL compile leg may take 3 minutes) and is stopped at 7m50s;
# it writes leg by leg, so the finished legs stay
deadline=$(( (tiny ? 900 : 470) - (SECONDS - start) )); deadline=$(( deadline > 10 ? deadline : 10 ))
budget=$(( (tiny ? 600 : 280) - (SECONDS - start) ))
timeout "$deadline" "$py" benchmarks/gpu/ratios.py "${ratios[@]}" --budget "$budget" --out "$out" \
  2>"$work/ratios.log"
code=$?
if [ $code = 124 ]; then
  printf '\n**ratios.py was stopped at the deadline: the legs above finished, the others did not run.**\n' >>"$out"
elif [ $code != 0 ]; then
  failed=1; { echo '## ratios.py: FAILED'; echo '```'; tail -n 15 "$work/ratios.log"; echo '```'; } >>"$out"
fi
printf '\n_Total: %s s._\n' $((SECONDS - start)) >>"$out"
echo "results: $out ($((SECONDS - start)) s)" >&2
exit $failed
