//! helix: declarative multi-agent workflows with a durable journal.
//!
//! Data flows one way: `workflow` (load → validate) → `engine` (plan → state machine →
//! executor) → actions on `sandbox`, `scripting`, `tools`; every outcome is an `events::Event`
//! that goes to the `store` journal first and then to the `ui`.

pub mod agents;
pub mod cli;
pub mod codes;
pub mod diagnostic;
pub mod engine;
pub mod events;
pub mod llm;
pub mod memory;
pub mod prompt;
pub mod sandbox;
pub mod scripting;
pub mod store;
pub mod tools;
pub mod ui;
pub mod workflow;
