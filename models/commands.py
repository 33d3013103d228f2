"""Handlers of the model subcommands of `capeen` (train, caption, calibrate, evaluate, bench).

They translate arguments into calls of the library modules and library errors into `UserError` lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import textwrap
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from capeen import outputs
from capeen.errors import UserError, first_line
from capeen.options import CHECKPOINT_VARIABLE
from capeen.outputs import check_output, output_file_problem
from models.interrupts import termination_interrupts


def _parse_overrides(text: str | None) -> dict:
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--model-config is not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError("--model-config is nested too deeply to be a model config") from None
    if not isinstance(data, dict):
        raise UserError("--model-config must be a JSON object of model config fields")
    return data


def train_main(args) -> int:
    from models.checkpoint import CheckpointError
    from models.dataset import DatasetError
    from models.train import TrainOptions, train

    for flag in ("--data", "--out", "--run-dir", "--init", "--encoder-from", "--decoder-from", "--image-dir"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not value.strip():  # an unset shell variable: "" would mean the current folder
            raise UserError(f"{flag} is empty (an unset shell variable?)")
    opts = TrainOptions(
        stage=args.stage, data=Path(args.data), out=Path(args.out),
        run_dir=Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.out).name / args.stage,
        init=Path(args.init) if args.init else None, encoder_from=Path(args.encoder_from) if args.encoder_from else None,
        decoder_from=Path(args.decoder_from) if args.decoder_from else None,
        min_word_count=args.min_word_count,
        steps=args.steps, batch_size=args.batch_size,
        captions_per_image=args.captions_per_image, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
        seed=args.seed, device=args.device, alpha=args.alpha, temperature=args.temperature, ce_only=args.ce_only,
        keep_exits=args.keep_exits, exit_aware=args.exit_aware, aux_weight=args.aux_weight, resume=args.resume,
        model_overrides=_parse_overrides(args.model_config), name=args.name or Path(args.out).name,
        image_dir=Path(args.image_dir) if args.image_dir else None,
    )
    if not opts.data.exists():
        raise UserError(f"{opts.data}: data set not found (make one with `capeen data --out DIR`)")
    if opts.resume and not (opts.run_dir / "last" / "train_state.json").exists():
        raise UserError(f"{opts.run_dir}: nothing to resume (no last/train_state.json)")
    try:
        path = train(opts)
    except (CheckpointError, DatasetError, ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote checkpoint {path}")
    if opts.stage == "exits" or opts.exit_aware:  # new weights never keep a threshold measured on others
        where = ["--data", str(opts.data)] + (["--image-dir", str(opts.image_dir)] if opts.image_dir else [])
        print("next: choose its early-exit threshold (it has none yet) with "
              + shlex.join(["capeen", "calibrate", "--checkpoint", str(path), *where]))
    else:
        following = "backbone" if opts.stage == "encoder" else "exits"
        print(f"next: {shlex.join(['capeen', 'train', '--stage', following, '--init', str(path)])} ...")
    return 0


def _engine(args):
    from models.checkpoint import CheckpointError
    from models.engine import CaptionEngine

    try:
        return CaptionEngine.from_checkpoint(args.checkpoint, device=args.device, half=getattr(args, "half", False),
                                             kv_fill=getattr(args, "kv_fill", None))
    except (CheckpointError, ValueError) as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:  # the device's own failure: a GPU out of memory, busy or broken
        raise UserError(f"cannot put the model on --device {args.device}: {first_line(exc)}") from None


def caption_main(args) -> int:
    from models.images import find_images

    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.images and args.files_from is None:
        raise UserError("give images or folders to caption, or --files-from LIST")
    _check_where(args)
    listed = _listed_paths(args.files_from)  # a list that cannot be opened is refused before the model loads
    one_file = len(args.images) == 1 and not Path(args.images[0]).is_dir() and args.files_from is None
    output = _CaptionOutput("jsonl" if args.jsonl else "json" if args.json else "text", with_paths=not one_file)
    if args.server is not None:
        from service.client import caption_remote

        return caption_remote(args, find_images(itertools.chain(args.images, listed)), output)
    args.checkpoint = args.checkpoint if args.checkpoint is not None else os.environ.get(CHECKPOINT_VARIABLE)
    args.threads = 1 if args.threads is None else args.threads
    args.device = args.device or "auto"
    args.workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.engines is not None and args.engines < 1:
        raise UserError(f"--engines must be at least 1, got {args.engines}")
    if args.threshold is not None and not 0 < args.threshold <= 1:  # before a model loads, not after
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    _set_threads(args)
    if args.engines not in (None, 1):
        with termination_interrupts():  # SIGTERM and SIGHUP stop the engines too, as Ctrl-C does
            return _caption_locally(args, listed, output, _engine_processes(args))
    return _caption_locally(args, listed, output, [_engine(args)])


def _caption_locally(args, listed, output, engines: list) -> int:
    """Caption with the model in this process (one engine), or with engine processes (several)."""
    from models.images import find_images

    processes = engines if len(engines) > 1 else []

    try:
        try:
            threshold = engines[0].threshold_for(args.mode, args.threshold)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        failures = [0]

        def failed(problem: str) -> None:
            print(f"capeen caption: {problem}", file=sys.stderr, flush=True)
            failures[0] += 1

        # a batch at a time, read, captioned and printed: thousands of images never sit in memory together, and
        # the first captions appear while the rest are being read (folders too are walked as they are captioned)
        read = _read_ahead(find_images(itertools.chain(args.images, listed)), engines[0].config.image_size,
                           args.workers, args.batch_size * len(engines))
        chunks = _caption_chunks(read, args.batch_size, failed)
        if len(engines) == 1:
            for chunk in chunks:
                images = [image for _, image, problem in chunk if problem is None]
                results = engines[0].caption(images, threshold, max_tokens=args.max_tokens).results if images else []
                _write_chunk(output, chunk, results, failed)
        else:
            with _engine_news_on_stderr():
                _caption_in_engines(chunks, engines, threshold, args.max_tokens, output, failed)
        output.close()
    except BaseException:
        for engine in processes:
            engine.kill()  # Ctrl-C: a child ignores it, and would finish its batch first
        raise
    for engine in processes:
        engine.close()
    return 1 if failures[0] else 0


def _engine_processes(args) -> list:
    """`--engines N`: N copies of the model in processes of their own (service.engine_process), started side by
    side; on CUDA they spread over the GPUs visible."""
    import torch

    from models.engine import resolve_device
    from service.engine_process import EngineStartError, start_engines
    from service.engine_spawn import EngineOptions

    try:  # here, in one line, rather than in every child
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # each engine holds a model and wants a core (or a GPU) of its own: more only crowd the machine's memory
    most = max(os.cpu_count() or 1, torch.cuda.device_count() if device.type == "cuda" else 0)
    if args.engines > most:
        kind = "GPUs or cores" if device.type == "cuda" else "cores"
        raise UserError(f"--engines {args.engines}: this machine has {most} {kind}, and each engine is a copy of the "
                        f"model that wants one")
    options = EngineOptions(checkpoint=args.checkpoint, device=args.device, half=getattr(args, "half", False),
                            kv_fill=getattr(args, "kv_fill", None), torch_threads=args.threads, onednn="auto",
                            log_level="warning")
    try:
        return start_engines(options, args.engines, batch_timeout_s=600.0)
    except EngineStartError as exc:
        raise UserError(str(exc)) from None


def _caption_chunks(read, batch_size: int, failed) -> Iterator[list]:
    """Lists of (path, image, None) or (path, None, why it failed), in input order, each with at most
    `batch_size` images. A failure with no image before it waiting comes alone, so that it is written at once
    (a folder of broken files must not pile up); `failed` hears of each failure as it is found."""
    chunk: list[tuple[Path, object, str | None]] = []
    waiting = 0  # images in the chunk
    for path, image, exc in read:
        if exc is None:
            chunk.append((path, image, None))
            waiting += 1
        else:
            path = getattr(exc, "path", None) or path
            problem = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            failed(problem)
            chunk.append((path, None, problem))
        if waiting == batch_size or (chunk and not waiting):
            yield chunk
            chunk, waiting = [], 0
    if chunk:
        yield chunk


def _write_chunk(output, chunk: list, results, failed) -> None:
    """A chunk's captions and failures, in the order given; `results` are its images' captions, or the
    exception that failed their batch (each of its images is then a failure)."""
    captions = iter(() if isinstance(results, BaseException) else results)
    for path, _, problem in chunk:
        if problem is None and isinstance(results, BaseException):
            problem = f"{path}: its batch failed in the engine: {first_line(results)}"
            failed(problem)
        if problem is None:
            output.caption(path, next(captions))
        else:
            output.failure_record(path, problem)


@contextmanager
def _engine_news_on_stderr() -> Iterator[None]:
    """The engine processes' warnings (one gone and started again) as `capeen caption: ...` lines, like the
    command's own, instead of Python's bare last-resort ones."""
    import logging

    logger = logging.getLogger("service.engine_process")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("capeen caption: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _caption_in_engines(chunks, engines: list, threshold: float, max_tokens: int | None, output, failed) -> None:
    """The chunks captioned by whichever engine process is free, written in input order. One chunk per engine
    is decoded at a time, and one more waits, read, for the first engine free."""
    import queue

    from service.engine_process import EngineProcessDied, EngineStartError

    free: queue.SimpleQueue = queue.SimpleQueue()
    for engine in engines:
        free.put(engine)

    def decode(images: list):
        engine = free.get()
        try:
            return engine.caption_pixels(engine.pixels(images), threshold, max_tokens=max_tokens).results
        except (EngineProcessDied, EngineStartError, RuntimeError) as exc:  # started again for the next batch
            return exc
        finally:
            free.put(engine)

    pending: deque = deque()
    with ThreadPoolExecutor(len(engines), thread_name_prefix="capeen-caption") as pool:
        try:
            for chunk in chunks:
                images = [image for _, image, problem in chunk if problem is None]
                pending.append((chunk, pool.submit(decode, images) if images else None))
                while pending and (len(pending) > len(engines) or pending[0][1] is None or pending[0][1].done()):
                    chunk, future = pending.popleft()
                    _write_chunk(output, chunk, future.result() if future else [], failed)
            while pending:
                chunk, future = pending.popleft()
                _write_chunk(output, chunk, future.result() if future else [], failed)
        except BaseException:
            for _, future in pending:
                if future is not None:
                    future.cancel()
            for engine in engines:  # before the pool waits for its threads: a batch in a stopped child never ends
                engine.kill()
            raise


# options of `capeen caption` that only a local model has, and those that only --server has: none has an
# argparse default (their defaults are applied where they are used), so that one given is one set
_LOCAL_ONLY = ("checkpoint", "device", "half", "kv_fill", "threads", "workers", "engines")
_SERVER_ONLY = ("concurrency", "retries", "timeout", "header")


def _check_where(args) -> None:
    """Refuse the options that mean nothing where the captions are made (here, or on `--server`)."""
    def given(names: tuple[str, ...]) -> list[str]:
        return ["--" + name.replace("_", "-") for name in names if getattr(args, name) not in (None, False)]

    if args.server is not None:
        if given(_LOCAL_ONLY):
            raise UserError(f"{', '.join(given(_LOCAL_ONLY))}: the server's model is used with --server, "
                            "set by the server's own settings")
    else:
        if given(_SERVER_ONLY):
            raise UserError(f"{', '.join(given(_SERVER_ONLY))}: only with --server URL")
        if args.mode == "adaptive":
            raise UserError("--mode adaptive: only with --server URL (the service's bandit picks the threshold)")


def _listed_paths(list_path: str | None) -> Iterator[str | ImageError]:
    """The paths of `capeen caption --files-from`, one per line, read as they are needed (a manifest of millions
    is not held in memory); blank lines are skipped. Names are decoded as the file system's are, so any file
    name a listing tool wrote comes back as the same file.

    A list that cannot be opened is refused here, before the model loads. What goes wrong later (a line with a
    NUL byte: not a list of lines; a read error; a list that names nothing) ends the list with an ImageError in
    its place, reported like an unreadable folder, while the images listed before it are still captioned."""
    from models.images import ImageError

    if list_path is None:
        return iter(())
    if list_path == "-" and sys.stdin is None:
        raise UserError("--files-from -: standard input is closed")
    try:
        lines = sys.stdin.buffer if list_path == "-" else open(list_path, "rb")  # closed by paths()
    except OSError as exc:
        raise UserError(f"--files-from {list_path}: {exc.strerror or exc}") from None

    def problem(text: str) -> ImageError:
        return ImageError("unreadable", f"--files-from {list_path}: {text}", Path(list_path))

    def paths() -> Iterator[str | ImageError]:
        listed = number = 0
        try:
            for number, line in enumerate(lines, 1):
                if b"\0" in line:
                    yield problem(f"line {number} holds a NUL byte, so this is not a list of paths one per line "
                                  "(find -print0 writes NUL-separated ones: use find -print); not read further")
                    return
                name = os.fsdecode(line.rstrip(b"\r\n"))
                if name.strip():
                    listed += 1
                    yield name
        except OSError as exc:
            after = f" after line {number}" if number else ""
            yield problem(f"cannot be read{after}: {exc.strerror or exc}")
            return
        finally:
            if lines is not sys.stdin.buffer:
                lines.close()
        if not listed:
            yield problem("names no image or folder")

    return paths()


def _read_ahead(found, size: int, workers: int, batch_size: int):
    """(path, image, None) or (path, None, error) for each of `found`, in its order, each image already at the
    model's input size (a batch waiting for the model holds no photo at full size). With `workers`, threads
    read, decode and resize the images ahead of the model (Pillow lets go of the GIL meanwhile): a batch of
    photos is ready when the one before leaves the model. They run at most a batch and a worker's share ahead,
    so memory stays bounded whatever the folder's size."""
    from models.images import ImageError, load_image
    from models.preprocess import model_sized

    def read(path):
        try:
            return path, model_sized(load_image(path, min_size=size), size), None
        except (ImageError, OSError) as exc:
            return path, None, exc

    if workers == 0:
        for item in found:  # a path, or the error of a folder that could not be searched
            yield (item, None, item) if isinstance(item, ImageError) else read(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="capeen-read")
    ahead: deque = deque()
    try:
        for item in found:
            ahead.append((item, None, item) if isinstance(item, ImageError) else pool.submit(read, item))
            if len(ahead) > batch_size + workers:
                yield _resolved(ahead.popleft())
        while ahead:
            yield _resolved(ahead.popleft())
    finally:  # Ctrl-C or a broken pipe: the reads not started yet are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _resolved(entry):
    return entry.result() if isinstance(entry, Future) else entry


