//! The Markdown report, in the seed report's layout: header, verdict, summary, failure
//! breakdown, first failure, sample evidence, propagation tree, root cause, recommendations.

use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use driftscope_trace::Point;

use crate::advice::{list_nodes, recommendations, size_of};
use crate::analysis::{describe_region, Analysis, Classification, Group, PairStatus, Verdict};
use crate::collect::{PointId, Side};
use crate::dataflow::Node;
use crate::report::{Evidence, ReportContext};
use crate::tolerance::Policy;

/// Renders the report.
pub fn render(a: &Analysis, ctx: &ReportContext) -> String {
    let mut md = String::new();
    header(a, ctx, &mut md);
    verdict(a, &mut md);
    crate::report::bug_tier::section(a, &mut md);
    token_impact(a, &mut md);
    summary(a, &mut md);
    breakdown(a, &mut md);
    per_prompt(a, &mut md);
    growth(a, &mut md);
    first_failure(a, &mut md);
    evidence(a, ctx.evidence.as_ref(), &mut md);
    propagation(a, &mut md);
    root_cause(a, &mut md);
    recs(a, &mut md);
    appendix(a, &mut md);
    md
}

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    let p = n as f64 * 100.0 / total as f64;
    let s = format!("{p:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

fn header(a: &Analysis, ctx: &ReportContext, md: &mut String) {
    let c = &a.collected;
    if c.is_diff() {
        let _ = writeln!(
            md,
            "# driftscope diff: `{}` vs `{}`, phase `{}`\n",
            c.source_of(false).path.display(),
            c.source_of(true).path.display(),
            a.options.baseline
        );
    } else {
        let _ = writeln!(md, "# driftscope report: `{}` vs `{}` drift\n", a.options.baseline, a.options.candidate);
    }
    let meta = a.meta();
    let date = meta.date.as_deref().map(|d| d.get(..10).unwrap_or(d)).unwrap_or(&ctx.date);
    let _ = writeln!(md, "**Date**: {date}  ");
    let sides: &[(bool, &str)] =
        if c.is_diff() { &[(false, "Baseline "), (true, "Candidate ")] } else { &[(false, "")] };
    for &(cand, who) in sides {
        let meta = a.meta_of(cand);
        let fields = [
            ("Host", &meta.host),
            ("Device", &meta.device),
            ("Engine", &meta.engine),
            ("Model", &meta.model),
            ("Dtype", &meta.dtype),
            ("Kernel Profile", &meta.profile),
            ("Run Mode", &meta.run_mode),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                let _ = writeln!(md, "**{who}{name}**: {v}  ");
            }
        }
        let src = c.source_of(cand);
        let r = &src.read;
        let _ = writeln!(
            md,
            "**{who}Trace**: `{}` ({} lines, {} stage_trace events{})  ",
            src.path.display(),
            r.lines,
            r.stage_events,
            if r.other_events > 0 {
                format!(", {} events of other kinds skipped", r.other_events)
            } else {
                String::new()
            }
        );
    }
    md.push_str("\n---\n\n");
}

/// How the tolerances were applied, in words.
fn tolerance_basis(a: &Analysis) -> String {
    let source = match &a.options.tolerances.source {
        Some(p) => format!("tolerances from `{}`", p.display()),
        None => "built-in tolerances".into(),
    };
    let basis = if a.magnitudes_from_dump {
        "exact differences from the dumped rows"
    } else {
        "statistics only, which bound the difference from below: no evidence beyond tolerance"
    };
    format!("{source}; {basis}")
}

