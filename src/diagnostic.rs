//! A user-facing error that points at a place in a file and renders a caret excerpt.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::codes::Code;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub fn new(line: u32, col: u32) -> Pos {
        Pos { line, col }
    }
}

/// One problem found in a file: what, where, and how to fix it.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub file: PathBuf,
    pub pos: Option<Pos>,
    /// How many characters the caret underlines; 1 when unknown.
    pub width: usize,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(code: Code, file: &Path, pos: Option<Pos>, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            file: file.to_path_buf(),
            pos,
            width: 1,
            help: None,
            notes: Vec::new(),
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn with_width(mut self, width: usize) -> Self {
        self.width = width.max(1);
        self
    }

    /// `file:line:col`, or just the file when the position is unknown.
    pub fn location(&self) -> String {
        match self.pos {
            Some(p) => format!("{}:{}:{}", self.file.display(), p.line, p.col),
            None => self.file.display().to_string(),
        }
    }

    /// Renders the diagnostic with a caret excerpt of `source` (the file's text, when known).
    pub fn render(&self, source: Option<&str>) -> String {
        let digits = self.pos.map(|p| p.line.to_string().len()).unwrap_or(1);
        self.render_with_gutter(source, digits)
    }

    /// Renders with a gutter `gutter` digits wide, so a report's excerpts line up.
    fn render_with_gutter(&self, source: Option<&str>, gutter: usize) -> String {
        let mut out = String::new();
        let pad = " ".repeat(gutter);
        let _ = writeln!(out, "error[{}]: {}", self.code, self.message);
        let _ = writeln!(out, "{pad}--> {}", self.location());
        let excerpt = self.pos.zip(source).and_then(|(pos, text)| {
            let line = text.lines().nth(pos.line.saturating_sub(1) as usize)?;
            Some((pos, line))
        });
        if let Some((pos, line_text)) = excerpt {
            // Long lines are shown as a window around the column so the caret stays under it.
            let chars: Vec<char> = line_text.chars().collect();
            let col = (pos.col.saturating_sub(1) as usize).min(chars.len());
            let start = col.saturating_sub(60);
            let end = (start + 120).min(chars.len());
            let mut shown: String = chars[start..end].iter().collect();
            let mut indent: String = chars[start..col]
                .iter()
                .map(|&c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            if start > 0 {
                shown.insert(0, '…');
                indent.insert(0, ' ');
            }
            if end < chars.len() {
                shown.push('…');
            }
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{:>gutter$} | {shown}", pos.line);
            let _ = writeln!(out, "{pad} | {indent}{}", "^".repeat(self.width));
        }
        for note in &self.notes {
            let _ = writeln!(out, "{pad} = note: {note}");
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "{pad} = help: {help}");
        }
        out
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: error[{}]: {}",
            self.location(),
            self.code,
            self.message
        )
    }
}

/// A non-empty set of diagnostics for one or more files, with the texts needed to render them.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub diagnostics: Vec<Diagnostic>,
    sources: Vec<(PathBuf, String)>,
}

impl Report {
    pub fn add_source(&mut self, file: &Path, text: &str) {
        if !self.sources.iter().any(|(p, _)| p == file) {
            self.sources.push((file.to_path_buf(), text.to_string()));
        }
    }

    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    pub fn merge(&mut self, other: Report) {
        for (p, t) in other.sources {
            self.add_source(&p, &t);
        }
        self.diagnostics.extend(other.diagnostics);
    }

    pub fn single(diagnostic: Diagnostic) -> Report {
        Report {
            diagnostics: vec![diagnostic],
            sources: Vec::new(),
        }
    }

    /// Sorted by file and position so output is stable, with a count at the end.
    pub fn render(&self) -> String {
        let mut sorted: Vec<&Diagnostic> = self.diagnostics.iter().collect();
        sorted.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
        let gutter = sorted
            .iter()
            .filter_map(|d| d.pos)
            .map(|p| p.line.to_string().len())
            .max()
            .unwrap_or(1);
        let mut out = String::new();
        for d in sorted {
            let text = self
                .sources
                .iter()
                .find(|(p, _)| *p == d.file)
                .map(|(_, t)| t.as_str());
            out.push_str(&d.render_with_gutter(text, gutter));
            out.push('\n');
        }
        let n = self.diagnostics.len();
        let _ = writeln!(out, "{} error{} found", n, if n == 1 { "" } else { "s" });
        out
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Report {}

/// The closest candidate to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_caret_under_the_column() {
        let d = Diagnostic::new(
            Code::UnknownKey,
            Path::new("w.yaml"),
            Some(Pos::new(2, 3)),
            "unknown key `neds`",
        )
        .with_width(4)
        .with_help("did you mean `needs`?");
        let text = d.render(Some("tasks:\n  neds: [a]\n"));
        assert!(text.contains("--> w.yaml:2:3"), "{text}");
        assert!(text.contains("2 |   neds: [a]\n  |   ^^^^"), "{text}");
        assert!(text.contains("help: did you mean `needs`?"), "{text}");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(did_you_mean("neds", ["needs", "when"]), Some("needs"));
        assert_eq!(did_you_mean("zzzzzz", ["needs", "when"]), None);
    }
}
