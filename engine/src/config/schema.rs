//! The `[schema]` and `[aggregate]` sections, and the check of the fields the aggregates
//! read against the schema.

use crate::decode::{FieldSpec, FieldType, Schema};

use super::model::{AggFn, AggregateConfig, EnrichConfig};
use super::reader::{Diagnostics, TableReader};
use super::tree::{Loc, Value};

/// `[schema]`: what events must look like (none: anything goes).
pub(super) fn schema(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Schema {
    match r.table(d, "schema") {
        Some(t) => read_schema(t, d),
        None => Schema::default(),
    }
}

/// `[aggregate]`, and where its `group_by` and `compute` are (for the schema check).
pub(super) fn aggregate(
    r: &mut TableReader<'_>,
    d: &mut Diagnostics,
    schema: &Schema,
) -> (AggregateConfig, (Loc, Loc)) {
    let mut agg_locs = (Loc::Nowhere, Loc::Nowhere);
    let aggregate = match r.table(d, "aggregate") {
        Some(mut t) => {
            let gb_loc = t.node("group_by").map(|n| n.loc.clone());
            agg_locs.0 = gb_loc.clone().unwrap_or_else(|| t.loc().clone());
            let group_by = t.str_list(d, "group_by").unwrap_or_default();
            if group_by.is_empty() {
                d.push(
                    &gb_loc.unwrap_or_else(|| t.loc().clone()),
                    "aggregate.group_by",
                    "name at least one key field, e.g. group_by = \"user_id\"",
                );
            }
            for g in &group_by {
                if let Some(f) = schema.fields.iter().find(|f| &f.path == g) {
                    if matches!(f.ty, FieldType::Object | FieldType::Array) {
                        d.push(
                            t.loc(),
                            "aggregate.group_by",
                            format!("`{g}` is an {:?} in the schema; keys must be scalars", f.ty)
                                .to_lowercase(),
                        );
                    }
                }
            }
            let compute_node = t.node("compute");
            let names = t
                .str_list(d, "compute")
                .unwrap_or_else(|| vec!["count".into()]);
            let mut compute: Vec<AggFn> = Vec::new();
            let loc = compute_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
            agg_locs.1 = loc.clone();
            for n in &names {
                match AggFn::parse(n) {
                    Ok(f) if compute.contains(&f) => {
                        d.push(&loc, "aggregate.compute", format!("`{n}` is listed twice"))
                    }
                    Ok(f) => compute.push(f),
                    Err(e) => d.push(&loc, "aggregate.compute", e),
                }
            }
            if names.is_empty() {
                d.push(
                    &loc,
                    "aggregate.compute",
                    "name at least one aggregate, e.g. [\"count\"]",
                );
            }
            t.finish(d);
            AggregateConfig { group_by, compute }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                "aggregate",
                "missing required table [aggregate] (with `group_by`)",
            );
            AggregateConfig {
                group_by: Vec::new(),
                compute: vec![AggFn::Count],
            }
        }
    };
    (aggregate, agg_locs)
}

/// What the schema says about field `path`.
enum Known<'a> {
    /// Declared, with this spec.
    Field(&'a FieldSpec),
    /// Inside a declared object (or `any`) field, or the enrichment's field: its type is
    /// not known before run time.
    Inside,
    /// Neither.
    Unknown,
}

fn known<'a>(schema: &'a Schema, enrich: Option<&EnrichConfig>, path: &str) -> Known<'a> {
    if let Some(f) = schema.fields.iter().find(|f| f.path == path) {
        return Known::Field(f);
    }
    let under = |parent: &str| {
        path.strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    if enrich.is_some_and(|e| under(&e.into))
        || schema
            .fields
            .iter()
            .any(|f| matches!(f.ty, FieldType::Object | FieldType::Any) && under(&f.path))
    {
        return Known::Inside;
    }
    Known::Unknown
}

