//! The SQL sandbox: what analysts' SQL may reach, and the limits that keep parsing and
//! planning it bounded.
//!
//! Analysts' SQL is untrusted input. It may reach exactly the stream tables (`STORED AS
//! KAFKA`), the reference tables, views, and the engine's scalar, aggregate and window
//! functions. [`check_statement`] allows these statements and refuses every other one at
//! planning, with a message naming the statement and what is available instead:
//!
//! | allowed | refused (examples) |
//! |---|---|
//! | `SELECT …`, `INSERT INTO <stream table> SELECT …` | `COPY`, `CREATE TABLE … AS`, `CREATE TABLE` |
//! | `CREATE EXTERNAL TABLE … STORED AS KAFKA` (no `LOCATION`) | any other `STORED AS` (CSV, JSON, PARQUET, AVRO, ARROW) or a `LOCATION` |
//! | `CREATE [OR REPLACE] VIEW`, `DROP VIEW`, `DROP TABLE` | `CREATE FUNCTION`, `CREATE SCHEMA`, `CREATE DATABASE`, `ATTACH` |
//! | `SET urbanstream.…` | `SET datafusion.…` and other settings, `RESET` |
//!
//! The session a query is planned in registers no file-backed table factory and no table
//! function (see [`super::stream::StreamContext`]), so a refused statement has nothing to reach
//! even if it got past this check.
//!
//! Limits: a statement text of at most [`MAX_SQL_BYTES`]; expressions and queries nested at
//! most [`MAX_NESTING`] deep (sqlparser builds `1 + 1 + … + 1` as a left-deep tree without
//! recursing, so its own recursion limit does not see it, but every later walk of the tree
//! does). [`parse_checked`] parses and measures on a thread with a stack sized for the largest
//! tree a statement of the size limit can hold, and drops a refused tree there, so that no
//! statement can overflow the caller's stack; what it returns is shallow enough for the
//! planner on any thread. [`on_planning_thread`] runs planning with a time limit.
//!
//! What a function call may make while a query runs is bounded in [`super::bounded`].

use std::ops::ControlFlow;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    Expr, ObjectType, Query, Set, SetExpr, Statement, TableFactor, Visit, Visitor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;

/// Largest statement text accepted, in bytes (all statements of one request together).
pub const MAX_SQL_BYTES: usize = 64 * 1024;

/// Deepest nesting of expressions and subqueries accepted (a chain of `UNION`s counts one
/// level per set operation).
pub const MAX_NESTING: usize = 100;

/// Most tables (and table functions) one statement may name.
pub const MAX_TABLES: usize = 64;

/// Longest a request's planning may take, waiting for a planning thread included.
pub const PLANNING_TIMEOUT: Duration = Duration::from_secs(10);

/// How a statement refused because every planning thread is busy begins.
pub const BUSY_PLANNING: &str = "the service is busy planning other statements";

/// Statements planned at once, at most.
const PLANNING_THREADS: usize = 4;

/// Stack of the thread that parses and measures a statement: enough to walk and drop the
/// deepest tree [`MAX_SQL_BYTES`] of text can hold (about one level per two bytes). The
/// memory is reserved, not committed: only the pages a walk touches are used.
const PARSE_STACK_BYTES: usize = 256 * 1024 * 1024;

/// The most statements one SQL text of a client may hold.
pub const MAX_STATEMENTS: usize = 64;

/// Stack of the thread that plans a request (trees are at most [`MAX_NESTING`] deep by then).
const PLANNING_STACK_BYTES: usize = 64 * 1024 * 1024;

/// What analysts' SQL may do, for messages.
const AVAILABLE: &str = "stream queries may declare Kafka tables (CREATE EXTERNAL TABLE … \
    STORED AS KAFKA OPTIONS ('topic' '…')), views (CREATE VIEW), settings (SET urbanstream.…) \
    and queries (INSERT INTO <stream table> SELECT …) over the stream and reference tables";

/// Splits `sql` into statements after checking its size, and refuses statements nested
/// deeper than [`MAX_NESTING`]. Runs on a thread with a large stack (see the module docs).
pub fn parse_checked(sql: &str) -> Result<Vec<DFStatement>> {
    parse_within(sql, MAX_SQL_BYTES)
}

