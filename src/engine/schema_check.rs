//! A small JSON Schema checker for task outputs: type, required, properties, items, enum,
//! minItems/maxItems, minLength, minimum/maximum. Enough to catch a malformed output early.

use serde_json::Value as Json;

/// Returns every mismatch between `value` and `schema`, as `path: problem` strings.
pub fn check(schema: &Json, value: &Json) -> Vec<String> {
    let mut problems = Vec::new();
    walk(schema, value, "$", &mut problems);
    problems
}

fn type_matches(name: &str, value: &Json) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn walk(schema: &Json, value: &Json, path: &str, problems: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    if let Some(t) = schema.get("type") {
        let names: Vec<&str> = match t {
            Json::String(s) => vec![s.as_str()],
            Json::Array(items) => items.iter().filter_map(Json::as_str).collect(),
            _ => Vec::new(),
        };
        if !names.is_empty() && !names.iter().any(|n| type_matches(n, value)) {
            problems.push(format!(
                "{path}: expected {}, found {}",
                names.join(" or "),
                kind(value)
            ));
            return;
        }
    }
    if let Some(Json::Array(allowed)) = schema.get("enum") {
        if !allowed.contains(value) {
            problems.push(format!("{path}: {value} is not one of the allowed values"));
        }
    }
    if let Some(obj) = value.as_object() {
        if let Some(Json::Array(required)) = schema.get("required") {
            for r in required.iter().filter_map(Json::as_str) {
                if !obj.contains_key(r) {
                    problems.push(format!("{path}: missing required property `{r}`"));
                }
            }
        }
        if let Some(Json::Object(props)) = schema.get("properties") {
            for (k, sub) in props {
                if let Some(v) = obj.get(k) {
                    walk(sub, v, &format!("{path}.{k}"), problems);
                }
            }
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(sub) = schema.get("items") {
            for (i, v) in items.iter().enumerate() {
                walk(sub, v, &format!("{path}[{i}]"), problems);
            }
        }
        let len = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Json::as_u64)
            .is_some_and(|m| len < m)
        {
            problems.push(format!("{path}: fewer than {} items", schema["minItems"]));
        }
        if schema
            .get("maxItems")
            .and_then(Json::as_u64)
            .is_some_and(|m| len > m)
        {
            problems.push(format!("{path}: more than {} items", schema["maxItems"]));
        }
    }
    if let Some(s) = value.as_str() {
        if schema
            .get("minLength")
            .and_then(Json::as_u64)
            .is_some_and(|m| (s.chars().count() as u64) < m)
        {
            problems.push(format!(
                "{path}: shorter than {} characters",
                schema["minLength"]
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        if schema
            .get("minimum")
            .and_then(Json::as_f64)
            .is_some_and(|m| n < m)
        {
            problems.push(format!(
                "{path}: {n} is below the minimum {}",
                schema["minimum"]
            ));
        }
        if schema
            .get("maximum")
            .and_then(Json::as_f64)
            .is_some_and(|m| n > m)
        {
            problems.push(format!(
                "{path}: {n} is above the maximum {}",
                schema["maximum"]
            ));
        }
    }
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_missing_and_mistyped_fields() {
        let schema = json!({"type": "object", "required": ["files"], "properties": {"files": {"type": "array", "items": {"type": "string"}}}});
        assert!(check(&schema, &json!({"files": ["a.py"]})).is_empty());
        assert_eq!(
            check(&schema, &json!({})),
            vec!["$: missing required property `files`"]
        );
        assert_eq!(
            check(&schema, &json!({"files": [1]})),
            vec!["$.files[0]: expected string, found a number"]
        );
    }
}
