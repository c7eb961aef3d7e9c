"""The `mmlora-fx` command: show what the compiler passes saw and did."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import MMLoRAError

__all__ = ["main", "load_model"]


def load_model(spec: str):
    """A zoo model by name, or a local Hugging Face model directory (config + safetensors)."""
    import torch
    import transformers

    from . import zoo

    if spec in zoo.ZOO:
        return zoo.build(spec)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"mmlora-fx: {spec!r} is neither a zoo model ({', '.join(zoo.ZOO)}) nor a directory")
    if not any(path.glob("*.safetensors")):
        raise SystemExit(f"mmlora-fx: {spec!r} holds no .safetensors weights (pickled weights are never opened)")
    config = transformers.AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)), None)
    if model_class is None:
        raise SystemExit(f"mmlora-fx: config.json of {spec!r} names no transformers class ({architectures})")
    return model_class.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()


def _adapter_specs(values: list[str]) -> list[tuple[str, str]]:
    specs = []
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            path, name = value, Path(value).name
        specs.append((name, path))
    return specs


def _overrides(values: list[str]) -> dict[str, str]:
    overrides = {}
    for value in values:
        prefix, separator, partition = value.partition("=")
        if not separator:
            raise SystemExit(f"mmlora-fx: --partition takes PREFIX=PARTITION, not {value!r}")
        overrides[prefix] = partition
    return overrides


def _images(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--images takes counts like 0,1,2, not {value!r}") from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of rows, not {value!r}")
    return number


def _fold_predicate(model, fold_min_rows: int | None):
    """For `inspect --fold-min-rows`: whether `compile(fold_min_rows=...)` folds a served linear call
    of these modules on an input of this shape (None without the option)."""
    from .folding import foldable

    return _in_gemm_predicate(model, foldable, lambda rows: fold_min_rows is not None and rows >= fold_min_rows,
                              fold_min_rows is None)


def _stack_predicate(model, stack_max_rows: int | None):
    """For `inspect --stack-max-rows`: whether `compile(stack_max_rows=...)` stacks the shrink of a
    served linear call of these modules on an input of this shape into its base GEMM."""
    from .folding import stackable

    return _in_gemm_predicate(model, stackable, lambda rows: stack_max_rows is not None and rows <= stack_max_rows,
                              stack_max_rows is None)


def _in_gemm_predicate(model, eligible, rows_fit, off: bool):
    if off:
        return None
    import math

    from .folding import shared_weights

    shared = shared_weights(model)
    return lambda modules, shape: (bool(shape) and rows_fit(math.prod(shape[:-1]))
                                   and all(eligible(model.get_submodule(module), shared) for module in modules))


def inspect_command(args) -> int:
    from . import zoo
    from .capture import capture
    from .inspect_report import build_report, render_dot, render_text
    from .linear_index import LinearIndex
    from .partitions import discover_partitions, tower_label
    from .row_owners import modality_token_ids, outermost, token_name, trace_units
    from .peft_format import scan_adapter
    from .runtime import ServingOptions
    from .serving import ServingPlan

    # The stack's options refused as compile refuses them (stack_shrink without the graph expand, say).
    ServingOptions(stack_max_rows=args.stack_max_rows, stack_expand=args.stack_expand, stack_shrink=args.stack_shrink)
    model = load_model(args.model)
    partition_map = discover_partitions(model, _overrides(args.partition))
    linears = LinearIndex(model, partition_map)
    scans = [scan_adapter(name, path, linears) for name, path in _adapter_specs(args.adapter)]
    serving = None
    if args.adapter or args.partitions or args.target_modules:
        serving = ServingPlan.build(linears, scans, partitions=args.partitions, target_modules=args.target_modules)
    print(f"capturing {args.model} ...", file=sys.stderr)
    batch = zoo.make_batch(model, args.images)
    captured = capture(model, batch, partition_map=partition_map, verbose=args.verbose)
    config = getattr(model, "config", None)
    ownership = {modality: trace_units(model, batch, outermost(partition_map.prefixes_of(tower_label(modality))),
                                       modality_token_ids(config, modality), what=token_name(modality))
                 for modality in partition_map.modalities}
    report = build_report(captured, linears, args.model, scans, serving, ownership,
                          folds=_fold_predicate(model, args.fold_min_rows),
                          stacks=_stack_predicate(model, args.stack_max_rows), stack_expand=args.stack_expand,
                          stack_shrink=args.stack_shrink)
    if args.format == "json":
        text = json.dumps(report, indent=2) + "\n"
    elif args.format == "dot":
        text = render_dot(report)
    else:
        text = render_text(report)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    unmatched = [adapter for adapter in report["adapters"] if adapter["unmatched_keys"]]
    for adapter in unmatched:
        print(f"mmlora-fx: error: adapter {adapter['name']!r}: {len(adapter['unmatched_keys'])} tensor(s) "
              f"match no linear of the model (first: {adapter['unmatched_keys'][0]})", file=sys.stderr)
    return 1 if unmatched else 0


def zoo_command(args) -> int:
    from . import zoo

    name_width = max(len(name) for name in zoo.ZOO)
    class_width = max(len(family.model_class) for family in zoo.ZOO.values())
    for name, family in zoo.ZOO.items():
        print(f"{name:{name_width}}  {family.model_class:{class_width}}  {family.notes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmlora-fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="capture a model and show partitions, graphs, breaks, adapters")
    inspect.add_argument("model", help="zoo name (see `mmlora-fx zoo`) or a local Hugging Face model directory")
    inspect.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                         help="a PEFT LoRA adapter directory; repeat for several")
    inspect.add_argument("--format", choices=("text", "json", "dot"), default="text")
    inspect.add_argument("--images", type=_images, default=[0, 1, 2], metavar="N,N,...",
                         help="images (audio clips, for an audio model) per request of the example batch "
                              "(default 0,1,2)")
    inspect.add_argument("--partition", action="append", default=[], metavar="PREFIX=PARTITION",
                         help="override or add a partition prefix (tower, connector, language_model, other)")
    inspect.add_argument("--partitions", nargs="+", default=None, metavar="PARTITION",
                         help="serve LoRA only on these partitions (as compile(partitions=...))")
    inspect.add_argument("--target-modules", nargs="+", default=None, metavar="SUFFIX",
                         help="serve LoRA only on modules with these name suffixes (as compile(target_modules=...))")
    inspect.add_argument("--fold-min-rows", type=_positive_int, default=None, metavar="N",
                         help="mark the served linear calls compile(fold_min_rows=N) would fold into their base "
                              "GEMM (LoRA column: folded), where max_loras x max_lora_rank is at most 256 (past it "
                              "compile folds nothing)")
    inspect.add_argument("--stack-max-rows", type=_positive_int, default=None, metavar="N",
                         help="mark the served linear calls compile(stack_max_rows=N) would stack (the shrink in "
                              "their base GEMM; LoRA column: stacked)")
    inspect.add_argument("--stack-expand", choices=["kernel", "inductor"], default="kernel",
                         help="with --stack-max-rows: compile(stack_expand=...); inductor marks the language model's "
                              "stacked calls 'stacked, graph expand' (their expand as graph ops, no LoRA kernel)")
    inspect.add_argument("--stack-shrink", choices=["gemm", "inductor", "inductor_columns"], default="gemm",
                         help="with --stack-expand inductor: compile(stack_shrink=...); inductor and inductor_columns "
                              "mark those calls 'graph shrink and expand' (their shrink as graph ops too, the base "
                              "GEMM as it is)")
    inspect.add_argument("--output", "-o", help="write to this file instead of standard output")
    inspect.add_argument("--verbose", "-v", action="store_true",
                         help="let torch._dynamo's own messages (one per graph break) through")
    inspect.set_defaults(run=inspect_command)

    listing = commands.add_parser("zoo", help="list the built-in tiny models")
    listing.set_defaults(run=zoo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MMLoRAError as error:
        print(f"mmlora-fx: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