/// [`parse_checked`] with another size limit: for data fed as SQL (`INSERT … VALUES` in
/// deterministic mode), not for analysts' queries.
pub fn parse_within(sql: &str, max_bytes: usize) -> Result<Vec<DFStatement>> {
    if sql.len() > max_bytes {
        return plan_err!(
            "the SQL is {} bytes, over the limit of {} KiB: split it into several requests",
            sql.len(),
            max_bytes / 1024
        );
    }
    std::thread::scope(|scope| {
        let parse = std::thread::Builder::new()
            .name("sql-parse".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn_scoped(scope, || parse_and_measure(sql))
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        parse.join().unwrap_or_else(|panic| {
            plan_err!("the SQL could not be parsed: {}", panic_message(&*panic))
        })
    })
}

/// The parser's recursion limit, well above [`MAX_NESTING`]: sqlparser counts a level per
/// call of some of its functions (a parenthesised `CASE` takes several), and past its limit
/// it may backtrack and report a token it did not expect instead. So the parser refuses no
/// statement [`nesting`] would accept, and the refusal past the limit names the limit.
const PARSER_RECURSION_LIMIT: usize = 8 * MAX_NESTING;

fn parse_and_measure(sql: &str) -> Result<Vec<DFStatement>> {
    use datafusion::sql::sqlparser::parser::ParserError;
    let statements = DFParserBuilder::new(sql)
        .with_dialect(&GenericDialect {})
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .build()?
        .parse_statements()
        .map_err(|e| match e {
            DataFusionError::SQL(p, _) if matches!(*p, ParserError::RecursionLimitExceeded) => {
                too_deep(&format!("over {MAX_NESTING} levels"))
            }
            // Past its recursion limit the parser may backtrack to another reading and
            // report a token that reading did not expect: a statement whose brackets alone
            // nest past the limit is refused for the limit instead.
            DataFusionError::SQL(p, d) => match bracket_depth(sql) {
                depth if depth > MAX_NESTING + 1 => {
                    too_deep(&format!("{depth} deep in brackets alone"))
                }
                _ => DataFusionError::SQL(p, d),
            },
            e => e,
        })?;
    for statement in &statements {
        let tables = tables_named(statement);
        if tables > MAX_TABLES {
            return plan_err!(
                "the statement names {tables} tables, over the limit of {MAX_TABLES}: join \
                 fewer tables in one query"
            );
        }
        let depth = nesting(statement);
        if depth > MAX_NESTING {
            return Err(too_deep(&format!("{depth} deep")));
        }
    }
    Ok(statements.into_iter().collect())
}

/// How deep the brackets and `CASE … END`s of `sql` nest: each opens at least one level of
/// the syntax tree, but for the column list of a table's declaration (hence the one level
/// of slack where this is compared with [`MAX_NESTING`]). 0 when `sql` does not tokenize.
fn bracket_depth(sql: &str) -> usize {
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return 0;
    };
    let (mut now, mut deepest) = (0usize, 0usize);
    for token in tokens {
        match token {
            Token::LParen | Token::LBracket => now += 1,
            Token::Word(w) if w.keyword == Keyword::CASE => now += 1,
            Token::RParen | Token::RBracket => now = now.saturating_sub(1),
            Token::Word(w) if w.keyword == Keyword::END => now = now.saturating_sub(1),
            Token::SemiColon => now = 0,
            _ => {}
        }
        deepest = deepest.max(now);
    }
    deepest
}

/// The refusal of a statement nested past [`MAX_NESTING`], `how` deep.
fn too_deep(how: &str) -> DataFusionError {
    DataFusionError::Plan(format!(
        "the statement nests expressions or subqueries {how}, over the limit of \
         {MAX_NESTING}: write long sums or conditions as several columns, a CASE or an IN list"
    ))
}

/// Deepest nesting of expressions and queries in `statement` (stops counting past the limit).
fn nesting(statement: &DFStatement) -> usize {
    struct Depth {
        now: usize,
        max: usize,
    }
    impl Depth {
        fn enter(&mut self) -> ControlFlow<()> {
            self.now += 1;
            self.max = self.max.max(self.now);
            if self.now > MAX_NESTING {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    impl Visitor for Depth {
        type Break = ();
        fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
            self.enter()
        }
        fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
            // Set operations chain without recursing in the parser, as binary operators do.
            let mut deepest = 0;
            let _ = statement.visit(&mut SetChains(&mut deepest));
            self.max = self.max.max(deepest);
            if deepest > MAX_NESTING {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.enter()
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.now -= 1;
            ControlFlow::Continue(())
        }
        // A join in brackets (`FROM ((a JOIN b ON …))`) is a level the planner recurses into.
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if matches!(factor, TableFactor::NestedJoin { .. }) {
                return self.enter();
            }
            ControlFlow::Continue(())
        }
        fn post_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if matches!(factor, TableFactor::NestedJoin { .. }) {
                self.now -= 1;
            }
            ControlFlow::Continue(())
        }
    }
    let mut depth = Depth { now: 0, max: 0 };
    let _ = match statement {
        DFStatement::Statement(s) => s.visit(&mut depth),
        // DataFusion's own statements hold no expressions of the analyst's beyond these.
        DFStatement::CreateExternalTable(c) => c.columns.visit(&mut depth),
        DFStatement::CopyTo(_) | DFStatement::Explain(_) | DFStatement::Reset(_) => {
            ControlFlow::Continue(())
        }
    };
    depth.max
}

/// Finds the longest chain of set operations (`UNION`, `INTERSECT`, `EXCEPT`) of any query.
struct SetChains<'a>(&'a mut usize);

