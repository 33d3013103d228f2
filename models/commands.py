"""Handlers of the model subcommands of `capeen` (train, caption, calibrate, evaluate, bench).

They translate arguments into calls of the library modules and library errors into `UserError` lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from capeen.cli import UserError


def _parse_overrides(text: str | None) -> dict:
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--model-config is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError("--model-config must be a JSON object of model config fields")
    return data


def train_main(args) -> int:
    from models.checkpoint import CheckpointError
    from models.dataset import DatasetError
    from models.train import TrainOptions, train

    opts = TrainOptions(
        stage=args.stage, data=Path(args.data), out=Path(args.out),
        run_dir=Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.out).name / args.stage,
        init=Path(args.init) if args.init else None, steps=args.steps, batch_size=args.batch_size,
        captions_per_image=args.captions_per_image, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
        seed=args.seed, device=args.device, alpha=args.alpha, temperature=args.temperature, ce_only=args.ce_only,
        exit_aware=args.exit_aware, aux_weight=args.aux_weight, resume=args.resume,
        model_overrides=_parse_overrides(args.model_config), name=args.name or Path(args.out).name,
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
    return 0


def _engine(args):
    from models.checkpoint import CheckpointError
    from models.engine import CaptionEngine

    try:
        return CaptionEngine.from_checkpoint(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as exc:
        raise UserError(str(exc)) from None


def caption_main(args) -> int:
    from models.images import ImageError, load_image

    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    engine = _engine(args)
    try:
        threshold = engine.threshold_for(args.mode, args.threshold)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    images, failures = [], 0
    outputs: list[dict] = []
    for path in args.images:
        try:
            images.append((path, load_image(Path(path))))
        except (ImageError, OSError) as exc:
            print(f"capeen caption: {path}: {exc}", file=sys.stderr)
            failures += 1
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        batch = engine.caption([image for _, image in chunk], threshold, max_tokens=args.max_tokens)
        for (path, _), result in zip(chunk, batch.results):
            outputs.append({"image": str(path), "caption": result.caption, "tokens": result.tokens,
                            "exit_layers": result.exit_layers,
                            "confidences": [round(c, 4) for c in result.confidences],
                            "threshold": result.threshold})
    if args.json:
        print(json.dumps(outputs, indent=2))
    else:
        for item in outputs:
            print(f"{item['image']}\t{item['caption']}" if len(args.images) > 1 else item["caption"])
    return 1 if failures else 0
