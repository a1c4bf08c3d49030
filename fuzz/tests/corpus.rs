//! Replays every file of `fuzz/corpus/<target>/` through its target: what CI runs instead of a
//! campaign. A panic here is a regression of a finding (or a new one).

use std::path::Path;

#[test]
fn every_corpus_file_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    // `fuzz/run coverage TARGET` measures one target's corpus alone.
    let only = std::env::var("VNP_FUZZ_ONLY").ok();
    let chosen = vnp_fuzz::TARGETS
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name));
    for target in chosen {
        let dir = root.join(target.name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "corpus of {} has {} files",
            target.name,
            files.len()
        );
        for file in &files {
            let bytes = std::fs::read(file).expect("corpus file");
            (target.run)(&bytes);
        }
        println!("{}: {} files replayed", target.name, files.len());
    }
}

#[test]
fn every_seed_replays_and_every_target_has_seeds() {
    let seeds = vnp_fuzz::seeds::all();
    for target in vnp_fuzz::TARGETS {
        let mine: Vec<_> = seeds.iter().filter(|s| s.0 == target.name).collect();
        assert!(!mine.is_empty(), "no seeds for {}", target.name);
        for (_, _, bytes) in mine {
            (target.run)(bytes);
        }
    }
}
