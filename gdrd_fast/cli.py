"""The gdrd-fast command: `gdrd-fast <subcommand> --help`.

  gdrd-fast demo [--quick]                 the offline CPU demo: table + plots in ./demo_output
                                           (--quick: a smoke run into ./demo_output_quick)
  gdrd-fast train --config paper --set data.train_root=...   two-stage GDRD training
                                           (--dry-run: every file checked, a step timed, peak memory)
  gdrd-fast cache-teachers --config paper --set data.teacher_cache=DIR   the frozen teachers run once;
                                           train with the same --set reads their outputs from DIR
  gdrd-fast eval --weights student.pt --pairs lfw.bin cfp_fp.bin   LFW-protocol verification at 8/16/32
  gdrd-fast identify tinyface --weights student.pt --root TinyFace/Testing_Set   CMC (also uccs, ar)
  gdrd-fast data pack FOLDER OUT.rec       identity folders -> insightface train.rec + train.idx
  gdrd-fast ablate --variants gdrd crd --resolutions 8 16 --seeds 2   a grid of training variants
  gdrd-fast analyze RUN                    feature geometry (CKA, probe, plots) of a finished ablation cell
  gdrd-fast bench [-- pytest args]         the kernel benchmarks (pytest-benchmark)
  gdrd-fast env                            what was built and which devices exist

A failure is one line on stderr and a non-zero exit: 2 for bad input (arguments, files, a missing
optional package), 1 for anything unexpected, 130 for Ctrl-C, 143 for SIGTERM (both stop every process the
command started). GDRD_FAST_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

# pip names of the optional packages a subcommand may need, where they differ from the import name
_PIP_NAMES = {"diffusers": "'gdrd_fast[demo]'", "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs (workers stopped,
    files closed); the exit code is then 143."""
    exit_code = 143


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


class CommandError(Exception):
    """A failure the user can fix (an argument, a file, a missing package): reported as one line, exit 2."""


def require(purpose: str, *modules: str) -> None:
    """Fail now, before any work starts, if a package `purpose` needs is not installed."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise CommandError(f"{purpose} needs {', '.join(missing)}, which is not installed: "
                           f"pip install {' '.join(_PIP_NAMES.get(m, m) for m in missing)}")


def _env(args) -> int:
    from .env import env_report
    print(env_report())
    return 0


def _train(args) -> int:
    import yaml

    from .train.config import load_config, to_dict
    from .train.pipeline import train_gdrd
    config = load_config(args.config, args.set)
    if config.models.generative_teacher == "diffusers":
        require("the diffusers generative teacher", "diffusers")
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if args.dry_run:
        from .train.dryrun import dry_run, format_report
        print(format_report(dry_run(config)))
        return 0
    from .distributed.launch import shutdown
    try:
        path = train_gdrd(config, resume=args.resume)
    finally:
        shutdown()  # under torchrun; a no-op in one process
    print(f"student weights: {path}")
    return 0


def _cache_teachers(args) -> int:
    from .distributed.launch import shutdown
    from .train.config import load_config
    from .train.pipeline import cache_teachers
    config = load_config(args.config, args.set)
    if config.models.generative_teacher == "diffusers":
        require("the diffusers generative teacher", "diffusers")
    try:
        manifest = cache_teachers(config, args.dtype, args.chunk, progress=not args.no_progress)
    finally:
        shutdown()  # under torchrun; a no-op in one process
    for name, error in manifest["error"].items():
        print(f"{name} {manifest['outputs'][name]['shape']} ({manifest['dtype']}) against the float32 teacher on "
              f"{error['images']} images x 2 flips: max abs {error['max_abs']:.3g}, mean abs {error['mean_abs']:.3g},"
              f" relative {error['relative']:.3g}")
    print(f"teacher cache: {config.data.teacher_cache}")
    return 0


def _resolutions(values: list[str]) -> list[int | None]:
    out = []
    for v in values:
        if v.lower() == "hr":
            out.append(None)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ValueError(f"--resolutions takes positive ints or 'hr', got {v!r}")
    return out


def _eval(args) -> int:
    import torch

    from .eval import markdown_table, verification_rows, write_verification_report
    from .eval.protocols import plot_accuracy_vs_resolution, verify_sets, write_sets_report
    resolutions = _resolutions(args.resolutions)
    for flag, path in [("--weights", args.weights)] + [("--pairs", p) for p in args.pairs]:
        if not Path(path).is_file():
            raise CommandError(f"{flag}: no file at {path!r}")
    net = _load_student(args.weights, args.arch).to(args.device).eval()
    results = verify_sets(net, args.pairs, resolutions, batch_size=args.batch_size, device=torch.device(args.device))
    extra = {"weights": str(args.weights), "arch": args.arch}
    if len(args.pairs) == 1:  # one set: its table, ROC curves and accuracy against resolution
        (name, per), = results.items()
        per = {f"{args.arch} {label}": r for label, r in per.items()}
        paths = write_verification_report(args.output, Path(args.pairs[0]).name, per, extra=extra)
        paths["figure"] = plot_accuracy_vs_resolution(Path(args.output) / "accuracy_vs_resolution.png", results,
                                                      f"{args.arch} on {name}")
        print(markdown_table(verification_rows(per)))
    else:
        paths = write_sets_report(args.output, results, extra=extra)
        print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _load_student(path: str, arch: str):
    """The IResNet in `path`; a trainer checkpoint (stage1.pt, stage2.pt, single.pt) is refused with where the
    student's own weights are."""
    from . import models
    try:
        return models.load_backbone(path, arch)
    except ValueError:
        try:
            saved = models.checkpoints.read_checkpoint(path, require_digest=False, what="--weights")
        except Exception:
            saved = None
        if isinstance(saved, dict) and {"stage", "modules"} <= saved.keys():
            folder = Path(path).parent
            raise CommandError(f"--weights: {path} is a training checkpoint (stage {saved['stage']!r}), not the "
                               f"student's weights: pass {folder / 'student.pt'} (the trained student) or "
                               f"{folder / 'best.pt'} (the best validated one)") from None
        raise


