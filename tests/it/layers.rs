//! The layer order of ARCHITECTURE.md holds: every `crate::` path in a file
//! under `src/` names a module below the file's own, so no two modules
//! import each other, directly or round a circle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The order written in ARCHITECTURE.md, bottom first.
fn written_order() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let start = text.find("<!-- layers -->").expect("ARCHITECTURE.md marks the layer order") + "<!-- layers -->".len();
    let end = text[start..].find("<!-- /layers -->").unwrap() + start;
    text[start..end].split('`').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Every `.rs` file under `dir`.
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

/// The modules a source text names through `crate::`, including grouped
/// imports (`use crate::{a, b::C}`).
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let close = group.find('}').unwrap_or(group.len());
            for item in group[..close].split(',') {
                let item = item.trim();
                let module: String = item.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !module.is_empty() {
                    names.insert(module);
                }
            }
        } else {
            let module: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            names.insert(module);
        }
    }
    names
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let order = written_order();
    let rank = |m: &str| order.iter().position(|o| o == m);
    let src = root().join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect();
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(declared, listed, "lib.rs's modules and ARCHITECTURE.md's layer order must name the same modules");

    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let own =
            relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if own == "lib" || own == "main" {
            continue;
        }
        let own_rank = rank(&own).unwrap_or_else(|| panic!("{} is in no layer", relative.display()));
        let text = std::fs::read_to_string(&file).unwrap();
        for module in named_modules(&text) {
            // Items of lib.rs itself (`crate::USER_AGENT`) are below everything.
            let Some(their_rank) = rank(&module) else { continue };
            if their_rank > own_rank {
                wrong.push(format!("{} ({own}) imports {module}, which is above it", relative.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "layer order broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_qualified_paths() {
    let names = named_modules("use crate::{store::Store, vocab};\nlet x = crate::diff::diff(a);\n");
    assert_eq!(names, ["diff", "store", "vocab"].into_iter().map(String::from).collect());
}
