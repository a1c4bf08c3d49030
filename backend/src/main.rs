//! vnpd binary: thin wrapper over the `vnpd` library.

fn main() {}
