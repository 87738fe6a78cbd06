//! The workflow language: YAML with spans → a validated model that cannot be wrong.

pub mod model;
pub mod spec;
pub mod units;
pub mod validate;
pub mod yaml;

pub use model::*;
pub use validate::{load, resolve_inputs};

/// Checks a cron expression (five fields, or six with seconds first).
pub fn cron_check(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "expected 5 fields (or 6 with seconds), found {fields}"
        ));
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map(|_| ())
        .map_err(|e| e.to_string())
}
