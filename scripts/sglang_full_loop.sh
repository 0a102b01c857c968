#!/usr/bin/env bash
# The full online-speculative-decoding loop on one GPU host with SGLang (pinned 0.5.23):
# trainer + SGLang (EAGLE3 draft, our scheduler plugin, sidecar) + a bounded workload, printing
# acceptance length over time. Needs the target weights under models/<name> and a day-0 EAGLE3
# draft directory at the config's sglang.draft_path (see README, "SGLang tier").
#   scripts/sglang_full_loop.sh llama3.1-8b            # or qwen3-8b; extra key=value overrides follow
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-llama3.1-8b}"; shift || true
# The pinned release (the adapter is checked against it), and a GPU. sglang-launch sets what traces need
# in SGLang's environment (SGLANG_RETURN_ORIGINAL_LOGPROB=1) and flags (configs/<model>-sglang.yaml).
python -c "
import sglang, torch
from serving.sglang import pinned
assert torch.cuda.is_available(), 'no GPU'
assert sglang.__version__ == pinned.VERSION, f'sglang {sglang.__version__} installed; the adapter is pinned to {pinned.VERSION}'
print('sglang', sglang.__version__)"
exec aurora-jax demo --config "configs/${model}-sglang-demo.yaml" "$@"
