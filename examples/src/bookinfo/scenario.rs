//! The routing scenarios of Istio's Bookinfo tasks, one file each in
//! `examples/bookinfo/config/scenarios/` (embedded in the binary): the VirtualServices of
//! `productpage`, `reviews`, `ratings` and `details` as that task leaves them.
//!
//! ```
//! use examples::bookinfo::scenario::{self, SCENARIOS};
//!
//! let s = scenario::find("2").unwrap();
//! assert_eq!(s.name, "jason-v2");
//! assert_eq!(scenario::find("canary-90-10").unwrap().number, 3);
//! assert_eq!(SCENARIOS.len(), 6);
//! ```

use std::time::Duration;

/// One routing scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    /// Its number in the launcher's menu (from 1).
    pub number: usize,
    /// Its VirtualServices as Istio publishes them.
    pub yaml: &'static str,
    /// What each service's routing does, for the changes the launcher prints.
    pub routing: [(&'static str, &'static str); 4],
}

const ALL_V1: [(&str, &str); 4] = [
    ("productpage", "all -> v1"),
    ("details", "all -> v1"),
    ("reviews", "all -> v1 (no stars)"),
    ("ratings", "all -> v1"),
];

const JASON_V2: &str = "end-user jason -> v2 (black stars), everyone else -> v1";

/// Every scenario, in menu order.
pub const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "all-v1",
        number: 1,
        yaml: include_str!("../../bookinfo/config/scenarios/all-v1.yaml"),
        routing: ALL_V1,
    },
    Scenario {
        name: "jason-v2",
        number: 2,
        yaml: include_str!("../../bookinfo/config/scenarios/jason-v2.yaml"),
        routing: [ALL_V1[0], ALL_V1[1], ("reviews", JASON_V2), ALL_V1[3]],
    },
    Scenario {
        name: "canary-90-10",
        number: 3,
        yaml: include_str!("../../bookinfo/config/scenarios/canary-90-10.yaml"),
        routing: [
            ALL_V1[0],
            ALL_V1[1],
            ("reviews", "90% -> v1, 10% -> v2 (black stars)"),
            ALL_V1[3],
        ],
    },
    Scenario {
        name: "v3",
        number: 4,
        yaml: include_str!("../../bookinfo/config/scenarios/v3.yaml"),
        routing: [
            ALL_V1[0],
            ALL_V1[1],
            ("reviews", "all -> v3 (red stars)"),
            ALL_V1[3],
        ],
    },
    Scenario {
        name: "ratings-delay",
        number: 5,
        yaml: include_str!("../../bookinfo/config/scenarios/ratings-delay.yaml"),
        routing: [
            ALL_V1[0],
            ALL_V1[1],
            ("reviews", JASON_V2),
            (
                "ratings",
                "end-user jason: {DELAY} delay injected (fault), then v1; everyone else -> v1",
            ),
        ],
    },
    Scenario {
        name: "ratings-abort",
        number: 6,
        yaml: include_str!("../../bookinfo/config/scenarios/ratings-abort.yaml"),
        routing: [
            ALL_V1[0],
            ALL_V1[1],
            ("reviews", JASON_V2),
            (
                "ratings",
                "end-user jason: HTTP 500 injected (fault); everyone else -> v1",
            ),
        ],
    },
];

/// The line of Istio's delay fault that `--fault-delay` replaces.
const FIXED_DELAY_LINE: &str = "fixedDelay: 7s";

/// A scenario by name or menu number (surrounding blanks ignored).
pub fn find(input: &str) -> Option<&'static Scenario> {
    let input = input.trim();
    SCENARIOS
        .iter()
        .find(|s| s.name == input || input.parse() == Ok(s.number))
}

/// The menu: `1 all-v1, 2 jason-v2, ...`.
pub fn menu() -> String {
    SCENARIOS
        .iter()
        .map(|s| format!("{} {}", s.number, s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats a delay as Istio writes it (`7s`, `2s`, `1.5s`, `500ms`).
pub fn format_delay(delay: Duration) -> String {
    mesh_core::config::Duration(delay).to_string()
}

impl Scenario {
    /// The YAML to load, with the injected delay set to `delay` (Istio's 7 s when `None`).
    pub fn render(&self, delay: Option<Duration>) -> Result<String, String> {
        let Some(delay) = delay else {
            return Ok(self.yaml.to_owned());
        };
        match self.yaml.matches(FIXED_DELAY_LINE).count() {
            0 => Ok(self.yaml.to_owned()),
            1 => Ok(self.yaml.replace(
                FIXED_DELAY_LINE,
                &format!("fixedDelay: {}", format_delay(delay)),
            )),
            n => Err(format!(
                "scenario {} has {n} `{FIXED_DELAY_LINE}` lines; expected one",
                self.name
            )),
        }
    }

    /// What each service's routing does under this scenario.
    pub fn describe(&self, delay: Option<Duration>) -> Vec<(&'static str, String)> {
        let delay = format_delay(delay.unwrap_or(Duration::from_secs(7)));
        self.routing
            .iter()
            .map(|(svc, what)| (*svc, what.replace("{DELAY}", &delay)))
            .collect()
    }

    /// What changes from `from` to this scenario, one line per service whose routing changes.
    pub fn changes_from(&self, from: &Scenario, delay: Option<Duration>) -> Vec<String> {
        let old = from.describe(delay);
        self.describe(delay)
            .into_iter()
            .zip(old)
            .filter(|(new, old)| new.1 != old.1)
            .map(|((svc, new), (_, old))| format!("{svc}: {new} (was: {old})"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_by_name_or_number() {
        for s in &SCENARIOS {
            assert_eq!(find(s.name), Some(s));
            assert_eq!(find(&format!(" {} \n", s.number)), Some(s));
        }
        assert_eq!(find("7"), None);
        assert_eq!(find("v4"), None);
        assert!(menu().starts_with("1 all-v1, 2 jason-v2"));
    }

    #[test]
    fn every_scenario_routes_the_four_services() {
        for s in &SCENARIOS {
            for svc in ["productpage", "reviews", "ratings", "details"] {
                assert!(
                    s.yaml.contains(&format!("  name: {svc}\n")),
                    "{} misses the VirtualService {svc}",
                    s.name
                );
            }
            assert!(s.yaml.contains("apiVersion: networking.istio.io/v1\n"));
        }
    }

    #[test]
    fn delay_override() {
        let s = find("ratings-delay").unwrap();
        assert!(s.render(None).unwrap().contains("fixedDelay: 7s"));
        let short = s.render(Some(Duration::from_secs(2))).unwrap();
        assert!(short.contains("fixedDelay: 2s"));
        assert!(!short.contains("7s"));
        let ms = s.render(Some(Duration::from_millis(1500))).unwrap();
        assert!(ms.contains("fixedDelay: 1.5s"));
        // Scenarios without a delay are unchanged.
        let v3 = find("v3").unwrap();
        assert_eq!(v3.render(Some(Duration::from_secs(2))).unwrap(), v3.yaml);
    }

    #[test]
    fn changes_name_what_moves() {
        let all = find("all-v1").unwrap();
        let jason = find("jason-v2").unwrap();
        let changes = jason.changes_from(all, None);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].starts_with("reviews: end-user jason -> v2"));
        let delay = find("ratings-delay").unwrap();
        let changes = delay.changes_from(jason, Some(Duration::from_secs(2)));
        assert_eq!(changes.len(), 1);
        assert!(changes[0].contains("2s delay"), "{changes:?}");
        assert!(all.changes_from(all, None).is_empty());
    }
}