fn verdict(a: &Analysis, md: &mut String) {
    match (a.verdict, a.root_cause) {
        (Verdict::Pass, _) if a.summary.within_tol > 0 => {
            let _ = writeln!(md, "## Verdict: **PASS** (policy: tolerance)\n");
            let _ = writeln!(
                md,
                "{} of {} pairs differ between `{}` and `{}`, all within tolerance ({}); the rest are bitwise identical.",
                a.summary.within_tol,
                a.summary.total_pairs,
                a.baseline_label,
                a.candidate_label,
                tolerance_basis(a)
            );
        }
        (Verdict::Pass, _) => {
            let _ = writeln!(md, "## Verdict: **PASS**\n");
            let _ = writeln!(
                md,
                "All {} pairs are bitwise identical between `{}` and `{}`.",
                a.summary.total_pairs, a.baseline_label, a.candidate_label
            );
        }
        (Verdict::Fail, cause) => {
            let cause = cause.unwrap_or("UNLOCALIZED");
            let _ = writeln!(md, "## Verdict: **FAIL** + ROOT_CAUSE: **{cause}**\n");
            if let Some(ff) = a.first_failure {
                let what = match a.options.policy {
                    Policy::Bitwise => "First divergence",
                    Policy::Tolerance => "First pair beyond tolerance",
                };
                let _ = writeln!(md, "{what}: {}.", a.pair_name(ff));
                if let Some(o) = a.first_gross.and_then(|i| a.groups[i].gross.as_ref()) {
                    let rounding = match a.rounding_root_cause {
                        Some(c) if o.judged.pair != ff => {
                            format!("; the first divergence is rounding drift ({c}), a secondary finding")
                        }
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        md,
                        "\nGross origin: {} ({}), far above what rounding explains: the bug to fix first{rounding}.",
                        a.pair_name(o.judged.pair),
                        o.class
                    );
                }
                if a.options.policy == Policy::Tolerance {
                    let _ = writeln!(md, "\nPolicy: tolerance ({}).", tolerance_basis(a));
                }
            }
            let causes = a.distinct_causes();
            let failing = a.groups.iter().filter(|g| g.cause.is_some()).count();
            if causes.len() > 1 {
                let _ = writeln!(
                    md,
                    "\n**Prompts disagree**: {} failing prompt(s) name {} different root causes ({}); see Per-Prompt Results.",
                    failing,
                    causes.len(),
                    causes.iter().copied().collect::<Vec<_>>().join(", ")
                );
            } else if failing < a.groups.len() {
                let _ = writeln!(
                    md,
                    "\n**Prompts disagree**: {} of {} prompts fail; see Per-Prompt Results.",
                    failing,
                    a.groups.len()
                );
            }
        }
    }
    md.push_str("\n---\n\n");
}

/// What drift does to the next token: it leads the report, since it is what users feel.
fn token_impact(a: &Analysis, md: &mut String) {
    if a.groups.iter().all(|g| g.token_impact.is_none()) {
        return;
    }
    md.push_str("## Token Impact\n\n| Prompt | Greedy token (baseline / candidate) | Same token | KL(baseline ‖ candidate) | max \\|Δ log-prob\\| (top 10) |\n|---|---|---|---|---|\n");
    for g in &a.groups {
        let Some(t) = g.token_impact else { continue };
        let _ = writeln!(
            md,
            "| `{}` | {} / {} | {} | {:.3e} | {:.3e} |",
            a.prompt_id(g),
            t.baseline_argmax,
            t.candidate_argmax,
            if t.argmax_agree { "yes" } else { "**no**" },
            t.kl,
            t.max_dlogprob
        );
    }
    md.push('\n');
}

/// How the drift grows through the layers: the residual stream entering each traced layer.
/// Prompts shown in the Drift Growth table; the JSON verdict has every pair of every prompt.
const GROWTH_PROMPTS: usize = 20;

fn growth(a: &Analysis, md: &mut String) {
    let mut rows = String::new();
    let failing = a.groups.iter().filter(|g| g.failed > 0);
    let (shown, more) = (failing.clone().take(GROWTH_PROMPTS), failing.count().saturating_sub(GROWTH_PROMPTS));
    for g in shown {
        let mut prev: Option<f64> = None;
        for i in g.pairs.clone() {
            let p = &a.pairs[i];
            if p.key.point != PointId::Known(Point::XIn) || p.status == PairStatus::Pass && prev.is_none() {
                continue;
            }
            let (size, what) = match (p.magnitude.as_deref(), a.delta(p)) {
                (Some(m), _) => (m.rel_l2, format!("{:.3e} | {}", m.max_abs, m.max_ulp)),
                (None, Some(d)) => (d.rel, format!("≥ {:.3e} | —", d.max_abs_lower_bound)),
                _ => continue,
            };
            let amp = match prev {
                Some(x) if x > 0.0 => format!("×{:.2}", size / x),
                _ => "—".into(),
            };
            let _ = writeln!(rows, "| `{}` | {} | {what} | {size:.3e} | {amp} |", a.prompt_id(g), p.key.layer);
            prev = Some(size);
        }
    }
    if rows.is_empty() {
        return;
    }
    let measure = if a.magnitudes_from_dump { "relative L2 (dump)" } else { "relative stat Δ (no dump)" };
    let _ = writeln!(
        md,
        "## Drift Growth\n\nThe residual stream entering each traced layer (`x_in`), from the first layer where it drifts.\n\n| Prompt | Layer | max \\|Δ\\| | max ULP | {measure} | vs previous |\n|---|---|---|---|---|---|\n{rows}"
    );
    if more > 0 {
        let _ = writeln!(
            md,
            "The first {GROWTH_PROMPTS} failing prompts are shown; {more} more fail (their pairs are in the JSON verdict).\n"
        );
    }
}

