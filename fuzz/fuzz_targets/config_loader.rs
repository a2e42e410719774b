//! The configuration loader: Istio YAML from files or etcd values, as the proxy loads it.
//!
//! Input: arbitrary bytes, read as lossy UTF-8 (the loader takes `String`s; files that are
//! not UTF-8 are rejected before it by `read_to_string`). A NUL byte separates sources, so
//! one input can be several files (at most 4).
//!
//! Exercised, none of which may panic (errors are expected and fine):
//! - `load_sources` over all the sources, then `Display` of the errors or, when it loads,
//!   `MeshConfig::to_json` (the admin `/config_dump`) and a service registry walk;
//! - `split_resources` of each source (what `mesh-proxy config apply` stores in etcd);
//! - `load_layered`: the first source as the proxy's files, the resources split out of the
//!   second as the etcd overlay (the proxy's discovery path).
//!
//! One property is checked: resources that `split_resources` accepted (no Bootstrap among
//! them) load again as an overlay on an empty base, since that is exactly what a proxy reads
//! back from etcd after `config apply`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::config::{self, KeyedSource, Kind, MeshConfig, Source};

fn keyed(pieces: Vec<(config::ResourceId, String)>) -> Vec<KeyedSource> {
    pieces
        .into_iter()
        .map(|(id, text)| KeyedSource {
            source: Source::new(
                format!("/mesh/{}/{}/{}", id.kind, id.namespace, id.name),
                text,
            ),
            id,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let sources: Vec<Source> = text
        .split('\0')
        .take(4)
        .enumerate()
        .map(|(i, t)| Source::new(format!("fuzz-{i}.yaml"), t))
        .collect();

    let base = match config::load_sources(&sources) {
        Ok(config) => {
            let dump = config.to_json();
            let _ = dump.to_string();
            let _ = config.resource_count();
            let _ = config.proxy_namespace();
            for port in config.services().iter() {
                let _ = config.services().lookup(port.host.as_str(), port.number);
            }
            Some(config)
        }
        Err(errors) => {
            let _ = errors.to_string();
            None
        }
    };

    let mut splits = Vec::new();
    for source in &sources {
        match config::split_resources(source) {
            Ok(pieces) => {
                let has_bootstrap = pieces.iter().any(|(id, _)| id.kind == Kind::Bootstrap);
                if !has_bootstrap && !pieces.is_empty() {
                    let overlay = keyed(pieces.clone());
                    if let Err(e) = config::load_layered(&MeshConfig::default(), &overlay) {
                        panic!(
                            "resources split out of {:?} do not load back as an overlay:\n{e}",
                            source.name
                        );
                    }
                }
                splits.push(Some(pieces));
            }
            Err(errors) => {
                let _ = errors.to_string();
                splits.push(None);
            }
        }
    }

    // The proxy's own files (the first source) with the second source's resources from etcd.
    if sources.len() >= 2 {
        let base = match (&base, sources.len()) {
            (Some(all), 1) => Some(all.clone()),
            _ => config::load_sources(&sources[..1]).ok(),
        };
        if let (Some(base), Some(Some(pieces))) = (base, splits.get(1)) {
            match config::load_layered(&base, &keyed(pieces.clone())) {
                Ok(layered) => {
                    let _ = layered.config.to_json().to_string();
                    let _ = layered.shadowed.len();
                }
                Err(errors) => {
                    let _ = errors.to_string();
                }
            }
        }
    }
});
