"""The `capeen` console script: one entry point, one subcommand per job.

Handlers are imported lazily so that `capeen --help` and light commands do not pay for importing torch.
Every handler takes the parsed namespace and returns an exit code. Expected failures (bad input, missing
files) raise `UserError`, which is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys


class UserError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""


def _handler(target: str):
    def run(args: argparse.Namespace) -> int:
        module_name, function_name = target.split(":")
        return getattr(importlib.import_module(module_name), function_name)(args)

    return run


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="generate the synthetic captioning data set (images + Karpathy-style JSON)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=0, help="processes drawing images (0: one per core)")
    p.set_defaults(func=_handler("models.synthetic:cli_main"))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a CAPEEN model: stage 1 (backbone) or stage 2 (exits)")
    p.add_argument("--stage", choices=["backbone", "exits"], required=True)
    p.add_argument("--data", required=True, help="data set directory (with dataset.json) or a Karpathy JSON file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--init", help="checkpoint to start from (required for --stage exits)")
    p.add_argument("--run-dir", help="where resumable state goes (default runs/<out name>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--alpha", type=float, default=0.5, help="stage exits: weight of the distillation term")
    p.add_argument("--temperature", type=float, default=2.0, help="stage exits: distillation temperature T")
    p.add_argument("--ce-only", action="store_true", help="stage exits: cross-entropy only (no distillation)")
    p.add_argument("--exit-aware", action="store_true",
                   help="stage backbone: also train the exits as auxiliary losses (CALM/LayerSkip style)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the exit losses with --exit-aware")
    p.add_argument("--model-config", help='JSON object of model config overrides, e.g. \'{"n_layer": 4}\'')
    p.add_argument("--name", help="model name recorded in the checkpoint (default: the --out directory name)")
    p.set_defaults(func=_handler("models.commands:train_main"))


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption image files with a trained checkpoint (default: the shipped one)",
                       description="Print one caption per image. --mode fixed leaves each token at the first exit "
                       "whose confidence reaches the threshold and skips the remaining decoder layers for it.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the shipped models/checkpoints/default)")
    p.add_argument("--mode", choices=["full", "fixed"], default="fixed",
                   help="full: every decoder layer; fixed: early exit at --threshold (default)")
    p.add_argument("--threshold", type=float, help="confidence threshold for --mode fixed (default: the calibrated one)")
    p.add_argument("--max-tokens", type=int, help="longest caption in tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print JSON: caption, tokens, exit_layers, confidences")
    p.set_defaults(func=_handler("models.commands:caption_main"))


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP captioning service (POST /caption)",
                       description="Every option can also be set with its CAPEEN_* environment variable "
                       "(see the README); a flag given here wins over the environment.")
    p.add_argument("--host", help="address to listen on (CAPEEN_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (CAPEEN_PORT, default 8000)")
    p.add_argument("--checkpoint", help="checkpoint directory (CAPEEN_CHECKPOINT, default: the shipped one)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="CAPEEN_DEVICE, default auto")
    p.add_argument("--half", action="store_true", default=None, help="half precision on CUDA (CAPEEN_HALF)")
    p.set_defaults(func=_handler("service.cli:serve_main"))


SUBCOMMANDS = [_add_data, _add_train, _add_caption, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capeen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"capeen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capeen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
