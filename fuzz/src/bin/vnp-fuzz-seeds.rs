//! Writes the seed inputs of every target into `DIR/<target>/<name>`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: vnp-fuzz-seeds DIR");
        std::process::exit(2);
    };
    for (target, name, bytes) in vnp_fuzz::seeds::all() {
        let folder = dir.join(target);
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join(name), bytes)?;
    }
    Ok(())
}