fn summary(a: &Analysis, md: &mut String) {
    let s = &a.summary;
    md.push_str("## Summary\n\n| Metric | Value |\n|--------|-------|\n");
    let _ = writeln!(md, "| **Total Pairs** | {} |", s.total_pairs);
    let _ = writeln!(md, "| **Pass** | {} ({}) |", s.passed, pct(s.passed, s.total_pairs));
    let _ = writeln!(md, "| **Fail** | {} ({}) |", s.failed, pct(s.failed, s.total_pairs));
    let _ = writeln!(md, "| **Missing Pairs** | {} |", s.missing_pairs);
    let extra = [
        ("Within Tolerance (of Fail)", s.within_tol),
        ("Beyond Tolerance (of Fail)", s.beyond_tol),
        ("Misaligned (of Fail)", s.misaligned),
        ("Numeric Faults (of Fail)", s.numeric_faults),
        ("Duplicate Events Dropped", s.duplicates),
        ("Unreadable Lines Skipped", s.skipped_lines),
    ];
    for (name, n) in extra {
        if n > 0 {
            let _ = writeln!(md, "| **{name}** | {n} |");
        }
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "Magnitudes: {}.\n",
        if a.magnitudes_from_dump {
            "exact, from the rows dumped next to the trace"
        } else {
            "lower bounds from the events' statistics (run with `--dump` for exact ones)"
        }
    );
    for note in &a.dump_notes {
        let _ = writeln!(md, "- Note: {note}");
    }
    if !a.dump_notes.is_empty() {
        md.push('\n');
    }
}

fn breakdown(a: &Analysis, md: &mut String) {
    if a.breakdown.is_empty() {
        return;
    }
    md.push_str("## Failure Breakdown\n\n| Root Cause | Count | Percentage |\n|------------|-------|------------|\n");
    for (class, n) in &a.breakdown {
        let _ = writeln!(md, "| {class} | {n} | {} |", pct(*n, a.summary.total_pairs));
    }
    md.push('\n');
}

fn origin_text(a: &Analysis, g: &Group) -> String {
    let Some(ff) = g.first_failure else {
        return if g.missing > 0 { "incomplete (missing pairs)".into() } else { "—".into() };
    };
    match g.origins.iter().find(|o| o.pair == ff) {
        Some(o) => match o.layers {
            Some((x, y)) if x != y => format!(
                "between {} and {} (layers {x}–{y})",
                list_nodes(&o.upstream),
                a.pairs[ff].node.map_or(String::new(), |n| format!("`{n}`"))
            ),
            _ => format!("`{}`", o.node),
        },
        None => a.pair_name(ff),
    }
}

fn per_prompt(a: &Analysis, md: &mut String) {
    if a.groups.len() < 2 {
        return;
    }
    md.push_str("## Per-Prompt Results\n\n| Prompt | pos_id | seq_len (base / cand) | Pairs | Pass | Fail | Missing | Origin | Root Cause | Gross Origin |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for g in &a.groups {
        let side = g.pairs.clone().find_map(|i| a.base(&a.pairs[i]).zip(a.cand(&a.pairs[i])));
        let (pos, lens) = match side {
            Some((b, c)) => (b.pos_id().to_string(), format!("{} / {}", b.seq_len(), c.seq_len())),
            None => ("?".into(), "?".into()),
        };
        let name = match g.rank {
            Some(r) => format!("`{}` (rank {r})", a.prompt_id(g)),
            None => format!("`{}`", a.prompt_id(g)),
        };
        let _ = writeln!(
            md,
            "| {name} | {pos} | {lens} | {} | {} | {} | {} | {} | {} | {} |",
            g.pairs.len(),
            g.passed,
            g.failed,
            g.missing,
            origin_text(a, g),
            g.cause.map_or("PASS".to_string(), |c| format!("**{c}**")),
            g.gross.as_ref().map_or("—".to_string(), |o| format!(
                "`{}` **{}** ({})",
                o.node,
                o.class,
                crate::bug_advice::rel(o.judged.rel_delta)
            ))
        );
    }
    md.push('\n');
}

fn fmt_stat(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{x}")
    }
}

