"""Summarize the verdicts of gpu_case_studies.sh as one Markdown table per comparison.

    python3 python/scripts/summarize_case_studies.py OUT_DIR > summary.md

Reads OUT_DIR/<config>/<comparison>.json (driftscope's JSON verdicts) and prints, per
configuration and prompt: failing pairs, where the drift originates (the op, or the region of
untraced ops it lies in), the root cause, the exact magnitude at the first divergence when the
rows were dumped, and the next-token impact (greedy agreement, KL) when the logits were dumped.
Only the standard library is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2e}"


def _first_failure_pair(v: Dict[str, Any], prompt: str, node: Optional[str]) -> Optional[Dict[str, Any]]:
    if not node:
        return None
    point, _, layer = node.partition("[")
    layer_no = int(layer.rstrip("]")) if layer else 0
    for p in v.get("pairs", []):
        k = p["key"]
        if k["prompt_id"] == prompt and k["point"] == point and k["layer"] == layer_no:
            return p
    return None


def rows(config: str, comparison: str, v: Dict[str, Any]) -> List[str]:
    out = []
    origins = v.get("origin", {})
    impacts = v.get("token_impact", {})
    for pr in v["prompts"]:
        name = pr["prompt_id"]
        o = origins.get(name, {})
        node = o.get("first_failure")
        region = o.get("region") or []
        where = "—"
        if node:
            where = f"`{node}`"
            if len(region) > 1:
                where += " (in " + ", ".join(f"`{r}`" for r in region) + ")"
        ff = _first_failure_pair(v, name, node)
        mag = (ff or {}).get("magnitude")
        size = f"rel L2 {_fmt(mag['rel_l2'])}, {mag['max_ulp']} ULP" if mag else "—"
        t = impacts.get(name)
        if t:
            agree = "same" if t["argmax_agree"] else f"{t['baseline_argmax']} → {t['candidate_argmax']}"
            impact = f"greedy {agree}, KL {_fmt(t['kl'])}"
        else:
            impact = "logits bitwise equal" if pr["failed"] == 0 else "—"
        out.append(
            f"| {config} | {comparison} | `{name}` | {pr['failed']}/{pr['pairs']} | {where} | "
            f"{pr.get('root_cause') or 'PASS'} | {size} | {impact} |"
        )
    return out


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    root = Path(argv[1])
    lines = [
        "| config | vs `prefill_last` | prompt | failing pairs | origin | root cause | size at origin | next token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for comparison in ("decode0", "batch4"):
            path = d / f"{comparison}.json"
            try:
                v = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                lines.append(f"| {d.name} | {comparison} | — | — | — | ERROR: {e} | — | — |")
                continue
            lines.extend(rows(d.name, comparison, v))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
