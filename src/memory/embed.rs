//! Embedders: what turns a memory's text into the vector it is stored and searched by.
//!
//! `HashEmbedder` needs no model and no network; `OpenAiEmbedder` calls an
//! OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, Ollama, vLLM, llama.cpp, …).

use reqwest::header::AUTHORIZATION;
use serde::Deserialize;
use serde_json::json;

use super::{BoxFuture, MemoryError};
use crate::llm::http::{self, ApiKey, HttpOptions, Post, ReadError};

/// The dimension of the built-in embedder unless another is asked for.
pub const DEFAULT_DIM: usize = 384;

/// Texts per request to an embeddings endpoint; OpenAI accepts up to 2048 inputs, smaller
/// local servers much fewer.
const DEFAULT_BATCH: usize = 64;

/// A source of embeddings. A store records the `id` and `dim` of the embedder that filled
/// it, since vectors of different embedders cannot be compared.
pub trait Embedder: Send + Sync {
    /// Names the embedder and everything that changes its vectors (model, version).
    fn id(&self) -> String;

    fn dim(&self) -> usize;

    /// One vector of `dim()` numbers per text, in order.
    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, MemoryError>>;
}

/// Feature hashing of words, word pairs and character trigrams, computed locally.
///
/// It captures lexical overlap, not meaning: texts that share words (or parts of words,
/// through the trigrams, so `timeout` is near `timeouts`) are near; synonyms are not
/// (`car` and `automobile` share nothing). It is deterministic across runs and platforms
/// (FNV-1a, not the std hasher), so stored vectors stay valid.
#[derive(Debug, Clone)]
pub struct HashEmbedder {
    dim: usize,
}

/// Feature weights: whole words carry most of the meaning, trigrams soften inflection and
/// typos, pairs reward shared phrases.
const WORD_WEIGHT: f32 = 1.0;
const PAIR_WEIGHT: f32 = 0.7;
const TRIGRAM_WEIGHT: f32 = 0.35;

impl Default for HashEmbedder {
    fn default() -> HashEmbedder {
        HashEmbedder::new(DEFAULT_DIM)
    }
}

impl HashEmbedder {
    /// `dim` is clamped to at least 8.
    pub fn new(dim: usize) -> HashEmbedder {
        HashEmbedder { dim: dim.max(8) }
    }

    /// The vector of one text: L2-normalized, or all zeros for a text without a letter,
    /// digit or symbol.
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let mut features: Vec<(String, f32)> = Vec::new();
        for word in &words {
            features.push((format!("w\u{1}{word}"), WORD_WEIGHT));
            let padded: Vec<char> = std::iter::once('^')
                .chain(word.chars())
                .chain(std::iter::once('$'))
                .collect();
            for gram in padded.windows(3) {
                let gram: String = gram.iter().collect();
                features.push((format!("c\u{1}{gram}"), TRIGRAM_WEIGHT));
            }
        }
        for pair in words.windows(2) {
            features.push((format!("b\u{1}{}\u{1}{}", pair[0], pair[1]), PAIR_WEIGHT));
        }
        if words.is_empty() {
            // Only punctuation: its trigrams still tell `???` from `!!!`.
            let chars: Vec<char> = lower.chars().filter(|c| !c.is_whitespace()).collect();
            for gram in chars.windows(3.min(chars.len().max(1))) {
                let gram: String = gram.iter().collect();
                features.push((format!("c\u{1}{gram}"), TRIGRAM_WEIGHT));
            }
        }
        // Sublinear term frequency: a word said five times is not five times the topic.
        features.sort_by(|a, b| a.0.cmp(&b.0));
        let mut vector = vec![0f32; self.dim];
        let mut i = 0;
        while i < features.len() {
            let (name, weight) = &features[i];
            let count = features[i..].iter().take_while(|f| &f.0 == name).count();
            let hash = fnv1a(name.as_bytes());
            let slot = (hash % self.dim as u64) as usize;
            let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
            vector[slot] += sign * weight * (1.0 + (count as f32).ln());
            i += count;
        }
        normalize(&mut vector);
        vector
    }
}

impl Embedder for HashEmbedder {
    fn id(&self) -> String {
        "helix-hash-v1".to_string()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, MemoryError>> {
        Box::pin(async move { Ok(texts.iter().map(|t| self.vector(t)).collect()) })
    }
}

/// 64-bit FNV-1a: fixed, so vectors are the same on every platform and build.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Scales `v` to unit length; a zero vector stays zero.
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// An embedding model behind an OpenAI-compatible `/embeddings` endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    /// Up to and including `/v1`, as for chat models.
    pub base_url: String,
    pub model: String,
    pub dim: usize,
    pub api_key: Option<ApiKey>,
    /// Named in errors about the key, never the key itself.
    pub key_env: String,
    pub http: HttpOptions,
    /// Texts per request.
    pub batch: usize,
}