fn first_failure(a: &Analysis, md: &mut String) {
    let Some(ff) = a.first_failure else { return };
    let p = &a.pairs[ff];
    let (Some(b), Some(c)) = (a.base(p), a.cand(p)) else { return };
    md.push_str("## First Failure\n\n");
    let _ = writeln!(
        md,
        "**Location**: `{}` tensor, Layer {}, Prompt `{}`, pos_id {}{}\n",
        a.collected.point_name(p.key.point),
        p.key.layer,
        a.collected.prompts[p.key.prompt as usize],
        b.pos_id(),
        p.key.rank.map(|r| format!(", rank {r}")).unwrap_or_default()
    );
    let _ = writeln!(
        md,
        "| Metric | {} (step={}, seq_len={}) | {} (step={}, seq_len={}) | \\|Δ\\| |\n|--------|-----------------|-----------------|-----|",
        a.baseline_label, b.step(), b.seq_len(), a.candidate_label, c.step(), c.seq_len()
    );
    let _ = writeln!(md, "| **Hash** | {} | {} | |", b.hash, c.hash);
    let _ = writeln!(md, "| **Match** | ❌ NO | ❌ NO | |");
    if b.pos_id() != c.pos_id() {
        let _ = writeln!(md, "| **pos_id** | {} | {} | |", b.pos_id(), c.pos_id());
    }
    let rows: [(&str, f64, f64); 3] = [("min", b.min, c.min), ("max", b.max, c.max), ("mean", b.mean, c.mean)];
    for (name, x, y) in rows {
        let _ = writeln!(md, "| {name} | {} | {} | {} |", fmt_stat(x), fmt_stat(y), delta(x, y));
    }
    if let (Some(x), Some(y)) = (b.l2(), c.l2()) {
        let _ = writeln!(md, "| l2 | {} | {} | {} |", fmt_stat(x), fmt_stat(y), delta(x, y));
    }
    for (name, f) in [("nan_count", side_nan as fn(&Side) -> Option<u64>), ("inf_count", side_inf)] {
        let (x, y) = (f(b), f(c));
        if x.is_some() || y.is_some() {
            let show = |v: Option<u64>| v.map_or("—".to_string(), |v| v.to_string());
            let _ = writeln!(md, "| {name} | {} | {} | |", show(x), show(y));
        }
    }
    let _ = writeln!(md, "| line | {} | {} | |", b.line(), c.line());
    md.push('\n');
    if let Some((_, sentence)) = size_of(a, ff) {
        let _ = writeln!(md, "**Magnitude**, {sentence}.\n");
    }
    let _ = writeln!(md, "**Classification**: {}\n", classification_text(a, ff));
    md.push_str("---\n\n");
}

fn side_nan(s: &Side) -> Option<u64> {
    s.nan_count()
}
fn side_inf(s: &Side) -> Option<u64> {
    s.inf_count()
}

fn delta(x: f64, y: f64) -> String {
    if x == y {
        "0".into()
    } else if x.is_finite() && y.is_finite() {
        format!("{:.3e}", (x - y).abs())
    } else {
        "—".into()
    }
}

/// One line on why a pair is classified as it is.
fn classification_text(a: &Analysis, i: usize) -> String {
    let p = &a.pairs[i];
    match p.classification {
        Some(Classification::Originated) => {
            let g = a.groups.iter().find(|g| g.pairs.contains(&i));
            let o = g.and_then(|g| g.origins.iter().find(|o| o.pair == i));
            match o {
                Some(o) if o.region.len() == 1 => format!(
                    "ORIGINATED: its traced inputs ({}) match, so the op `{}` itself computes differently.",
                    list_nodes(&o.upstream),
                    crate::dataflow::op_of(o.node).0
                ),
                Some(o) => format!(
                    "ORIGINATED: its nearest traced inputs ({}) match; the drift starts in the untraced ops \
                     between them: {}.",
                    list_nodes(&o.upstream),
                    describe_region(&o.region)
                ),
                None => "ORIGINATED".into(),
            }
        }
        Some(Classification::Inherited) => {
            format!("INHERITED from {} (a traced input already drifts).", list_nodes(a.inherited_from(p)))
        }
        Some(Classification::Undetermined) => format!(
            "UNDETERMINED: its nearest traced input(s) {} are missing or misaligned.",
            list_nodes(a.unknown_upstream(p))
        ),
        Some(Classification::Unplaced) => "UNPLACED: the point is not in driftscope's vocabulary.".into(),
        None if p.status == PairStatus::Misaligned => "MISALIGNED: the two events are about different tokens.".into(),
        None => "—".into(),
    }
}

fn evidence(a: &Analysis, ev: Option<&Evidence>, md: &mut String) {
    let (Some(ff), Some(ev)) = (a.first_failure, ev) else { return };
    let p = &a.pairs[ff];
    md.push_str("## Sample Trace Evidence\n\n");
    if ev.rebuilt {
        md.push_str(
            "The trace was read from a stream (standard input, a pipe or a FIFO) and is not read twice: the two \
             events are rebuilt from the fields the analysis parsed, not quoted from the file.\n\n",
        );
    }
    let point = a.collected.point_name(p.key.point);
    let prompt = &a.collected.prompts[p.key.prompt as usize];
    for (phase, raw, side) in
        [(&a.baseline_label, &ev.baseline, a.base(p)), (&a.candidate_label, &ev.candidate, a.cand(p))]
    {
        let line = side.map_or(0, |s| s.line());
        let _ = writeln!(
            md,
            "### {phase} - {point} Layer {} ({prompt}), line {line}\n```json\n{}\n```\n",
            p.key.layer, raw
        );
    }
    md.push_str("---\n\n");
}

