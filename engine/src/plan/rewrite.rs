//! SQL rewrite that makes `window_start` and `window_end` selectable.
//!
//! In a `SELECT` whose `GROUP BY` holds a window call `W` (`tumble(…)`, `hop(…)`,
//! `session(…)` or `cumulate(…)`), the bare names `window_start` and `window_end` in the select
//! list, `HAVING` and `ORDER BY` become `get_field(W, 'window_start')` and
//! `get_field(W, 'window_end')`: expressions over a grouping expression, which DataFusion's
//! own planner accepts. Where the input has columns of those names (a query over another
//! windowed query's output), the bare names are the input's and `window.window_start` /
//! `window.window_end` are the new window's. The engine later fills the window column itself. The rewrite works on
//! sqlparser's syntax tree (DataFusion's parser, unmodified).

use std::ops::ControlFlow;

use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, GroupByExpr, Ident, OrderByKind, Query, SelectItem, SetExpr, VisitMut, VisitorMut,
    visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use urbanstream_operators::window::WINDOW_FUNCTIONS;

/// Rewrites every query of `statement` in place. `shadowed` lists the names among
/// `window_start`/`window_end` that are columns of a table the statement reads (the output of
/// another windowed query, say): there the bare name means the input's column, and the new
/// window's bound is `window.window_start` / `window.window_end`.
pub fn rewrite_windows(statement: &mut DFStatement, shadowed: &[String]) -> Result<()> {
    rewrite_windows_knowing(statement, shadowed, &|_| false)
}

/// [`rewrite_windows`], with `is_function` telling the functions there are: a GROUP BY call
/// of an unknown function whose name is near a window function's is refused as mistyped.
pub fn rewrite_windows_knowing(
    statement: &mut DFStatement,
    shadowed: &[String],
    is_function: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut rewriter = Rewriter {
        error: None,
        shadowed: shadowed.iter().map(|s| s.to_ascii_lowercase()).collect(),
        is_function,
    };
    match statement {
        DFStatement::Statement(s) => {
            let _ = s.visit(&mut rewriter);
        }
        DFStatement::Explain(e) => {
            return rewrite_windows_knowing(&mut e.statement, shadowed, is_function);
        }
        _ => {}
    }
    match rewriter.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Rewriter<'a> {
    error: Option<DataFusionError>,
    shadowed: Vec<String>,
    is_function: &'a dyn Fn(&str) -> bool,
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        match rewrite_query(query, &self.shadowed, self.is_function) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }
}

/// Whether `expr` is a call of a window function.
pub fn is_window_call(expr: &Expr) -> bool {
    match expr {
        Expr::Function(f) => {
            let name = f.name.to_string().to_ascii_lowercase();
            WINDOW_FUNCTIONS.contains(&name.as_str())
        }
        Expr::Nested(e) => is_window_call(e),
        _ => false,
    }
}

