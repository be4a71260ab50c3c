//! Service ports of sources whose instances each listen on one port of
//! their own (Consul instances, DNS SRV targets): one service port per
//! distinct number, named after its protocol.

use meshreg_registry::{Port, Protocol};

/// Adds a port numbered `number` speaking `protocol` (an Istio protocol
/// name) unless `ports` has that number already (the first protocol
/// wins).
pub(crate) fn add(ports: &mut Vec<Port>, number: u16, protocol: &str) {
    if !ports.iter().any(|p| p.number == number) {
        ports.push(Port {
            name: protocol.to_ascii_lowercase(),
            number,
            protocol: Protocol::parse(protocol),
            target_port: None,
        });
    }
}

/// Sorts `ports` by number and makes their names unique: the lowest port
/// of a protocol keeps the protocol's name (`http`, as Istio's former
/// Consul adapter names every port, so a ServiceEntry port `http` of the
/// same number merges with it), the others become `<protocol>-<number>`.
pub(crate) fn finish(ports: &mut [Port]) {
    ports.sort_by_key(|p| p.number);
    let mut used = std::collections::HashSet::new();
    for p in ports {
        if !used.insert(p.name.clone()) {
            p.name = format!("{}-{}", p.name, p.number);
        }
    }
}

/// The name of the port numbered `number`.
pub(crate) fn name_of(ports: &[Port], number: u16) -> Option<String> {
    ports
        .iter()
        .find(|p| p.number == number)
        .map(|p| p.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_port_per_number_named_after_its_protocol() {
        let mut ports = Vec::new();
        add(&mut ports, 9000, "grpc");
        add(&mut ports, 8000, "HTTP");
        add(&mut ports, 8000, "tcp");
        add(&mut ports, 9100, "grpc");
        finish(&mut ports);
        let names: Vec<_> = ports
            .iter()
            .map(|p| (p.name.as_str(), p.number, p.protocol))
            .collect();
        assert_eq!(
            names,
            [
                ("http", 8000, Protocol::Http),
                ("grpc", 9000, Protocol::Grpc),
                ("grpc-9100", 9100, Protocol::Grpc),
            ]
        );
        assert_eq!(name_of(&ports, 9100).as_deref(), Some("grpc-9100"));
        assert_eq!(name_of(&ports, 1), None);
    }
}