/// The propagation tree of one group, as lines.
///
/// Layers are grouped by the keys of their lines first (no formatting), and only one layer of
/// each group is formatted: a 30-layer trace of thousands of prompts formats a few layers per
/// prompt instead of every pair.
fn tree(a: &Analysis, g: &Group, lines: &mut HashMap<LineKey, String>) -> Vec<String> {
    let line = |i: usize| format!("{}: {}", a.collected.point_name(a.pairs[i].key.point), node_status(a, g, i));
    let mut globals_before: Vec<String> = vec![];
    let mut globals_after: Vec<String> = vec![];
    // The per-layer pairs, by layer (a stable sort: dataflow order within a layer; the pairs
    // come sorted already, layer after layer) with their line keys: one allocation for all
    // layers, then a range of it per layer.
    let mut per_layer: Vec<(u32, usize, LineKey)> = vec![];
    for i in g.pairs.clone() {
        let p = &a.pairs[i];
        match p.key.point {
            PointId::Known(Point::EmbedOut) => globals_before.push(line(i)),
            PointId::Known(pt) if !pt.is_per_layer() => globals_after.push(line(i)),
            _ => per_layer.push((p.key.layer, i, LineKey::of(a, g, i))),
        }
    }
    if !per_layer.is_sorted_by_key(|e| e.0) {
        per_layer.sort_by_key(|e| e.0);
    }
    // Layers with equal keys render equal lines.
    let keys_of = |r: &std::ops::Range<usize>| per_layer[r.clone()].iter().map(|e| &e.2);
    let mut by_keys: Vec<(Vec<u32>, std::ops::Range<usize>)> = vec![];
    let mut start = 0;
    while start < per_layer.len() {
        let l = per_layer[start].0;
        let end = start + per_layer[start..].iter().take_while(|e| e.0 == l).count();
        let run = start..end;
        match by_keys.iter_mut().find(|(_, r)| keys_of(r).eq(keys_of(&run))) {
            Some((ids, _)) => ids.push(l),
            None => by_keys.push((vec![l], run)),
        }
        start = end;
    }
    // Group layers whose lines are identical, as the seed report does (different keys may still
    // read the same).
    let mut grouped: Vec<(Vec<u32>, Vec<String>)> = vec![];
    for (ids, run) in by_keys {
        // A per-layer line depends on its key alone.
        let lines: Vec<String> =
            per_layer[run].iter().map(|e| lines.entry(e.2).or_insert_with(|| line(e.1)).clone()).collect();
        match grouped.iter_mut().find(|(_, ls)| *ls == lines) {
            Some((first, _)) => {
                first.extend(ids);
                first.sort_unstable();
            }
            None => grouped.push((ids, lines)),
        }
    }
    let mut out = globals_before;
    for (ids, lines) in grouped {
        let ids_text = ranges(&ids, 3);
        out.push(if ids.len() == 1 { format!("Layer {ids_text}:") } else { format!("Layers {ids_text}:") });
        for (k, line) in lines.iter().enumerate() {
            let branch = if k + 1 == lines.len() { "└──" } else { "├──" };
            out.push(format!("  {branch} {line}"));
        }
    }
    out.extend(globals_after);
    out
}

/// Everything a tree line of a per-layer pair depends on ([`node_status`] and the point's name),
/// without the layer number: pairs of two layers, or of two prompts, with equal keys render the
/// same line.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LineKey {
    point: PointId,
    status: PairStatus,
    class: Option<Classification>,
    /// For an originated pair: whether it originates by itself, and the untraced layer span.
    origin: Option<(bool, Option<(u32, u32)>)>,
    /// The related nodes as [`relative`] names them.
    related: Relative,
    /// Whether the pair is its prompt's gross origin.
    gross: bool,
}

/// The nodes of a relation as [`relative`] sees them: same-layer points and global points (as
/// bit sets of point indices: the lists are in dataflow order) and whether an earlier layer is
/// among them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Relative {
    same: u32,
    global: u32,
    earlier: bool,
}

impl Relative {
    fn of(nodes: &[Node], layer: u32) -> Relative {
        let mut r = Relative::default();
        for n in nodes {
            match *n {
                Node::Layer(l, p) if l == layer => r.same |= 1 << p.index(),
                Node::Layer(..) | Node::LayersAfter(_) => r.earlier = true,
                Node::Global(p) => r.global |= 1 << p.index(),
            }
        }
        r
    }
}