impl Visitor for SetChains<'_> {
    type Break = ();
    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // Walked with a stack of its own: the chain may be far deeper than a thread's stack
        // would take by recursion.
        let mut stack = vec![(query.body.as_ref(), 0usize)];
        while let Some((body, depth)) = stack.pop() {
            *self.0 = (*self.0).max(depth);
            if let SetExpr::SetOperation { left, right, .. } = body {
                stack.push((left.as_ref(), depth + 1));
                stack.push((right.as_ref(), depth + 1));
            }
        }
        ControlFlow::Continue(())
    }
}

/// How many tables and table functions `statement` names.
fn tables_named(statement: &DFStatement) -> usize {
    struct Count(usize);
    impl Visitor for Count {
        type Break = ();
        fn pre_visit_relation(
            &mut self,
            _: &datafusion::sql::sqlparser::ast::ObjectName,
        ) -> ControlFlow<()> {
            self.0 += 1;
            ControlFlow::Continue(())
        }
    }
    let mut count = Count(0);
    if let DFStatement::Statement(s) = statement {
        let _ = s.visit(&mut count);
    }
    count.0
}

/// Refuses what stream queries may not do (see the module docs): every statement kind but
/// the allowed ones, file-backed tables, locations, and settings outside `urbanstream.`.
pub fn check_statement(statement: &DFStatement) -> Result<()> {
    match statement {
        DFStatement::CreateExternalTable(create) => {
            if !create.file_type.eq_ignore_ascii_case("KAFKA") {
                return plan_err!(
                    "STORED AS {} is not available in stream queries: tables read from files \
                     or URLs are not reachable; {AVAILABLE}",
                    create.file_type.to_ascii_uppercase()
                );
            }
            if !create.order_exprs.is_empty() {
                return plan_err!(
                    "WITH ORDER is not available for KAFKA tables: a stream's order is its \
                     event time (OPTIONS ('event_time' '<column>'))"
                );
            }
            if create.locations.iter().any(|l| !l.is_empty()) {
                return plan_err!(
                    "LOCATION is not available in stream queries: a KAFKA table names its topic \
                     in OPTIONS ('topic' '…')"
                );
            }
            // An option given twice took its last value, silently ('format' 'json', …,
            // 'format' 'avro').
            let mut seen = std::collections::HashSet::new();
            for (key, _) in &create.options {
                let key = key.to_ascii_lowercase();
                let bare = key.strip_prefix("format.").unwrap_or(&key).to_string();
                if !seen.insert(bare.clone()) {
                    return plan_err!(
                        "option '{bare}' is given twice in the OPTIONS of {}: give each option \
                         once",
                        create.name
                    );
                }
            }
            // `public.cams` is DataFusion's default schema's table `cams`.
            let default_schema = create.name.0.len() == 2
                && create.name.0[0]
                    .as_ident()
                    .is_some_and(|i| i.value.eq_ignore_ascii_case("public"));
            if create.name.0.len() > 1 && !default_schema {
                let name = create.name.to_string();
                return plan_err!(
                    "{name}: a table's name is one name, not qualified by a schema or catalog; \
                     write {} (or quote it, \"{name}\"); the topic is named in OPTIONS \
                     ('topic' '…') and may have dots",
                    name.replace('.', "_")
                );
            }
            Ok(())
        }
        DFStatement::CopyTo(_) => refuse("COPY"),
        DFStatement::Explain(_) => plan_err!(
            "EXPLAIN is answered by the API: POST /v1/queries/explain {{\"sql\": …}} shows \
                 a stream query's stages, state, partitioning and emission"
        ),
        DFStatement::Reset(_) => refuse("RESET"),
        DFStatement::Statement(s) => check_sql_statement(s),
    }
}