/// `group_by` and every aggregate name fields the schema declares (or fields inside a
/// declared object, or the enrichment's), and numeric aggregates name numeric fields: a
/// pipeline that would dead-letter every event is a configuration error. A pipeline without
/// a `[schema]` checks nothing, so there is nothing to check against.
pub(super) fn check_fields_against_schema(
    schema: &Schema,
    enrich: Option<&EnrichConfig>,
    aggregate: &AggregateConfig,
    (gb_loc, compute_loc): &(Loc, Loc),
    d: &mut Diagnostics,
) {
    if schema.fields.is_empty() {
        return;
    }
    let declared = || {
        schema
            .fields
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for g in &aggregate.group_by {
        if let Known::Unknown = known(schema, enrich, g) {
            d.push(
                gb_loc,
                "aggregate.group_by",
                format!(
                    "`{g}` is not a field of the schema (declared: {}); every event would be a dead letter",
                    declared()
                ),
            );
        }
    }
    for f in &aggregate.compute {
        let Some(field) = f.field() else { continue };
        let name = f.output_name();
        match known(schema, enrich, field) {
            Known::Unknown => d.push(
                compute_loc,
                "aggregate.compute",
                format!(
                    "`{field}` (in {name}) is not a field of the schema (declared: {})",
                    declared()
                ),
            ),
            Known::Field(spec)
                if f.is_numeric()
                    && !matches!(
                        spec.ty,
                        FieldType::Integer | FieldType::Number | FieldType::Any
                    ) =>
            {
                d.push(
                    compute_loc,
                    "aggregate.compute",
                    format!(
                        "{name} needs a number, but `{field}` is a {} in the schema; every event would be a dead letter",
                        format!("{:?}", spec.ty).to_lowercase()
                    ),
                )
            }
            Known::Field(spec)
                if matches!(spec.ty, FieldType::Object | FieldType::Array) =>
            {
                d.push(
                    compute_loc,
                    "aggregate.compute",
                    format!(
                        "{name} needs a string, number or boolean, but `{field}` is an {} in the schema",
                        format!("{:?}", spec.ty).to_lowercase()
                    ),
                )
            }
            _ => {}
        }
    }
}

fn read_schema(mut t: TableReader<'_>, d: &mut Diagnostics) -> Schema {
    let preset_node = t.node("preset");
    let mut schema = match t.str(d, "preset") {
        Some("seed_event") => Schema::seed_event(),
        Some(other) => {
            d.push(
                &preset_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                "schema.preset",
                format!("unknown preset `{other}` (available: seed_event)"),
            );
            Schema::default()
        }
        None => Schema::default(),
    };
    if let Some(fields) = t.table(d, "fields") {
        let mut fields = fields;
        for (name, _loc, node) in fields.entries() {
            let key = format!("schema.fields.{name}");
            let Value::Table(ft) = &node.value else {
                d.push(
                    &node.loc,
                    &key,
                    "expected a table such as { type = \"string\" }",
                );
                continue;
            };
            let mut fr = TableReader::new(&key, ft, node.loc.clone());
            let ty_node = fr.node("type");
            let ty = match fr.req_str(d, "type") {
                Some(s) => FieldType::from_name(s).unwrap_or_else(|| {
                    d.push(
                        &ty_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        &format!("{key}.type"),
                        format!("unknown type `{s}` (choose {})", FieldType::NAMES),
                    );
                    FieldType::Any
                }),
                None => FieldType::Any,
            };
            let required = fr.bool_or(d, "required", true);
            let allowed_node = fr.node("allowed");
            let allowed = fr.str_list(d, "allowed");
            if allowed.is_some() && ty != FieldType::String {
                d.push(
                    &allowed_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                    &format!("{key}.allowed"),
                    "`allowed` applies to string fields only",
                );
            }
            if name.is_empty() || name.split('.').any(|p| p.is_empty()) {
                d.push(
                    &node.loc,
                    &key,
                    "field paths are dotted names such as metadata.page",
                );
            }
            fr.finish(d);
            let spec = FieldSpec {
                path: name.clone(),
                ty,
                required,
                allowed,
            };
            match schema.fields.iter_mut().find(|f| f.path == *name) {
                Some(existing) => *existing = spec,
                None => schema.fields.push(spec),
            }
        }
    }
    t.finish(d);
    schema
}
