//! Per-model limits: how many calls may be in flight and how many may start per minute,
//! shared by every agent of a run that uses the model (local models and rate-limited
//! accounts cannot take a 100-wide fan-out at once).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::{BoxFuture, ChatRequest, ChatResponse, LlmError, Provider};

pub struct Limited {
    inner: Arc<dyn Provider>,
    in_flight: Option<Semaphore>,
    /// Earliest start of the next call, for `rpm`.
    next_start: Mutex<Instant>,
    interval: Option<Duration>,
}

impl Limited {
    /// Wraps `inner` when a limit is set; returns it unchanged otherwise.
    pub fn wrap(
        inner: Arc<dyn Provider>,
        concurrency: Option<usize>,
        rpm: Option<u32>,
    ) -> Arc<dyn Provider> {
        if concurrency.is_none() && rpm.is_none() {
            return inner;
        }
        Arc::new(Limited {
            inner,
            in_flight: concurrency.map(|n| Semaphore::new(n.max(1))),
            next_start: Mutex::new(Instant::now()),
            interval: rpm.map(|r| Duration::from_secs(60) / r.max(1)),
        })
    }
}

impl Provider for Limited {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(async move {
            let _permit = match &self.in_flight {
                Some(s) => Some(
                    s.acquire()
                        .await
                        .map_err(|_| LlmError::Scripted("model limiter closed".into()))?,
                ),
                None => None,
            };
            if let Some(interval) = self.interval {
                // Reserve a start slot, then wait for it outside the lock.
                let start = {
                    let mut next = self.next_start.lock().await;
                    let start = (*next).max(Instant::now());
                    *next = start + interval;
                    start
                };
                tokio::time::sleep_until(start).await;
            }
            self.inner.chat(request, on_token).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers after a short delay and records the most calls it saw at once.
    struct Slow {
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    impl Provider for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn chat<'a>(
            &'a self,
            _: &'a ChatRequest,
            _: Option<&'a (dyn Fn(&str) + Send + Sync)>,
        ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
            Box::pin(async move {
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                Ok(ChatResponse {
                    content: "ok".into(),
                    tool_calls: Vec::new(),
                    usage: Usage::default(),
                    finish_reason: "stop".into(),
                })
            })
        }
    }

    #[tokio::test]
    async fn concurrency_caps_calls_in_flight() {
        let slow = Arc::new(Slow {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let limited = Limited::wrap(slow.clone(), Some(2), None);
        let request = ChatRequest::default();
        let calls = (0..8).map(|_| limited.chat(&request, None));
        for r in futures_util::future::join_all(calls).await {
            assert!(r.is_ok());
        }
        assert_eq!(slow.peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn rpm_spaces_call_starts() {
        let slow = Arc::new(Slow {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let limited = Limited::wrap(slow, None, Some(600));
        let request = ChatRequest::default();
        let t0 = Instant::now();
        let calls = (0..3).map(|_| limited.chat(&request, None));
        futures_util::future::join_all(calls).await;
        // Three starts 100 ms apart: the last starts at 200 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
    }
}
