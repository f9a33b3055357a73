//! Random SQL expression trees, deep and wide, planned through the entry point the API uses
//! ([`urbanstream::plan::plan_all`] in the city's context): every statement plans or is
//! refused with an error; none panics or overflows a stack. The test threads have the
//! default 2 MiB stack, as the service's runtime workers do.

use proptest::prelude::*;
use urbanstream::pipeline::Topics;
use urbanstream::plan::{city_context, plan_all, sandbox};
use urbanstream::schema::SchemaRegistry;

/// An expression over `camera_events`, as SQL text, with its nesting depth as the service
/// counts it (each expression node and each query one level).
#[derive(Debug, Clone)]
struct Tree(String, usize);

/// Numbers, columns and NULL (which makes some conditions never true, for the planner to
/// find).
fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        8 => (0i64..1000).prop_map(|i| Tree(i.to_string(), 1)),
        4 => Just(Tree("speed_kmh".into(), 1)),
        4 => Just(Tree("confidence".into(), 1)),
        4 => Just(Tree("lane".into(), 1)),
        2 => Just(Tree("NULL".into(), 1)),
    ]
}

/// One level around a numeric expression `x`, keeping it numeric: an arithmetic operator
/// with a random subtree beside it, a function, a CASE over a comparison, a subquery, a
/// negation, a cast through text or a condition of `AND`/`OR`/`NOT` turned back into a number.
#[derive(Debug, Clone)]
enum Wrap {
    Op(&'static str, Tree),
    Abs,
    Case(Tree, Tree),
    Coalesce(Vec<Tree>),
    Subquery,
    Negate,
    ThroughText,
    Condition(&'static str, Tree),
}

fn small_tree() -> impl Strategy<Value = Tree> {
    let op = prop_oneof![Just("+"), Just("-"), Just("*")];
    leaf().prop_recursive(3, 24, 3, move |inner| {
        (inner.clone(), op.clone(), inner)
            .prop_map(|(a, op, b)| Tree(format!("({} {op} {})", a.0, b.0), a.1.max(b.1) + 2))
    })
}

fn wrap() -> impl Strategy<Value = Wrap> {
    let arithmetic = prop_oneof![Just("+"), Just("-"), Just("*"), Just("/"), Just("%")];
    let logic = prop_oneof![Just("AND"), Just("OR"), Just("AND NOT")];
    prop_oneof![
        4 => (arithmetic, small_tree()).prop_map(|(op, t)| Wrap::Op(op, t)),
        1 => Just(Wrap::Abs),
        1 => (small_tree(), small_tree()).prop_map(|(a, b)| Wrap::Case(a, b)),
        1 => prop::collection::vec(small_tree(), 0..4).prop_map(Wrap::Coalesce),
        1 => Just(Wrap::Subquery),
        1 => Just(Wrap::Negate),
        1 => Just(Wrap::ThroughText),
        1 => (logic, small_tree()).prop_map(|(op, t)| Wrap::Condition(op, t)),
    ]
}

/// A tree with a spine of up to 100 wraps, up to about 300 levels deep (the nesting limit is
/// 100, about the middle), built without recursion so that any depth is drawn as often as any
/// other.
fn tree() -> impl Strategy<Value = Tree> {
    (small_tree(), prop::collection::vec(wrap(), 0..100)).prop_map(|(mut t, wraps)| {
        for w in wraps {
            t = match w {
                // In parentheses, so that operator precedence cannot regroup the spine and
                // the depth counted here is the parser's.
                Wrap::Op(op, b) => Tree(format!("({} {op} {})", t.0, b.0), t.1.max(b.1) + 2),
                Wrap::Abs => Tree(format!("abs({})", t.0), t.1 + 1),
                Wrap::Case(a, b) => Tree(
                    format!("CASE WHEN {} < {} THEN {} ELSE {} END", a.0, b.0, t.0, b.0),
                    t.1.max(a.1 + 1).max(b.1 + 1) + 1,
                ),
                Wrap::Coalesce(rest) => {
                    let depth = rest.iter().map(|r| r.1).max().unwrap_or(0).max(t.1) + 1;
                    let mut args = vec![t.0];
                    args.extend(rest.into_iter().map(|r| r.0));
                    Tree(format!("coalesce({})", args.join(", ")), depth)
                }
                Wrap::Subquery => Tree(format!("(SELECT {})", t.0), t.1 + 2),
                Wrap::Negate => Tree(format!("-({})", t.0), t.1 + 2),
                // `length(CAST(t AS VARCHAR) || 'x')`: function, operator, cast.
                Wrap::ThroughText => {
                    Tree(format!("length(CAST({} AS VARCHAR) || 'x')", t.0), t.1 + 3)
                }
                // `CASE WHEN NOT (t > 1 op b > 1) THEN 1 ELSE 0 END`.
                Wrap::Condition(op, b) => Tree(
                    format!(
                        "CASE WHEN NOT ({} > 1 {op} {} > 1) THEN 1 ELSE 0 END",
                        t.0, b.0
                    ),
                    t.1.max(b.1 + usize::from(op == "AND NOT")) + 5,
                ),
            };
        }
        t
    })
}

/// A long flat chain `e op e op …`, which sqlparser builds left-deep without recursing.
fn chain() -> impl Strategy<Value = (usize, String)> {
    (
        prop_oneof![1usize..200, 200usize..12_000],
        prop_oneof![Just("+"), Just("AND"), Just("||"), Just("*")],
    )
        .prop_map(|(n, op)| (n, vec!["lane"; n].join(&format!(" {op} "))))
}

fn plan(sql: &str) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let schemas = SchemaRegistry::embedded().map_err(|e| e.to_string())?;
        let ctx = city_context(&Topics::default(), &schemas).map_err(|e| e.to_string())?;
        plan_all(&ctx, sql)
            .await
            .map(|q| q.len())
            .map_err(|e| e.to_string())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Trees as deep as the nesting limit and beyond: those within it plan or fail with an
    /// error; deeper ones are refused naming the limit.
    #[test]
    fn random_expression_trees_plan_or_are_refused(t in tree(), wide in 0usize..3) {
        let columns: Vec<String> = (0..=wide).map(|i| format!("{} AS c{i}", t.0)).collect();
        let sql = format!(
            "SELECT {} FROM camera_events WHERE {} IS NOT NULL",
            columns.join(", "),
            t.0
        );
        // The query is one level and `… IS NOT NULL` one more around the tree.
        let depth = t.1 + 2;
        match plan(&sql) {
            Ok(n) => {
                prop_assert!(depth <= sandbox::MAX_NESTING, "{} deep planned", depth);
                prop_assert_eq!(n, 1)
            }
            Err(e) => {
                // Deeper than the limit: refused for it (or for the statement's size). Within
                // it: for the types or the kind of query, never for the nesting and never as
                // a syntax error (the parser's own recursion limit is higher).
                let refused_for_nesting =
                    e.contains(&format!("over the limit of {}", sandbox::MAX_NESTING));
                if sql.len() > sandbox::MAX_SQL_BYTES {
                    prop_assert!(e.contains("KiB"), "{}", e);
                } else if depth > sandbox::MAX_NESTING {
                    prop_assert!(refused_for_nesting, "{} deep: {}", depth, e);
                } else {
                    prop_assert!(
                        !refused_for_nesting && !e.contains("ParserError"),
                        "{} deep: {}",
                        depth,
                        e
                    );
                }
            }
        }
    }

    /// Long operator chains, up to the statement size limit and past it.
    #[test]
    fn long_operator_chains_are_refused_or_planned((terms, c) in chain()) {
        let sql = format!("SELECT {c} AS x FROM camera_events");
        match plan(&sql) {
            Ok(n) => {
                prop_assert!(terms <= sandbox::MAX_NESTING, "{} terms planned", terms);
                prop_assert_eq!(n, 1)
            }
            // Within the limit, a chain may still not type-check (AND over numbers).
            Err(e) => prop_assert!(
                terms <= sandbox::MAX_NESTING || e.contains("limit"),
                "{} terms: {}",
                terms,
                e
            ),
        }
    }
}

/// A running query is planned again from its SQL on the runtime's own threads (a partition
/// taken over, a restart): the deepest statement the limit lets through plans on a thread
/// with the default 2 MiB stack.
#[test]
fn the_deepest_accepted_statement_plans_on_a_default_stack() {
    let deepest = |op: &str| vec!["lane"; sandbox::MAX_NESTING - 2].join(&format!(" {op} "));
    let sqls = [
        format!("SELECT {} AS x FROM camera_events", deepest("+")),
        format!(
            "SELECT x FROM (SELECT {} AS x FROM camera_events) WHERE x > 0",
            deepest("*")
        ),
        format!(
            "SELECT segment_id FROM camera_events WHERE {}",
            vec!["lane > 1"; sandbox::MAX_NESTING - 3].join(" AND ")
        ),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let schemas = SchemaRegistry::embedded().expect("schemas");
        let ctx = city_context(&Topics::default(), &schemas).expect("context");
        for sql in &sqls {
            for statement in urbanstream::plan::stream::StreamContext::parse(sql).expect("parse") {
                ctx.plan(statement).await.expect("plans");
            }
        }
    });
}
