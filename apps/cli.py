"""`aurora-jax` command line. Subcommands import their heavy dependencies lazily, so
`aurora-jax --help` is instant and serving-side commands never pull in JAX."""

from __future__ import annotations

import argparse
import logging
import sys

from bridge.config import ConfigError
from bridge.eagle3 import LayoutError

EPILOG = """Overrides: any config key can be set after the options as key.sub=value, e.g.
  aurora-jax ingest --config configs/trainer.yaml ingest.address=0.0.0.0:50051 buffer.fsync=always
"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if level.lower() != "debug":  # orbax logs every save phase through absl at INFO
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notes


def _cmd_ingest(args) -> int:
    from aurora_jax.config import TrainerConfig
    from aurora_jax.service import run_ingest
    from bridge.config import load_config

    cfg = load_config(TrainerConfig, args.config, args.overrides)
    return run_ingest(cfg, stats_every=args.stats_every)


def _cmd_train(args) -> int:
    from aurora_jax.config import TrainerConfig
    from aurora_jax.loop import run_train
    from bridge.config import load_config

    overrides = list(args.overrides) + ([f"loop.max_steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(TrainerConfig, args.config, overrides)
    return run_train(cfg, resume=args.resume)


def _cmd_export_hf(args) -> int:
    from aurora_jax.export import export_hf

    path = export_hf(args.checkpoint, args.out, args.step, args.dtype)
    print(f"wrote {path}/config.json and {path}/model.safetensors")
    return 0


def _cmd_init_draft(args) -> int:
    from aurora_jax.config import TrainerConfig
    from aurora_jax.export import init_hf
    from bridge.config import load_config

    target = [f"target={args.target}"] if args.target else []
    path = init_hf(load_config(TrainerConfig, args.config, target + list(args.overrides)), args.out, args.dtype)
    print(f"wrote {path}/config.json and {path}/model.safetensors (untrained); serve it with SGLang "
          f"(sglang.draft_path={path}) and train with loop.init_from={path}")
    return 0


def _cmd_count_tokens(args) -> int:
    from pathlib import Path

    import numpy as np

    from apps.count_tokens import count_prompt_tokens

    files = [Path(args.prompts) / f"{d}.jsonl" for d in args.domains.split(",")] if Path(args.prompts).is_dir() \
        else [Path(args.prompts)]
    counts = count_prompt_tokens(args.tokenizer, files, args.vocab_size, args.split)
    np.save(args.out, counts)
    print(f"wrote {args.out}: {int(counts.sum())} tokens, {int((counts > 0).sum())} distinct of {counts.size}")
    return 0


def _cmd_prepare_target(args) -> int:
    from serving.targets import prepare_target

    out = args.out or f"models/{args.name}"
    path = prepare_target(args.name, out, args.dtype, check=not args.no_check)
    print(f"target ready: {path} (serve it with target.path={path}; train with target={path})")
    return 0


def _cmd_import_hf(args) -> int:
    from aurora_jax.export import describe_hf

    print(describe_hf(args.path))
    return 0


def _cmd_serve(args) -> int:
    from bridge.config import load_config
    from bridge.signals import stop_event
    from serving.engine import Engine, EngineConfig
    from serving.http import HttpServer

    cfg = load_config(EngineConfig, args.config, args.overrides)
    engine = Engine(cfg)
    http = HttpServer(engine, cfg.host, cfg.port).start()
    print(f"serving on {http.url}", flush=True)
    stop_event().wait()
    http.stop()
    engine.close()
    return 0


def _cmd_sglang_launch(args) -> int:
    from bridge.config import load_config
    from serving.sglang.launch import SGLangLaunchConfig, run

    return run(load_config(SGLangLaunchConfig, args.config, args.overrides), dry_run=args.dry_run)


def _cmd_load(args) -> int:
    from apps.load import main as load_main

    return load_main(args.load_args)


def _cmd_demo(args) -> int:
    from apps.demo import DemoConfig, run_demo
    from bridge.config import load_config

    cfg = load_config(DemoConfig, args.config, args.overrides)
    return run_demo(cfg)


def _cmd_aot_compile(args) -> int:
    """Runs aurora_jax.aot in a child that has libtpu on its path (this process never imports it)."""
    import subprocess

    from aurora_jax.aot import LIBTPU_DIR, child_env, libtpu_available
    if not libtpu_available():
        raise ValueError(f"libtpu is not installed at {LIBTPU_DIR}; the install step (`make .venv/.installed`) "
                         f"puts it there")
    return subprocess.call([sys.executable, "-m", "aurora_jax.aot", *args.aot_args], env=child_env())


def _cmd_bench(args) -> int:
    if args.what == "ingest":
        from bench.ingest import main as bench_main
    elif args.what == "train":
        from bench.train import main as bench_main
    elif args.what == "bridge":
        from bench.bridge import main as bench_main
    elif args.what == "serve":
        from bench.serve import main as bench_main
    elif args.what == "flywheel":
        from apps.flywheel import main as bench_main
    elif args.what == "attention":
        from bench.attention import main as bench_main
    elif args.what == "learn":
        from bench.learn import main as bench_main
    elif args.what == "fleet":
        from apps.fleet import main as bench_main
    else:  # argparse restricts choices
        raise AssertionError(args.what)
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aurora-jax",
        description="Online speculative decoding: serve with a draft, export traces, train the draft in JAX, "
                    "hot-swap it back.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("ingest", help="run the TraceIngest gRPC endpoint with its durable replay buffer",
                       description="Run the TraceIngest endpoint alone: traces are validated, spooled durably "
                                   "and acknowledged; unconsumed traces survive a restart.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", default="configs/trainer.yaml", help="trainer YAML config (default: %(default)s)")
    s.add_argument("--stats-every", type=float, default=10.0, help="seconds between stats log lines (0 = never)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("train", help="run the trainer: ingest endpoint + buffer + async train loop",
                       description="Run the trainer process: the TraceIngest endpoint fills the durable buffer "
                                   "while the draft trains on it (EAGLE3 TTT over trees), publishing a new "
                                   "draft_version every loop.sync_every steps and checkpointing with orbax. "
                                   "Metrics go to stderr and loop.metrics_path (JSONL).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", default="configs/trainer.yaml", help="trainer YAML config (default: %(default)s)")
    s.add_argument("--resume", action="store_true",
                   help="restore model, optimizer, step, draft_version and sampler from the latest checkpoint "
                        "in checkpoint.dir (the buffer resumes from its spool)")
    s.add_argument("--steps", type=int, default=None, help="shorthand for loop.max_steps=N")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("serve", help="run the embedded speculative-decoding engine behind an OpenAI-compatible API",
                       description="Serve a local Hugging Face causal LM with EAGLE3 tree speculative decoding "
                                   "(draft: none | untrained | hf), export every request's RequestTrace to the "
                                   "trainer, hot-swap draft versions from WeightSync. Routes: /v1/completions, "
                                   "/v1/chat/completions (stream or not), /v1/models, /health, /metrics.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", default="configs/serve-cpu.yaml", help="engine YAML config (default: %(default)s)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("sglang-launch", help="start SGLang on this GPU host wired into the loop (sidecar, plugin, "
                                             "hot-swap)",
                       description="Start an SGLang server (pinned release, see serving/sglang/pinned.py) as a child "
                                   "process, then serve users through the sidecar's OpenAI endpoint, exporting every "
                                   "request's trace to the trainer; with sglang.mode=draft the scheduler plugin "
                                   "records verify trees and WeightSync versions are hot-swapped into SGLang's draft. "
                                   "--dry-run prints the SGLang command without starting anything.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", required=True, help="e.g. configs/llama3.1-8b-sglang.yaml")
    s.add_argument("--dry-run", action="store_true", help="print the SGLang command line and environment, then exit")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_sglang_launch)

    s = sub.add_parser("aot-compile", help="compile the train step for TPU topologies on this CPU host (libtpu)",
                       description="Ahead-of-time XLA:TPU + Mosaic compiles of the whole train step at a trainer "
                                   "config's shapes, for chips this host does not have: `aurora-jax aot-compile "
                                   "--config configs/trainer.yaml --topology v5e:2x4 --devices 1,8`. "
                                   "`aurora-jax aot-compile -h` for its options.", add_help=False)
    s.add_argument("aot_args", nargs=argparse.REMAINDER, help="options of aurora_jax.aot")
    s.set_defaults(func=_cmd_aot_compile)

    s = sub.add_parser("load", help="send a bounded workload (mixed / ordered / shift) to an OpenAI-compatible endpoint",
                       description="Workload driver: `aurora-jax load --endpoint URL [key=value ...]`; "
                                   "`aurora-jax load -h` for its options.", add_help=False)
    s.add_argument("load_args", nargs=argparse.REMAINDER, help="options of the load driver")
    s.set_defaults(func=_cmd_load)

    s = sub.add_parser("export-hf", help="write an orbax checkpoint as an SGLang-loadable EAGLE3 HF directory",
                       description="Export the draft in CHECKPOINT (a checkpoint.dir; the latest step unless --step) "
                                   "as config.json + model.safetensors in OUT, for SGLang's "
                                   "--speculative-draft-model-path.")
    s.add_argument("checkpoint", help="checkpoint directory (checkpoint.dir of a training run)")
    s.add_argument("out", help="output directory")
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.set_defaults(func=_cmd_export_hf)

    s = sub.add_parser("init-draft", help="write an untrained (day-0) EAGLE3 draft dir from a trainer config",
                       description="Day 0 on SGLang: SGLang needs a draft directory before the first WeightSync "
                                   "version. This writes the trainer's model.* (random init, loop.seed) as "
                                   "config.json + model.safetensors without embed_tokens (SGLang uses the target's). "
                                   "Start the trainer with loop.init_from=OUT so both sides share its d2t/t2d.")
    s.add_argument("--config", required=True, help="the trainer's YAML config (its model.* and loop.* are used)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--target", default="", help="the target's HF directory: the draft's shape, RoPE, eps and "
                                                "vocabulary come from its config.json (the trainer's `target:`)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    s.set_defaults(func=_cmd_init_draft)

    s = sub.add_parser("count-tokens", help="token counts [V] of local prompts, for a day-0 draft vocabulary",
                       description="Count the target tokenizer's tokens over prompt files (<domain>.jsonl with a "
                                   "'prompt' per line) and save them as .npy for loop.vocab_counts.")
    s.add_argument("out", help="output .npy")
    s.add_argument("--tokenizer", required=True, help="the target model directory (tokenizer + config.json)")
    s.add_argument("--prompts", default="models/demo-target/prompts", help="a .jsonl file or a directory of them")
    s.add_argument("--domains", default="code,prose", help="with a directory: which <domain>.jsonl files")
    s.add_argument("--vocab-size", type=int, default=0, help="V (default: the target config's vocab_size)")
    s.add_argument("--split", default="all", help="only prompts of this split (e.g. train: never the held-out ones)")
    s.set_defaults(func=_cmd_count_tokens)

    s = sub.add_parser("prepare-target", help="convert a registry-installed real target (GGUF) into a local HF dir",
                       description="Find a known target's GGUF in its installed package (no download), convert it "
                                   "once with transformers + gguf into OUT (safetensors, tokenizer, chat template) and "
                                   "check it against the GGUF (tensors, tokenizer, greedy tokens). An existing complete "
                                   "OUT is left as it is.")
    from serving.targets import KNOWN  # (stdlib only at import: no torch)
    s.add_argument("name", choices=sorted(KNOWN), help="; ".join(f"{n}: GGUF from the package {k.package}"
                                                              for n, k in KNOWN.items()))
    s.add_argument("--out", default="", help="output directory (default: models/NAME)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--no-check", action="store_true", help="skip the check against the GGUF")
    s.set_defaults(func=_cmd_prepare_target)

    s = sub.add_parser("import-hf", help="check an EAGLE3 HF directory and print how to train from it",
                       description="Load an existing EAGLE3 draft directory (e.g. trained by SpecForge), check every "
                                   "key and shape, and print the `aurora-jax train loop.init_from=...` overrides that "
                                   "start training from it.")
    s.add_argument("path", help="EAGLE3 HF directory (config.json + *.safetensors)")
    s.set_defaults(func=_cmd_import_hf)

    s = sub.add_parser("demo", help="the main job on CPU (see README)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", default="configs/demo-cpu.yaml", help="demo YAML config (default: %(default)s)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("bench", help="benchmarks: print a table of ratios and write JSON",
                       description="Benchmarks. Each prints a table and writes JSON under --out. "
                                   "Pass -h after the name for its options, e.g. `aurora-jax bench ingest -h`.")
    s.add_argument("what", choices=["ingest", "train", "bridge", "serve", "flywheel", "attention", "learn", "fleet"],
                   help="ingest: endpoint throughput vs raw loopback gRPC; train: step time and tree tokens/s; "
                        "bridge: Flax->torch export (zero copy vs copy) and publish->swap-ready latency; "
                        "serve: target-only vs speculative decoding; flywheel: the paper's experiments in miniature; "
                        "attention: Pallas tree-attention kernel vs jnp reference (time, memory, TFLOP/s); "
                        "learn: held-out acceptance proxy over training time on a recorded spool, per config arm; "
                        "fleet: engine replicas against a multi-process trainer, the capacity model checked")
    s.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark")
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "load":  # the driver parses its own options (-h included)
        args.load_args = extra + args.load_args
    elif args.cmd == "aot-compile":
        args.aot_args = extra + args.aot_args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.log_level)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"aurora-jax: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad layouts and config combinations only checkable at start-up (devices, shapes)
        logging.getLogger(__name__).debug("details", exc_info=True)
        kind = "checkpoint layout error" if isinstance(e, LayoutError) else "error"
        print(f"aurora-jax: {kind}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable files, ports in use: say what, not a traceback
        print(f"aurora-jax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