fn rewrite_query(
    query: &mut Query,
    shadowed: &[String],
    is_function: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(());
    };
    let GroupByExpr::Expressions(exprs, _) = &select.group_by else {
        return Ok(());
    };
    let windows: Vec<&Expr> = exprs.iter().filter(|e| is_window_call(e)).collect();
    if windows.is_empty() {
        // A window function's name mistyped (`tumbel`) was told that window_start needs a
        // window, or that the aggregation needs one.
        for e in exprs {
            if let Expr::Function(f) = e {
                let name = f.name.to_string().to_ascii_lowercase();
                if is_function(&name) {
                    continue;
                }
                // Names of five letters or more only: `cos` is two letters from `hop`.
                if let Some(meant) = WINDOW_FUNCTIONS
                    .iter()
                    .filter(|w| w.len() >= 5 && name.len() >= 5)
                    .find(|w| **w != name && edits(w, &name) <= 2)
                {
                    return plan_err!(
                        "GROUP BY calls {name}(…), which is no function: did you mean \
                         {meant}(…)? The windows are {}",
                        WINDOW_FUNCTIONS.join(", ")
                    );
                }
            }
        }
    }
    // The window's bounds come with it: grouped by as well, they were taken for columns of
    // the input, and the query was told it had no window.
    if !windows.is_empty()
        && let Some(bound) = exprs.iter().find_map(|e| match e {
            Expr::Identifier(id)
                if !shadowed.contains(&id.value.to_ascii_lowercase())
                    && (id.value.eq_ignore_ascii_case("window_start")
                        || id.value.eq_ignore_ascii_case("window_end")) =>
            {
                Some(id.value.to_ascii_lowercase())
            }
            _ => None,
        })
    {
        return plan_err!(
            "GROUP BY {bound}: the window gives window_start and window_end with each of its \
             groups; group by the window and the keys only, and select {bound}"
        );
    }
    let window = match windows.as_slice() {
        [] => return Ok(()),
        [w] => w.to_string(),
        _ => {
            return plan_err!(
                "a GROUP BY may hold only one window function, found {}",
                windows.len()
            );
        }
    };
    let start = parse_expr(&format!("get_field({window}, 'window_start')"))?;
    let end = parse_expr(&format!("get_field({window}, 'window_end')"))?;
    // The bound a name stands for: a bare `window_start` unless the input has such a
    // column; `window.window_start` always.
    let bound = |x: &Expr| -> Option<Expr> {
        let name = match x {
            Expr::Identifier(id) if !shadowed.contains(&id.value.to_ascii_lowercase()) => &id.value,
            Expr::CompoundIdentifier(parts)
                if parts.len() == 2 && parts[0].value.eq_ignore_ascii_case("window") =>
            {
                &parts[1].value
            }
            _ => return None,
        };
        if name.eq_ignore_ascii_case("window_start") {
            Some(start.clone())
        } else if name.eq_ignore_ascii_case("window_end") {
            Some(end.clone())
        } else {
            None
        }
    };
    let replace = |e: &mut Expr| {
        let _ = visit_expressions_mut(e, |x| {
            if let Some(b) = bound(x) {
                *x = b;
            }
            ControlFlow::<()>::Continue(())
        });
    };
    for item in select.projection.iter_mut() {
        let bare = match item {
            SelectItem::UnnamedExpr(Expr::Identifier(id)) => Some(id.clone()),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) if parts.len() == 2 => {
                Some(parts[1].clone())
            }
            _ => None,
        };
        match item {
            SelectItem::UnnamedExpr(e)
                if bound(e).is_some()
                    && bare.as_ref().is_some_and(|id| {
                        id.value.eq_ignore_ascii_case("window_start")
                            || id.value.eq_ignore_ascii_case("window_end")
                    }) =>
            {
                let id = bare.unwrap_or_else(|| Ident::new("window_start"));
                let alias = Ident::new(id.value.to_ascii_lowercase());
                let mut expr = e.clone();
                replace(&mut expr);
                *item = SelectItem::ExprWithAlias { expr, alias };
            }
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => replace(e),
            _ => {}
        }
    }
    if let Some(having) = select.having.as_mut() {
        let before = having.to_string();
        replace(having);
        if having.to_string() != before {
            // A condition on the window's bounds alone holds only group keys, so DataFusion
            // would push it below the aggregation, where rows have no window yet. Joined with
            // a condition on an aggregate that never holds, it is one condition the optimizer
            // leaves above the aggregation: evaluated on the window's rows, with the same
            // result (`c OR false` is `c`, NULL included).
            *having = parse_expr(&format!("(({having}) OR count(*) < 0)"))?;
        }
    }
    if let Some(order_by) = query.order_by.as_mut()
        && let OrderByKind::Expressions(items) = &mut order_by.kind
    {
        for item in items {
            replace(&mut item.expr);
        }
    }
    Ok(())
}

/// The edit distance of `a` and `b` (letters inserted, removed or replaced).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn parse_expr(sql: &str) -> Result<Expr> {
    Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| DataFusionError::Plan(format!("cannot rewrite window reference: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn rewritten(sql: &str) -> String {
        let mut statements = DFParser::parse_sql(sql).expect("parse");
        let mut s = statements.pop_front().expect("statement");
        rewrite_windows(&mut s, &[]).expect("rewrite");
        s.to_string()
    }

    #[test]
    fn window_columns_become_fields_of_the_window() {
        let sql = rewritten(
            "INSERT INTO out SELECT segment_id, window_start, window_end, count(*) FROM t \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id \
             HAVING window_end > window_start ORDER BY window_start",
        );
        assert!(
            sql.contains(
                "get_field(tumble(event_time, INTERVAL '1 minute'), 'window_start') AS window_start"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "HAVING ((get_field(tumble(event_time, INTERVAL '1 minute'), 'window_end') > \
                 get_field(tumble(event_time, INTERVAL '1 minute'), 'window_start')) OR count(*) < 0)"
            ),
            "{sql}"
        );
        assert!(sql.contains("ORDER BY get_field(tumble"), "{sql}");
    }

    #[test]
    fn input_columns_named_like_the_bounds_win() {
        let mut statements = DFParser::parse_sql(
            "SELECT window.window_start, max(window_end) FROM t \
             GROUP BY tumble(window_start, INTERVAL '5 minutes') HAVING window_end > 0",
        )
        .expect("parse");
        let mut s = statements.pop_front().expect("statement");
        rewrite_windows(&mut s, &["window_start".into(), "window_end".into()]).expect("rewrite");
        let sql = s.to_string();
        assert!(
            sql.contains("get_field(tumble(window_start, INTERVAL '5 minutes'), 'window_start') AS window_start"),
            "{sql}"
        );
        assert!(sql.contains("max(window_end)"), "{sql}");
        assert!(sql.contains("HAVING window_end > 0"), "{sql}");
    }

    #[test]
    fn queries_without_windows_are_untouched() {
        let sql = "SELECT window_start FROM t";
        assert_eq!(rewritten(sql), sql);
    }

    #[test]
    fn two_windows_are_refused() {
        let mut statements = DFParser::parse_sql(
            "SELECT count(*) FROM t GROUP BY tumble(a, INTERVAL '1 minute'), hop(a, INTERVAL '1 minute', INTERVAL '2 minutes')",
        )
        .expect("parse");
        let mut s = statements.pop_front().expect("statement");
        let e = rewrite_windows(&mut s, &[]).expect_err("two windows");
        assert!(e.to_string().contains("only one window"), "{e}");
    }
}
