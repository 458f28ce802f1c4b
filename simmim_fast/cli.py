"""The ``simmim-fast`` command: ``pretrain`` (the original SimMIM recipe) and ``reconstruct``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import PRESETS
from .train.engine import COMPILE_MODES
from .user_errors import CommandLineParser, parse_arguments, run_reporting_errors
from .downstream import cli as downstream


def _pretrain_parser(commands) -> None:
    parser = commands.add_parser(
        "pretrain", help="pretrain a SimMIM model (embedded demo data unless --data)",
        description="SimMIM pretraining with the original recipe. Multi-process: "
                    "torchrun --nproc_per_node=N -m simmim_fast.train [options]; --device xla uses every "
                    "device of the host (SPMD, docs/tpu.md). "
                    "Settings apply in order: preset, --config, --set, then the dedicated options.")
    model = parser.add_argument_group("recipe")
    model.add_argument("--preset", choices=list(PRESETS), help="a published recipe or a tiny CPU-sized one")
    model.add_argument("--config", metavar="FILE", help="a YAML in the original SimMIM config layout")
    model.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                       help="override a config key, e.g. --set TRAIN.BASE_LR=1e-4 (repeatable; YAML values)")
    model.add_argument("--epochs", type=int, help="TRAIN.EPOCHS")
    model.add_argument("--steps", type=int, help="stop after this many optimizer steps; the LR schedule is "
                                                  "compressed to fit (warmup keeps its share)")
    model.add_argument("--batch-size", type=int, help="images per device per micro-batch (DATA.BATCH_SIZE)")
    model.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step (TRAIN.ACCUMULATION_STEPS)")
    model.add_argument("--seed", type=int, help="SEED")
    model.add_argument("--optimizer", choices=["adamw", "apex-fused-adam"], default="adamw",
                       help="adamw (fused on CUDA) or NVIDIA apex's FusedAdam when it is installed")
    model.add_argument("--max-nonfinite", type=int, default=10,
                       help="stop after this many steps in a row with a NaN/inf loss (each is skipped)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="a folder of images, any nesting (default: embedded scenes)")
    data.add_argument("--num-workers", type=int, help="data loader processes (DATA.NUM_WORKERS)")
    data.add_argument("--decode", choices=["cpu", "gpu", "auto"],
                      help="where JPEGs are decoded, cropped and resized (DATA.DECODE, default cpu): gpu = nvJPEG "
                           "through torchvision on CUDA, back to the CPU with a one-line reason where it cannot; "
                           "auto = gpu when it can")
    run = parser.add_argument_group("hardware")
    run.add_argument("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto")
    run.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                     help="autocast: auto = bf16 on CUDA (fp16 + GradScaler where bf16 is missing) and on TPUs, "
                          "off elsewhere")
    run.add_argument("--xla-matmul-precision", choices=["default", "high", "highest"],
                     help="XLA fp32 matmuls: default = one bf16 pass on TPUs, highest = full fp32 (parity checks)")
    run.add_argument("--backend", help="kernel choice, as SIMMIM_FAST_BACKEND (e.g. triton, or attention=sdpa)")
    run.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                     help=f"torch.compile the model in MODE, one of {', '.join(COMPILE_MODES)} (--compile "
                          "alone: default); reduce-overhead and max-autotune replay CUDA graphs: no Python per "
                          "op call after the first steps")
    run.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    run.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="DIR", help="run folder (default: runs/<TAG>)")
    out.add_argument("--resume", metavar="auto|PATH",
                     help="auto: the newest checkpoint in --output, if any (the default while TRAIN.AUTO_RESUME "
                          "is on, as in the original; --set TRAIN.AUTO_RESUME=False starts over)")
    out.add_argument("--log-every", type=int, help="steps between text lines / GPU stats (default PRINT_FREQ)")
    out.add_argument("--save-every", type=int, help="steps between checkpoints (default SAVE_FREQ epochs)")
    out.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0: all)")
    out.add_argument("--profile", action="store_true",
                     help="trace 3 steps after the first 2 into <output>/profile (XLA's profiler on XLA, the torch "
                          "profiler elsewhere)")
    out.add_argument("--picture-every", type=int, help="steps between reconstruction pictures (default --save-every)")


def _reconstruct_parser(commands) -> None:
    parser = commands.add_parser("reconstruct", help="a checkpoint's reconstructions of your images, as a PNG grid")
    parser.add_argument("--checkpoint", required=True, help="a simmim-fast or original SimMIM checkpoint")
    parser.add_argument("--images", required=True, metavar="DIR", help="a folder of images")
    parser.add_argument("--out", required=True, metavar="PNG")
    parser.add_argument("--count", type=int, default=8, help="images in the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--preset", choices=list(PRESETS), help="the model, for checkpoints without a config")
    parser.add_argument("--config", metavar="FILE", help="the model's YAML, for checkpoints without a config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow pickled objects (the original's checkpoints); runs code from the file")


def _prepare_data_parser(commands) -> None:
    parser = commands.add_parser(
        "prepare-data", help="write a folder of images once, smaller (JPEG or raw pixels), in memory-mapped shards",
        description="Shrink every image of SRC so its longer side is at most --max-side and store them in DST, "
                    "which pretrain --data DST then reads (faster decoding). See docs/input-pipeline.md.")
    parser.add_argument("source", metavar="SRC", help="a folder of images, any nesting")
    parser.add_argument("destination", metavar="DST", help="a new folder for the prepared data")
    parser.add_argument("--max-side", type=int, required=True,
                        help="longer side in pixels after shrinking (>= 1.63 x the training size keeps every crop "
                             "a downscale: 365 for 224, 313 for 192)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    parser.add_argument("--workers", type=int, default=1, help="processes encoding in parallel")
    parser.add_argument("--format", choices=("jpeg", "raw"), default="jpeg", dest="encoding",
                        help="jpeg: 20-30 KB an image at --max-side 365; raw: uint8 pixels, no decoding, about "
                             "1.5x the images/s per core for 10-15x the disk (300 KB an image at 365)")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="simmim-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(commands)
    _reconstruct_parser(commands)
    _prepare_data_parser(commands)
    downstream.add_commands(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; a mistake is one line on stderr and exit status 2 (``--debug``: the traceback)."""
    args, exit_status = parse_arguments(build_parser(), argv)
    if args is None:
        return exit_status
    return run_reporting_errors(args.command, lambda: _run(args), debug=getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> None:
    from .train import PretrainOptions, pretrain, reconstruct_images

    if args.command == "pretrain":
        options = vars(args).copy()
        del options["command"]
        options.pop("debug", None)
        pretrain(PretrainOptions(**options))
    elif args.command == "prepare-data":
        from .train.prepared import main_prepare

        main_prepare(args.source, args.destination, args.max_side, args.quality, args.workers, args.encoding)
    elif args.command in downstream.COMMANDS:
        downstream.run(args)
    else:
        path = reconstruct_images(args.checkpoint, args.images, args.out, count=args.count, seed=args.seed,
                                  preset=args.preset, config_file=args.config, device=args.device,
                                  trust_checkpoint=args.trust_checkpoint)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