class _CaptionOutput:
    """How `capeen caption` prints: `text` (a caption a line, after its path when there are several images),
    `json` (one array, streamed item by item so that it never sits in memory whole) or `jsonl` (an object a
    line, flushed per batch; an image that failed gets a line with its error in its place, so a pipeline sees
    every input in order). Failures also go to stderr, one line each, as soon as they happen."""

    def __init__(self, form: str, with_paths: bool) -> None:
        self.form, self.with_paths, self.items = form, with_paths, 0

    def caption(self, path: Path, result) -> None:
        self._print({"image": str(path), "caption": result.caption, "tokens": result.tokens,
                     "exit_layers": result.exit_layers, "confidences": [round(c, 4) for c in result.confidences],
                     "threshold": result.threshold})

    def remote_caption(self, path: Path, fields: dict) -> None:
        """A caption made by the service (`--server`): its answer's fields (service.client.CAPTION_FIELDS)."""
        self._print({"image": str(path), **fields})

    def _print(self, item: dict) -> None:
        if self.form == "text":
            print(f"{item['image']}\t{item['caption']}" if self.with_paths else item["caption"], flush=True)
        elif self.form == "jsonl":
            print(json.dumps(item), flush=True)
        else:
            print(("[\n" if self.items == 0 else ",\n") + textwrap.indent(json.dumps(item, indent=2), "  "),
                  end="", flush=True)
        self.items += 1

    def failure_record(self, path: Path, message: str) -> None:
        if self.form == "jsonl":
            print(json.dumps({"image": str(path), "error": message}), flush=True)

    def close(self) -> None:
        if self.form == "json":
            print("\n]" if self.items else "[]", flush=True)


