//! Registry API types and the client that hosts and gateways use; vnpctl.
