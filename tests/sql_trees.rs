//! Random SQL expression trees, deep and wide, planned through the entry point the API uses
//! ([`urbanstream::plan::plan_all`] in the city's context): every statement plans or is
//! refused with an error; none panics or overflows a stack. The test threads have the
//! default 2 MiB stack, as the service's runtime workers do.

use proptest::prelude::*;
use urbanstream::pipeline::Topics;
use urbanstream::plan::{city_context, plan_all, sandbox};
use urbanstream::schema::SchemaRegistry;

/// An expression over `camera_events`, as SQL text, with its nesting depth.
#[derive(Debug, Clone)]
struct Tree(String, usize);

fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        (0i64..1000).prop_map(|i| Tree(i.to_string(), 1)),
        Just(Tree("speed_kmh".into(), 1)),
        Just(Tree("confidence".into(), 1)),
        Just(Tree("lane".into(), 1)),
        Just(Tree("NULL".into(), 1)),
        Just(Tree("'x'".into(), 1)),
    ]
}

/// One level around an expression `x`: an operator with a random subtree beside it, a
/// function, a CASE, a subquery or a negation.
#[derive(Debug, Clone)]
enum Wrap {
    Op(&'static str, Tree),
    Abs,
    Case(Tree, Tree),
    Coalesce(Vec<Tree>),
    Subquery,
    Not,
}

fn small_tree() -> impl Strategy<Value = Tree> {
    leaf().prop_recursive(3, 24, 3, |inner| {
        (inner.clone(), inner)
            .prop_map(|(a, b)| Tree(format!("({} + {})", a.0, b.0), a.1.max(b.1) + 2))
    })
}

fn wrap() -> impl Strategy<Value = Wrap> {
    let op = prop_oneof![
        Just("+"),
        Just("-"),
        Just("*"),
        Just("/"),
        Just("%"),
        Just("="),
        Just("<"),
        Just("AND"),
        Just("OR"),
        Just("||")
    ];
    prop_oneof![
        4 => (op, small_tree()).prop_map(|(op, t)| Wrap::Op(op, t)),
        1 => Just(Wrap::Abs),
        1 => (small_tree(), small_tree()).prop_map(|(a, b)| Wrap::Case(a, b)),
        1 => prop::collection::vec(small_tree(), 0..4).prop_map(Wrap::Coalesce),
        1 => Just(Wrap::Subquery),
        1 => Just(Wrap::Not),
    ]
}

/// A tree with a spine of up to 250 levels (the nesting limit is 100), built without
/// recursion so that any depth is drawn as often as any other.
fn tree() -> impl Strategy<Value = Tree> {
    (small_tree(), prop::collection::vec(wrap(), 0..250)).prop_map(|(mut t, wraps)| {
        for w in wraps {
            t = match w {
                Wrap::Op(op, b) => Tree(format!("{} {op} {}", t.0, b.0), t.1.max(b.1) + 1),
                Wrap::Abs => Tree(format!("abs({})", t.0), t.1 + 1),
                Wrap::Case(a, b) => Tree(
                    format!("CASE WHEN {} THEN {} ELSE {} END", a.0, t.0, b.0),
                    t.1.max(a.1).max(b.1) + 1,
                ),
                Wrap::Coalesce(rest) => {
                    let depth = rest.iter().map(|r| r.1).max().unwrap_or(0).max(t.1) + 1;
                    let mut args = vec![t.0];
                    args.extend(rest.into_iter().map(|r| r.0));
                    Tree(format!("coalesce({})", args.join(", ")), depth)
                }
                Wrap::Subquery => Tree(format!("(SELECT {})", t.0), t.1 + 2),
                Wrap::Not => Tree(format!("NOT ({})", t.0), t.1 + 1),
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
        match plan(&sql) {
            Ok(n) => prop_assert_eq!(n, 1),
            Err(e) => {
                // Deeper than the limit: refused for it, unless the parser refused first (its
                // own recursion limit, or the generated syntax).
                if t.1 + 3 > sandbox::MAX_NESTING && sql.len() <= sandbox::MAX_SQL_BYTES {
                    prop_assert!(
                        e.contains("limit") || e.contains("ParserError"),
                        "{}",
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
