//! The crate's shape, checked on every test run: each module imports only
//! from the layers below it (docs/architecture.md, "Layers"), and no
//! function grows past 100 lines. Reads the source as text; a `crate::X`
//! anywhere outside a comment counts as an import of `X`.

use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first. A module may use its own
/// layer's code only inside itself, and any lower layer's.
const LAYERS: &[&[&str]] = &[
    &["config"],
    &["model", "logging"],
    &["balance", "health", "affinity"],
    &["proxy"],
    &["control"],
    &["admin", "shared", "dns"],
    &["server"],
    &["cli"],
];

/// Longest function body allowed, in lines from `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 100;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`src/proxy/pump.rs` → `proxy`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The text of a line without its comment (good enough for this code base:
/// no `//` inside string literals of the import lines that matter).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) if !line[..i].contains('"') => &line[..i],
        Some(_) => line,
        None => line,
    }
}

/// Every top-level module named after `crate::` on a line.
fn crate_references(line: &str) -> Vec<String> {
    code(line)
        .match_indices("crate::")
        .filter(|(i, _)| !code(line)[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, _)| {
            code(line)[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn crate_sources() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    (src, files)
}

#[test]
fn every_module_imports_only_from_the_layers_below_it() {
    let (src, files) = crate_sources();
    let mut checked = 0;
    let mut uphill = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let own = layer_of(&module).unwrap_or_else(|| panic!("module {module} is in no layer of LAYERS"));
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for target in crate_references(line) {
                checked += 1;
                if target == module {
                    continue;
                }
                let Some(theirs) = layer_of(&target) else {
                    panic!("{}:{}: crate::{target} is in no layer of LAYERS", file.display(), n + 1);
                };
                if theirs >= own {
                    uphill.push(format!("{}:{}: {module} uses {target}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} references found: is the scan still reading the code?"
    );
    assert!(
        uphill.is_empty(),
        "imports that do not point down:\n{}",
        uphill.join("\n")
    );
}

#[test]
fn the_scan_sees_an_upward_import() {
    assert_eq!(
        crate_references("use crate::proxy::DataPlane; // crate::admin"),
        ["proxy"]
    );
    assert_eq!(
        crate_references("    let x = crate::balance::compile(c, None);"),
        ["balance"]
    );
    assert!(crate_references("/// see `crate::control`").is_empty());
    assert!(crate_references("use protobalance::crate_like::x;").is_empty());
}

/// The length of each function: from its `fn` line to the first line after
/// it that closes a brace at the same indentation (rustfmt's layout).
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let signature = trimmed
            .split_once("fn ")
            .filter(|(before, _)| {
                before
                    .split_whitespace()
                    .all(|w| ["pub", "pub(crate)", "pub(super)", "async", "const", "unsafe"].contains(&w))
            })
            .map(|(_, after)| after);
        let Some(signature) = signature else { continue };
        let name: String = signature
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{}}}", " ".repeat(indent));
        let Some(end) = lines[i + 1..].iter().position(|l| l.starts_with(&close)) else {
            continue; // a signature without a body (trait method)
        };
        // A body that ends with a `;`-terminated signature found the next item's brace.
        if lines[i..=i + end]
            .iter()
            .any(|l| l.trim_end().ends_with(';') && l.contains("fn "))
        {
            continue;
        }
        let length = end + 2;
        if length > MAX_FUNCTION_LINES {
            found.push((i + 1, name, length));
        }
    }
    found
}

#[test]
fn no_function_is_longer_than_a_hundred_lines() {
    let (_, files) = crate_sources();
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, name, length) in long_functions(&text) {
            long.push(format!("{}:{line}: fn {name} is {length} lines", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_check_sees_a_long_function() {
    let body = "    let x = 1;\n".repeat(MAX_FUNCTION_LINES);
    let text = format!("pub fn short() {{\n}}\n\nfn long() {{\n{body}}}\n");
    let found = long_functions(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].1, "long");
}
