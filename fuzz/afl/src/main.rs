//! AFL++ harness: `vnp-fuzz-afl TARGET` fuzzes one of `vnp_fuzz::TARGETS` in persistent mode.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = vnp_fuzz::target(&name) else {
        let names: Vec<&str> = vnp_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: vnp-fuzz-afl TARGET (one of {})", names.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        (target.run)(data);
    });
}
