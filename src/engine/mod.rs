//! The engine: a pure scheduling state machine (`state`) driven by a tokio executor.

pub mod context;
pub mod executor;
pub mod schema_check;
pub mod state;
pub mod work;

pub use executor::{
    execute, new_run_id, run_dir, EngineError, ExecOptions, LlmMode, RunSpec, RunStatus, RunSummary,
};
