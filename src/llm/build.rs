//! From a workflow's `models:` entry to a provider: which wire format, which endpoint, which
//! key, which limits.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use super::anthropic::{self, Anthropic};
use super::cassette::Replay;
use super::http::{ApiKey, HttpOptions};
use super::openai::{self, OpenAi};
use super::scripted::Scripted;
use super::{LlmError, Provider};
use crate::workflow::units::parse_duration;
use crate::workflow::ModelDecl;

/// The provider a model declaration describes, with keys and base URLs read from the
/// process environment. `scripted` and `replay` files are relative to `workflow_dir`.
pub fn provider(model: &ModelDecl, workflow_dir: &Path) -> Result<Arc<dyn Provider>, LlmError> {
    provider_with_env(model, workflow_dir, &|name| std::env::var(name).ok())
}

/// [`provider`], with the environment read through `env`: tests and embedders pass their
/// own rather than change the process's.
pub fn provider_with_env(
    model: &ModelDecl,
    workflow_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn Provider>, LlmError> {
    // An empty variable is as good as unset: `OPENAI_API_KEY= helix …` must not send "".
    let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    let settings = Settings(&model.settings);
    match model.provider.as_str() {
        "openai" | "ollama" => {
            let ollama = model.provider == "ollama";
            let base_url = match settings.text("base_url") {
                Some(url) => url.to_string(),
                None if ollama => openai::OLLAMA_BASE_URL.to_string(),
                None => env(openai::BASE_URL_ENV)
                    .unwrap_or_else(|| openai::DEFAULT_BASE_URL.to_string()),
            };
            let (key, key_env) = if ollama {
                // A local server needs no key, and the OpenAI key must not go to it; one is
                // sent only when the model names its variable.
                match settings.text("api_key_env") {
                    Some(name) => (env(name), name.to_string()),
                    None => (None, "`api_key_env` (no key was sent)".to_string()),
                }
            } else {
                let name = settings.text("api_key_env").unwrap_or(openai::KEY_ENV);
                (env(name), name.to_string())
            };
            // OpenAI itself always wants a key; a compatible server elsewhere may not.
            if key.is_none() && !ollama && base_url == openai::DEFAULT_BASE_URL {
                return Err(LlmError::MissingKey(key_env));
            }
            let name = model_name(model)?;
            let mut provider = if ollama {
                OpenAi::ollama(base_url, name)
            } else {
                OpenAi::new(base_url, name)
            }
            .with_key(key.map(ApiKey::new), key_env)
            .with_http(settings.http()?);
            provider.temperature = settings.temperature();
            provider.max_tokens = settings.max_tokens();
            Ok(Arc::new(provider))
        }
        "anthropic" => {
            let base_url = match settings.text("base_url") {
                Some(url) => url.to_string(),
                None => env(anthropic::BASE_URL_ENV)
                    .unwrap_or_else(|| anthropic::DEFAULT_BASE_URL.to_string()),
            };
            let key_env = settings.text("api_key_env").unwrap_or(anthropic::KEY_ENV);
            let key = env(key_env);
            if key.is_none() && base_url == anthropic::DEFAULT_BASE_URL {
                return Err(LlmError::MissingKey(key_env.to_string()));
            }
            let mut provider = Anthropic::new(base_url, model_name(model)?)
                .with_key(key.map(ApiKey::new), key_env)
                .with_http(settings.http()?);
            provider.temperature = settings.temperature();
            provider.max_tokens = settings.max_tokens();
            Ok(Arc::new(provider))
        }
        "scripted" => {
            let file = settings.text("file").ok_or_else(|| {
                LlmError::Scripted("the `scripted` provider needs `file`: a replies file".into())
            })?;
            Ok(Arc::new(Scripted::load(&workflow_dir.join(file))?))
        }
        "replay" => {
            let file = settings.text("file").ok_or_else(|| {
                LlmError::Scripted(
                    "the `replay` provider needs `file`: a cassette written by \
                     `helix apply --record`"
                        .into(),
                )
            })?;
            Ok(Arc::new(Replay::load(&workflow_dir.join(file))?))
        }
        other => Err(LlmError::Scripted(format!(
            "unknown provider `{other}` (expected openai, anthropic, ollama, scripted or replay)"
        ))),
    }
}

fn model_name(model: &ModelDecl) -> Result<String, LlmError> {
    match model.model.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(LlmError::Scripted(format!(
            "the `{}` provider needs `model`: the model's name at the provider",
            model.provider
        ))),
    }
}

/// The timeout and retries a model's settings ask for (for other clients of its server,
/// such as an embedder).
pub fn http_options(settings: &Json) -> Result<HttpOptions, LlmError> {
    Settings(settings).http()
}

/// The model's YAML mapping as JSON. Validation has checked the types; anything else here
/// is ignored rather than guessed at.
struct Settings<'a>(&'a Json);

impl Settings<'_> {
    fn text(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)?
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    fn temperature(&self) -> Option<f64> {
        self.0.get("temperature")?.as_f64()
    }

    fn max_tokens(&self) -> Option<u32> {
        let n = self.0.get("max_tokens")?.as_u64()?;
        Some(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn http(&self) -> Result<HttpOptions, LlmError> {
        let mut options = HttpOptions::default();
        let text = match self.0.get("timeout") {
            None | Some(Json::Null) => return Ok(options),
            Some(Json::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        };
        options.timeout = parse_duration(&text)
            .map_err(|e| LlmError::Scripted(format!("invalid model `timeout`: {e}")))?;
        if options.timeout.is_zero() {
            return Err(LlmError::Scripted(
                "a model `timeout` of zero would fail every call".into(),
            ));
        }
        Ok(options)
    }
}
