#!/usr/bin/env python3
"""Measure how the bug tier separates decode-path bugs from rounding drift (docs/tolerances.md).

    python3 scripts/calibrate_gross.py OUT_DIR [--quick] [--bin PATH] [--torch-python PATH]

Runs SmolLM2-135M-Instruct through

- driftscope's engine: both kernel profiles, f32/bf16/f16, every scenario (decode0, chunk64,
  prefix_cache, batch4, decode4) on the default prompts; `driftscope sweep` of decode0, chunk64,
  prefix_cache and batch4 at the kernels' block edges up to 2048 tokens; and every injected bug
  (`--inject`) under both profiles and all three dtypes, in decode0 and decode4;
- the PyTorch adapter (driftscope-torch, eager attention, CPU): f32/bf16/f16, every scenario, and
  every injected bug, on prompts of 5 to 2048 tokens;

each analyzed with dumped rows (exact relative L2) and again from the statistics alone. It prints
one Markdown table: per engine, basis and dtype, the largest difference ÷ bound of any pair of the
rounding-only runs (must stay below 1: never gross) and the smallest at the gross origin of the
bug runs (must exceed 1), with the count of runs that got it wrong. Exit code 1 when a rounding
run has a gross origin or a bug run with dumps misses or misplaces its bug.

--quick: f32 and bf16 only, fewer sweep lengths, no adapter bf16/f16 (about 10 minutes on 2 cores).
Needs the release binary (cargo build --release) and, for the adapter, the venv of
scripts/setup-python.sh (found automatically).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
BUGS = ["kv_drop", "rope_pos", "cache_off_by_one", "mask_off_by_one"]
SCENARIOS = "decode0,chunk64,prefix_cache,batch4,decode4"
EDGES = "1,2,3,5,31,32,33,63,64,65,96,97,127,128,129,255,256,257,511,512,513,1023,1024,1025,2047,2048"
QUICK_EDGES = "2,32,33,64,65,128,129,256,257,512,513,1024,2048"
# The adapter's prompt lengths (token ids cut from one long text, as the engine's sweep does).
ADAPTER_LENGTHS = [5, 33, 65, 150, 257, 600, 1025, 2048]
# What each bug must be called, and where (the adapter traces no q_rope/k_rope).
EXPECTED = {
    "kv_drop": ("attn_ctx", "ATTENTION_STATE_MISMATCH"),
    "cache_off_by_one": ("attn_ctx", "ATTENTION_STATE_MISMATCH"),
    "mask_off_by_one": ("attn_ctx", "ATTENTION_STATE_MISMATCH"),
    "rope_pos": ("q_rope", "POSITION_MISMATCH"),
}


def run(cmd: List[str], ok=(0, 1)) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode not in ok:
        sys.exit(f"calibrate: `{' '.join(cmd)}` failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class Tally:
    """Rounding and bug results per (engine, basis, dtype)."""

    def __init__(self) -> None:
        self.rows: Dict[Tuple[str, str, str], Dict] = {}

    def row(self, engine: str, basis: str, dtype: str) -> Dict:
        return self.rows.setdefault(
            (engine, basis, dtype),
            {"rounding": 0, "max": 0.0, "max_at": "", "false": 0, "bugs": 0, "min": float("inf"), "min_at": "", "miss": 0},
        )

    def rounding(self, engine: str, basis: str, dtype: str, ratio: Optional[float], where: str, gross: bool) -> None:
        r = self.row(engine, basis, dtype)
        r["rounding"] += 1
        if ratio is not None and ratio > r["max"]:
            r["max"], r["max_at"] = ratio, where
        r["false"] += int(gross)

    def bug(self, engine: str, basis: str, dtype: str, ratio: Optional[float], where: str, right: bool) -> None:
        r = self.row(engine, basis, dtype)
        r["bugs"] += 1
        if right and ratio is not None and ratio < r["min"]:
            r["min"], r["min_at"] = ratio, where
        r["miss"] += int(not right)


def verdict_prompts(path: Path):
    v = json.loads(path.read_text())
    return v, v["prompts"]


def ratio_of(x) -> Optional[float]:
    if x is None:
        return None
    return float("inf") if x == "Infinity" else float(x)


def judge_rounding(t: Tally, engine: str, basis: str, dtype: str, verdict: Path, label: str) -> None:
    _, prompts = verdict_prompts(verdict)
    for p in prompts:
        big = p.get("largest_excess")
        where = f"{label} {p['prompt_id']} {big['point']}[{big['layer']}]" if big else label
        t.rounding(engine, basis, dtype, ratio_of(big["ratio"]) if big else None, where, p.get("gross_origin") is not None)


def judge_bug(t: Tally, engine: str, basis: str, dtype: str, verdict: Path, bug: str, label: str) -> None:
    _, prompts = verdict_prompts(verdict)
    point, cls = EXPECTED[bug]
    if engine == "torch" and bug == "rope_pos":
        point, cls = "attn_ctx", "ATTENTION_STATE_MISMATCH"
    for p in prompts:
        g = p.get("gross_origin")
        if p["failed"] == 0:
            continue  # a prompt the bug cannot touch (decode from an empty cache)
        right = g is not None and g["point"] == point and g["layer"] == 0 and g["class"] == cls
        ratio = ratio_of(g["rel_delta"]) / ratio_of(g["bound"]) if g else None
        where = f"{label} {p['prompt_id']}" + (f" -> {g['point']}[{g['layer']}] {g['class']}" if g else " -> none")
        t.bug(engine, basis, dtype, ratio, where, right)


def comparisons(scenarios: str) -> List[Tuple[str, str]]:
    out = []
    for s in scenarios.split(","):
        if s.startswith("decode") and s != "decode0":
            out += [(f"prefill_decode{k}", f"decode{k}") for k in range(1, int(s[6:]) + 1)]
        else:
            out.append(("prefill_last", s))
    return out


def analyze_both(binary: str, trace: Path, pairs: List[Tuple[str, str]], work: Path) -> List[Tuple[str, Path, str]]:
    """Analyzes a trace per comparison with its dump and without (a copy of the trace alone)."""
    plain = work / "stats" / trace.name
    plain.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trace, plain)
    out = []
    for base, cand in pairs:
        for basis, t in (("dump", trace), ("stats", plain)):
            v = work / f"verdict-{basis}-{cand}.json"
            run([binary, "analyze", str(t), "--baseline", base, "--candidate", cand, "--json", str(v)])
            out.append((basis, v, cand))
    return out


def engine_runs(binary: str, out: Path, t: Tally, dtypes: List[str], edges: str) -> None:
    for profile in ("fast", "invariant"):
        for dtype in dtypes:
            d = out / f"engine-{profile}-{dtype}"
            run([binary, "check", "--model", "smollm2", "--profile", profile, "--dtype", dtype,
                 "--scenario", SCENARIOS, "--dump", "--out", str(d)])
            for basis, v, cand in analyze_both(binary, d / "trace.jsonl", comparisons(SCENARIOS), d):
                judge_rounding(t, "engine", basis, dtype, v, f"{profile} {cand}")
            for bug in BUGS:
                d = out / f"engine-{bug}-{profile}-{dtype}"
                run([binary, "check", "--model", "smollm2", "--profile", profile, "--dtype", dtype, "--inject", bug,
                     "--scenario", "decode0,decode4", "--dump", "--out", str(d)])
                for basis, v, cand in analyze_both(binary, d / "trace.jsonl", comparisons("decode0,decode4"), d):
                    judge_bug(t, "engine", basis, dtype, v, bug, f"{bug} {profile} {cand}")
        print(f"calibrate: engine {profile} done", file=sys.stderr)
    for dtype in dtypes:
        for scenario in ("decode0", "chunk64", "prefix_cache", "batch4"):
            for basis in ("dump", "stats"):
                d = out / f"sweep-{scenario}-{dtype}-{basis}"
                cmd = [binary, "sweep", "--model", "smollm2", "--dtype", dtype, "--scenario", scenario,
                       "--lengths", edges, "--out", str(d)]
                run(cmd + (["--dump"] if basis == "dump" else []))
                with open(d / "sweep.csv", newline="") as f:
                    for row in csv.DictReader(f):
                        ratio = None if row["max_bound_ratio"] == "-" else float(row["max_bound_ratio"])
                        where = f"sweep {scenario} length {row['length']}"
                        t.rounding("engine", basis, dtype, ratio, where, row["gross_origin"] != "-")
        print(f"calibrate: sweeps {dtype} done", file=sys.stderr)


ADAPTER = r'''
import json, sys
from pathlib import Path
from driftscope_torch.loading import DTYPES, load_model, resolve_model
from driftscope_torch.phases import trace_prompts
out, dtypes, lengths, bugs, scenarios = sys.argv[1], sys.argv[2].split(","), [int(x) for x in sys.argv[3].split(",")], sys.argv[4].split(","), sys.argv[5]
src = resolve_model("smollm2")
for dtype in dtypes:
    model, tok = load_model(src, DTYPES[dtype], "eager", "cpu")
    text = Path(sys.argv[6]).read_text()
    ids = tok(text)["input_ids"]
    ids = (ids * (max(lengths) // len(ids) + 1))[: max(lengths)]
    prompts = [{"id": f"len{n}", "token_ids": ids[:n]} for n in lengths]
    phases = ["prefill_last"] + scenarios.split(",")
    trace_prompts(model, tok, prompts, f"{out}/torch-{dtype}.jsonl", phases=phases, dump=True)
    for bug in bugs:
        short = [p for p in prompts if len(p["token_ids"]) <= 600]
        trace_prompts(model, tok, short, f"{out}/torch-{bug}-{dtype}.jsonl", phases=["prefill_last", "decode0"], dump=True, inject=bug)
    print(f"adapter {dtype} done", file=sys.stderr)
'''


def adapter_runs(binary: str, py: str, out: Path, t: Tally, dtypes: List[str]) -> None:
    d = out / "torch"
    d.mkdir(parents=True, exist_ok=True)
    text = REPO / "crates" / "engine" / "src" / "prompts.rs"
    long_text = text.read_text().split('pub const LONG: &str = "', 1)[1].split('";', 1)[0].replace("\\\n", "")
    (d / "long.txt").write_text(long_text)
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    scen = "decode0,chunk64,prefix_cache,batch4,decode4"
    p = subprocess.run([py, "-c", ADAPTER, str(d), ",".join(dtypes), ",".join(map(str, ADAPTER_LENGTHS)),
                        ",".join(BUGS), scen, str(d / "long.txt")], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"calibrate: the adapter failed:\n{p.stderr[-4000:]}")
    for dtype in dtypes:
        w = d / f"rounding-{dtype}"
        w.mkdir(exist_ok=True)
        for basis, v, cand in analyze_both(binary, d / f"torch-{dtype}.jsonl", comparisons(scen), w):
            judge_rounding(t, "torch", basis, dtype, v, f"torch {cand}")
        for bug in BUGS:
            w = d / f"{bug}-{dtype}"
            w.mkdir(exist_ok=True)
            for basis, v, cand in analyze_both(binary, d / f"torch-{bug}-{dtype}.jsonl", comparisons("decode0"), w):
                judge_bug(t, "torch", basis, dtype, v, bug, f"torch {bug} {cand}")


def fmt(x: float) -> str:
    return "—" if x in (0.0, float("inf")) else f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "driftscope"))
    ap.add_argument("--torch-python", default=None)
    ap.add_argument("--no-adapter", action="store_true")
    args = ap.parse_args()
    if not Path(args.bin).exists():
        sys.exit(f"calibrate: no driftscope binary at {args.bin} (cargo build --release)")
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes = ["f32", "bf16"] if args.quick else ["f32", "bf16", "f16"]
    t = Tally()
    engine_runs(args.bin, args.out, t, dtypes, QUICK_EDGES if args.quick else EDGES)
    if not args.no_adapter:
        py = args.torch_python or run(["bash", str(REPO / "scripts" / "setup-python.sh")]).stdout.strip().splitlines()[-1]
        adapter_runs(args.bin, py, args.out, t, ["f32"] if args.quick else dtypes)
    print("| Engine | Basis | Dtype | Rounding comparisons | Largest ÷ bound (where) | Gross (must be 0) "
          "| Bug comparisons | Smallest ÷ bound at the bug (where) | Missed or misplaced |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = False
    for (engine, basis, dtype), r in sorted(t.rows.items()):
        print(f"| {engine} | {basis} | {dtype} | {r['rounding']} | {fmt(r['max'])} ({r['max_at']}) | {r['false']} "
              f"| {r['bugs']} | {fmt(r['min'])} ({r['min_at']}) | {r['miss']} |")
        bad |= r["false"] > 0 or (basis == "dump" and r["miss"] > 0)
    (args.out / "calibration.json").write_text(json.dumps({"|".join(k): v for k, v in t.rows.items()}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