def _identify(args) -> int:
    import torch

    from .eval import identification_rows, markdown_table, protocols
    default = ["hr"] if args.benchmark == "tinyface" else ["16"]
    resolutions = _resolutions(args.resolutions or default)
    net = _load_student(args.weights, args.arch).to(args.device).eval()
    kw = dict(resolutions=resolutions, batch_size=args.batch_size, device=torch.device(args.device),
              num_workers=args.num_workers)
    top1 = subsets = None
    if args.benchmark == "tinyface":
        ranks = protocols.tinyface(net, args.root, **kw)
    elif args.benchmark == "uccs":
        if args.split is None:
            raise ValueError("uccs needs --split: a split file with 'train' and 'test' lines")
        top1, ranks = protocols.uccs(net, args.root, args.split, **kw)
    else:
        ranks, subsets = protocols.ar(net, args.root, **kw)
    paths = protocols.write_report(args.output, f"{args.benchmark} ({args.root})", args.arch, ranks, top1, subsets)
    print(markdown_table(identification_rows({f"{args.arch} {k}": v for k, v in ranks.items()},
                                             None if top1 is None else {f"{args.arch} {k}": v for k, v in top1.items()})))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _data_pack(args) -> int:
    from .data import pack_folder
    rec, idx = pack_folder(args.folder, args.out, progress=not args.no_progress)
    print(f"wrote {rec} and {idx}")
    return 0


