//! vnp demo (being written).
fn main() {}