fn check_sql_statement(statement: &Statement) -> Result<()> {
    if has_select_into(statement) {
        return plan_err!(
            "SELECT … INTO is not available in stream queries: it would create a table and run \
             the query once; write INSERT INTO <stream table> SELECT …"
        );
    }
    if has_match_recognize(statement) {
        return plan_err!(
            "MATCH_RECOGNIZE is not supported in stream queries. Per-key patterns over time are \
             written with windows and alert_state: e.g. 'PM2.5 above 150 for three consecutive \
             hours' is alert_state(pm25, window_end, 150, 150, INTERVAL '2 hours') OVER \
             (PARTITION BY sensor_id ORDER BY window_end) over hourly averages (SELECT \
             sensor_id, window_end, avg(pm25) AS pm25 … GROUP BY tumble(event_time, INTERVAL \
             '1 hour'), sensor_id): it raises once the value has stayed at or above 150 from \
             one window's end to the third's; or with LAG over the hourly rows: \
             lag(pm25, 1) OVER w > 150 AND lag(pm25, 2) OVER w > 150 AND pm25 > 150 with \
             WINDOW w AS (PARTITION BY sensor_id ORDER BY window_end)"
        );
    }
    if has_table_sample(statement) {
        return plan_err!(
            "TABLESAMPLE is not supported in stream queries (it would be ignored, and every \
             row counted): sample by a condition on the rows instead, e.g. WHERE \
             right(md5(camera_id), 1) = '0' for the rows of one key in 16"
        );
    }
    if let Some(function) = window_call_ignoring_nulls(statement) {
        return plan_err!(
            "{function}(…) IGNORE NULLS OVER (…) is not supported in stream queries (it would be \
             taken as RESPECT NULLS): leave the nulls out below it, e.g. lag(v) OVER (…) FROM \
             (SELECT … FROM t WHERE v IS NOT NULL), or use last_value(v) IGNORE NULLS as an \
             aggregate in a window"
        );
    }
    if let Some(written) = distinct_from_over_a_condition(statement) {
        return plan_err!(
            "{written} reads as IS [NOT] DISTINCT FROM (… AND/OR …): the parser binds AND and \
             OR tighter than IS DISTINCT FROM. Put the comparison in parentheses, e.g. \
             (a.k IS NOT DISTINCT FROM b.k) AND b.ts BETWEEN …"
        );
    }
    if has_recursive_cte(statement) {
        return plan_err!(
            "WITH RECURSIVE is not available in stream queries: a recursive query may never \
             end; write the levels out as joins, or use a reference table"
        );
    }
    match statement {
        Statement::Query(_) | Statement::Insert(_) => Ok(()),
        Statement::CreateView(view) if !view.materialized => Ok(()),
        Statement::Drop {
            object_type: ObjectType::View | ObjectType::Table,
            ..
        } => Ok(()),
        Statement::Set(Set::SingleAssignment { variable, .. }) => {
            let name = variable.to_string().to_ascii_lowercase();
            if name.starts_with("urbanstream.") {
                Ok(())
            } else {
                plan_err!(
                    "SET {name} is not available in stream queries: only the urbanstream.… \
                     settings (allowed_lateness, early_fire, key_ttl, on_data_loss) can be set"
                )
            }
        }
        Statement::Set(_) => plan_err!(
            "this SET is not available in stream queries: write SET urbanstream.<name> = \
             '<value>' (allowed_lateness, early_fire, key_ttl, on_data_loss)"
        ),
        Statement::CreateTable(create) if create.query.is_some() => plan_err!(
            "CREATE TABLE … AS is not available in stream queries: it would run the query \
             once; {AVAILABLE}"
        ),
        Statement::Explain { .. } => plan_err!(
            "EXPLAIN is answered by the API: POST /v1/queries/explain {{\"sql\": …}} shows \
                 a stream query's stages, state, partitioning and emission"
        ),
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ExplainTable { .. } => plan_err!(
            "SHOW and DESCRIBE are answered by the API, not by a stream query: GET /v1/tables \
             lists the tables, GET /v1/tables/<name> shows one's columns, event time, watermark \
             delay and key, and GET /v1/functions lists the functions"
        ),
        other => refuse(statement_kind(other)),
    }
}

