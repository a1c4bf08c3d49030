//! Start guests wired to vnpd, drive them over QMP, run live migrations.

fn main() {}
