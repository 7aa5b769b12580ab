//! The report's two tiers side by side: the first divergence (where the rows first differ, often
//! by rounding) and the gross origin (where they first differ by far more than rounding
//! explains: a bug), and which one to fix first.

use std::fmt::Write as _;

use crate::analysis::{Analysis, Group};
use crate::bug_advice::{headline, inputs_words, rel, stats_only_coarse};
use crate::gross::{Basis, Judged};

/// `## Bug or Rounding`, after the verdict (nothing when no pair drifts).
pub fn section(a: &Analysis, md: &mut String) {
    if a.groups.iter().all(|g| g.first_failure.is_none()) {
        return;
    }
    md.push_str("## Bug or Rounding\n\n");
    match a.first_gross.map(|i| &a.groups[i]) {
        Some(g) => with_gross(a, g, md),
        None => without_gross(a, md),
    }
    md.push_str("Precisions the drift was judged against:\n\n");
    for line in a.precisions.describe() {
        let _ = writeln!(md, "- {line}");
    }
    md.push_str("\nSee docs/tolerances.md (\"Bugs and rounding\") for the bound and how it was measured.\n\n---\n\n");
}

fn cell(j: Option<&Judged>) -> [String; 4] {
    match j {
        Some(j) => [
            rel(j.rel_delta),
            if j.inputs_rel_delta == 0.0 { "0 (bitwise equal)".into() } else { rel(j.inputs_rel_delta) },
            format!("{} ({})", rel(j.bound), j.precision.name()),
            if j.ratio() >= 100.0 { format!("{:.0}", j.ratio()) } else { format!("{:.3}", j.ratio()) },
        ],
        None => ["—".into(), "—".into(), "—".into(), "—".into()],
    }
}

fn with_gross(a: &Analysis, g: &Group, md: &mut String) {
    let Some(o) = &g.gross else { return };
    let j = &o.judged;
    let first_is_gross = g.first_failure == Some(j.pair);
    let _ = writeln!(md, "**Fix the gross origin first.** {}\n", headline(a, g, o));
    let ff = g.first_failure.unwrap_or(j.pair);
    let source = match j.basis {
        Basis::Dump => "relative L2 differences from the dumped rows",
        Basis::Stats => "relative moves of the statistics (lower bounds; no dump)",
    };
    let _ = writeln!(
        md,
        "| Prompt `{}` | First divergence | Gross origin |\n|---|---|---|",
        a.prompt_id(g).replace('|', "\\|")
    );
    let (f, o_cells) = (cell(g.first_judged.as_ref()), cell(Some(j)));
    let rows = [
        ("Where", format!("`{}` layer {}", point(a, ff), a.pairs[ff].key.layer), format!("`{}`", o.node)),
        ("Root cause", g.cause.unwrap_or("—").to_string(), format!("**{}**", o.class)),
        ("Relative difference", f[0].clone(), o_cells[0].clone()),
        ("Traced inputs differ by", f[1].clone(), o_cells[1].clone()),
        ("Rounding explains up to", f[2].clone(), o_cells[2].clone()),
        ("Difference ÷ bound", f[3].clone(), o_cells[3].clone()),
        (
            "Reading",
            if first_is_gross {
                "the same pair: nothing drifts before the bug".to_string()
            } else {
                "rounding: kernels reduce in another order".to_string()
            },
            "**a bug**: far above rounding".to_string(),
        ),
        (
            "Fix",
            if first_is_gross { "—".to_string() } else { "after the bug: batch-invariant kernels".to_string() },
            "**first**".to_string(),
        ),
    ];
    for (name, x, y) in rows {
        let _ = writeln!(md, "| {name} | {x} | {y} |");
    }
    let _ = writeln!(md, "\nMagnitudes: {source}. The gross origin's inputs: {}.\n", inputs_words(o));
    let with: Vec<&Group> = a.groups.iter().filter(|g| g.gross.is_some()).collect();
    if a.groups.len() > 1 {
        let _ = writeln!(
            md,
            "{} of {} prompts have a gross origin:\n\n| Prompt | Gross origin | Bug class | Relative difference | Inputs | Bound |\n|---|---|---|---|---|---|",
            with.len(),
            a.groups.len()
        );
        for g in &with {
            let Some(o) = &g.gross else { continue };
            let j = &o.judged;
            let _ = writeln!(
                md,
                "| `{}` | `{}` | **{}** | {} | {} | {} |",
                a.prompt_id(g).replace('|', "\\|"),
                o.node,
                o.class,
                rel(j.rel_delta),
                rel(j.inputs_rel_delta),
                rel(j.bound)
            );
        }
        md.push('\n');
    }
}

fn without_gross(a: &Analysis, md: &mut String) {
    let largest = a.groups.iter().filter_map(|g| g.largest).max_by(|x, y| x.ratio().total_cmp(&y.ratio()));
    match largest {
        Some(j) => {
            let _ = writeln!(
                md,
                "No gross origin: every drift is within what rounding explains. The nearest to its bound is {}: \
                 {} against a bound of {} ({}; its inputs differ by {}), {:.0}% of it.\n",
                a.pair_name(j.pair),
                rel(j.rel_delta),
                rel(j.bound),
                j.precision.name(),
                rel(j.inputs_rel_delta),
                j.ratio() * 100.0
            );
        }
        None => md.push_str("No gross origin: no drifting pair could be judged (their inputs are not traced).\n\n"),
    }
    if stats_only_coarse(a) {
        md.push_str(
            "Without dumped rows, 16-bit rows are judged by their statistics, which move by whole rounding steps: \
             only differences that move a row's extremes by several percent stand out. Rerun with `--dump` for \
             exact differences; decode bugs of 1e-2 relative show then.\n\n",
        );
    }
}

fn point(a: &Analysis, i: usize) -> &str {
    a.collected.point_name(a.pairs[i].key.point)
}
