//! The `fs.*` tools, and the rule that keeps them inside the workspace: a path is relative,
//! has no `..`, and no symlink along it leads outside.
//!
//! The checks run before the file is opened, so a process racing us inside the workspace
//! could swap a checked directory for a symlink in between. `O_NOFOLLOW` closes that gap for
//! the last component; closing it for every component would take `openat2(RESOLVE_BENEATH)`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use super::{Args, ToolContext, ToolError};

/// Larger files are refused by `fs.read` and skipped by `fs.search`: a model gains little
/// from megabytes of text, and they would flood its context.
const READ_LIMIT: u64 = 1024 * 1024;
const MATCH_LIMIT: usize = 200;
/// Long enough for any line of code; keeps a match in minified text from flooding the result.
const MATCH_TEXT_LIMIT: usize = 500;
const LIST_LIMIT: usize = 10_000;

pub(crate) fn read_params() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": { "type": "string", "description": "File path, relative to the workspace." }
        },
        "required": ["path"],
        "additionalProperties": false
    })
}

pub(crate) fn write_params() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": { "type": "string", "description": "File path, relative to the workspace." },
            "content": { "type": "string", "description": "Text to write." },
            "append": {
                "type": "boolean",
                "description": "Add to the end of the file instead of replacing it.",
                "default": false
            }
        },
        "required": ["path", "content"],
        "additionalProperties": false
    })
}

pub(crate) fn list_params() -> Value {
    json!({
        "type": "object",
        "properties": {
            "path": {
                "type": "string",
                "description": "Directory, relative to the workspace.",
                "default": "."
            },
            "recursive": {
                "type": "boolean",
                "description": "Also list the contents of subdirectories.",
                "default": false
            }
        },
        "additionalProperties": false
    })
}

pub(crate) fn search_params() -> Value {
    json!({
        "type": "object",
        "properties": {
            "pattern": { "type": "string", "description": "Plain text to look for (not a regex)." },
            "path": {
                "type": "string",
                "description": "File or directory to search, relative to the workspace.",
                "default": "."
            }
        },
        "required": ["pattern"],
        "additionalProperties": false
    })
}

pub(crate) fn read(args: &Args<'_>, cx: &ToolContext) -> Result<Value, ToolError> {
    let given = args.str("path")?;
    let file = Workspace::of(cx)?.confine(given)?;
    let bytes = read_regular_file(&file.full, given)?;
    Ok(json!({
        "path": file.shown(),
        "content": String::from_utf8_lossy(&bytes),
    }))
}

pub(crate) fn write(args: &Args<'_>, cx: &ToolContext) -> Result<Value, ToolError> {
    let given = args.str("path")?;
    let content = args.str("content")?;
    let append = args.opt_bool("append")?.unwrap_or(false);
    let file = Workspace::of(cx)?.confine(given)?;
    if let Some(parent) = file.full.parent() {
        // `confine` saw no symlink on the existing part of the path, so the directories
        // created here are inside the workspace.
        fs::create_dir_all(parent).map_err(|error| io_error(given, error))?;
    }
    create_file(&file.full, given, append)?
        .write_all(content.as_bytes())
        .map_err(|error| io_error(given, error))?;
    Ok(json!({ "path": file.shown(), "bytes": content.len() }))
}

