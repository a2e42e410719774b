//! Load balancers; see the crate docs.
