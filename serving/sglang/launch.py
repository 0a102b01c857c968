"""`aurora-jax sglang-launch`: SGLang on this GPU host, wired into the online-training loop.

One command starts, in order: the sidecar's tree sink (with a draft), the SGLang server as a child
process (flags from the config; the plugin is told where the sink is through AURORA_TREE_SINK),
waits for its /health, then serves users through the sidecar's OpenAI endpoint (exporting traces
to the trainer) and, with a draft, follows the trainer's WeightSync versions into SGLang's draft.
`--dry-run` prints the SGLang command line and environment without starting anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import time

import httpx

from bridge.config import resolve_secret
from bridge.signals import stop_event
from serving.sglang.config import SGLangLaunchConfig, SGLangServerConfig
from serving.sglang.sidecar import SINK_PATH

log = logging.getLogger(__name__)

# SGLang divides output logprobs by the temperature unless this is set (layers/sampler.py, greedy batches
# aside): a trace's targets must be the raw distribution at every position, as at prompt and tree nodes.
SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}


def sglang_command(cfg: SGLangLaunchConfig) -> list[str]:
    """`python -m sglang.launch_server ...` for this config (flags checked against the pinned release)."""
    s = cfg.sglang
    cmd = [s.python, "-m", "sglang.launch_server", "--model-path", s.model_path, "--host", s.host,
           "--port", str(s.port), "--tp-size", str(s.tp_size), "--weight-version", "0"]
    if s.mode == "draft":
        cmd += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", s.draft_path,
                "--speculative-num-steps", str(s.num_steps), "--speculative-eagle-topk", str(s.topk),
                "--speculative-num-draft-tokens", str(s.num_draft_tokens), "--enable-return-hidden-states"]
    else:  # aux hidden states from the target alone; EAGLE3 names the capture convention
        cmd += ["--enable-return-aux-hidden-states", "--speculative-algorithm", "EAGLE3"]
    if s.mem_fraction_static:
        cmd += ["--mem-fraction-static", str(s.mem_fraction_static)]
    if s.disable_radix_cache:
        cmd += ["--disable-radix-cache"]
    if s.chunked_prefill_size:
        cmd += ["--chunked-prefill-size", str(s.chunked_prefill_size)]
    if s.api_key:
        cmd += ["--api-key", resolve_secret(s.api_key)]
    if s.admin_api_key:
        cmd += ["--admin-api-key", resolve_secret(s.admin_api_key)]
    return cmd + list(s.extra_args)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"SGLang exited with code {proc.returncode} during start-up (see its log above)")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
        log.info("waiting for SGLang at %s (%.0fs)", url, time.monotonic() - t0)
    raise RuntimeError(f"SGLang not healthy after {timeout_s:.0f}s")


def _draft_config(path: str):
    """The served draft's config (None when the path is not a local directory, e.g. a hub id)."""
    from bridge.eagle3 import load_hf_config
    return load_hf_config(path) if os.path.isfile(os.path.join(path, "config.json")) else None


def served_vocab(draft_path: str) -> dict:
    """The vocabulary map SGLang reads from the draft at start (`hot_token_id`, from d2t); {} when the
    draft has none (full vocabulary) or is not a local directory."""
    from bridge.eagle3 import read_tensor, weights_file

    try:
        return {"d2t": read_tensor(weights_file(draft_path, "d2t"), "d2t")}
    except (KeyError, OSError):
        return {}


def check_draft(s: SGLangServerConfig) -> None:
    """Before SGLang starts: a local draft directory must fit a local target (vocabulary, fc width);
    a hub id on either side is left to SGLang on its host."""
    from bridge.eagle3 import check_draft_fits_target, read_target_config

    draft = _draft_config(s.draft_path) if s.mode == "draft" else None
    if draft is not None and os.path.isfile(os.path.join(s.model_path, "config.json")):
        check_draft_fits_target(draft, read_target_config(s.model_path), s.draft_path, s.model_path)


def run(cfg: SGLangLaunchConfig, dry_run: bool = False) -> int:
    from serving.http import HttpServer
    from serving.sglang.sidecar import SGLangEngine, TreeSink
    from serving.sglang.weights import SGLangWeightUpdater
    from serving.weight_sync import WeightSubscriber

    s = cfg.sglang
    url = f"http://{s.host}:{s.port}"
    sink = TreeSink(cfg.sidecar.tree_sink) if s.mode == "draft" and not dry_run else None
    env = dict(SERVER_ENV)
    if s.mode == "draft":  # tells the scheduler plugin where the sidecar's tree sink is
        env.update(AURORA_TREE_SINK=sink.url if sink else f"http://{cfg.sidecar.tree_sink}{SINK_PATH}",
                   AURORA_TREE_TOPK=str(cfg.tree_topk))
    cmd = sglang_command(cfg)
    check_draft(s)
    if dry_run:
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
        return 0
    proc = subprocess.Popen(cmd, env={**os.environ, **env})
    engine = http = sub = None
    try:
        _wait_healthy(url, proc, s.startup_timeout_s)
        sidecar = dataclasses.replace(cfg.sidecar, sglang_url=url, api_key=s.api_key, with_draft=s.mode == "draft",
                                      tokenizer=cfg.sidecar.tokenizer or s.model_path, original_logprobs=True)
        updater = None
        if s.mode == "draft" and cfg.subscribe_weights:
            updater = SGLangWeightUpdater(dataclasses.replace(cfg.updater, url=url, tp_size=s.tp_size,
                                                              api_key=s.admin_api_key or s.api_key),
                                          served_vocab=served_vocab(s.draft_path))
        engine = SGLangEngine(sidecar, updater=updater, sink=sink)  # the sink SGLang's plugin was told about
        if updater is not None:  # versions trained for another draft than s.draft_path's are refused
            sub = WeightSubscriber(cfg.weights, updater, draft_config=_draft_config(s.draft_path)).start()
        http = HttpServer(engine, sidecar.host, sidecar.port).start()
        log.info("SGLang at %s; traces -> %s%s", url, sidecar.traces.address,
                 f"; draft versions <- {cfg.weights.address}" if sub else "")
        print(f"serving on {http.url}", flush=True)
        done = stop_event()
        while not done.wait(5.0):
            if proc.poll() is not None:
                log.error("SGLang exited with code %s", proc.returncode)
                return 1
        return 0
    finally:
        for part in (http, sub, engine):
            if part is not None:
                part.stop() if part is http else part.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
