//! Runnable demos of the mesh. The programs are in `src/bin/`; the README says how to run
//! them. This library holds what they share.
#![forbid(unsafe_code)]

pub mod bookinfo;
pub mod custom_proxy;
pub mod embed;
pub mod hello;
