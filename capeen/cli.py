"""The `capeen` console script: one entry point, one subcommand per job.

Handlers are imported lazily so that `capeen --help` and light commands do not pay for importing torch.
Every handler takes the parsed namespace and returns an exit code. Expected failures (bad input, missing
files) raise `UserError`, which is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import signal
import sys

# Defined in its own module so that `python -m capeen.cli` (which loads this file twice) still catches it.
from capeen.errors import UserError
from capeen.options import add_checkpoint, add_half, add_image_dir, add_kv_fill


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
    p = sub.add_parser("train", help="train a CAPEEN model: stage 1 (backbone) or stage 2 (exits), optionally "
                       "after pre-training the image encoder on the scenes' objects (encoder)")
    p.add_argument("--stage", choices=["encoder", "backbone", "exits"], required=True,
                   help="encoder: pre-train the image encoder on ground-truth scene objects (synthetic data); "
                        "backbone: encoder + decoder on captions; exits: the exit heads on a frozen backbone")
    p.add_argument("--data", required=True, help="data set directory (with dataset.json) or a Karpathy JSON file")
    add_image_dir(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--init", help="checkpoint to start from (required for --stage exits)")
    p.add_argument("--encoder-from", metavar="DIR",
                   help="stages encoder and backbone: start the image encoder from a local Hugging Face ViT or Swin "
                        "(a folder written by save_pretrained, with model.safetensors), whose config sets the "
                        "encoder's shape")
    p.add_argument("--decoder-from", metavar="DIR",
                   help="stages encoder and backbone: start the decoder from a local Hugging Face GPT-2 (a folder "
                        "written by save_pretrained, with model.safetensors and its tokenizer), whose config sets "
                        "the decoder's shape; each word of the vocabulary starts at the mean of GPT-2's embeddings "
                        "of its tokens")
    p.add_argument("--min-word-count", type=int, default=1, metavar="N",
                   help="a new model's vocabulary: the training captions' words seen at least N times, the others "
                        "read as <unk> (default 1; 5 is Karpathy's for COCO and Flickr30k)")
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
    p.add_argument("--keep-exits", action="store_true",
                   help="stage exits: start from the --init checkpoint's exit heads (e.g. an exit-aware backbone's) "
                        "instead of copies of the final head")
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
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="an image file, or a folder: every .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif and .tiff "
                        "file under it, in name order")
    p.add_argument("--files-from", metavar="LIST",
                   help="a file naming images or folders, one per line (-: standard input), captioned after those "
                        "given as arguments: a manifest of any length, past the shell's limit on arguments")
    add_checkpoint(p, environment=False)
    p.add_argument("--mode", choices=["full", "fixed", "adaptive"], default="fixed",
                   help="full: every decoder layer; fixed: early exit at --threshold (default); adaptive (with "
                        "--server): the service's bandit picks the threshold")
    p.add_argument("--threshold", type=float, help="confidence threshold for --mode fixed (default: the calibrated one)")
    p.add_argument("--max-tokens", type=int, help="longest caption in tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images captioned together; with --server, images per request (at most the server's "
                        "max_images_per_request)")
    p.add_argument("--workers", type=int,
                   help="threads reading and decoding images ahead of the model (default: the cores, at most 4); "
                        "0: each image is read when its turn comes")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1, the fastest for this decoder, "
                                               "which leaves the other cores to the readers)")
    p.add_argument("--engines", type=int, metavar="N",
                   help="copies of the model captioning batches side by side, each in a process of its own with "
                        "--threads threads (about 470 MiB each on a CPU); on CUDA they spread over the GPUs "
                        "visible. Default 1, in this process. On a host with idle cores, more captions per second")
    remote = p.add_argument_group("captioning through a running service (capeen serve)")
    remote.add_argument("--server", metavar="URL",
                        help="send the images to this service (e.g. http://gpu-host:8000) instead of captioning "
                             "them here: POST /caption/batch, in input order, 503s retried after Retry-After")
    remote.add_argument("--concurrency", type=int, help="requests in flight (default 2)")
    remote.add_argument("--retries", type=int,
                        help="times one request is sent again while the server answers 500, 502, 504 or 408 or "
                             "cannot be reached, after a doubling backoff (default 8); 503s and 429s "
                             "(back-pressure) are waited out apart, up to 10 minutes a request")
    remote.add_argument("--timeout", type=float, help="seconds one request may take (default 120)")
    remote.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                        help="an HTTP header for every request, e.g. a gateway's 'Authorization: Bearer TOKEN' "
                             "(repeatable)")
    p.add_argument("--device", help="auto (the default), cpu or cuda")
    add_half(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON: caption, tokens, exit_layers, confidences")
    form.add_argument("--jsonl", action="store_true",
                      help="print JSON Lines, one object per image as its batch is done (the fields of --json); an "
                           "image that could not be read gets {\"image\", \"error\"}")
    add_kv_fill(p)
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
    add_kv_fill(p, env_var="CAPEEN_KV_FILL")
    p.add_argument("--engines", type=int, help="engine processes decoding side by side, each with its own copy "
                   "of the model (CAPEEN_ENGINES, default 1): on a CPU host, up to one per core")
    p.set_defaults(func=_handler("service.cli:serve_main"))


def _add_model_source(p, default_split: str, writes: bool = False) -> None:
    add_checkpoint(p, writes=writes)
    p.add_argument("--data", required=True, help="data set directory (with dataset.json) or a Karpathy JSON file")
    add_image_dir(p)
    p.add_argument("--split", default=default_split)
    p.add_argument("--limit", type=int, help="use only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=1, help="images decoded together (1: per-caption latency)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_half(p)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this decoder)")
    add_kv_fill(p)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="choose the early-exit threshold on held-out data; writes thresholds.json")
    _add_model_source(p, "val", writes=True)
    p.add_argument("--quality", type=float, default=0.99, help="keep CIDEr-D >= this fraction of full depth")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="the calibration split is a sample: a setting passes only if the lower bound of its share of "
                        "full depth's CIDEr-D at this confidence (paired bootstrap over the images) reaches --quality; "
                        "0: the share measured on the split (default: %(default)s)")
    p.add_argument("--thresholds", help="comma-separated grid (default: 0.5 ... 0.999)")
    p.add_argument("--no-schedules", action="store_true",
                   help="one threshold for every exit: do not propose per-exit schedules")
    p.set_defaults(func=_handler("models.commands:calibrate_main"))


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="caption quality and measured speed: full depth vs early exit, interleaved")
    _add_model_source(p, "test")
    p.add_argument("--mode", choices=["full", "fixed", "sweep"], default="fixed")
    p.add_argument("--threshold", type=float, help="--mode fixed: threshold (default: the calibrated one)")
    p.add_argument("--thresholds", help="--mode sweep: comma-separated grid (default: 0.5 ... 0.999)")
    p.add_argument("--distortion", action="append",
                   help="none, noise:SIGMA or blur:RADIUS; repeat for several (default: none)")
    p.add_argument("--compare", action="append", default=[], metavar="CHECKPOINT",
                   help="also evaluate this checkpoint (e.g. CE-only exits); repeatable")
    p.add_argument("--agreement", action="store_true", help="also report per-exit agreement with the final layer")
    p.add_argument("--simulated-exits", action="store_true",
                   help="also decode each setting as the paper's code evaluates it: every layer computed, the token "
                        "taken from the first confident exit (no time saved, no state propagation)")
    p.add_argument("--meteor", action="store_true", help="also compute METEOR (needs Java)")
    p.add_argument("--exits", help="comma-separated exit layers to consult (default: the calibrated ones)")
    p.add_argument("--exit-offsets", help="with --exits: comma-separated offsets added to the threshold at each")
    p.add_argument("--json", help="write the full report to this JSON file")
    p.add_argument("--plot", help="--mode sweep: write a PNG of CIDEr-D against speedup")
    p.set_defaults(func=_handler("models.commands:evaluate_main"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput: HF generate() vs our full depth vs early exit")
    _add_model_source(p, "test")
    p.set_defaults(batch_size=1)
    p.add_argument("--threshold", type=float, help="early-exit threshold (default: the calibrated one)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--images", type=int, default=200, help="images per batch size (at least enough for a few batches)")
    p.add_argument("--min-batches", type=int, default=8, help="measured batches at the largest batch size, at least")
    p.add_argument("--compare-kernels", action="store_true",
                   help="also run ours with every product on MKL, interleaved, to measure what oneDNN buys")
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=_handler("models.commands:bench_main"))


def _add_bench_serve(sub) -> None:
    from service.loadtest import add_arguments  # the standard library only at import time

    p = sub.add_parser("bench-serve", help="load benchmark of `capeen serve` on loopback (batching vs batch-1, "
                       "latency, 2x overload, memory soak)")
    add_arguments(p)
    p.set_defaults(func=_handler("service.loadtest:bench_serve_main"))


def _add_bench_drift(sub) -> None:
    from capeen.drift import add_arguments  # the standard library only at import time

    p = sub.add_parser("bench-drift", help="A-CAPEEN on drifting traffic: the fixed threshold against UCB1, "
                       "SW-UCB, D-UCB and CD-UCB, per phase (CIDEr-D, mean exit layer, reward vs the best fixed arm)")
    add_arguments(p)
    p.set_defaults(func=_handler("capeen.drift:bench_drift_main"))


SUBCOMMANDS = [_add_data, _add_train, _add_caption, _add_calibrate, _add_evaluate, _add_bench, _add_serve,
               _add_bench_serve, _add_bench_drift]


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
    except KeyboardInterrupt as exc:  # Ctrl-C, or a termination that the command turned into one
        number = getattr(exc, "signal", signal.SIGINT)
        print(f"capeen {args.command}: {'interrupted' if number == signal.SIGINT else 'terminated'}",
              file=sys.stderr)
        return 128 + number  # what a shell reports for a process that the signal ended
    except BrokenPipeError:  # the reader went away (`capeen caption *.jpg | head -1`): stop quietly, as it asked
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk under the output (`capeen caption photos/ > captions.txt`), or under a file written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"capeen {args.command}: error: {where}{exc.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unwritten output is dropped
        return 2


def console_main() -> int:
    """The `capeen` command: `main`, then the exit made quick."""
    code = main()
    # The interpreter collects garbage as it tears its modules down, and with torch's 350,000 objects that took
    # 1.1 to 1.6 s of a command's wall time on the 2-core machine (BENCHMARKS.md); frozen objects are left out.
    # Not done in `main`, which tests call in-process: their garbage would never be collected again.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
