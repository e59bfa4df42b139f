//! The table's layout (from the pipeline's `group_by`, window and aggregates), the SQL that
//! creates it and upserts into it, and the check that an existing table fits.

use weir_engine::config::{AggFn, EmitMode, PipelineConfig};

use crate::error::PostgresError;

/// A column's SQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// A group field: its text, or the JSON text of a value that is not a string.
    Text,
    /// `window_start`, `window_end`, `updated_at`.
    Timestamptz,
    /// `count`, `distinct_*`.
    Bigint,
    /// `sum_*`, `min_*`, `max_*`, `mean_*`.
    Double,
    /// `final` (emit = "update").
    Boolean,
}

impl ColType {
    /// The type in `CREATE TABLE`.
    fn sql(self) -> &'static str {
        match self {
            ColType::Text => "text",
            ColType::Timestamptz => "timestamptz",
            ColType::Bigint => "bigint",
            ColType::Double => "double precision",
            ColType::Boolean => "boolean",
        }
    }

    /// Whether an existing column of type `found` (as `format_type` names it) takes this
    /// type's values.
    fn accepts(self, found: &str) -> bool {
        match self {
            ColType::Text => found == "text" || found.starts_with("character varying"),
            ColType::Timestamptz => found == "timestamp with time zone",
            ColType::Bigint => found == "bigint" || found.starts_with("numeric"),
            ColType::Double => found == "double precision" || found.starts_with("numeric"),
            ColType::Boolean => found == "boolean",
        }
    }
}

/// One column the results are written to.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its name: the result field's name.
    pub name: String,
    /// Its type.
    pub ty: ColType,
    /// Part of the primary key (the group fields and `window_start`).
    pub key: bool,
}

/// The columns of a pipeline's results, in order: the group fields, `window_start`,
/// `window_end`, the aggregates, and `final` with `emit = "update"`; `updated_at` follows.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Every column written from a result.
    pub columns: Vec<Column>,
}

impl Layout {
    /// The layout of `c`'s results.
    pub fn of(c: &PipelineConfig) -> Layout {
        let col = |name: &str, ty, key| Column {
            name: name.to_string(),
            ty,
            key,
        };
        let mut columns: Vec<Column> = c
            .aggregate
            .group_by
            .iter()
            .map(|g| col(g, ColType::Text, true))
            .collect();
        columns.push(col("window_start", ColType::Timestamptz, true));
        columns.push(col("window_end", ColType::Timestamptz, false));
        for f in &c.aggregate.compute {
            let ty = match f {
                AggFn::Count | AggFn::CountDistinct(_) => ColType::Bigint,
                AggFn::Sum(_) | AggFn::Min(_) | AggFn::Max(_) | AggFn::Mean(_) => ColType::Double,
            };
            columns.push(col(&f.output_name(), ty, false));
        }
        if c.window.emit == EmitMode::Update {
            columns.push(col("final", ColType::Boolean, false));
        }
        Layout { columns }
    }