impl LineKey {
    fn of(a: &Analysis, g: &Group, i: usize) -> LineKey {
        let p = &a.pairs[i];
        let layer = p.key.layer;
        let gross = g.gross.as_ref().is_some_and(|o| o.judged.pair == i);
        let mut key = LineKey {
            point: p.key.point,
            status: p.status,
            class: None,
            origin: None,
            related: Relative::default(),
            gross,
        };
        if !matches!(p.status, PairStatus::Drift | PairStatus::NumericFault) {
            return key;
        }
        key.class = p.classification;
        key.related = match p.classification {
            Some(Classification::Originated) => match g.origins.iter().find(|o| o.pair == i) {
                Some(o) => {
                    let span = o.layers.filter(|(x, y)| x != y);
                    key.origin = Some((o.region.len() == 1, span));
                    if o.region.len() == 1 {
                        Relative::default()
                    } else {
                        Relative::of(&o.upstream, layer)
                    }
                }
                None => Relative::default(),
            },
            Some(Classification::Inherited) => Relative::of(a.inherited_from(p), layer),
            Some(Classification::Undetermined) => Relative::of(a.unknown_upstream(p), layer),
            _ => Relative::default(),
        };
        key
    }
}

/// `✓ MATCH`, `✗ DRIFT (…)`, with the relation to upstream in layer-relative words.
fn node_status(a: &Analysis, g: &Group, i: usize) -> String {
    let p = &a.pairs[i];
    match p.status {
        PairStatus::Pass => "✓ MATCH (hash identical)".into(),
        PairStatus::MissingBaseline => format!("? MISSING (no `{}` event)", a.baseline_label),
        PairStatus::MissingCandidate => format!("? MISSING (no `{}` event)", a.candidate_label),
        PairStatus::Misaligned => "✗ MISALIGNED (different tokens)".into(),
        s => {
            let what = if s == PairStatus::NumericFault { "✗ NUMERIC FAULT" } else { "✗ DRIFT" };
            let layer = p.key.layer;
            let why = match p.classification {
                Some(Classification::Originated) => match g.origins.iter().find(|o| o.pair == i) {
                    Some(o) if o.region.len() == 1 => "originated here: inputs match".to_string(),
                    Some(o) => {
                        let span = match o.layers {
                            Some((x, y)) if x != y => format!(" somewhere in untraced layers {x}–{y}"),
                            _ => " in the untraced ops before it".to_string(),
                        };
                        format!("originated{span}; inputs {} match", relative(&o.upstream, layer))
                    }
                    None => "originated".into(),
                },
                Some(Classification::Inherited) => format!("propagated from {}", relative(a.inherited_from(p), layer)),
                Some(Classification::Undetermined) => {
                    format!("origin undetermined: {} missing/misaligned", relative(a.unknown_upstream(p), layer))
                }
                Some(Classification::Unplaced) => "point outside the vocabulary".into(),
                None => String::new(),
            };
            let gross = if g.gross.as_ref().is_some_and(|o| o.judged.pair == i) {
                " ⚠ GROSS: far above rounding, the bug to fix first"
            } else {
                ""
            };
            format!("{what} ({why}){gross}")
        }
    }
}

/// Names nodes relative to a layer, so that identical layers render identically.
fn relative(nodes: &[Node], layer: u32) -> String {
    // Names are &'static: one allocation for the result, none per node.
    let mut same: Vec<&'static str> = vec![];
    let mut earlier = false;
    let mut parts: Vec<&'static str> = vec![];
    for n in nodes {
        match n {
            Node::Layer(l, p) if *l == layer => same.push(p.as_str()),
            Node::Layer(..) | Node::LayersAfter(_) => earlier = true,
            Node::Global(p) => parts.push(p.as_str()),
        }
    }
    if earlier {
        parts.push("the previous traced layer");
    }
    parts.extend(same);
    if parts.is_empty() {
        "the input tokens".into()
    } else {
        parts.join(", ")
    }
}