impl OpenAiEmbedder {
    /// `model` at `base_url`, producing `dim`-dimensional vectors, with the key read from
    /// the environment variable `key_env` if it is set (local servers need none).
    pub fn new(
        base_url: &str,
        model: impl Into<String>,
        dim: usize,
        key_env: impl Into<String>,
    ) -> OpenAiEmbedder {
        let key_env = key_env.into();
        let api_key = std::env::var(&key_env)
            .ok()
            .filter(|k| !k.is_empty())
            .map(ApiKey::new);
        OpenAiEmbedder {
            base_url: http::trim_base_url(base_url),
            model: model.into(),
            dim,
            api_key,
            key_env,
            http: HttpOptions::default(),
            batch: DEFAULT_BATCH,
        }
    }

    pub fn with_http(mut self, http: HttpOptions) -> OpenAiEmbedder {
        self.http = http;
        self
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, MemoryError> {
        let body = json!({ "model": self.model, "input": texts, "encoding_format": "float" });
        let mut headers = http::json_headers(false);
        if let Some(key) = &self.api_key {
            headers.insert(AUTHORIZATION, key.header("Bearer ", &self.key_env)?);
        }
        let post = Post {
            base_url: &self.base_url,
            url: format!("{}/embeddings", self.base_url),
            headers,
            body: body.to_string().into_bytes(),
            stream: false,
            model: &self.model,
            key_env: &self.key_env,
            key: self.api_key.as_ref(),
        };
        let expected = texts.len();
        let reply: EmbeddingsReply = http::send_with_retry(&self.http, &post, |reply| async {
            let parsed: EmbeddingsReply = reply.json().await?;
            if parsed.data.len() != expected {
                return Err(ReadError::Malformed(format!(
                    "{} embeddings for {expected} inputs",
                    parsed.data.len()
                )));
            }
            Ok(parsed)
        })
        .await?;
        let mut data = reply.data;
        data.sort_by_key(|d| d.index);
        let mut vectors = Vec::with_capacity(data.len());
        for item in data {
            if item.embedding.len() != self.dim {
                return Err(MemoryError::EmbeddingShape {
                    endpoint: self.base_url.clone(),
                    model: self.model.clone(),
                    expected: self.dim,
                    got: item.embedding.len(),
                });
            }
            vectors.push(item.embedding);
        }
        Ok(vectors)
    }
}

#[derive(Deserialize)]
struct EmbeddingsReply {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: usize,
    embedding: Vec<f32>,
}

impl Embedder for OpenAiEmbedder {
    fn id(&self) -> String {
        format!("openai:{}", self.model)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, MemoryError>> {
        Box::pin(async move {
            let mut vectors = Vec::with_capacity(texts.len());
            for batch in texts.chunks(self.batch.max(1)) {
                vectors.extend(self.embed_batch(batch).await?);
            }
            Ok(vectors)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn hash_vectors_are_unit_length_and_deterministic() {
        let e = HashEmbedder::default();
        let v = e.vector("Retry the flaky network test with a longer timeout");
        assert_eq!(v.len(), 384);
        assert!((cosine(&v, &v) - 1.0).abs() < 1e-5);
        assert_eq!(
            v,
            e.vector("Retry the flaky network test with a longer timeout")
        );
        // Pinned: a change of hashing would silently invalidate every stored vector.
        let nonzero: Vec<usize> = e
            .vector("cargo")
            .iter()
            .enumerate()
            .filter(|(_, x)| **x != 0.0)
            .map(|(i, _)| i)
            .collect();
        // One word and five trigrams (`^ca`, `car`, `arg`, `rgo`, `go$`).
        assert_eq!(nonzero, [129, 135, 215, 281, 283, 365]);
        assert_eq!(fnv1a(b"hello"), 0xa430_d846_80aa_bd0b);
    }

    #[test]
    fn shared_words_score_higher_than_unrelated_text() {
        let e = HashEmbedder::default();
        let query = e.vector("database migration failed");
        let related = e.vector("The database migration failed on a locked table");
        let unrelated = e.vector("Lunch menu for the team offsite");
        assert!(cosine(&query, &related) > 0.4);
        assert!(cosine(&query, &unrelated) < 0.15);
        assert!(cosine(&e.vector("timeouts"), &e.vector("timeout")) > 0.3);
    }

    #[test]
    fn case_and_punctuation_do_not_matter_and_blank_text_is_zero() {
        let e = HashEmbedder::default();
        assert_eq!(e.vector("Fix the BUILD!"), e.vector("fix the build"));
        assert!(e.vector("   ").iter().all(|x| *x == 0.0));
        assert!(e.vector("???").iter().any(|x| *x != 0.0));
    }
}
