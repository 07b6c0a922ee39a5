//! The layers hold: no two modules of one level import each other, directly or around a loop.
//! A module's imports are read from its source (`crate::…` paths naming a sibling, and
//! `super::…` from a file directly in the parent); test code (a `#[cfg(test)] mod tests`) is left
//! out, since tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The modules directly inside `dir` (the crate root or a module folder) and which of them
/// each one's code names. `path` is the folder's module path (`""` for the crate root).
fn sibling_imports(dir: &Path, path: &str) -> Graph {
    let children: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().unwrap().is_dir();
            if is_dir && dir.join(&name).join("mod.rs").exists() {
                Some(name)
            } else {
                name.strip_suffix(".rs")
                    .filter(|n| !["mod", "lib", "main"].contains(n))
                    .map(str::to_string)
            }
        })
        .collect();
    let prefix = if path.is_empty() {
        "crate::".to_string()
    } else {
        format!("crate::{path}::")
    };
    let mut graph = Graph::new();
    for child in &children {
        let mut files = Vec::new();
        let file = dir.join(format!("{child}.rs"));
        if file.exists() {
            files.push((file, true));
        }
        collect_rs(&dir.join(child), &mut files);
        let names = graph.entry(child.clone()).or_default();
        for (file, direct) in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Test code sits in a `#[cfg(test)] mod tests` at the end of a file.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let mut prefixes = vec![prefix.clone()];
            if direct {
                prefixes.push("super::".into());
            }
            for p in &prefixes {
                for (i, _) in code.match_indices(p.as_str()) {
                    // `crate::model` must not match inside `some_crate::model`.
                    if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                        continue;
                    }
                    let rest = &code[i + p.len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if &name != child && children.contains(&name) {
                        names.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// Every `.rs` file under `dir`, marked when it is the folder's `mod.rs` (whose `super::`
/// names the folder's siblings).
fn collect_rs(dir: &Path, out: &mut Vec<(PathBuf, bool)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let direct = p.file_name().is_some_and(|f| f == "mod.rs");
            out.push((p, direct));
        }
    }
}

/// A loop of imports, if there is one (`a → b → … → a`).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_string(), false);
        path.push(v.to_string());
        for w in graph.get(v).into_iter().flatten() {
            match state.get(w) {
                Some(false) => {
                    let start = path.iter().position(|p| p == w).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(c) = visit(w, graph, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(v.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    for v in graph.keys() {
        if !state.contains_key(v) {
            let mut path = Vec::new();
            if let Some(c) = visit(v, graph, &mut state, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

/// The crate roots of this workspace's source folders.
fn source_roots() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut roots = vec![root.join("src")];
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        for c in crates {
            let src = c.unwrap().path().join("src");
            if src.is_dir() {
                roots.push(src);
            }
        }
    }
    roots
}

/// Each module folder under `root` with its module path.
fn module_folders(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = vec![(root.to_path_buf(), String::new())];
    let mut i = 0;
    while i < out.len() {
        let (dir, path) = out[i].clone();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && p.join("mod.rs").exists() {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let child = if path.is_empty() {
                    name
                } else {
                    format!("{path}::{name}")
                };
                out.push((p, child));
            }
        }
        i += 1;
    }
    out
}

#[test]
fn no_module_imports_a_sibling_that_imports_it_back() {
    let mut checked = 0;
    for root in source_roots() {
        for (dir, path) in module_folders(&root) {
            let graph = sibling_imports(&dir, &path);
            checked += graph.len();
            let cycle = find_cycle(&graph);
            assert!(
                cycle.is_none(),
                "{}: the modules {} import each other in a loop",
                dir.display(),
                cycle.unwrap().join(" → ")
            );
        }
    }
    assert!(checked > 50, "only {checked} modules found");
}

#[test]
fn a_planted_cycle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::Thing;\n").unwrap();
    std::fs::create_dir(src.join("b")).unwrap();
    std::fs::write(src.join("b/mod.rs"), "mod inner;\n").unwrap();
    // Deep in b, a path back to c; c back to a: a → b → c → a.
    std::fs::write(src.join("b/inner.rs"), "fn f() { crate::c::g(); }\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "use super::a;\n#[cfg(test)]\nmod tests { use crate::b; }\n",
    )
    .unwrap();
    let graph = sibling_imports(src, "");
    assert_eq!(graph["b"], BTreeSet::from(["c".to_string()]));
    // Test code does not count.
    assert_eq!(graph["c"], BTreeSet::from(["a".to_string()]));
    let cycle = find_cycle(&graph).expect("the loop a → b → c → a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    // Cut c's import: no loop.
    std::fs::write(src.join("c.rs"), "pub fn g() {}\n").unwrap();
    assert_eq!(find_cycle(&sibling_imports(src, "")), None);
    // `other_crate::a` is not this crate's module.
    std::fs::write(src.join("c.rs"), "use other_crate::a;\n").unwrap();
    assert_eq!(find_cycle(&sibling_imports(src, "")), None);
}
