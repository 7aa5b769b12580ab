"""``driftscope-torch trace``: run prompts through a transformers model's phases and write a trace.

Bad input (files, flags, prompts, point names, outputs over inputs) prints one message naming the
file/line or flag and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from torch import nn

from .errors import InputError
from .loading import DTYPES, load_model, resolve_model
from .meta import enable_deterministic
from .phases import INJECTIONS, Phase, parse_phases, trace_prompts
from .pointmap import PointMap, decoder_layers, point_map_for
from .points import HOOKABLE, parse_layers, parse_points
from .prompts import PromptLine, read_prompt_lines, tokenize
from .writer import check_outputs, dump_path

PROG = "driftscope-torch"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Trace a Hugging Face transformers model (PyTorch) in driftscope's trace format.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    t = sub.add_parser(
        "trace",
        help="run prompts through prefill_last and the scenarios (default decode0) and write a trace",
        description="Run each prompt through phase prefill_last and each scenario (default decode0), "
        "trace every chosen point of every chosen layer at the prompt's last position, and write "
        "the trace (and with --dump the rows) atomically. Analyze it with `driftscope analyze`.",
    )
    t.add_argument("--model", required=True, help="a transformers checkpoint directory, a .gguf file, or `smollm2`")
    t.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='JSON Lines of {"id": ..., "text": ...} or {"id": ..., "token_ids": [...]}, as driftscope run reads',
    )
    t.add_argument("--out", required=True, metavar="TRACE.jsonl", help="where to write the trace")
    t.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    t.add_argument("--dtype", default="fp32", help="weights and activations: fp32, bf16 or fp16 (default: fp32)")
    t.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (default: sdpa)")
    t.add_argument(
        "--layers", default="all", metavar="LIST", help="layers to trace: all, 0,1,2,4,8 or 0-3,8 (default: all)"
    )
    t.add_argument(
        "--points",
        default="all",
        metavar="LIST",
        help=f"points to trace: all, or a list of {', '.join(HOOKABLE)} (default: all)",
    )
    t.add_argument(
        "--scenario",
        default="decode0",
        metavar="LIST",
        help="phases compared with prefill_last: decode0, chunkC, prefix_cache, batchB, decodeK (default: decode0)",
    )
    t.add_argument(
        "--batch", type=int, metavar="B", help="also run scenario batchB: the prompt inside a batch of B prompts"
    )
    t.add_argument(
        "--dump", action="store_true", help="also write the traced rows to the trace's name with .safetensors"
    )
    t.add_argument(
        "--inject",
        metavar="BUG",
        choices=sorted(INJECTIONS),
        help="commit a decode-path bug on purpose in every decode step (recorded in run_meta): "
        + "; ".join(f"{k}: {v}" for k, v in INJECTIONS.items()),
    )
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True), deterministic cuDNN, CUBLAS_WORKSPACE_CONFIG (in run_meta)",
    )
    t.add_argument(
        "--point-map",
        metavar="FILE.json",
        help="point -> module map for other architectures (JSON: "
        '{"layers": "model.layers", "points": {"x_in": ":input", ...}})',
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (0 done, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        return _trace(args, list(sys.argv[1:] if argv is None else argv))
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _trace(args: argparse.Namespace, argv: List[str]) -> int:
    started = time.perf_counter()
    points = parse_points(args.points)
    dtype = DTYPES.get(args.dtype.lower())
    if dtype is None:
        raise InputError(f"--dtype: unknown dtype `{args.dtype}` (known: fp32, bf16, fp16)")
    scenarios = parse_phases(args.scenario.split(","), "--scenario")
    if Phase("prefill_last") in scenarios:
        raise InputError("--scenario: `prefill_last` is the baseline every scenario is compared with")
    if args.batch is not None:
        if args.batch < 2:
            raise InputError(f"--batch: a batch needs at least 2 prompts, not {args.batch}")
        if Phase("batch", args.batch) not in scenarios:
            scenarios.append(Phase("batch", args.batch))
    source = resolve_model(args.model)
    lines = read_prompt_lines(args.prompts)
    inputs = [args.prompts, source.input_path] + ([args.point_map] if args.point_map else [])
    outputs = [args.out] + ([dump_path(args.out)] if args.dump else [])
    check_outputs(inputs, outputs)
    point_map = PointMap.from_file(args.point_map) if args.point_map else None
    if args.deterministic:
        enable_deterministic()  # before the model touches CUDA: cuBLAS reads its env when it starts
    model, tokenizer = load_model(source, dtype, args.attn, args.device)
    return _run(args, argv, model, tokenizer, source.desc, lines, points, point_map, scenarios, started)


def _run(
    args: argparse.Namespace,
    argv: List[str],
    model: nn.Module,
    tokenizer: Any,
    desc: str,
    lines: List[PromptLine],
    points: Optional[Tuple[str, ...]],
    point_map: Optional[PointMap],
    scenarios: List[Phase],
    started: float,
) -> int:
    config = getattr(model, "config", None)
    pmap = point_map_for(model, point_map)
    n_layers = len(decoder_layers(model, pmap)) if pmap.layers else int(getattr(config, "num_hidden_layers", 0))
    layers = parse_layers(args.layers, n_layers)
    prompts = tokenize(lines, tokenizer, getattr(config, "vocab_size", None))
    limit = getattr(config, "max_position_embeddings", None)
    for p in prompts:
        if isinstance(limit, int) and len(p.token_ids) > limit:
            raise InputError(f"prompt `{p.id}` has {len(p.token_ids)} tokens, more than the model's context of {limit}")
    phases = [Phase("prefill_last")] + list(scenarios)
    summary = trace_prompts(
        model,
        tokenizer,
        prompts,
        args.out,
        phases=phases,
        layers=layers,
        points=points,
        point_map=pmap,
        dump=args.dump,
        model_desc=desc,
        command=" ".join([PROG] + [shlex.quote(a) for a in argv]),
        inject=args.inject,
    )
    lengths = ", ".join(str(len(p.token_ids)) for p in prompts)
    if summary.dump is not None:
        print(f"dumped {summary.dumped_rows} rows -> {summary.dump}", file=sys.stderr)
    print(
        f"traced {summary.prompts} prompt(s) ({lengths} tokens) x {len(phases)} phases on {desc} "
        f"({args.dtype}, {args.attn}, {args.device}{', injected bug ' + args.inject if args.inject else ''}): "
        f"{summary.events} events in "
        f"{time.perf_counter() - started:.1f} s -> {summary.trace}",
        file=sys.stderr,
    )
    for phase in scenarios:
        for base, cand in phase.comparisons():
            print(
                f"analyze: driftscope analyze {shlex.quote(str(summary.trace))} --baseline {base} --candidate {cand}",
                file=sys.stderr,
            )
    return 0
