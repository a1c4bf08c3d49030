//! The VM registry service.

fn main() {}