def benchmarks_dir() -> Path:
    """The kernel benchmarks: shipped inside the package (gdrd_fast/benchmarks), or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "benchmarks", here.parent / "benchmarks"):
        if (candidate / "harness.py").is_file():
            return candidate
    raise CommandError(f"no benchmarks found beside {here}: this install ships without them; "
                       "run from a source checkout or pass --path")


def _bench(args) -> int:
    path = args.path or str(benchmarks_dir())
    if not Path(path).exists():
        raise CommandError(f"--path: no benchmark file or folder at {path!r}")
    require("the benchmarks", "pytest", "pytest_benchmark")
    extra = [a for a in args.pytest_args if a != "--"]
    return subprocess.call([sys.executable, "-m", "pytest", path, "--benchmark-only", "-p", "no:cacheprovider",
                            *extra])


def _demo(args) -> int:
    require("the demo (its generative teacher is a diffusers UNet)", "diffusers")
    # the first line, before torch loads (seconds; a minute on a busy machine); stderr stays for failures
    print(f"gdrd-fast demo{' --quick' if args.quick else ''}: loading torch and the demo's models...", flush=True)
    import torch

    from .demo import load_demo_config, run_demo
    config = load_demo_config(args.config, quick=args.quick, overrides=args.set)
    output = Path(args.output or ("demo_output_quick" if args.quick else "demo_output"))
    if (output / "results.json").exists():
        print(f"gdrd-fast demo: replacing the results of an earlier run in {output}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_demo(output, config, train_root=args.train_root, pairs=args.pairs, device=args.device,
                      progress=not args.no_progress, jobs=args.jobs, threads=args.threads or 1)
    print(f"\n{result['note']}\n\n{result['table']}\n{result['text']}")
    print("outputs: " + ", ".join(str(p) for p in result["paths"].values()))
    return 0


def _ablate(args) -> int:
    from .demo import load_demo_config
    from .demo.ablate import run_grid
    from .train.config import VARIANTS
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    config = load_demo_config(args.config, quick=args.quick, overrides=args.set)
    resolutions = []
    for v in args.resolutions:
        if not v.isdigit() or int(v) < 1:
            raise ValueError(f"--resolutions takes positive ints, got {v!r}")
        resolutions.append(int(v))
    summary = run_grid(args.output, config, args.variants, resolutions, args.seeds, args.train_root, args.pairs,
                       args.device, args.jobs, args.threads, progress=not args.no_progress)
    print(summary["markdown"])
    print("outputs: " + ", ".join(str(p) for p in summary["paths"].values()))
    return 0


def _analyze(args) -> int:
    from .demo.analyze import analyze_cell
    result = analyze_cell(args.run, args.output, device=args.device)
    print(result["markdown"])
    print("outputs: " + ", ".join(str(p) for p in result["paths"].values()))
    return 0


class _Parser(argparse.ArgumentParser):
    """Rejects unknown arguments itself, so the error shows the (sub)command's own usage, not the top level's.
    Subparsers inherit the class, nested ones (gdrd-fast data pack) included."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gdrd-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="what was built and which devices exist")
    env.set_defaults(func=_env)

    overrides = dict(action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set data.batch_size=64 (repeatable; YAML values)")

    train = sub.add_parser("train", help="two-stage GDRD training from a YAML recipe")
    train.add_argument("--config", default="paper",
                       help="packaged recipe name (paper) or a .yaml path (the demo recipe runs with `gdrd-fast demo`)")
    train.add_argument("--set", **overrides)
    train.add_argument("--resume", metavar="CHECKPOINT", help="a stage1.pt or stage2.pt to continue from")
    train.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    train.add_argument("--dry-run", action="store_true",
                       help="check every file, build every stage, read batches and time one step per stage; report "
                            "the peak memory and time per step, train nothing and write nothing")
    train.set_defaults(func=_train)

    cache = sub.add_parser("cache-teachers", help="run the frozen teachers once over the training set and store "
                                                  "their outputs in data.teacher_cache, for train to read")
    cache.add_argument("--config", default="paper", help="packaged recipe name (paper) or a .yaml path")
    cache.add_argument("--set", **overrides)
    cache.add_argument("--dtype", default="bf16", choices=["bf16", "float32", "fp8"],
                       help="storage precision (fp8: float8_e4m3fn with a per-entry scale); its error against "
                            "the float32 teachers is reported at the end")
    cache.add_argument("--chunk", type=int, default=64,
                       help="images per teacher batch; a killed run resumes after its last finished chunk")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=_cache_teachers)

    ev = sub.add_parser("eval", help="LFW-protocol verification of an IResNet student on pairs .bin files")
    ev.add_argument("--weights", required=True, help="IResNet state dict (insightface keys), e.g. student.pt")
    ev.add_argument("--arch", default="r18", help="IResNet arch: r18, r34, r50, r100")
    ev.add_argument("--pairs", required=True, nargs="+",
                    help="insightface pairs .bin files (e.g. lfw.bin cfp_fp.bin agedb_30.bin)")
    ev.add_argument("--resolutions", nargs="+", default=["8", "16", "32"],
                    help="input sides to degrade to before the 112x112 network ('hr' = none)")
    ev.add_argument("--output", default="eval_output",
                    help="folder for the table (.md + .json) and accuracy_vs_resolution.png (one set: also roc.png)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=_eval)

    ident = sub.add_parser("identify", help="identification benchmarks over their released layouts: "
                                            "tinyface, uccs, ar (README: Evaluation layouts)")
    ident.add_argument("benchmark", choices=["tinyface", "uccs", "ar"])
    ident.add_argument("--weights", required=True, help="IResNet state dict (insightface keys), e.g. student.pt")
    ident.add_argument("--arch", default="r18", help="IResNet arch: r18, r34, r50, r100")
    ident.add_argument("--root", required=True,
                       help="tinyface: Testing_Set (Probe, Gallery_Match, Gallery_Distractor); uccs: identity "
                            "folders; ar: gallery/ and one folder per probe subset")
    ident.add_argument("--split", help="uccs: split file with 'train' and 'test' lines")
    ident.add_argument("--resolutions", nargs="+", default=None,
                       help="input sides to degrade to ('hr' = none); default: hr for tinyface, 16 otherwise")
    ident.add_argument("--output", default="identify_output", help="folder for identification.json / .md")
    ident.add_argument("--batch-size", type=int, default=128)
    ident.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    ident.add_argument("--device", default="cpu")
    ident.set_defaults(func=_identify)

    data = sub.add_parser("data", help="training-set tools: pack identity folders into insightface RecordIO")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pack = data_sub.add_parser("pack", help="identity folders -> OUT.rec + OUT.idx (insightface's layout)")
    pack.add_argument("folder", help="identity-folder root: one sub-folder of images per identity")
    pack.add_argument("out", help="the .rec to write; its .idx is written beside it")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=_data_pack)

    bench = sub.add_parser("bench", help="run the kernel benchmarks: pytest <path> --benchmark-only [args]")
    bench.add_argument("--path", help="benchmark folder or file (default: the benchmarks of this install)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest (after --)")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="the offline CPU demo: GDRD vs baseline vs CRD at 16x16, table + plots")
    demo.add_argument("--output", help="folder for the table, JSON, plots and log "
                                       "(default demo_output, or demo_output_quick with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run (seconds) that checks the whole path; its numbers mean nothing")
    demo.add_argument("--config", default="demo", help="demo recipe name or .yaml path")
    demo.add_argument("--set", **overrides)
    demo.add_argument("--train-root", help="real data: identity-folder tree to train on (with --pairs)")
    demo.add_argument("--pairs", help="real data: insightface pairs .bin to verify on (with --train-root)")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    demo.add_argument("--threads", type=int, default=0,
                      help="CPU threads for torch per process (default: torch's choice in the main process, 1 per "
                           "ablation process; 1 is fastest on a busy machine)")
    demo.add_argument("--jobs", type=int, default=0, help="parallel processes for the students (default: cores / threads)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (the log file still fills)")
    demo.set_defaults(func=_demo)

    ablate = sub.add_parser("ablate", help="a grid of training variants x resolutions x seeds: table + figure")
    ablate.add_argument("--config", default="demo", help="demo-style recipe name or .yaml path")
    ablate.add_argument("--variants", nargs="+", default=["baseline", "crd", "crrcd", "gdrd", "gdrd-e2e"],
                        metavar="VARIANT", help="training variants (see `gdrd-fast train --print-config`: variant)")
    ablate.add_argument("--resolutions", nargs="+", default=["16"], help="LR input sides, e.g. 8 16 32")
    ablate.add_argument("--seeds", type=int, default=2, help="student seeds 0..N-1 per cell (std needs >= 2)")
    ablate.add_argument("--output", default="ablation_output", help="grid folder (rerun to resume a stopped grid)")
    ablate.add_argument("--quick", action="store_true", help="the recipe's tiny --quick settings")
    ablate.add_argument("--set", **overrides)
    ablate.add_argument("--train-root", help="real data: identity-folder tree to train on (with --pairs)")
    ablate.add_argument("--pairs", help="real data: insightface pairs .bin to verify on (with --train-root)")
    ablate.add_argument("--device", default="cpu")
    ablate.add_argument("--jobs", type=int, default=0, help="parallel processes (default: cores / threads)")
    ablate.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ablate.add_argument("--no-progress", action="store_true")
    ablate.set_defaults(func=_ablate)

    analyze = sub.add_parser("analyze", help="feature geometry of a finished ablation cell: CKA, probe, plots")
    analyze.add_argument("run", help="an ablation cell folder (cells/<variant>-r<res>-s<seed>) or a grid folder")
    analyze.add_argument("--output", default=None, help="folder for the outputs (default: RUN/geometry)")
    analyze.add_argument("--device", default="cpu")
    analyze.set_defaults(func=_analyze)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        text = f"needs {exc.name}, which is not installed: pip install {_PIP_NAMES.get(exc.name, exc.name)}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# failures of the user's input or environment; anything else is a bug, reported as one line all the same
_USER_ERRORS = (CommandError, ValueError, TypeError, OSError, ImportError, pickle.UnpicklingError)


def main(argv=None) -> int:
    """Run one subcommand; every failure is reported here, once, as one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # Terminated (SIGTERM) or train's StopRequested: the signal's exit code
        if in_main_thread:  # the process exits now (workers joined, files closed): a late Ctrl-C would only
            previous = signal.SIG_IGN  # turn exit 130 into a traceback or a death by signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        parser.exit(getattr(exc, "exit_code", 130), f"{prog}: interrupted{f': {exc}' if str(exc) else ''}\n")
    except Exception as exc:
        if os.environ.get("GDRD_FAST_DEBUG"):
            raise
        from .data.workers import original_error
        exc = original_error(exc)  # a DataLoader worker's error, as the worker raised it
        if isinstance(exc, _USER_ERRORS):
            parser.exit(2, f"{prog}: error: {_one_line(exc)}\n")
        parser.exit(1, f"{prog}: unexpected {type(exc).__name__}: {_one_line(exc)} "
                       "(GDRD_FAST_DEBUG=1 shows the traceback)\n")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