/// DataFusion's planner refuses SQL it does not plan with the whole syntax tree of the
/// construct in the message (kilobytes of it): the message names the construct instead.
pub fn shorten_unsupported(e: DataFusionError) -> DataFusionError {
    let text = e.to_string();
    // A function's own refusal of its arguments, inside DataFusion's list of its signatures.
    if let Some(at) = text.find("user-defined coercion failed with: ") {
        let inner = &text[at + "user-defined coercion failed with: ".len()..];
        let inner = inner.split(" No function matches").next().unwrap_or(inner);
        let inner = inner.trim_start_matches("Error during planning: ");
        return DataFusionError::Plan(inner.trim_end_matches('.').to_string());
    }
    // A time and a number, either way round (`event_time + 5`, `5 + event_time`).
    let coerced = text
        .split_once("Cannot coerce arithmetic expression ")
        .map(|(_, rest)| rest.split(" to valid types").next().unwrap_or(rest));
    let is_time = |t: &str| t.starts_with("Timestamp") || t.starts_with("Date");
    let is_number = |t: &str| {
        ["Int", "UInt", "Float", "Decimal"]
            .iter()
            .any(|n| t.starts_with(n))
    };
    let time_and_number =
        coerced.is_some_and(|e| e.split(' ').any(is_time) && e.split(' ').any(is_number));
    if time_and_number {
        let shown = text.trim_start_matches("Error during planning: ");
        return DataFusionError::Plan(format!(
            "{shown}: a number has no unit of time; add or subtract an interval, e.g. \
             event_time + INTERVAL '5 seconds', or the difference of two times"
        ));
    }
    // A column neither grouped nor aggregated: DataFusion lists the grouping's expressions
    // in its own debug form (`IntervalMonthDayNano { months: 0, … }`) and speaks of a
    // wildcard the query may not have.
    if text.contains("must appear in the GROUP BY clause or must be part of an aggregate")
        && let Some(column) = text
            .split("column \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
    {
        let name = column.rsplit('.').next().unwrap_or(column);
        // DataFusion says where: `Column in SELECT|HAVING|ORDER BY must be …`.
        let clause = text
            .split("Column in ")
            .nth(1)
            .and_then(|rest| rest.split(" must").next())
            .filter(|c| c.len() <= 16)
            .unwrap_or("SELECT");
        let used = if clause == "SELECT" {
            "selected".to_string()
        } else {
            format!("used in {clause}")
        };
        return DataFusionError::Plan(format!(
            "column {name} is {used} but neither grouped nor aggregated: add it to GROUP BY, \
             or aggregate it (max({name}), last_value({name} ORDER BY event_time), …)"
        ));
    }
    let Some(at) = text.find("Unsupported ast node ") else {
        return e;
    };
    let rest = &text[at + "Unsupported ast node ".len()..];
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    DataFusionError::Plan(format!(
        "{name} is not supported in stream queries (the SQL planner does not plan it); see GET \
         /v1/functions and the README's list of what stream queries accept"
    ))
}

/// Whether `statement` holds a `MATCH_RECOGNIZE` anywhere.
fn has_match_recognize(statement: &Statement) -> bool {
    struct Pattern;
    impl Visitor for Pattern {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if matches!(factor, TableFactor::MatchRecognize { .. }) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    statement.visit(&mut Pattern).is_break()
}

/// Whether `statement` samples a table (`TABLESAMPLE`) anywhere.
fn has_table_sample(statement: &Statement) -> bool {
    struct Sample;
    impl Visitor for Sample {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            match factor {
                TableFactor::Table {
                    sample: Some(_), ..
                }
                | TableFactor::Derived {
                    sample: Some(_), ..
                } => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    statement.visit(&mut Sample).is_break()
}

/// The name of a window function called with `IGNORE NULLS` in `statement`, if one is.
fn window_call_ignoring_nulls(statement: &Statement) -> Option<String> {
    use datafusion::sql::sqlparser::ast::{
        Function, FunctionArgumentClause, FunctionArguments, NullTreatment,
    };
    struct Ignoring;
    impl Visitor for Ignoring {
        type Break = String;
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
            let Expr::Function(Function {
                name,
                args,
                null_treatment,
                over: Some(_),
                ..
            }) = expr
            else {
                return ControlFlow::Continue(());
            };
            let in_args = matches!(args, FunctionArguments::List(list) if list.clauses.iter().any(|c| {
                matches!(c, FunctionArgumentClause::IgnoreOrRespectNulls(NullTreatment::IgnoreNulls))
            }));
            if in_args || matches!(null_treatment, Some(NullTreatment::IgnoreNulls)) {
                ControlFlow::Break(name.to_string())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    match statement.visit(&mut Ignoring) {
        ControlFlow::Break(name) => Some(name),
        ControlFlow::Continue(()) => None,
    }
}

/// An `x IS [NOT] DISTINCT FROM y AND …` (or `OR …`) of `statement`, written without
/// parentheses, which the parser reads as `x IS [NOT] DISTINCT FROM (y AND …)`: DataFusion
/// then refused it naming only the types of an AND ("Cannot infer common argument type for
/// logical boolean operation Utf8View AND Boolean").
fn distinct_from_over_a_condition(statement: &Statement) -> Option<String> {
    use datafusion::sql::sqlparser::ast::BinaryOperator;
    struct Misread;
    impl Visitor for Misread {
        type Break = String;
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
            let (Expr::IsDistinctFrom(_, right) | Expr::IsNotDistinctFrom(_, right)) = expr else {
                return ControlFlow::Continue(());
            };
            match right.as_ref() {
                Expr::BinaryOp {
                    op: BinaryOperator::And | BinaryOperator::Or,
                    ..
                } => ControlFlow::Break(expr.to_string()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    match statement.visit(&mut Misread) {
        ControlFlow::Break(written) => Some(written.chars().take(200).collect()),
        ControlFlow::Continue(()) => None,
    }
}

/// Whether `statement` holds a `WITH RECURSIVE` anywhere.
fn has_recursive_cte(statement: &Statement) -> bool {
    struct Recursive;
    impl Visitor for Recursive {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if query.with.as_ref().is_some_and(|w| w.recursive) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    statement.visit(&mut Recursive).is_break()
}

/// Whether `statement` holds a `SELECT … INTO` anywhere (which creates a table).
fn has_select_into(statement: &Statement) -> bool {
    struct Into;
    impl Visitor for Into {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if matches!(query.body.as_ref(), SetExpr::Select(s) if s.into.is_some()) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    statement.visit(&mut Into).is_break()
}

fn refuse(kind: &str) -> Result<()> {
    plan_err!("{kind} is not available in stream queries; {AVAILABLE}")
}

/// The leading keywords of a statement, for messages (no values from it).
fn statement_kind(statement: &Statement) -> &'static str {
    match statement {
        Statement::Copy { .. } | Statement::CopyIntoSnowflake { .. } => "COPY",
        Statement::CreateTable(_) => "CREATE TABLE",
        Statement::CreateView(_) => "CREATE MATERIALIZED VIEW",
        Statement::CreateFunction(_) => "CREATE FUNCTION",
        Statement::CreateSchema { .. } => "CREATE SCHEMA",
        Statement::CreateDatabase { .. } => "CREATE DATABASE",
        Statement::CreateIndex(_) => "CREATE INDEX",
        Statement::AttachDatabase { .. } => "ATTACH",
        Statement::Update { .. } => "UPDATE",
        Statement::Delete(_) => "DELETE",
        Statement::Truncate { .. } => "TRUNCATE",
        Statement::Drop { .. } => "this DROP",
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. } => "SHOW",
        Statement::Prepare { .. } | Statement::Execute { .. } | Statement::Deallocate { .. } => {
            "PREPARE/EXECUTE"
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => "a transaction statement",
        _ => "this statement",
    }
}

/// Runs `plan` on its own thread (with a current-thread runtime and a stack sized for
/// [`MAX_NESTING`]) and waits at most [`PLANNING_TIMEOUT`] for it. A panic while planning is an
/// error naming it, not a crash.
pub async fn on_planning_thread<T, F, Fut>(plan: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    // At most PLANNING_THREADS plan at once; a permit is held until its thread ends (even
    // after a caller gave up waiting), so a flood of requests cannot pile up threads.
    static PLANNING: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    let permits = PLANNING
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(PLANNING_THREADS)))
        .clone();
    let deadline = tokio::time::Instant::now() + PLANNING_TIMEOUT;
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, permits.acquire_owned()).await else {
        return plan_err!("{BUSY_PLANNING}: try again in a few seconds");
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    planning_thread(move || {
        let _permit = permit;
        let _ = tx.send(plan_here(plan));
    })?;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => plan_err!("planning stopped without an answer"),
        Err(_) => plan_err!(
            "planning took longer than {} s: simplify the statement",
            PLANNING_TIMEOUT.as_secs()
        ),
    }
}

/// [`on_planning_thread`] for a caller that waits by blocking and whose runtime may have no
/// timer (the deterministic engine of the `.slt` tests and offline runs): the same thread,
/// stack, deadline and budget for constants ([`super::bounded::while_planning`]), but the
/// caller waits until the planning ends.
pub fn on_planning_thread_blocking<T, F, Fut>(plan: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    planning_thread(move || plan_here(plan))?
        .join()
        .unwrap_or_else(|_| plan_err!("planning stopped without an answer"))
}

/// Starts `work` on a planning thread: named `sql-plan`, with a stack sized for
/// [`MAX_NESTING`].
fn planning_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name("sql-plan".into())
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(work)
        .map_err(|e| DataFusionError::External(Box::new(e)))
}

/// Runs `plan` to its end on this (planning) thread, in a runtime of its own, within
/// [`PLANNING_TIMEOUT`] and the budget for constants ([`super::bounded::while_planning`]); a
/// panic is an error naming it.
fn plan_here<T, F, Fut>(plan: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let until = std::time::Instant::now() + PLANNING_TIMEOUT;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        super::bounded::while_planning(until, || runtime.block_on(plan()))
    }))
    .unwrap_or_else(|panic| {
        plan_err!(
            "planning failed inside the engine: {}",
            panic_message(&*panic)
        )
    })
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Most plan nodes a query or view may expand to, its views' plans included: a view that
/// reads the view before it twice doubles the plan, and a chain of them grows it past what
/// planning can hold in time or memory.
pub const MAX_PLAN_NODES: usize = 10_000;

/// Deepest expressions a query may stack through its views and subqueries: the planner
/// merges the projections of a chain of views into one expression, as deep as theirs
/// together.
pub const MAX_STACKED_NESTING: usize = 10 * MAX_NESTING;

/// Refuses a logical plan (a query's, or a view's being created) that expands, with the
/// plans of the views it reads, to more than [`MAX_PLAN_NODES`] nodes or stacks expressions
/// deeper than [`MAX_STACKED_NESTING`]. Walks at most that many nodes.
pub fn refuse_large_plans(plan: &datafusion::logical_expr::LogicalPlan, what: &str) -> Result<()> {
    let mut nodes = 0;
    let depth = stacked(plan, &mut nodes)?;
    if nodes > MAX_PLAN_NODES {
        return plan_err!(
            "the {what} expands to more than {MAX_PLAN_NODES} plan nodes with the views it \
             reads (a view that reads another view twice doubles its plan): read fewer views, \
             or define a view once and join it fewer times"
        );
    }
    if depth > MAX_STACKED_NESTING {
        return plan_err!(
            "the expressions of the {what} and the views it reads nest {depth} deep together, \
             more than {MAX_STACKED_NESTING}: compute the value in fewer stacked views, or in \
             several columns"
        );
    }
    Ok(())
}

/// The deepest expressions stacked along a path of `plan` (each node's deepest expression
/// plus the deepest of its inputs, a view's plan an input of its scan); counts the nodes
/// walked into `nodes` and stops past [`MAX_PLAN_NODES`].
fn stacked(plan: &datafusion::logical_expr::LogicalPlan, nodes: &mut usize) -> Result<usize> {
    use datafusion::logical_expr::LogicalPlan;
    *nodes += 1;
    if *nodes > MAX_PLAN_NODES {
        return Ok(0);
    }
    let mut own = 0;
    let inputs = plan.inputs();
    let mut schema = match inputs.first() {
        Some(first) => first.schema().as_ref().clone(),
        None => datafusion::common::DFSchema::empty(),
    };
    for input in inputs.iter().skip(1) {
        schema.merge(input.schema());
    }
    plan.apply_expressions(|e| {
        own = own.max(expr_depth(e));
        refuse_large_digests(e)?;
        refuse_utc_read_as_local(e, &schema)?;
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    let mut below = 0;
    for input in plan.inputs() {
        below = below.max(stacked(input, nodes)?);
    }
    plan.apply_subqueries(|sub| {
        below = below.max(stacked(sub, nodes)?);
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    if let LogicalPlan::TableScan(scan) = plan
        && let Ok(provider) = datafusion::datasource::source_as_provider(&scan.source)
        && let Some(view) = provider.downcast_ref::<datafusion::catalog::view::ViewTable>()
    {
        below = below.max(stacked(view.logical_plan(), nodes)?);
    }
    Ok(own + below)
}

/// The most centroids an `approx_percentile_cont` digest may keep (DataFusion's default is
/// 100): each group's digest allocates for them on every update.
pub const MAX_DIGEST_CENTROIDS: i64 = 10_000;

/// Refuses an `approx_percentile_cont` whose digest size is beyond [`MAX_DIGEST_CENTROIDS`]
/// (2 000 000 000 made one update allocate 32 GB, and the process was aborted).
fn refuse_large_digests(expr: &datafusion::logical_expr::Expr) -> Result<()> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::Expr;
    expr.apply(|e| {
        if let Expr::AggregateFunction(agg) = e {
            let name = agg.func.name();
            // (value[, weight], percentile, size): the size comes after the percentile.
            let size_at = match name {
                "approx_percentile_cont" => 2,
                "approx_percentile_cont_with_weight" => 3,
                _ => return Ok(TreeNodeRecursion::Continue),
            };
            let Some(mut size) = agg.params.args.get(size_at) else {
                return Ok(TreeNodeRecursion::Continue);
            };
            // DataFusion evaluates any constant expression here: only a number, cast or not,
            // can be checked before it does (`2000000 * 1000` went past a check of literals).
            while let Expr::Cast(datafusion::logical_expr::Cast { expr, .. })
            | Expr::TryCast(datafusion::logical_expr::TryCast { expr, .. }) = size
            {
                size = expr;
            }
            let Expr::Literal(size, _) = size else {
                return plan_err!(
                    "{name}(): give the digest's size as a number (at most \
                     {MAX_DIGEST_CENTROIDS}), not an expression"
                );
            };
            {
                let too_many = match size.cast_to(&datafusion::arrow::datatypes::DataType::Float64)
                {
                    Ok(datafusion::scalar::ScalarValue::Float64(Some(n))) => {
                        n.is_nan() || n > MAX_DIGEST_CENTROIDS as f64
                    }
                    _ => false,
                };
                if too_many {
                    return plan_err!(
                        "{name}(): a digest of {size} centroids would take memory without \
                         bound; give at most {MAX_DIGEST_CENTROIDS} (100, the default, is \
                         accurate to about 1 %)"
                    );
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// Refuses `t AT TIME ZONE 'Asia/Ho_Chi_Minh'` of a column's timestamp without a zone: the
/// engine's timestamps hold UTC instants, and the cast reads them as wall-clock times of the
/// zone (7 hours off in Hanoi). A constant (`TIMESTAMP '…'`) is the analyst's own
/// wall-clock time, and passes.
fn refuse_utc_read_as_local(
    expr: &datafusion::logical_expr::Expr,
    schema: &datafusion::common::DFSchema,
) -> Result<()> {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Cast, Expr, ExprSchemable, TryCast};
    expr.apply(|e| {
        let (inner, to) = match e {
            Expr::Cast(Cast { expr, field }) | Expr::TryCast(TryCast { expr, field }) => {
                (expr, field.data_type())
            }
            _ => return Ok(TreeNodeRecursion::Continue),
        };
        let DataType::Timestamp(_, Some(zone)) = to else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let utc = matches!(
            zone.to_ascii_uppercase().as_str(),
            "UTC"
                | "UCT"
                | "Z"
                | "+00:00"
                | "-00:00"
                | "+0000"
                | "+00"
                | "ETC/UTC"
                | "ETC/UCT"
                | "ETC/GMT"
                | "GMT"
                | "UNIVERSAL"
                | "ZULU"
        );
        // A stream's time as it is: a column, or a window's bound. A timestamp made from
        // something else (a text of wall-clock time cast to TIMESTAMP) may be a local time.
        let bound = |e: &Expr| match e {
            Expr::ScalarFunction(f) if f.name() == "get_field" => match f.args.get(1) {
                Some(Expr::Literal(datafusion::scalar::ScalarValue::Utf8(Some(n)), _)) => {
                    Some(n.clone())
                }
                _ => None,
            },
            _ => None,
        };
        let as_written = match inner.as_ref() {
            Expr::Column(c) => Some(c.name.clone()),
            other => bound(other),
        };
        let from_column = as_written.is_some()
            && inner
                .get_type(schema)
                .is_ok_and(|t| matches!(t, DataType::Timestamp(_, None)));
        if !utc && from_column {
            let inner = as_written.unwrap_or_default();
            return plan_err!(
                "{inner} AT TIME ZONE '{zone}' would read its UTC time as a wall-clock time in \
                 {zone} (the engine's timestamps hold UTC instants): write ({inner} AT TIME \
                 ZONE 'UTC') AT TIME ZONE '{zone}' for the time in {zone}, or add the zone's \
                 offset (in Hanoi: {inner} + INTERVAL '7 hours')"
            );
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// How deep `expr` nests (a column or literal is 1).
fn expr_depth(expr: &datafusion::logical_expr::Expr) -> usize {
    use datafusion::common::tree_node::TreeNode;
    let mut deepest = 0;
    let _ = expr.apply_children(|child| {
        deepest = deepest.max(expr_depth(child));
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    deepest + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_construct_is_named_without_its_syntax_tree() {
        let e = DataFusionError::NotImplemented(
            "Unsupported ast node Pivot { table: Table { name: ObjectName([…]) } } in \
             create_relation"
                .into(),
        );
        let shown = shorten_unsupported(e).to_string();
        assert!(
            shown.starts_with("Error during planning: Pivot is not supported in stream queries"),
            "{shown}"
        );
        assert!(!shown.contains("ObjectName"), "{shown}");
        let other = shorten_unsupported(DataFusionError::Plan("x".into()));
        assert_eq!(other.to_string(), "Error during planning: x");
    }
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    fn nested(levels: usize, open: &str, close: &str) -> String {
        format!(
            "SELECT {}lane{} AS x FROM camera_events",
            open.repeat(levels),
            close.repeat(levels)
        )
    }

    /// The parser's own recursion limit sat below the nesting limit for some constructs (a
    /// parenthesised CASE 30 deep was a syntax error): a statement within the nesting limit
    /// parses, and one past it is refused naming the limit, never with a syntax error about
    /// a token the parser did not expect.
    #[test]
    fn nesting_within_the_limit_parses_and_past_it_is_refused_for_it() {
        // (opening, closing, levels of the tree per step, levels besides the steps: the
        // query, the innermost column, and for CASE its condition's comparison.)
        let shapes = [
            ("(CASE WHEN lane > 1 THEN ", " ELSE 0 END)", 2, 3),
            ("NOT (", ")", 2, 2),
            ("abs(", ")", 1, 2),
            ("(SELECT ", ")", 2, 2),
            ("-(", ")", 2, 2),
            ("(", " + 1)", 2, 2),
        ];
        for (open, close, per_step, besides) in shapes {
            for steps in [10, 30, 45, 48, 49, 60, 90, 97, 98, 99, 120, 400] {
                let depth = per_step * steps + besides;
                let sql = nested(steps, open, close);
                match parse_checked(&sql) {
                    Ok(statements) => {
                        assert!(depth <= MAX_NESTING, "{open}…{close} × {steps}: planned");
                        assert_eq!(nesting(&statements[0]), depth, "{open}…{close} × {steps}");
                    }
                    Err(e) => {
                        let e = e.to_string();
                        assert!(
                            depth > MAX_NESTING && e.contains(&format!("limit of {MAX_NESTING}")),
                            "{open}…{close} × {steps} ({depth} deep): {e}"
                        );
                    }
                }
            }
        }
        // Joins in brackets are levels too.
        let joins = |steps: usize| {
            format!(
                "SELECT 1 AS x FROM {}camera_events a JOIN camera_events b ON a.lane = b.lane{}",
                "(".repeat(steps),
                ")".repeat(steps)
            )
        };
        assert!(parse_checked(&joins(50)).is_ok());
        let e = parse_checked(&joins(300))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("limit of {MAX_NESTING}")), "{e}");
    }
}
