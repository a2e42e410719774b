//! Runnable demos of the mesh. See `src/bin/` for the programs and the README for how to run
//! them.
#![forbid(unsafe_code)]
