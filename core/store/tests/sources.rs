//! Rules about the store's own source that the compiler cannot check:
//! every transaction is opened through `on_pool!(transaction ..)`, which
//! runs it again after a serialization failure or a deadlock.

use std::path::Path;

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("src is readable")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn transactions_are_opened_only_by_the_retrying_helper() {
    let files = sources();
    assert!(files.len() > 10, "found {} files", files.len());
    let mut direct = Vec::new();
    for (name, text) in &files {
        for (n, line) in text.lines().enumerate() {
            let opens = line.contains(".begin()") || line.contains("begin_with(");
            let helper = name == "lib.rs" && line.trim_start().starts_with("pool.begin().await.map_err");
            if opens && !helper {
                direct.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(direct.is_empty(), "transactions opened without on_pool!(transaction ..): {direct:#?}");
    let helpers = files.iter().map(|(_, t)| t.matches("on_pool!(transaction").count()).sum::<usize>();
    assert!(helpers >= 15, "only {helpers} transactions found through the helper");
}
