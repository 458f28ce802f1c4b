"""The downstream sub-commands of ``simmim-fast``: finetune, eval (--linear / --knn), export."""
from __future__ import annotations

from ..config import PRESETS
from ..train.engine import COMPILE_MODES

COMMANDS = ("finetune", "eval", "export")


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "finetune", help="fine-tune a pretrained (or randomly initialised) encoder on a labelled folder",
        description="The original SimMIM fine-tuning recipe. Multi-process: torchrun --nproc_per_node=N "
                    "-m simmim_fast.cli finetune [options]. --data DIR holds train/<class>/ and val/<class>/; "
                    "without it the embedded scenes, labelled by kind, with 256 held out.")
    parser.add_argument("--pretrained", metavar="CKPT", help="a simmim-fast or original SimMIM pretraining checkpoint "
                                                             "(omit for a random-initialisation baseline)")
    parser.add_argument("--preset", choices=list(PRESETS), help="the model, when the checkpoint carries no config")
    parser.add_argument("--config", metavar="FILE",
                        help="a YAML in the original layout (e.g. a simmim_finetune__*.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a config key")
    parser.add_argument("--data", metavar="DIR")
    parser.add_argument("--output", metavar="DIR")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps (schedule compressed)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accum-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto",
                        help="xla: every device of the host, the batch sharded over them (SPMD, docs/tpu.md)")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    parser.add_argument("--xla-matmul-precision", choices=["default", "high", "highest"],
                        help="XLA fp32 matmuls: default = one bf16 pass on TPUs, highest = full fp32")
    parser.add_argument("--backend", help="kernel choice, as SIMMIM_FAST_BACKEND")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the model, as pretrain --compile")
    parser.add_argument("--resume", metavar="auto|PATH")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects (original checkpoints)")

    parser = commands.add_parser("eval", help="linear probe and/or k-NN of a checkpoint's frozen encoder")
    parser.add_argument("--checkpoint",
                        help="omit (with --preset) for a randomly initialised encoder, seeded by --seed")
    parser.add_argument("--linear", action="store_true", help="linear probe on standardised pooled features")
    parser.add_argument("--knn", action="store_true", help="weighted k-NN (cosine, exp(sim/T))")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--data", metavar="DIR", help="train/<class>/ and val/<class>/ (default: embedded scenes)")
    parser.add_argument("--preset", choices=list(PRESETS))
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: <checkpoint folder>/features)")
    parser.add_argument("--output", metavar="JSON", help="also write the metrics here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-checkpoint", action="store_true")

    parser = commands.add_parser("export", help="a checkpoint in timm or Hugging Face transformers layout "
                                                "(model.safetensors + config)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--format", choices=["timm", "transformers", "original"], required=True,
                        help="original: Swin in microsoft/Swin-Transformer's layout (model.pth), which OpenMMLab's "
                             "Swin backbone loads with convert_weights=True")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="a new folder, or an earlier export to replace (written as a whole or not at all)")
    parser.add_argument("--vit-bias", choices=["as-trained", "per-block"], default="as-trained",
                        help="per-block: a shared-bias ViT with a copy of the table in every block, the layout "
                             "of fine-tuning (timm beit_* and BEiT fine-tuning code expect it)")
    parser.add_argument("--preset", choices=list(PRESETS))
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--trust-checkpoint", action="store_true")


def run(args) -> None:
    from ..train.monitor import json_text

    if args.command == "finetune":
        from .finetune import FinetuneOptions, finetune

        options = vars(args).copy()
        del options["command"]
        finetune(FinetuneOptions(**options))
    elif args.command == "eval":
        from .probe import run_probes

        results = run_probes(args.checkpoint, args.data, linear=args.linear, knn=args.knn, preset=args.preset,
                             config_file=args.config, cache_dir=args.cache_dir, output=args.output, k=args.k,
                             temperature=args.temperature, batch_size=args.batch_size, device=args.device,
                             trust_checkpoint=args.trust_checkpoint, seed=args.seed)
        print(json_text(results, indent=2))
    else:
        from .export import describe_bias_layout, export_checkpoint

        folder = export_checkpoint(args.checkpoint, args.format, args.out, preset=args.preset, config_file=args.config,
                                   trust=args.trust_checkpoint, vit_bias=args.vit_bias)
        print(f"wrote {folder}: {', '.join(sorted(path.name for path in folder.iterdir()))}"
              f"{describe_bias_layout(folder)}")