fn propagation(a: &Analysis, md: &mut String) {
    if a.verdict == Verdict::Pass {
        return;
    }
    md.push_str("## Drift Propagation Pattern\n\n");
    // Each worker keeps the lines it formatted: prompts mostly repeat the same few lines.
    let trees: Vec<(String, Vec<String>, u64)> = a
        .groups
        .par_iter()
        .map_init(HashMap::new, |lines, g| {
            let name = match g.rank {
                Some(r) => format!("`{}` rank {r}", a.prompt_id(g)),
                None => format!("`{}`", a.prompt_id(g)),
            };
            let t = tree(a, g, lines);
            let mut hasher = rustc_hash::FxHasher::default();
            t.hash(&mut hasher);
            (name, t, hasher.finish())
        })
        .collect();
    // Group identical trees (in order of first appearance), comparing hashes before lines.
    let mut shown: Vec<(Vec<String>, Vec<String>)> = vec![];
    let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
    for (name, t, h) in trees {
        let same = by_hash.get(&h).and_then(|ix| ix.iter().copied().find(|&i| shown[i].1 == t));
        match same {
            Some(i) => shown[i].0.push(name),
            None => {
                by_hash.entry(h).or_default().push(shown.len());
                shown.push((vec![name], t));
            }
        }
    }
    for (names, t) in &shown {
        let _ = writeln!(md, "Prompt{} {}:\n```", if names.len() > 1 { "s" } else { "" }, names.join(", "));
        for line in t {
            let _ = writeln!(md, "{line}");
        }
        md.push_str("```\n\n");
    }
    let n_layers = a.graph.n_layers as usize;
    let traced = a
        .pairs
        .par_iter()
        .fold(
            || vec![false; n_layers],
            |mut traced, p| {
                if let (PointId::Known(pt), Some(t)) = (p.key.point, traced.get_mut(p.key.layer as usize)) {
                    *t |= pt.is_per_layer();
                }
                traced
            },
        )
        .reduce(|| vec![false; n_layers], |a, b| a.iter().zip(b).map(|(x, y)| *x || y).collect());
    let untraced: Vec<u32> = (0..a.graph.n_layers).filter(|&l| !traced[l as usize]).collect();
    if !untraced.is_empty() {
        let _ = writeln!(
            md,
            "Layers not traced: {} of {}{}. Drift passing through them is inferred, not observed.\n",
            ranges(&untraced, 2),
            a.graph.n_layers,
            if a.graph.exact { "" } else { " or more (the trace's run_meta does not give n_layers)" }
        );
    }
    md.push_str("---\n\n");
}

/// `3, 5–7`: runs of at least `min_run` consecutive numbers become ranges.
fn ranges(v: &[u32], min_run: usize) -> String {
    let mut out: Vec<String> = vec![];
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        if j + 1 - i >= min_run.max(2) {
            out.push(format!("{}–{}", v[i], v[j]));
        } else {
            out.extend(v[i..=j].iter().map(u32::to_string));
        }
        i = j + 1;
    }
    out.join(", ")
}

fn root_cause(a: &Analysis, md: &mut String) {
    if a.verdict == Verdict::Pass {
        return;
    }
    md.push_str("## Root Cause Analysis\n\n");
    // Prompts whose first failure has the same cause and the same origin share one explanation.
    let mut sections: Vec<(String, Vec<&Group>)> = vec![];
    for g in a.groups.iter().filter(|g| g.cause.is_some()) {
        let text = group_cause_text(a, g);
        match sections.iter_mut().find(|(t, _)| *t == text) {
            Some((_, gs)) => gs.push(g),
            None => sections.push((text, vec![g])),
        }
    }
    for (text, gs) in &sections {
        if a.groups.len() > 1 {
            let names: Vec<String> = gs.iter().map(|g| format!("`{}`", a.prompt_id(g))).collect();
            let _ = writeln!(md, "**Prompt{} {}**\n", if gs.len() > 1 { "s" } else { "" }, names.join(", "));
        }
        let _ = writeln!(md, "{text}\n");
        evidence_table(a, gs, md);
    }
    md.push_str("---\n\n");
}

