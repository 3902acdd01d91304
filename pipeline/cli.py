"""The `sslpipe` command line: data, pretrain, examples, eval, export, report, tasks, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from core.errors import ConfigError
from pipeline.config import EVAL_PROTOCOLS, Config, untrusted_overrides
from pipeline.data.storage import is_url

log = logging.getLogger("sslpipe")

WRITER_WORKERS_HELP = "processes writing shards (default: 1); the shards are the same bytes for any number"
SHARD_SIZE_HELP = ("samples per shard (default 0: at least 16 shards per split where the data allows, at most 5000 samples each, "
                   "so small datasets train on many workers)")
OVERRIDE_HELP = "config overrides as --section.key=value (e.g. --optim.lr=0.05 --train.steps=2000), applied after --config"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslpipe",
        description="Self-supervised pretraining on WebDataset shards with Ray Train, then kNN / linear-probe evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also SSLPIPE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="write a dataset as WebDataset shards plus manifest.json")
    sources = data.add_subparsers(dest="source", required=True, metavar="SOURCE")
    fmnist = sources.add_parser("fashion-mnist", help="Fashion-MNIST idx .gz files -> train/test shards",
                                description="Looks for the idx .gz files in --src, $FASHION_MNIST_DIR, "
                                            "../shared/data/fashion-mnist, /usr/share/datasets/fashion-mnist (in that order).")
    fmnist.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    fmnist.add_argument("--src", help="folder holding the four idx .gz files")
    fmnist.add_argument("--workers", type=int, default=1, help=WRITER_WORKERS_HELP)
    fmnist.add_argument("--samples-per-shard", type=int, default=0, help=SHARD_SIZE_HELP)
    digits = sources.add_parser("digits", help="scikit-learn's 8x8 handwritten digits (ships with scikit-learn) -> train/test shards",
                                description="1,797 images, 10 classes, a stratified seeded split: a second dataset to score "
                                            "transfer on (sslpipe eval RUN --data-root DIR).")
    digits.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    digits.add_argument("--test-fraction", type=float, default=0.3)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--workers", type=int, default=1, help=WRITER_WORKERS_HELP)
    digits.add_argument("--samples-per-shard", type=int, default=0, help=SHARD_SIZE_HELP)
    folder = sources.add_parser("folder", help="an image tree (PATH/[train|val|test/]<class>/img) -> shards",
                                description="Class-per-subfolder images; labels are optional (images directly in PATH). "
                                            "Subfolders train/, val/, test/ become splits; otherwise everything is 'train'.")
    folder.add_argument("path", help="root of the image tree")
    folder.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    folder.add_argument("--mode", default="RGB", choices=["RGB", "L"], help="colour mode images are converted to when read")
    folder.add_argument("--workers", type=int, default=1, help=WRITER_WORKERS_HELP)
    folder.add_argument("--samples-per-shard", type=int, default=0, help=SHARD_SIZE_HELP)
    video = sources.add_parser("video", help="video files with sound -> audio-visual shards (frame, audio window, record)",
                               description="PATH is a video or a folder of them (class subfolders give labels, as for `data folder`). "
                                           "Frames every 1/FPS s, centre-cropped and resized, each with the mono audio window centred on "
                                           "its timestamp; frames whose window leaves the clip are skipped. Videos without sound, "
                                           "unreadable files and clips shorter than the window are skipped and named. "
                                           "A seeded fraction of whole videos becomes the test split.")
    video.add_argument("path", help="a video file or a folder of them")
    video.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    video.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video (default: 2)")
    video.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (default: 16000)")
    video.add_argument("--window", type=float, default=1.0, help="audio window in seconds, centred on each frame (default: 1.0)")
    video.add_argument("--image-size", type=int, default=64, help="frames become square images of this size (default: 64)")
    video.add_argument("--labels", help='JSON object {"<video file>": "<class name>"} (instead of class subfolders)')
    video.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class's videos held out as 'test' (default: 0.2)")
    video.add_argument("--seed", type=int, default=0, help="seed of the train/test split of videos")
    video.add_argument("--workers", type=int, default=1, help="videos decoded in parallel processes (default: 1)")
    video.add_argument("--samples-per-shard", type=int, default=0, help=SHARD_SIZE_HELP)
    synth = sources.add_parser("av-synth", help="SYNTHETIC audio-visual clips (class-coloured moving shapes with class sounds) -> shards",
                               description="Procedural clips, not real data: each class has its own shape, colour, motion, pitch, "
                                           "timbre and rhythm. Writes the samples `data video` would make from the clips, "
                                           "and with --mp4 N also N clips as .mp4 files (H.264 + AAC) in class folders.")
    synth.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    synth.add_argument("--clips", type=int, default=500, help="number of clips (default: 500)")
    synth.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    synth.add_argument("--duration", type=float, default=4.0, help="seconds per clip (default: 4)")
    synth.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (default: 2)")
    synth.add_argument("--image-size", type=int, default=32, help="frame size in pixels (default: 32)")
    synth.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (default: 16000)")
    synth.add_argument("--window", type=float, default=1.0, help="audio window in seconds, centred on each frame (default: 1.0)")
    synth.add_argument("--test-fraction", type=float, default=0.2, help="fraction of clips held out as 'test' (default: 0.2)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--mp4", type=int, default=0, metavar="N", help="also write the first N clips as .mp4 files")
    synth.add_argument("--mp4-out", help="folder for the .mp4 files (default: OUT/mp4)")
    synth.add_argument("--workers", type=int, default=1, help=WRITER_WORKERS_HELP)
    synth.add_argument("--samples-per-shard", type=int, default=350,
                       help="samples per shard (default: 350: 8 train shards at the default size, enough for 2 workers x 2 loader workers)")

    verify = sources.add_parser("verify", help="check every shard of a dataset against its manifest (sha256, count, decoding)",
                                description="Reads every shard of ROOT (a folder or a URL) once: its sha256 and sample count must "
                                            "match manifest.json and every sample must decode. Exits 1 naming each bad shard and why.")
    verify.add_argument("root", metavar="ROOT", help="dataset folder or URL (holds manifest.json)")
    verify.add_argument("--splits", nargs="*", help="splits to check (default: all)")

    pretrain = commands.add_parser("pretrain", help="pretrain a backbone with a pretext task on Ray Train", epilog=OVERRIDE_HELP)
    pretrain.add_argument("--config", help="YAML config (see configs/); defaults apply to keys it leaves out")
    pretrain.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (uses its config.yaml unless --config)")
    pretrain.add_argument("--local", action="store_true", help="train in this one process without Ray (debugging, single-GPU benchmarks)")
    add_scaling_flags(pretrain)
    add_input_flags(pretrain)

    examples = commands.add_parser("examples", help="draw what the task feeds the network and what it must predict (PNG)", epilog=OVERRIDE_HELP)
    examples.add_argument("--config", required=True, help="YAML config (see configs/)")
    examples.add_argument("--out", default="examples.png", help="PNG to write (default: examples.png)")
    examples.add_argument("--count", type=int, default=8, help="training samples to draw (default: 8)")
    examples.add_argument("--checkpoint", metavar="RUN_OR_CHECKPOINT", help="draw the trained task of this run or checkpoint "
                          "(colorization adds its predicted colours)")
    add_input_flags(examples)

    evaluate = commands.add_parser("eval", help="kNN and linear-probe top-1 of a checkpoint vs raw pixels and random init")
    evaluate.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory (latest checkpoint) or checkpoint")
    evaluate.add_argument("--out", help="output folder (default: RUN_DIR/eval)")
    evaluate.add_argument("--data-root", help="shard folder, if it moved since pretraining")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--image-size", type=int, help="evaluate whole images at this size (default: the run's eval.image_size, "
                          "else the pretraining size; 0 forces the pretraining size)")
    evaluate.add_argument("--precise-bn", type=int, metavar="IMAGES",
                          help="recompute batch-norm statistics on this many unaugmented train images first (default: the "
                               "run's eval.precise_bn; 0: as trained)")
    evaluate.add_argument("--protocols", nargs="*", metavar="NAME",
                          help="protocols beside kNN and the linear probe: low_shot, clustering, per_layer (default: the run's "
                               "eval.protocols, low_shot and clustering; none: kNN and probe only)")
    add_input_flags(evaluate)

    export = commands.add_parser("export", help="export features (.npy, keys, labels) and backbone weights (safetensors)")
    export.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--splits", nargs="*", help="splits to extract features for (default: all)")
    export.add_argument("--no-features", action="store_true", help="export the backbone weights only")
    export.add_argument("--data-root", help="shard folder, if it moved since pretraining")
    export.add_argument("--device")
    add_input_flags(export)

    report = commands.add_parser("report", help="one self-contained HTML page comparing runs: configs, eval results, plots")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (config.yaml, metrics.jsonl, eval/)")
    report.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")

    commands.add_parser("tasks", help="list the registered pretext tasks and their options")

    demo = commands.add_parser("demo", help="Fashion-MNIST end to end: shards, 2-worker Ray pretraining, eval, table", epilog=OVERRIDE_HELP)
    demo.add_argument("--config", default="configs/rotation_fmnist.yaml")
    demo.add_argument("--src", help="Fashion-MNIST folder (see `sslpipe data fashion-mnist --help`)")
    add_scaling_flags(demo)
    add_input_flags(demo)
    return parser


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true", help="raise on the first bad sample or shard (data.strict=true); "
                        "default: skip and count them with a warning, abort above data.max_bad_fraction")
    parser.add_argument("--allow-shell-urls", action="store_true", help="let `pipe:` shard URLs run their shell command (data.allow_shell_urls=true)")


def input_overrides(args) -> dict:
    """The data.* values the input flags set (none when a flag is absent: the config's value stays)."""
    return {k: True for k, flag in (("strict", args.strict), ("allow_shell_urls", args.allow_shell_urls)) if flag}


def worker_count(text: str) -> int | list[int]:
    """`--num-workers 4` or `--num-workers 2:8` (elastic)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give N or MIN:MAX, e.g. 4 or 2:8")
    return parts[0] if len(parts) == 1 else parts


def add_scaling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address ('auto', host:port); default: $RAY_ADDRESS or an embedded local Ray")
    parser.add_argument("--num-workers", type=worker_count,
                        help="Ray Train workers (scaling.num_workers): N, or MIN:MAX for elastic training")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (scaling.use_gpu=true)")


def load_config(args, overrides: list[str]) -> Config:
    path = args.config
    if getattr(args, "resume", None) and not path:
        from pipeline.train.run_storage import fetch_run

        path = fetch_run(args.resume) / "config.yaml"  # a URL run's: fetched into its local mirror
    flags = []
    # A run directory's config.yaml may come from someone else: its security switches are reset
    # before this command line's overrides and flags apply.
    trusted = [] if args.config else untrusted_overrides()
    if getattr(args, "resume", None):
        flags.append(f"run_dir={args.resume if is_url(args.resume) else Path(args.resume).resolve()}")
    if args.address:
        flags.append(f"scaling.address={args.address}")
    if args.num_workers is not None:
        flags.append(f"scaling.num_workers={json.dumps(args.num_workers)}")
    if args.gpu:
        flags.append("scaling.use_gpu=true")
    flags += [f"data.{key}=true" for key in input_overrides(args)]
    cfg = Config.load(path, [*trusted, *overrides, *flags])
    from models.backbone import check_backbone

    check_backbone(cfg.model)
    return cfg


def cmd_data(args) -> int:
    from pipeline.data.ingest import write_fashion_mnist, write_image_folder

    if args.source == "verify":
        from pipeline.data.verify import summary, verify_dataset

        reports = verify_dataset(args.root, args.splits)
        print(summary(reports))
        return 0 if all(r.ok for r in reports) else 1
    if args.source == "fashion-mnist":
        manifest = write_fashion_mnist(args.out, args.src, args.samples_per_shard, args.workers)
    elif args.source == "digits":
        from pipeline.data.ingest import write_digits

        manifest = write_digits(args.out, args.test_fraction, args.seed, args.samples_per_shard, args.workers)
    elif args.source == "video":
        from pipeline.data.video import write_video_dataset

        manifest = write_video_dataset(args.path, args.out, args.fps, args.sample_rate, args.window, args.image_size, args.labels,
                                       args.test_fraction, args.seed, args.workers, args.samples_per_shard)
    elif args.source == "av-synth":
        from pipeline.data.av_synth import write_av_synth

        manifest = write_av_synth(args.out, args.clips, args.classes, args.duration, args.fps, args.image_size, args.sample_rate,
                                  args.window, test_fraction=args.test_fraction, seed=args.seed, mp4=args.mp4, mp4_out=args.mp4_out,
                                  samples_per_shard=args.samples_per_shard, workers=args.workers)
    else:
        manifest = write_image_folder(args.path, args.out, args.mode, args.samples_per_shard, args.workers)
    print(f"wrote {manifest}")
    return 0


def cmd_pretrain(args, overrides) -> Path:
    from pipeline.train.launch import pretrain, pretrain_local

    cfg = load_config(args, overrides)
    if args.local:
        return pretrain_local(cfg, resume=args.resume)
    return pretrain(cfg, resume=args.resume)


def cmd_examples(args, overrides) -> None:
    from models.backbone import check_backbone
    from pipeline.train.examples import write_examples

    cfg = Config.load(args.config, [*overrides, *(f"data.{key}=true" for key in input_overrides(args))])
    check_backbone(cfg.model)
    path = write_examples(cfg, args.out, args.count, checkpoint=args.checkpoint)
    print(f"wrote {path}" if path else f"task {cfg.task.name} has nothing to draw")


def cmd_eval(args) -> dict:
    from eval.evaluate import evaluate
    from eval.report import markdown_table

    if args.protocols is not None:
        unknown = sorted(set(args.protocols) - set(EVAL_PROTOCOLS))
        if unknown:
            raise ConfigError(f"--protocols: unknown {unknown}; choose from {list(EVAL_PROTOCOLS)}")
    if args.precise_bn is not None and args.precise_bn < 0:
        raise ConfigError(f"--precise-bn={args.precise_bn} must be >= 0")
    results = evaluate(args.path, args.out, args.data_root, args.device, image_size=args.image_size, data_options=input_overrides(args),
                       protocols=args.protocols, precise_bn=args.precise_bn)
    print(markdown_table(results))
    return results


def cmd_export(args) -> None:
    from eval.export import export_backbone, export_features

    file = export_backbone(args.path, args.out)
    print(f"wrote {file}")
    if not args.no_features:
        counts = export_features(args.path, args.out, args.splits, args.device, args.data_root, data_options=input_overrides(args))
        print(f"wrote features to {args.out}: {counts}")


def cmd_report(args) -> None:
    from eval.html_report import write_report

    print(f"wrote {write_report(args.run_dirs, args.out)}")


def cmd_tasks() -> None:
    from pretext import TASKS, task_options

    for name, cls in sorted(TASKS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
        for option, default in task_options(name).items():
            print(f"{'':12s}   task.options.{option} (default {default!r})")


def cmd_demo(args, overrides) -> None:
    from eval.evaluate import evaluate
    from eval.report import markdown_table
    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST
    from pipeline.train.launch import pretrain

    start = time.perf_counter()
    cfg = load_config(args, overrides)
    if not (Path(cfg.data.root) / MANIFEST).is_file():
        write_fashion_mnist(cfg.data.root, args.src, workers=os.cpu_count() or 1)
    data_done = time.perf_counter()
    run_dir = pretrain(cfg)
    import ray

    ray.shutdown()  # flushes the workers' last log lines now, not into the table, and frees memory for eval
    train_done = time.perf_counter()
    results = evaluate(run_dir)
    end = time.perf_counter()
    print()
    print(f"## {results['task']} pretraining on {results['dataset']}: {cfg.model.backbone}, "
          f"{cfg.scaling.describe()}, {results['step']} steps of {cfg.train.global_batch_size}")
    print(markdown_table(results))
    print(f"\nwall time: shards {data_done - start:.0f} s, pretraining {train_done - data_done:.0f} s, "
          f"eval {end - train_done:.0f} s, total {end - start:.0f} s")
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl/csv, training_curves.png, eval/results.*)")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input or configuration (one line at the CLI), not a bug."""
    from pipeline.data.bad_samples import ShardError
    from pipeline.data.sources import DatasetNotFoundError
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.preemption import Preempted

    # OSError: storage (a remote shard that cannot be read, a full disk), named by our messages.
    return ConfigError, DatasetNotFoundError, ShardError, CheckpointError, Preempted, OSError, KeyError, ValueError


def root_cause(err: BaseException, wanted: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first error of a `wanted` class inside `err`: itself, what it was raised from, the
    original of a Ray task error (`.cause`) or the per-worker errors of a failed Ray Train run
    (`.worker_failures`), depth first; None when there is none (a bug: show the traceback)."""
    seen, stack = set(), [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, wanted):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        stack += [current.__context__, current.__cause__, getattr(current, "cause", None), *failures.values()][::-1]
    return None


def one_line(err: BaseException) -> str:
    """The message of an error (our own may span lines, e.g. the places searched for a dataset)
    without the traces that wrap it: a DataLoader worker's error comes
    back as "Caught ShardError in DataLoader worker process 0. Original Traceback ... ShardError:
    <message>", a Ray task's with its remote traceback in front."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if "Traceback (most recent call last)" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        name = type(err).__name__
        message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return message.strip() or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    accepts_overrides = args.command in ("pretrain", "demo", "examples")
    bad = [item for item in rest if not (accepts_overrides and item.startswith("--") and "=" in item)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}" + ("" if not accepts_overrides else f" ({OVERRIDE_HELP})"))
    debug = args.debug or os.environ.get("SSLPIPE_DEBUG", "") not in ("", "0")
    try:
        if args.command == "data":
            return cmd_data(args)
        elif args.command == "pretrain":
            cmd_pretrain(args, rest)
        elif args.command == "examples":
            cmd_examples(args, rest)
        elif args.command == "eval":
            cmd_eval(args)
        elif args.command == "export":
            cmd_export(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "tasks":
            cmd_tasks()
        elif args.command == "demo":
            cmd_demo(args, rest)
    except Exception as err:
        cause = root_cause(err, user_errors())
        if cause is None or debug:
            raise
        print(f"sslpipe {args.command}: error: {one_line(cause)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
