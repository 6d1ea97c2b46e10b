//! Enforces that `broker/src/paxos/` stays a pure state machine: no async
//! runtime, sockets, files or wall clock may be named there.

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "std::net",
    "std::fs",
    "std::time::Instant",
    "SystemTime",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("paxos directory is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn paxos_module_names_no_io_or_clock() {
    // Goal: fail if any file under broker/src/paxos/ mentions an I/O or clock API.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/paxos");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() >= 3, "paxos sources not found in {dir:?}");
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source is readable");
        for (n, line) in text.lines().enumerate() {
            for word in FORBIDDEN {
                if line.contains(word) {
                    offences.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "impure paxos code:\n{}",
        offences.join("\n")
    );
}
