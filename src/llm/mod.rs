//! LLM providers: the seam agent tasks will call through.
//!
//! Only the types live here for now; the providers (openai, anthropic, ollama, scripted,
//! replay) arrive with agent execution.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}
