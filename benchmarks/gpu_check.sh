#!/usr/bin/env bash
# The GPU checks in one run (at most 9.5 minutes on one H200): the `gpu` test tier, the head benchmark and the scale
# benchmark under bf16-mixed, each part under its own time limit, so a failure or a hang in one part never loses the
# others' output. JSON lines go to benchmarks/results/ (and, where $OUT is set, to $OUT as well); a summary is
# printed last.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --prepare    # on a machine with the package index, before: fills .gpu/
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh     # another interpreter than python3
#
# The GPU machine may have no network: it then uses the python3 it has (torch with CUDA, and the Triton that torch
# was built with) and installs this package without dependencies. What that python lacks can travel in .gpu/
# (ignored by git), made by --prepare on a machine with the package index: wheels of the pure-Python dependencies
# (jsonargparse for the CLI tests, datasets for the scale benchmark's token cache) and the shipped MiniLM-L6
# encoder with its weights stored in fp16 (44 MB instead of 88 MB; loaded back as fp32). Missing pieces are
# reported and the parts that need them are recorded as failed, not hidden.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
RESULTS=$ROOT/benchmarks/results
GPU_TAG=${GPU_TAG:-h200}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
    "${PY}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 datasets==5.2.0 \
        dill==0.4.1 multiprocess==0.70.19
    .venv/bin/python - <<'EOF'
import json, shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from datamodules.resources import minilm_dir

source = minilm_dir()
if source is None:
    raise SystemExit("the MiniLM encoder is not installed here (bash scripts/setup.sh installs it)")
package = Path(".gpu/site") / source.parent.name
shutil.copytree(source.parent, package, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
weights = load_file(source / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          str(package / "model" / "model.safetensors"))
config = json.loads((package / "model" / "config.json").read_text())
config["dtype"] = config["torch_dtype"] = "float32"  # the model is built in fp32; the fp16 weights are cast up
(package / "model" / "config.json").write_text(json.dumps(config, indent=2))
print(f"wrote {package}")
EOF
    du -sh .gpu
    echo "carry .gpu with the run (device tool: carry=[\".gpu\"])"
    exit 0
fi

mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check_${GPU_TAG}.log
: >"$LOG"
declare -A STATUS
say() { echo "$*" | tee -a "$LOG"; }

# ---------------------------------------------------------------------------------------------------- set-up
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
SITE=/tmp/xmc-dst-site
mkdir -p "$SITE"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "${PY}" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .gpu/wheels/*.whl \
        >>"$LOG" 2>&1 && say "installed the carried wheels into $SITE" || say "WARNING: the carried wheels did not install"
fi
export PYTHONPATH="$ROOT:$SITE:$ROOT/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
# This package without dependencies (offline-safe); PYTHONPATH above serves where even that fails. The triton extra
# only where torch has no Triton at all: an install next to torch's own Triton could replace the one it needs.
"${PY}" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || say "note: pip install -e . failed; using PYTHONPATH"
if ! "${PY}" -c "import triton" >/dev/null 2>&1; then
    say "Triton does not import; trying the triton extra"
    "${PY}" -m pip install -q --retries 0 --timeout 10 -e ".[triton]" >>"$LOG" 2>&1 \
        || say "WARNING: no Triton: the triton tests skip and the triton benchmark rows fail"
fi
"${PY}" - <<'EOF' 2>&1 | tee -a "$LOG" | tee "$RESULTS/gpu_env_h200.json"
import json, platform, subprocess
info = {"type": "env", "python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if
                torch.cuda.is_available() else None)
except Exception as err:  # reported, the parts below then fail on their own
    info["torch_error"] = repr(err)
for name in ("triton", "lightning", "transformers", "datasets", "jsonargparse", "pyarrow"):
    try:
        info[name] = __import__(name).__version__
    except Exception as err:
        info[name] = f"missing ({type(err).__name__})"
try:
    from datamodules.resources import minilm_dir
    info["minilm"] = str(minilm_dir())
except Exception as err:
    info["minilm"] = f"missing ({err!r})"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
print(json.dumps(info))
EOF

# ---------------------------------------------------------------------------------------------------- parts
run_part() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    say ""
    say "=== $name (limit ${limit} s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    STATUS[$name]="exit $code after $((SECONDS - began)) s$([[ $code == 124 || $code == 137 ]] && echo ' (time limit)')"
    say "=== $name: ${STATUS[$name]}"
}

run_part gpu-tests 130 "${PY}" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$RESULTS/gpu_tests_${GPU_TAG}.xml" tests

# Head: the target configuration (670K labels) first, so a time limit cuts the least important rows.
HEAD_JSONL=$RESULTS/head_${GPU_TAG}_bf16.jsonl
run_part head 210 bash -c "set -o pipefail; \"${PY}\" benchmarks/head.py --device cuda --precision bf16-mixed \
    --impls dense csr triton triton-transposed --out-features 670000 3000000 131000 31000 --fan-in 32 \
    --batch 64 256 --repeats 10 --timeout 60 --json | tee \"$HEAD_JSONL\""

# Scale: MiniLM fine-tuned end to end, dense against sparse; 670K first for the same reason.
run_part scale 200 "${PY}" benchmarks/scale.py --device cuda --precision bf16-mixed \
    --labels 670091 2812281 131073 --variants dense sparse --docs-per-label 1 --batch-size 64 --max-length 64 \
    --warmup 3 --steps 10 --timeout 90 --data-root /tmp/xmc-synthetic

# ---------------------------------------------------------------------------------------------------- summary
say ""
say "=== summary"
for name in gpu-tests head scale; do say "$name: ${STATUS[$name]:-not run}"; done
"${PY}" - "$RESULTS" "$GPU_TAG" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

results, tag = Path(sys.argv[1]), sys.argv[2]
junit = results / f"gpu_tests_{tag}.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    line = {"type": "gpu_tests", **counts, "failed": failed}
    (results / f"gpu_tests_{tag}.jsonl").write_text(json.dumps(line) + "\n")
    print(f"gpu tests: {counts}; failed: {failed or 'none'}")
head = results / f"head_{tag}_bf16.jsonl"
if head.is_file():
    sys.path.insert(0, "benchmarks")
    from head import markdown
    rows = [json.loads(l) for l in head.read_text().splitlines() if l.startswith("{")]
    print(markdown(rows))
for path in sorted(results.glob("scale_nvidia*.md")):
    print(path.read_text())
EOF
if [[ -n "${OUT:-}" ]]; then
    cp -f "$LOG" "$RESULTS"/gpu_env_${GPU_TAG}.json "$RESULTS"/gpu_tests_${GPU_TAG}.jsonl "$HEAD_JSONL" \
        "$RESULTS"/scale_nvidia*.jsonl "$RESULTS"/scale_nvidia*.md "$OUT"/ 2>/dev/null
    echo "copied the results to \$OUT"
fi