def _set_threads(args) -> None:
    import torch

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def _eval_set(args, engine, split: str):
    from models.dataset import DatasetError
    from models.evaluation import load_eval_set

    if not Path(args.data).exists():
        raise UserError(f"{args.data}: data set not found (make one with `capeen data --out DIR`)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return load_eval_set(args.data, split, engine.config.image_size, limit=args.limit, image_root=args.image_dir)
    except (DatasetError, ValueError, OSError) as exc:
        raise UserError(str(exc)) from None


def _thresholds(text: str | None) -> list[float]:
    from models.evaluation import DEFAULT_SWEEP

    if not text:
        return list(DEFAULT_SWEEP)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 < v <= 1]
    if bad or not values:
        raise UserError(f"--thresholds must lie in (0, 1], got {text!r}")
    return values


def _numbers(option: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


def _exit_settings(args, engine, grid: list[float]) -> list | None:
    """--exits/--exit-offsets as evaluation settings for each threshold of `grid` (None: not given)."""
    from models.evaluation import Setting

    if args.exits is None:
        if args.exit_offsets is not None:
            raise UserError("--exit-offsets needs --exits")
        return None
    exits = _numbers("--exits", args.exits, int)
    offsets = None if args.exit_offsets is None else _numbers("--exit-offsets", args.exit_offsets, float)
    try:
        exits, checked = engine.decoder.check_schedule(exits, offsets)
        offsets = None if offsets is None else checked
    except ValueError as exc:
        raise UserError(f"--exits/--exit-offsets: {exc}") from None
    kinds = (False, True) if args.simulated_exits else (False,)
    return [Setting(t, exits, simulated, offsets) for t in grid for simulated in kinds]


def _exit_plan(exits: list[int], threshold: float, offsets: list[float] | None) -> str:
    """Exit layers, with each one's threshold (`3@0.75`) when they differ by exit."""
    if not offsets:
        return ",".join(map(str, exits))
    return ",".join(f"{layer}@{threshold + offset:.3g}" for layer, offset in zip(exits, offsets))


def calibrate_main(args) -> int:
    from models.calibration import calibrate
    from models.checkpoint import save_thresholds

    if args.checkpoint is None:  # never the shipped model by default: a forgotten flag would rewrite it
        raise UserError(f"name the checkpoint whose thresholds.json to rewrite: --checkpoint DIR or "
                        f"{CHECKPOINT_VARIABLE} (the shipped one is models/checkpoints/default)")
    _set_threads(args)
    if not 0 < args.quality <= 1:
        raise UserError(f"--quality must be in (0, 1], got {args.quality}")
    if not 0 <= args.confidence < 1:
        raise UserError(f"--confidence must be in [0, 1), got {args.confidence}")
    grid = _thresholds(args.thresholds)
    engine = _engine(args)
    if engine.checkpoint.path is None:
        raise UserError("calibration needs a checkpoint directory to write thresholds.json into")
    target = engine.checkpoint.path / "thresholds.json"
    problem = output_file_problem(target)  # now, not after minutes of decoding
    if problem:
        raise UserError(f"cannot write {target}: {problem} (calibrate a copy: --checkpoint DIR)")
    if not engine.config.exit_layers:
        raise UserError(f"{engine.checkpoint.path}: the model has no exit heads (exit_layers is empty): nothing to "
                        "calibrate")
    data = _eval_set(args, engine, args.split)
    if len(data) < 2:
        raise UserError(f"calibration needs at least 2 images, got {len(data)}: CIDEr-D weighs words by how few "
                        "images' references hold them, so one image scores 0 whatever its caption")
    result = calibrate(engine, data, grid, quality_fraction=args.quality, batch_size=args.batch_size,
                       split=args.split, schedules=not args.no_schedules, confidence=args.confidence)
    full = result.details["full_depth"]
    print(f"full depth: CIDEr-D {full['ciderD']:.3f}  BLEU-4 {full['bleu4']:.3f}")
    if full["ciderD"] <= 0:
        print(f"capeen calibrate: full depth scores CIDEr-D 0 on split {args.split!r}: no caption of this model "
              f"shares a weighted word with its references, so what early exit keeps cannot be measured; "
              f"{target} is left as it was", file=sys.stderr)
        return 1
    if result.threshold is not None:  # a failed calibration leaves the one the checkpoint had
        try:
            save_thresholds(engine.checkpoint.path, result)
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    for entry in result.sweep:
        exits = _exit_plan(entry["exit_layers"], entry["threshold"], entry.get("exit_offsets"))
        bound = entry.get("ciderD_share_lower_bound")
        share = f"{100 * entry['ciderD_share']:.1f}%" + ("" if bound is None else f" (>= {100 * bound:.1f}%)")
        print(f"exits {exits:<34} threshold {entry['threshold']:<6g} CIDEr-D {entry['ciderD']:.3f} = {share:<17} "
              f"BLEU-4 {entry['bleu4']:.3f}  mean exit layer {entry['mean_exit_layer']:.2f}  cost {entry['cost_layers_per_token']:.2f} layers/token  "
              f"decoder speedup {entry['decoder_speedup']:.2f}x")
    if result.threshold is None:
        sure = f" at {args.confidence:g} confidence" if args.confidence else ""
        print(f"no threshold keeps CIDEr-D >= {args.quality:g} x full depth{sure}; "
              f"{engine.checkpoint.path / 'thresholds.json'} is left as it was")
        return 1
    plan = _exit_plan(result.details["exit_layers"], result.threshold, result.details.get("exit_offsets"))
    print(f"calibrated threshold {result.threshold:g} with exits {plan}, kv fill {engine.kv_fill}, "
          f"written to {engine.checkpoint.path / 'thresholds.json'}")
    return 0


def evaluate_main(args) -> int:
    from models.evaluation import Distortion, evaluate_thresholds, exit_agreement
    from models.plots import plot_sweeps

    _set_threads(args)
    try:
        distortions = [Distortion.parse(d) for d in (args.distortion or ["none"])]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.plot and args.mode != "sweep":
        raise UserError("--plot needs --mode sweep")
    check_output("--json", args.json)
    check_output("--plot", args.plot, plot=True)
    _refuse_options_the_mode_ignores(args)
    if args.meteor and shutil.which("java") is None:  # the report would lack the column without a word
        raise UserError("--meteor needs Java, in which pycocoevalcap runs METEOR, and there is no java on PATH")
    sweep_grid = _thresholds(args.thresholds) if args.mode == "sweep" else []
    engines = [_engine(args)] + [_engine(argparse.Namespace(checkpoint=c, device=args.device, half=args.half,
                                                                  kv_fill=args.kv_fill))
                                 for c in args.compare]
    plans = []  # every checkpoint's settings, checked before any decoding: a late error would lose the others'
    for engine in engines:
        try:
            if args.mode == "fixed":
                grid = [engine.threshold_for("fixed", args.threshold)]
            else:
                grid = sweep_grid  # empty for --mode full
            plans.append((engine, grid, _exit_settings(args, engine, grid)))
        except (UserError, ValueError) as exc:
            raise UserError(f"{engine.checkpoint.path or engine.name}: {exc}" if len(engines) > 1 else str(exc)) \
                from None
    reports = []
    for engine, grid, chosen_exits in plans:
        data = _eval_set(args, engine, args.split)
        for distortion in distortions:
            if chosen_exits is None:
                report = evaluate_thresholds(engine, data, grid, batch_size=args.batch_size, distortion=distortion,
                                             meteor=args.meteor, simulated=args.simulated_exits)
            else:
                report = evaluate_thresholds(engine, data, [], batch_size=args.batch_size, distortion=distortion,
                                             meteor=args.meteor, schedules=chosen_exits)
            report["checkpoint"] = engine.name
            if args.agreement:
                report["exit_agreement"] = exit_agreement(engine, data)
            reports.append(report)
            _print_report(report)
    if args.json:
        outputs.write_text("--json", args.json, json.dumps(reports, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        with outputs.replacing("--plot", args.plot) as temporary:
            plot_sweeps(reports, temporary)
        print(f"wrote {args.plot}")
    return 0


def _refuse_options_the_mode_ignores(args) -> None:
    """An option that a mode would not use is an error: the report would otherwise look like it answered it."""
    ignored = {"full": [("--threshold", args.threshold), ("--thresholds", args.thresholds), ("--exits", args.exits),
                        ("--exit-offsets", args.exit_offsets), ("--simulated-exits", args.simulated_exits or None)],
               "fixed": [("--thresholds", args.thresholds)],
               "sweep": [("--threshold", args.threshold)]}[args.mode]
    given = [option for option, value in ignored if value is not None]
    if given:
        raise UserError(f"{' and '.join(given)} cannot be used with --mode {args.mode}")


def _print_report(report: dict) -> None:
    full = report["full"]
    print(f"\n{report['checkpoint']}  distortion={report['distortion']}  images={report['images']}  "
          f"batch={report['batch_size']}")
    meteor = "meteor" in full  # computed when asked for and Java is there
    header = ("threshold", "BLEU-4", "CIDEr-D", "ROUGE-L", *(("METEOR",) if meteor else ()), "scene acc",
              "mean exit", "saved", "decode ms/caption", "decoder x", "end-to-end x")
    print(" | ".join(header))
    for entry in [full, *report["thresholds"]]:
        setting = "full" if entry["threshold"] is None else f"{entry['threshold']:g}"
        if entry.get("exit_offsets"):
            setting += f" (exits {_exit_plan(entry['exit_layers'], entry['threshold'], entry['exit_offsets'])})"
        cells = [
            f"{setting} simulated" if entry.get("simulated") else setting,
            f"{entry['bleu4']:.3f}", f"{entry['ciderD']:.3f}", f"{entry['rougeL']:.3f}",
            *((f"{entry['meteor']:.3f}",) if meteor else ()),
            f"{entry['scene_accuracy']:.3f}" if "scene_accuracy" in entry else "-",  # COCO has no scenes
            f"{entry['mean_exit_layer']:.2f}",
            f"{entry['layers_saved']:.1%}", f"{entry['decode_ms_per_caption']:.2f}",
            f"{entry['decoder_speedup']:.2f}", f"{entry['end_to_end_speedup']:.2f}",
        ]
        print(" | ".join(cells))
    for entry in [full, *report["thresholds"]]:
        if "attribute_accuracy" in entry:
            setting = "full" if entry["threshold"] is None else f"{entry['threshold']:g}"
            setting += " simulated" if entry.get("simulated") else ""
            if entry.get("scene_accuracy_by_count"):
                print(f"{setting}: scene accuracy by object count: " +
                      ", ".join(f"{count}: {v['accuracy']:.3f} ({v['images']} images)"
                                for count, v in entry["scene_accuracy_by_count"].items()))
            print(f"{setting}: stated right for every object: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in entry["attribute_accuracy"].items()))
            if entry.get("lone_object_shape_accuracy"):
                print(f"{setting}: shape of a lone object, by size: " +
                      ", ".join(f"{size} {v['accuracy']:.3f} ({v['images']} images)"
                                for size, v in entry["lone_object_shape_accuracy"].items()))
    if "exit_agreement" in report:
        print("exit agreement with the final layer: " +
              ", ".join(f"L{k}: {v:.3f}" for k, v in report["exit_agreement"].items()))


def _profile_order(section: str) -> tuple[int, str]:
    """The timed sections by name, then what lies around them, then the total."""
    return ({"total decode": 2}.get(section, 1 if section.startswith("other") else 0), section)


def bench_main(args) -> int:
    from models import kernels
    from models.bench import (TooFewImages, agreement, describe_kernel_choice, head_cost, kernel_choice,
                              kernel_crossover, measure, methods, profile_early_exit)

    _set_threads(args)
    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    check_output("--json", args.json)
    engine = _engine(args)
    try:
        threshold = engine.threshold_for("fixed", args.threshold)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if any(b < 1 for b in sizes):
        raise UserError("--batch-sizes must be positive")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--batch-sizes lists a size twice: {args.batch_sizes}")
    data = _eval_set(args, engine, args.split)
    needed = 3 * max(sizes)  # measure()'s least: two warm-up batches and one measured
    if len(data) < needed:  # now, not after the smaller batch sizes were measured
        raise UserError(f"batch size {max(sizes)} needs at least {needed} images (2 warm-up batches and one "
                        f"measured), and the {args.split} split has {len(data)} images")
    method_list = methods(engine, threshold, compare_kernels=args.compare_kernels)
    results = {"device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
               "threads": args.threads, "threshold": threshold, "checkpoint": engine.name, "runs": []}
    if engine.device.type == "cpu":
        results["kernels"] = kernel_choice()
        print(describe_kernel_choice(results["kernels"]))
    for batch_size in sizes:
        images = data.pixels[: max(args.images, batch_size * (args.min_batches + 2))]
        try:
            report = measure(engine, images, batch_size, method_list)
        except TooFewImages as exc:
            raise UserError(f"{exc}; the {args.split} split has {len(data)} images") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        names = [m.name for m in method_list]
        hf, full, early = (report[n] for n in names[:3])
        run = {
            "batch_size": batch_size,
            **{n: {k: v for k, v in report[n].items() if k != "tokens"} for n in names},
            "full_vs_hf_speedup": hf["ms_per_caption"] / full["ms_per_caption"],
            "early_vs_full_speedup": full["ms_per_caption"] / early["ms_per_caption"],
            "early_vs_hf_speedup": hf["ms_per_caption"] / early["ms_per_caption"],
            "hf_and_full_identical_captions": agreement(report, names[0], names[1]),
        }
        if args.compare_kernels:  # ours with oneDNN's large products against ours on MKL alone
            run["onednn_speedup"] = {n: report[f"{n}/mkl-only"]["ms_per_caption"]
                                     / report[f"{n}/onednn"]["ms_per_caption"] for n in names[1:3]}
            run["onednn_identical_captions"] = {n: agreement(report, f"{n}/onednn", f"{n}/mkl-only")
                                                for n in names[1:3]}
        results["runs"].append(run)
        print(f"\nbatch {batch_size}: " + "  ".join(
            f"{n}: {report[n]['ms_per_caption']:.2f} ms/caption ({report[n]['captions_per_s']:.1f}/s)" for n in names))
        print(f"  ours full vs HF generate: {run['full_vs_hf_speedup']:.2f}x   early exit vs ours full: "
              f"{run['early_vs_full_speedup']:.2f}x   early exit vs HF: {run['early_vs_hf_speedup']:.2f}x   "
              f"HF and ours give identical captions for {run['hf_and_full_identical_captions']:.1%}")
        for n in names[1:3]:
            if args.compare_kernels:
                print(f"  {n}: oneDNN for large products {run['onednn_speedup'][n]:.2f}x as fast as MKL alone "
                      f"(identical captions {run['onednn_identical_captions'][n]:.1%}); MKL alone: encoder "
                      f"{report[n + '/mkl-only']['encode_ms_per_image']:.2f} ms/image + decoder "
                      f"{report[n + '/mkl-only']['decode_ms_per_caption']:.2f} ms/caption")
        for n in names[1:3]:
            first = results["runs"][0][n]
            print(f"  {n}: encoder {report[n]['encode_ms_per_image']:.2f} ms/image + decoder "
                  f"{report[n]['decode_ms_per_caption']:.2f} ms/caption; captions/s x"
                  f"{report[n]['captions_per_s'] / first['captions_per_s']:.2f} against batch {first['batch_size']}")
    profiles = {str(b): profile_early_exit(engine, data.pixels[: max(args.images, b)], threshold, b) for b in sizes}
    results["profile_ms_per_caption"] = profiles
    print(f"\nwhere early-exit decode time goes (ms per caption, threshold {threshold:g}), by batch size:")
    print(f"  {'':<48} " + " ".join(f"{'batch ' + b:>10}" for b in profiles))
    sections = sorted({name for profile in profiles.values() for name in profile}, key=_profile_order)
    for name in sections:
        print(f"  {name:<48} " + " ".join(f"{profile.get(name, 0.0):10.3f}" for profile in profiles.values()))
    results["head_cost"] = head_cost(engine)
    hc = results["head_cost"]
    print(f"\none decoder layer step {hc['decoder_layer_us']:.1f} us, one exit check {hc['exit_check_us']:.1f} us "
          f"({hc['ratio']:.1%} of a layer); one position catching up in a layer call {hc['catch_up_us']:.1f} us "
          f"({hc['catch_up_ratio']:.1%}, kv fill deferred)")
    if args.compare_kernels and kernels.onednn_available():
        results["kernel_crossover"] = kernel_crossover(engine)
        large_on = "oneDNN" if kernels.onednn_active() else "MKL"
        print(f"\nmicroseconds per product, MKL against oneDNN (models.kernels sends products of "
              f"{kernels.ONEDNN_MIN_MACS:,} multiply-adds and more to {large_on} here):")
        for row in results["kernel_crossover"]:
            print(f"  {row['product']:<42} {row['in']:>4} x {row['out']:<5} rows {row['rows']:>5}: MKL "
                  f"{row['mkl_us']:9.1f}  oneDNN {row['onednn_us']:9.1f}  ({row['mkl_us'] / row['onednn_us']:.2f}x) "
                  f"-> {row['picked']}")
    if args.json:
        outputs.write_text("--json", args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
