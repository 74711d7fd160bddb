"""`icae layout`: print the position ids a layout assigns (icae/core/positions.py), as JSON."""

from __future__ import annotations

import argparse
import json

from icae.core.positions import (
    LAYOUTS, TASKS, check_layout, decoder_positions, encoder_positions, memory_positions, segment_spans,
)
from icae.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icae layout", description="Print the position ids a layout assigns.")
    parser.add_argument("--layout", default="epl", help=f"one of {', '.join(LAYOUTS)}")
    parser.add_argument("--length", type=int, required=True, help="number of text tokens L")
    parser.add_argument("--mem_size", "--fixed_mem_size", type=int, default=128, dest="mem_size")
    parser.add_argument("--mean_compression_rate", type=int, default=4)
    parser.add_argument("--task", default="ae", choices=TASKS)
    parser.add_argument("--target_length", type=int, default=None,
                        help="decoder tokens after the special token (default: L+1 for ae, 8 otherwise)")
    parser.add_argument("--no_special_token", action="store_true", help="LM without the [LM] token")
    args = parser.parse_args(argv)
    check_layout(args.layout)
    if args.length < 1 or args.mem_size < 1 or args.mean_compression_rate < 1:
        raise UserError("--length, --mem_size and --mean_compression_rate must be positive integers")
    m, r, L = args.mem_size, args.mean_compression_rate, args.length
    n_targets = args.target_length if args.target_length is not None else (L + 1 if args.task == "ae" else 8)
    spans = segment_spans(L, m, r)
    out = {
        "layout": args.layout,
        "length": L,
        "mem_size": m,
        "mean_compression_rate": r,
        "segments": [
            {
                "offset": o,
                "length": s,
                "memory_positions": memory_positions(args.layout, s, m, r, o),
                "encoder_positions": encoder_positions(args.layout, s, m, r, o),
            }
            for o, s in spans
        ],
        "decoder": {
            "task": args.task,
            "row": f"[{len(spans) * m} slots, "
            + ("" if args.no_special_token else f"[{args.task.upper()}], ")
            + f"{n_targets} tokens]",
            "positions": decoder_positions(args.layout, L, m, r, args.task, n_targets, not args.no_special_token),
        },
    }
    print(json.dumps(out))
    return 0