    fn keys(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.key)
    }

    /// The names of the key columns (the group fields and `window_start`).
    pub(crate) fn key_names(&self) -> Vec<String> {
        self.keys().map(|c| c.name.clone()).collect()
    }

    /// `CREATE TABLE IF NOT EXISTS`, with the primary key on the group fields and
    /// `window_start`.
    pub(crate) fn create_sql(&self, table: &str) -> String {
        let mut cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let not_null = if c.key || c.name == "window_end" {
                    " NOT NULL"
                } else {
                    ""
                };
                format!("{} {}{not_null}", ident(&c.name), c.ty.sql())
            })
            .collect();
        cols.push("updated_at timestamptz NOT NULL DEFAULT now()".into());
        cols.push(format!("PRIMARY KEY ({})", self.key_list()));
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            table_ident(table),
            cols.join(", ")
        )
    }

    fn key_list(&self) -> String {
        self.keys()
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One statement that upserts a whole batch: each column's values come as one text
    /// array (`$1` … `$n`), cast by the server; a row whose values did not change is not
    /// written again (its `updated_at` stays).
    pub(crate) fn upsert_sql(&self, table: &str) -> String {
        let t = table_ident(table);
        let names: Vec<String> = self.columns.iter().map(|c| ident(&c.name)).collect();
        let arrays: Vec<String> = (1..=names.len()).map(|i| format!("${i}::text[]")).collect();
        let selected: Vec<String> = self
            .columns
            .iter()
            .map(|c| match c.ty {
                ColType::Text => format!("u.{}", ident(&c.name)),
                ty => format!("u.{}::{}", ident(&c.name), ty.sql()),
            })
            .collect();
        let values: Vec<&Column> = self.columns.iter().filter(|c| !c.key).collect();
        let set: Vec<String> = values
            .iter()
            .map(|c| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
            .collect();
        let old: Vec<String> = values
            .iter()
            .map(|c| format!("{t}.{}", ident(&c.name)))
            .collect();
        let new: Vec<String> = values
            .iter()
            .map(|c| format!("EXCLUDED.{}", ident(&c.name)))
            .collect();
        format!(
            "INSERT INTO {t} ({cols}, updated_at) \
             SELECT {selected}, now() FROM UNNEST({arrays}) AS u({cols}) \
             ON CONFLICT ({keys}) DO UPDATE SET {set}, updated_at = EXCLUDED.updated_at \
             WHERE ({old}) IS DISTINCT FROM ({new})",
            cols = names.join(", "),
            selected = selected.join(", "),
            arrays = arrays.join(", "),
            keys = self.key_list(),
            set = set.join(", "),
            old = old.join(", "),
            new = new.join(", "),
        )
    }

    /// Checks the columns of an existing table, `(name, type, not null, has default)`:
    /// every column of the layout present with a type that takes its values, and no other
    /// column that needs a value Weir does not write. The message names the column.
    pub(crate) fn check(
        &self,
        table: &str,
        found: &[(String, String, bool, bool)],
    ) -> Result<(), PostgresError> {
        let wanted = || {
            self.columns
                .iter()
                .map(|c| format!("{} {}", c.name, c.ty.sql()))
                .chain(["updated_at timestamptz".to_string()])
                .collect::<Vec<_>>()
                .join(", ")
        };
        let want_cols = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty))
            .chain([("updated_at", ColType::Timestamptz)]);
        for (name, ty) in want_cols {
            match found.iter().find(|(n, ..)| n == name) {
                None => {
                    return Err(PostgresError::Table(format!(
                        "table {table} has no column `{name}` ({} wanted): the pipeline's results need {}; add the column, or name another table and Weir creates it",
                        ty.sql(),
                        wanted()
                    )))
                }
                Some((_, t, ..)) if !ty.accepts(t) => {
                    return Err(PostgresError::Table(format!(
                        "column `{name}` of table {table} is {t}, but the results need {}",
                        ty.sql()
                    )))
                }
                Some(_) => {}
            }
        }
        for (name, _, not_null, has_default) in found {
            let ours = name == "updated_at" || self.columns.iter().any(|c| &c.name == name);
            if !ours && *not_null && !has_default {
                return Err(PostgresError::Table(format!(
                    "column `{name}` of table {table} is NOT NULL without a default, and the results do not fill it (they have {})",
                    wanted()
                )));
            }
        }
        Ok(())
    }

    /// The message when the upsert's `ON CONFLICT` finds no unique index to use.
    pub(crate) fn no_unique_key(&self, table: &str) -> PostgresError {
        PostgresError::Table(format!(
            "table {table} has no primary key or unique index on ({}), which the upsert needs: add one, or name another table and Weir creates it",
            self.key_list()
        ))
    }
}

/// `"name"`, quoted (any `"` doubled).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."name"` or `"name"`.
pub(crate) fn table_ident(table: &str) -> String {
    table.split('.').map(ident).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let col = |n: &str, ty, key| Column {
            name: n.into(),
            ty,
            key,
        };
        Layout {
            columns: vec![
                col("user_id", ColType::Text, true),
                col("window_start", ColType::Timestamptz, true),
                col("window_end", ColType::Timestamptz, false),
                col("count", ColType::Bigint, false),
            ],
        }
    }

    fn found(cols: &[(&str, &str, bool, bool)]) -> Vec<(String, String, bool, bool)> {
        cols.iter()
            .map(|(n, t, nn, d)| (n.to_string(), t.to_string(), *nn, *d))
            .collect()
    }

    #[test]
    fn a_fitting_table_passes_and_each_misfit_names_its_column() {
        let l = layout();
        let good = [
            ("user_id", "text", true, false),
            ("window_start", "timestamp with time zone", true, false),
            ("window_end", "timestamp with time zone", true, false),
            ("count", "bigint", false, false),
            ("updated_at", "timestamp with time zone", true, true),
            ("note", "text", false, false),
        ];
        l.check("t", &found(&good)).unwrap();
        let mut missing = good.to_vec();
        missing.retain(|c| c.0 != "count");
        let e = l.check("t", &found(&missing)).unwrap_err().to_string();
        assert!(e.contains("no column `count`"), "{e}");
        let mut wrong = good.to_vec();
        wrong[3].1 = "text";
        let e = l.check("t", &found(&wrong)).unwrap_err().to_string();
        assert!(e.contains("column `count` of table t is text"), "{e}");
        let mut extra = good.to_vec();
        extra.push(("owner", "text", true, false));
        let e = l.check("t", &found(&extra)).unwrap_err().to_string();
        assert!(e.contains("column `owner`"), "{e}");
    }

    #[test]
    fn sql_quotes_every_name() {
        let l = layout();
        let c = l.create_sql("s.t");
        assert!(c.starts_with("CREATE TABLE IF NOT EXISTS \"s\".\"t\" (\"user_id\" text NOT NULL"));
        assert!(
            c.ends_with("PRIMARY KEY (\"user_id\", \"window_start\"))"),
            "{c}"
        );
        let u = l.upsert_sql("t");
        assert!(
            u.contains("ON CONFLICT (\"user_id\", \"window_start\") DO UPDATE"),
            "{u}"
        );
        assert!(
            u.contains("UNNEST($1::text[], $2::text[], $3::text[], $4::text[])"),
            "{u}"
        );
    }
}
