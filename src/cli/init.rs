//! `helix init`: scaffold a project with an example workflow that validates and runs.

use std::path::Path;

use super::{EXIT_FAILED, EXIT_OK};

const FILES: &[(&str, &str)] = &[
    (
        "workflows/hello.yaml",
        include_str!("../../workflows/hello.yaml"),
    ),
    ("scripts/plan.rhai", include_str!("../../scripts/plan.rhai")),
    (
        "prompts/README.md",
        "Role prompt templates (minijinja) for agents live here.\n",
    ),
];

pub fn init(dir: &Path) -> i32 {
    for (rel, _) in FILES {
        let path = dir.join(rel);
        if path.exists() {
            eprintln!(
                "error: {} already exists; not overwriting anything",
                path.display()
            );
            return EXIT_FAILED;
        }
    }
    for (rel, text) in FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            if let Err(e) = std::fs::create_dir_all(parent) {
                eprintln!("error: cannot create {}: {e}", parent.display());
                return EXIT_FAILED;
            }
        }
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return EXIT_FAILED;
        }
        println!("created {}", path.display());
    }
    let shown = dir.join("workflows/hello.yaml");
    println!("\nnext: helix apply {}", shown.display());
    EXIT_OK
}
