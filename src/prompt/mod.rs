//! Templates: every string field is minijinja, with strict undefined variables.
//!
//! Validation uses the same environment as execution, so a template that passes
//! `helix validate` parses identically at run time.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value as Json;

/// An environment with strict undefined, `{% include %}`/`{% extends %}` from `base_dir`.
pub fn environment(base_dir: Option<&Path>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    if let Some(dir) = base_dir {
        env.set_loader(minijinja::path_loader(dir));
    }
    env.add_filter("fromjson", fromjson);
    env
}

fn fromjson(text: String) -> Result<minijinja::Value, minijinja::Error> {
    let v: Json = serde_json::from_str(&text).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("fromjson: {e}"),
        )
    })?;
    Ok(minijinja::Value::from_serialize(&v))
}

/// Whether `text` uses template syntax at all; plain strings skip the engine.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

/// The expression inside `{{ … }}` when the whole string is one, else the text itself.
pub fn expr_text(text: &str) -> &str {
    let t = text.trim();
    if let Some(inner) = t.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) {
        if !inner.contains("{{") && !inner.contains("}}") {
            return inner
                .trim()
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
        }
    }
    t
}

/// A template problem: the message and, when known, the line inside the template.
#[derive(Debug, Clone)]
pub struct TemplateError {
    pub message: String,
    pub line: Option<usize>,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn template_error(e: minijinja::Error) -> TemplateError {
    let mut message = e
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| e.kind().to_string());
    if let Some(name) = e.name().filter(|n| !n.starts_with('<')) {
        message = format!("{message} (in {name})");
    }
    TemplateError {
        message,
        line: e.line(),
    }
}

/// Parses a template or expression and returns the variables it reads, as dotted paths.
pub fn check(
    env: &Environment<'_>,
    text: &str,
    is_expr: bool,
) -> Result<Vec<String>, TemplateError> {
    let vars = if is_expr {
        env.compile_expression(expr_text(text))
            .map_err(template_error)?
            .undeclared_variables(true)
    } else if !is_template(text) {
        return Ok(Vec::new());
    } else {
        env.template_from_str(text)
            .map_err(template_error)?
            .undeclared_variables(true)
    };
    // Functions like `range` and `namespace` are globals, not variables a user must declare.
    let mut vars: Vec<String> = vars
        .into_iter()
        .filter(|v| {
            let head = v.split('.').next().unwrap_or(v);
            !env.globals().any(|(name, _)| name == head)
        })
        .collect();
    vars.sort();
    Ok(vars)
}

/// Renders a string template.
pub fn render<S: serde::Serialize>(
    env: &Environment<'_>,
    text: &str,
    context: &S,
) -> Result<String, TemplateError> {
    if !is_template(text) {
        return Ok(text.to_string());
    }
    env.render_str(text, context).map_err(template_error)
}

/// Evaluates an expression to a JSON value.
pub fn eval<S: serde::Serialize>(
    env: &Environment<'_>,
    text: &str,
    context: &S,
) -> Result<Json, TemplateError> {
    let expr = env
        .compile_expression(expr_text(text))
        .map_err(template_error)?;
    let value = expr.eval(context).map_err(template_error)?;
    if value.is_undefined() {
        return Err(TemplateError {
            message: format!("`{}` is undefined", expr_text(text)),
            line: None,
        });
    }
    serde_json::to_value(&value).map_err(|e| TemplateError {
        message: format!("the value cannot be represented as JSON: {e}"),
        line: None,
    })
}

/// Evaluates a `when:` condition with Jinja truthiness.
pub fn eval_condition<S: serde::Serialize>(
    env: &Environment<'_>,
    text: &str,
    context: &S,
) -> Result<bool, TemplateError> {
    let expr = env
        .compile_expression(expr_text(text))
        .map_err(template_error)?;
    let value = expr.eval(context).map_err(template_error)?;
    Ok(value.is_true())
}

/// Renders every string inside a JSON value (for `with:` arguments).
pub fn render_json<S: serde::Serialize>(
    env: &Environment<'_>,
    value: &Json,
    context: &S,
) -> Result<Json, TemplateError> {
    Ok(match value {
        Json::String(s) => Json::String(render(env, s, context)?),
        Json::Array(items) => Json::Array(
            items
                .iter()
                .map(|v| render_json(env, v, context))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(env, v, context)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_undefined_is_an_error() {
        let env = environment(None);
        let err = render(
            &env,
            "hi {{ inputs.nmae }}",
            &json!({"inputs": {"name": "x"}}),
        );
        assert!(err.is_err());
    }

    #[test]
    fn reports_variables_as_dotted_paths() {
        let env = environment(None);
        let vars = check(
            &env,
            "{{ inputs.feature }} {{ tasks.design.output.files | join(',') }}",
            false,
        )
        .expect("parses");
        assert!(vars.contains(&"inputs.feature".to_string()), "{vars:?}");
        assert!(
            vars.iter().any(|v| v.starts_with("tasks.design")),
            "{vars:?}"
        );
    }

    #[test]
    fn expressions_with_or_without_braces() {
        let env = environment(None);
        let ctx = json!({"tasks": {"qa": {"status": "succeeded"}}});
        assert!(eval_condition(&env, "{{ tasks.qa.status == 'succeeded' }}", &ctx).expect("eval"));
        assert!(!eval_condition(&env, "tasks.qa.status == 'failed'", &ctx).expect("eval"));
        assert_eq!(
            eval(&env, "{{ [1, 2] }}", &ctx).expect("eval"),
            json!([1, 2])
        );
    }
}