/// Per prompt: the shapes and the magnitude at the first failure.
fn evidence_table(a: &Analysis, gs: &[&Group], md: &mut String) {
    let rows: Vec<String> = gs
        .iter()
        .filter_map(|g| {
            let ff = g.first_failure?;
            let p = &a.pairs[ff];
            let (b, c) = (a.base(p)?, a.cand(p)?);
            let d = a.delta(p)?;
            let inherited = g.inherited;
            Some(format!(
                "| `{}` | {} | {} / {} | {:.3e} | {:.3e} | {inherited} |",
                a.prompt_id(g),
                b.pos_id(),
                b.seq_len(),
                c.seq_len(),
                d.max_abs_lower_bound,
                d.rel
            ))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "| Prompt | pos_id | seq_len ({} / {}) | max \\|Δ\\| ≥ (stats) | relative | later pairs inheriting |\n|---|---|---|---|---|---|",
        a.baseline_label, a.candidate_label
    );
    for r in rows {
        let _ = writeln!(md, "{r}");
    }
    match gs.iter().find_map(|g| g.first_failure).and_then(|i| size_of(a, i)) {
        Some((_, sentence)) => {
            let _ = writeln!(md, "\nMagnitude at the first prompt's first failure, {sentence}.\n");
        }
        None => md.push('\n'),
    }
}

/// The explanation of one group's root cause, in words that do not depend on the prompt.
fn group_cause_text(a: &Analysis, g: &Group) -> String {
    let mut t = String::new();
    let cause = g.cause.unwrap_or("UNLOCALIZED");
    let Some(ff) = g.first_failure else {
        let _ = write!(t, "**{cause}**: no pair differs, but {} pair(s) were traced in one phase only.", g.missing);
        return t;
    };
    let p = &a.pairs[ff];
    let point = a.collected.point_name(p.key.point);
    let _ = writeln!(t, "**{cause}**: the first divergence is `{point}` at layer {}.", p.key.layer);
    let Some(o) = g.origins.iter().find(|o| o.pair == ff) else {
        let _ = write!(t, "\n{}", classification_text(a, ff));
        return t.trim_end().to_string();
    };
    let _ = writeln!(t);
    let _ = writeln!(t, "1. Upstream evidence: {} match bitwise in both phases.", list_nodes(&o.upstream));
    let ops = describe_region(&o.region);
    match o.layers {
        Some((x, y)) if x != y => {
            let _ = writeln!(
                t,
                "2. Between them and the first drift lie untraced ops across layers {x}–{y}: {ops}. The origin is \
                 somewhere in that range; this trace cannot say which op."
            );
        }
        _ if o.region.len() == 1 => {
            let _ = writeln!(t, "2. The only op between them is {ops}: it computes differently in the two phases.");
        }
        _ => {
            let _ = writeln!(t, "2. The ops between them are untraced: {ops}. One of them computes differently.");
        }
    }
    let _ = writeln!(
        t,
        "3. Everything downstream that drifts is inherited from here (see the propagation tree); the \
         hashes alone cannot tell whether later ops add drift of their own."
    );
    if o.region.iter().any(|n| matches!(n, Node::Layer(_, Point::AttnCtx))) {
        let _ = writeln!(
            t,
            "   Caveat: attention also reads the K/V rows of the earlier positions from the cache, and this \
             trace pairs only the traced position: either the attention kernel or those cached rows differ."
        );
    }
    let more: Vec<String> =
        g.origins.iter().filter(|x| x.pair != ff).map(|x| format!("`{}` ({})", x.node, x.cause)).collect();
    if !more.is_empty() {
        let _ = writeln!(t, "4. Drift also starts anew, with matching inputs, at: {}.", more.join(", "));
    }
    t.trim_end().to_string()
}

fn recs(a: &Analysis, md: &mut String) {
    let list = recommendations(a);
    if list.is_empty() {
        return;
    }
    md.push_str("## Recommendations\n\n");
    for (i, r) in list.iter().enumerate() {
        let _ = writeln!(md, "{}. {r}", i + 1);
    }
    md.push('\n');
}

fn appendix(a: &Analysis, md: &mut String) {
    let missing: Vec<usize> = if a.summary.missing_pairs == 0 {
        vec![]
    } else {
        (0..a.pairs.len()).filter(|&i| a.pairs[i].status.is_missing()).collect()
    };
    if !missing.is_empty() {
        md.push_str("## Missing Pairs\n\n| Prompt | Layer | Point | Present in | Line |\n|---|---|---|---|---|\n");
        for &i in missing.iter().take(100) {
            let p = &a.pairs[i];
            let (phase, side) = match p.status {
                PairStatus::MissingCandidate => (&a.baseline_label, a.base(p)),
                _ => (&a.candidate_label, a.cand(p)),
            };
            let _ = writeln!(
                md,
                "| `{}` | {} | `{}` | {phase} | {} |",
                a.collected.prompts[p.key.prompt as usize],
                p.key.layer,
                a.collected.point_name(p.key.point),
                side.map_or(0, |s| s.line())
            );
        }
        if missing.len() > 100 {
            let _ = writeln!(md, "\n… and {} more (all in the JSON verdict).", missing.len() - 100);
        }
        md.push('\n');
    }
    if a.collected.skipped_lines() > 0 {
        md.push_str("## Skipped Lines (--lenient)\n\n");
        for src in &a.collected.sources {
            for b in &src.read.bad_lines {
                let _ = writeln!(md, "- `{}:{}`: {}", src.path.display(), b.line, b.message);
            }
            let more = src.read.bad_line_count - src.read.bad_lines.len() as u64;
            if more > 0 {
                let _ = writeln!(md, "- … and {more} more in `{}`", src.path.display());
            }
        }
        md.push('\n');
    }
    if !a.collected.duplicates.is_empty() {
        md.push_str("## Duplicate Events Dropped (--lenient)\n\n");
        for d in a.collected.duplicates.iter().take(50) {
            let _ = writeln!(
                md,
                "- `{}` layer {} `{}` in `{}`: line {} kept, line {} dropped",
                a.collected.prompts[d.key.prompt as usize],
                d.key.layer,
                a.collected.point_name(d.key.point),
                d.phase,
                d.first_line,
                d.second_line
            );
        }
        md.push('\n');
    }
}
