//! IP addresses and CIDR ranges as Istio's resources write them (`10.0.0.0/8`, `10.1.2.3`,
//! `2001:db8::/32`): AuthorizationPolicy `ipBlocks`, VirtualService `destinationSubnets` and
//! `sourceSubnet`, ServiceEntry `addresses`.

use std::net::IpAddr;

pub use ipnet::IpNet;

/// Parses an IP address (a range of one) or a CIDR range, host bits cleared; `None` for
/// anything else (validation at load refuses it first).
pub fn parse_ip_net(text: &str) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => text.parse::<IpAddr>().ok().map(IpNet::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ranges() {
        assert_eq!(parse_ip_net("10.1.2.3/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_ip_net("10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_ip_net("2001:db8::/32"), "2001:db8::/32".parse().ok());
        for bad in ["10.0.0.0/33", "nope", "", "10.0.0.0/"] {
            assert_eq!(parse_ip_net(bad), None, "{bad}");
        }
    }
}