pub(crate) fn list(args: &Args<'_>, cx: &ToolContext) -> Result<Value, ToolError> {
    let given = args.opt_str("path")?.unwrap_or(".");
    let recursive = args.opt_bool("recursive")?.unwrap_or(false);
    let dir = Workspace::of(cx)?.confine(given)?;
    let meta = fs::metadata(&dir.full).map_err(|error| io_error(given, error))?;
    if !meta.is_dir() {
        return Err(ToolError::Io(format!("path `{given}` is not a directory")));
    }
    let mut entries = Vec::new();
    let mut truncated = false;
    walk(&dir.full, &dir.relative, recursive, &mut |entry| {
        if entries.len() == LIST_LIMIT {
            truncated = true;
            return Ok(ControlFlow::Break(()));
        }
        entries.push(json!({
            "path": entry.shown(),
            "kind": entry.kind.as_str(),
            "size": entry.size,
        }));
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(json!({ "entries": entries, "truncated": truncated }))
}

pub(crate) fn search(args: &Args<'_>, cx: &ToolContext) -> Result<Value, ToolError> {
    let pattern = args.str("pattern")?;
    if pattern.is_empty() {
        return Err(args.invalid("argument `pattern` must not be empty".to_owned()));
    }
    let given = args.opt_str("path")?.unwrap_or(".");
    let root = Workspace::of(cx)?.confine(given)?;
    let meta = fs::symlink_metadata(&root.full).map_err(|error| io_error(given, error))?;
    let mut search = Search {
        pattern,
        matches: Vec::new(),
        truncated: false,
    };
    if meta.is_dir() {
        walk(&root.full, &root.relative, true, &mut |entry| {
            search.entry(entry)?;
            Ok(if search.truncated {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
    } else {
        search.entry(&Entry::new(root.full, root.relative, &meta))?;
    }
    Ok(json!({ "matches": search.matches, "truncated": search.truncated }))
}

/// The workspace root, canonical so that resolved paths can be compared with it.
struct Workspace {
    root: PathBuf,
}

/// A path the caller gave, checked to stay inside the workspace.
struct Confined {
    /// The caller's path without `.` components, relative to the workspace; shown back to
    /// the caller, so it names what they asked for even when a symlink led elsewhere.
    relative: PathBuf,
    /// Where it is on disk: every component that exists is canonical and not a symlink.
    full: PathBuf,
}

impl Confined {
    fn shown(&self) -> String {
        shown(&self.relative)
    }
}

impl Workspace {
    fn of(cx: &ToolContext) -> Result<Self, ToolError> {
        let root = cx.workspace.canonicalize().map_err(|error| {
            ToolError::Io(format!(
                "workspace `{}` is not accessible: {error}",
                cx.workspace.display()
            ))
        })?;
        Ok(Self { root })
    }

    fn confine(&self, given: &str) -> Result<Confined, ToolError> {
        let denied = |why: String| ToolError::Denied(format!("path `{given}` {why}"));
        let mut parts = Vec::new();
        for component in Path::new(given).components() {
            match component {
                Component::Normal(part) => parts.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(denied(
                        "leaves the workspace: `..` is not allowed".to_owned(),
                    ))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(denied(
                        "is absolute; paths are relative to the workspace".to_owned(),
                    ))
                }
            }
        }
        let relative: PathBuf = parts.iter().collect();

        let mut full = self.root.clone();
        for (index, part) in parts.iter().enumerate() {
            let next = full.join(part);
            let meta = match fs::symlink_metadata(&next) {
                Ok(meta) => meta,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    // Nothing from here on exists yet, so nothing from here on is a symlink.
                    full = next;
                    full.extend(&parts[index + 1..]);
                    break;
                }
                Err(error) => return Err(io_error(given, error)),
            };
            if !meta.file_type().is_symlink() {
                full = next;
                continue;
            }
            let link = shown(&parts[..=index].iter().collect::<PathBuf>());
            full = match fs::canonicalize(&next) {
                Ok(target) if target.starts_with(&self.root) => target,
                Ok(_) => {
                    return Err(denied(format!(
                        "leaves the workspace through symlink `{link}`"
                    )))
                }
                // A dangling link could point anywhere once its target is created.
                Err(error) => {
                    return Err(denied(format!(
                        "goes through symlink `{link}`, whose target cannot be checked: {error}"
                    )))
                }
            };
        }
        Ok(Confined { relative, full })
    }
}

/// Reads a regular file of at most `READ_LIMIT` bytes.
fn read_regular_file(full: &Path, given: &str) -> Result<Vec<u8>, ToolError> {
    let too_large = |size: u64| {
        ToolError::Denied(format!(
            "file `{given}` is {size} bytes; fs.read reads files of at most 1 MiB ({READ_LIMIT} bytes)"
        ))
    };
    // No-follow in case the file became a symlink after it was checked; non-blocking so
    // that a FIFO put in its place cannot make us wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(full)
        .map_err(|error| io_error(given, error))?;
    let meta = file.metadata().map_err(|error| io_error(given, error))?;
    if meta.is_dir() {
        return Err(ToolError::Io(format!("path `{given}` is a directory")));
    }
    if !meta.is_file() {
        return Err(ToolError::Io(format!(
            "path `{given}` is not a regular file"
        )));
    }
    if meta.len() > READ_LIMIT {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that grew since `metadata` from one that fits.
    file.take(READ_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| io_error(given, error))?;
    if bytes.len() as u64 > READ_LIMIT {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Opens `full` for writing without following a symlink planted in its place.
fn create_file(full: &Path, given: &str, append: bool) -> Result<File, ToolError> {
    match fs::symlink_metadata(full) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(ToolError::Denied(format!(
                "path `{given}` is a symlink; fs.write does not write through symlinks"
            )))
        }
        Ok(meta) if meta.is_dir() => {
            return Err(ToolError::Io(format!("path `{given}` is a directory")))
        }
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        // A symlink created since the check above makes the open fail instead of escaping.
        .custom_flags(libc::O_NOFOLLOW)
        .open(full)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => ToolError::Denied(format!(
                "path `{given}` is a symlink; fs.write does not write through symlinks"
            )),
            _ => io_error(given, error),
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    /// Sockets, FIFOs and device nodes: listed, never read.
    Other,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Other => "other",
        }
    }
}

struct Entry {
    full: PathBuf,
    relative: PathBuf,
    kind: Kind,
    /// Zero for anything but a file.
    size: u64,
}

impl Entry {
    /// `meta` must not have followed a symlink, or links would be reported as their targets.
    fn new(full: PathBuf, relative: PathBuf, meta: &fs::Metadata) -> Self {
        let file_type = meta.file_type();
        let kind = if file_type.is_symlink() {
            Kind::Symlink
        } else if file_type.is_dir() {
            Kind::Dir
        } else if file_type.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        let size = if kind == Kind::File { meta.len() } else { 0 };
        Self {
            full,
            relative,
            kind,
            size,
        }
    }

    fn shown(&self) -> String {
        shown(&self.relative)
    }
}

type Visit<'v> = dyn FnMut(&Entry) -> Result<ControlFlow<()>, ToolError> + 'v;

/// Visits the entries under `dir` depth-first with each directory's entries sorted by
/// name, so the order is that of the paths, until `visit` breaks. Symlinked directories
/// are reported but never entered: their contents may lie outside the workspace.
fn walk(
    dir: &Path,
    relative: &Path,
    recursive: bool,
    visit: &mut Visit<'_>,
) -> Result<(), ToolError> {
    walk_dir(dir, relative, recursive, visit).map(|_| ())
}

fn walk_dir(
    dir: &Path,
    relative: &Path,
    recursive: bool,
    visit: &mut Visit<'_>,
) -> Result<ControlFlow<()>, ToolError> {
    let shown_dir = shown(relative);
    let listing_error = |error| io_error(&shown_dir, error);
    let mut children = fs::read_dir(dir)
        .and_then(|children| children.collect::<io::Result<Vec<_>>>())
        .map_err(listing_error)?;
    children.sort_by_key(|child| child.file_name());
    for child in children {
        // `DirEntry::metadata` does not follow symlinks.
        let meta = child.metadata().map_err(listing_error)?;
        let entry = Entry::new(child.path(), relative.join(child.file_name()), &meta);
        if visit(&entry)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
        if recursive
            && entry.kind == Kind::Dir
            && walk_dir(&entry.full, &entry.relative, true, visit)?.is_break()
        {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

struct Search<'p> {
    pattern: &'p str,
    matches: Vec<Value>,
    truncated: bool,
}

impl Search<'_> {
    /// Collects the matches in `entry`, setting `truncated` once there are too many.
    fn entry(&mut self, entry: &Entry) -> Result<(), ToolError> {
        if entry.kind != Kind::File || entry.size > READ_LIMIT {
            return Ok(());
        }
        let shown = entry.shown();
        let bytes = read_regular_file(&entry.full, &shown)?;
        // A NUL byte means binary data, where a "line" means nothing.
        if bytes.contains(&0) {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&bytes);
        for (index, line) in text.lines().enumerate() {
            if !line.contains(self.pattern) {
                continue;
            }
            if self.matches.len() == MATCH_LIMIT {
                self.truncated = true;
                return Ok(());
            }
            self.matches.push(json!({
                "path": shown,
                "line": index + 1,
                "text": clip(line),
            }));
        }
        Ok(())
    }
}

fn clip(line: &str) -> String {
    match line.char_indices().nth(MATCH_TEXT_LIMIT) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

/// A workspace-relative path as the caller sees it; the workspace itself is `.`.
fn shown(relative: &Path) -> String {
    if relative.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        relative.to_string_lossy().into_owned()
    }
}

fn io_error(path: &str, error: io::Error) -> ToolError {
    match error.kind() {
        io::ErrorKind::NotFound => ToolError::Io(format!("path `{path}` does not exist")),
        _ => ToolError::Io(format!("path `{path}`: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::call_builtin;
    use std::os::unix::fs::symlink;

    /// A workspace with a sibling directory outside it that symlinks can point at.
    struct Fixture {
        _tmp: tempfile::TempDir,
        cx: ToolContext,
        outside: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().expect("tempdir");
            let workspace = tmp.path().join("ws");
            let outside = tmp.path().join("outside");
            fs::create_dir(&workspace).expect("create workspace");
            fs::create_dir(&outside).expect("create outside");
            fs::write(outside.join("secret.txt"), "secret").expect("write secret");
            Self {
                _tmp: tmp,
                cx: ToolContext { workspace },
                outside,
            }
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.cx.workspace.join(relative)
        }

        fn file(&self, relative: &str, content: &str) {
            let path = self.path(relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("create parent");
            }
            fs::write(path, content).expect("write fixture file");
        }

        fn link(&self, relative: &str, target: &Path) {
            symlink(target, self.path(relative)).expect("create symlink");
        }

        fn call(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
            call_builtin(tool, &args, &self.cx)
        }

        fn ok(&self, tool: &str, args: Value) -> Value {
            match self.call(tool, args) {
                Ok(value) => value,
                Err(error) => panic!("{tool} failed: {error}"),
            }
        }

        /// Calls a tool that must be refused and returns the refusal.
        fn denied(&self, tool: &str, args: Value) -> String {
            match self.call(tool, args) {
                Err(ToolError::Denied(message)) => message,
                other => panic!("expected {tool} to be denied, got {other:?}"),
            }
        }
    }

    fn paths(listing: &Value) -> Vec<&str> {
        listing["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter_map(|entry| entry["path"].as_str())
            .collect()
    }

    #[test]
    fn read_returns_the_content() {
        let fx = Fixture::new();
        fx.file("notes/a.txt", "hello\n");
        let read = fx.ok("fs.read", json!({"path": "./notes/a.txt"}));
        assert_eq!(read, json!({"path": "notes/a.txt", "content": "hello\n"}));
    }

    #[test]
    fn read_decodes_invalid_utf8_lossily() {
        let fx = Fixture::new();
        fs::write(fx.path("bin"), b"a\xffb").expect("write");
        let read = fx.ok("fs.read", json!({"path": "bin"}));
        assert_eq!(read["content"], "a\u{FFFD}b");
    }

    #[test]
    fn read_refuses_files_over_one_mebibyte() {
        let fx = Fixture::new();
        let file = File::create(fx.path("big")).expect("create");
        file.set_len(READ_LIMIT + 1).expect("grow");
        let message = fx.denied("fs.read", json!({"path": "big"}));
        assert_eq!(
            message,
            "file `big` is 1048577 bytes; fs.read reads files of at most 1 MiB (1048576 bytes)"
        );
    }

    #[test]
    fn read_of_a_missing_file_names_it() {
        let fx = Fixture::new();
        match fx.call("fs.read", json!({"path": "nope.txt"})) {
            Err(ToolError::Io(message)) => assert_eq!(message, "path `nope.txt` does not exist"),
            other => panic!("expected an i/o error, got {other:?}"),
        }
    }

    #[test]
    fn write_creates_parent_directories_and_appends_on_request() {
        let fx = Fixture::new();
        let written = fx.ok("fs.write", json!({"path": "a/b/c.txt", "content": "one\n"}));
        assert_eq!(written, json!({"path": "a/b/c.txt", "bytes": 4}));
        fx.ok(
            "fs.write",
            json!({"path": "a/b/c.txt", "content": "two\n", "append": true}),
        );
        assert_eq!(
            fs::read_to_string(fx.path("a/b/c.txt")).expect("read"),
            "one\ntwo\n"
        );
        fx.ok("fs.write", json!({"path": "a/b/c.txt", "content": "new"}));
        assert_eq!(
            fs::read_to_string(fx.path("a/b/c.txt")).expect("read"),
            "new"
        );
    }

    #[test]
    fn list_is_sorted_and_recursion_is_opt_in() {
        let fx = Fixture::new();
        fx.file("b.txt", "12345");
        fx.file("a/inner.txt", "");
        fx.file("a-b.txt", "");
        let listing = fx.ok("fs.list", json!({}));
        assert_eq!(paths(&listing), ["a", "a-b.txt", "b.txt"]);
        assert_eq!(listing["entries"][0]["kind"], "dir");
        assert_eq!(
            listing["entries"][2],
            json!({"path": "b.txt", "kind": "file", "size": 5})
        );
        assert_eq!(listing["truncated"], false);

        let listing = fx.ok("fs.list", json!({"recursive": true}));
        assert_eq!(paths(&listing), ["a", "a/inner.txt", "a-b.txt", "b.txt"]);
        let listing = fx.ok("fs.list", json!({"path": "a"}));
        assert_eq!(paths(&listing), ["a/inner.txt"]);
    }

    #[test]
    fn list_reports_symlinks_without_entering_them() {
        let fx = Fixture::new();
        fx.link("out", &fx.outside);
        let listing = fx.ok("fs.list", json!({"recursive": true}));
        assert_eq!(
            listing["entries"],
            json!([{"path": "out", "kind": "symlink", "size": 0}])
        );
    }

    #[test]
    fn search_reports_path_line_and_text() {
        let fx = Fixture::new();
        fx.file("src/main.rs", "fn main() {\n    todo!()\n}\n");
        fx.file("notes.md", "todo: tests\n");
        fs::write(fx.path("blob"), b"todo\0").expect("write binary");
        let found = fx.ok("fs.search", json!({"pattern": "todo"}));
        assert_eq!(
            found["matches"],
            json!([
                {"path": "notes.md", "line": 1, "text": "todo: tests"},
                {"path": "src/main.rs", "line": 2, "text": "    todo!()"},
            ])
        );
        let found = fx.ok("fs.search", json!({"pattern": "todo", "path": "notes.md"}));
        assert_eq!(found["matches"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn search_stops_at_the_match_limit() {
        let fx = Fixture::new();
        fx.file("many.txt", &"hit\n".repeat(MATCH_LIMIT + 50));
        let found = fx.ok("fs.search", json!({"pattern": "hit"}));
        assert_eq!(found["matches"].as_array().map(Vec::len), Some(MATCH_LIMIT));
        assert_eq!(found["truncated"], true);
    }

    #[test]
    fn absolute_paths_are_refused() {
        let fx = Fixture::new();
        let inside = fx.path("x.txt").to_string_lossy().into_owned();
        let message = fx.denied("fs.write", json!({"path": inside, "content": ""}));
        assert!(message.ends_with("is absolute; paths are relative to the workspace"));
        let message = fx.denied("fs.read", json!({"path": "/etc/passwd"}));
        assert_eq!(
            message,
            "path `/etc/passwd` is absolute; paths are relative to the workspace"
        );
    }

    #[test]
    fn parent_components_are_refused() {
        let fx = Fixture::new();
        fx.file("a/x.txt", "");
        let message = fx.denied("fs.read", json!({"path": "../outside/secret.txt"}));
        assert_eq!(
            message,
            "path `../outside/secret.txt` leaves the workspace: `..` is not allowed"
        );
        fx.denied("fs.read", json!({"path": "a/../a/x.txt"}));
        fx.denied("fs.write", json!({"path": "../x", "content": ""}));
        fx.denied("fs.list", json!({"path": ".."}));
        fx.denied("fs.search", json!({"pattern": "s", "path": "a/.."}));
        assert!(!fx.outside.join("x").exists());
    }

    #[test]
    fn a_symlinked_directory_leading_outside_is_refused() {
        let fx = Fixture::new();
        fx.link("out", &fx.outside);
        let message = fx.denied("fs.read", json!({"path": "out/secret.txt"}));
        assert_eq!(
            message,
            "path `out/secret.txt` leaves the workspace through symlink `out`"
        );
        fx.denied("fs.write", json!({"path": "out/new.txt", "content": "x"}));
        fx.denied(
            "fs.write",
            json!({"path": "out/deeper/new.txt", "content": "x"}),
        );
        fx.denied("fs.list", json!({"path": "out"}));
        fx.denied("fs.search", json!({"pattern": "secret", "path": "out"}));
        assert!(!fx.outside.join("new.txt").exists());
        assert!(!fx.outside.join("deeper").exists());
    }

    #[test]
    fn a_symlinked_file_leading_outside_is_refused_for_read_and_write() {
        let fx = Fixture::new();
        fx.link("secret.txt", &fx.outside.join("secret.txt"));
        fx.denied("fs.read", json!({"path": "secret.txt"}));
        let message = fx.denied(
            "fs.write",
            json!({"path": "secret.txt", "content": "owned"}),
        );
        assert_eq!(
            message,
            "path `secret.txt` leaves the workspace through symlink `secret.txt`"
        );
        let secret = fs::read_to_string(fx.outside.join("secret.txt")).expect("read");
        assert_eq!(secret, "secret");
    }

    #[test]
    fn a_dangling_symlink_is_not_written_through() {
        let fx = Fixture::new();
        let target = fx.outside.join("planted.txt");
        fx.link("planted.txt", &target);
        let message = fx.denied("fs.write", json!({"path": "planted.txt", "content": "x"}));
        assert!(
            message.starts_with(
                "path `planted.txt` goes through symlink `planted.txt`, whose target cannot be checked"
            ),
            "{message}"
        );
        assert!(!target.exists());
    }

    #[test]
    fn the_final_open_does_not_follow_a_symlink_planted_after_the_check() {
        let fx = Fixture::new();
        let target = fx.outside.join("planted.txt");
        fx.link("planted.txt", &target);
        // Called directly: `confine` would already have refused this path.
        let error = create_file(&fx.path("planted.txt"), "planted.txt", false)
            .expect_err("a symlink must not be opened for writing");
        assert_eq!(
            error.to_string(),
            "path `planted.txt` is a symlink; fs.write does not write through symlinks"
        );
        assert!(!target.exists());
    }

    #[test]
    fn symlinks_that_stay_inside_the_workspace_are_followed() {
        let fx = Fixture::new();
        fx.file("real/a.txt", "inside");
        fx.link("alias", &fx.path("real"));
        let read = fx.ok("fs.read", json!({"path": "alias/a.txt"}));
        assert_eq!(read, json!({"path": "alias/a.txt", "content": "inside"}));
        let listing = fx.ok("fs.list", json!({"path": "alias"}));
        assert_eq!(paths(&listing), ["alias/a.txt"]);
    }

    #[test]
    fn a_workspace_reached_through_a_symlink_still_works() {
        let fx = Fixture::new();
        fx.file("a.txt", "x");
        let alias = fx.outside.join("ws-alias");
        symlink(&fx.cx.workspace, &alias).expect("symlink");
        let cx = ToolContext { workspace: alias };
        let read = call_builtin("fs.read", &json!({"path": "a.txt"}), &cx).expect("read");
        assert_eq!(read["content"], "x");
    }

    #[test]
    fn an_empty_search_pattern_is_invalid() {
        let fx = Fixture::new();
        match fx.call("fs.search", json!({"pattern": ""})) {
            Err(ToolError::InvalidArgs { message, .. }) => {
                assert_eq!(message, "argument `pattern` must not be empty")
            }
            other => panic!("expected invalid arguments, got {other:?}"),
        }
    }
}
