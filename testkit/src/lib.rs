//! Test fixtures shared by vnp's integration tests. Everything here cleans up on drop.

pub mod libvirtd;
pub mod netns;
pub mod process;
pub mod tap_guest;
pub mod testpmd;
