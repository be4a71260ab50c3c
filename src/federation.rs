//! Federation through etcd: this cluster's chosen services are written to
//! etcd with its cluster id and network, for the daemons of other clusters
//! to import (`meshreg_adapters::etcd::run_imports` does the importing).
//!
//! A service is exported when its hostname is listed in
//! `federation.export.hosts` or its labels include every one of
//! `federation.export.labels`. Its record holds the merged service's ports
//! and its endpoints with IP addresses, except those imported from other
//! clusters (so exports never echo). Each replica writes its own copy under
//! its own lease, re-written whenever the registry changes what it holds,
//! and all of them again under a new lease when the old one was lost.
//!
//! This module reads the registry view and writes only to etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use meshreg_adapters::etcd::{ExportEndpoint, ExportPort, ExportRecord, Writer};
use meshreg_registry::{Address, Health, MergedService, Reader, SourceKind, TlsMode, View};
use tokio_util::sync::CancellationToken;

/// What this cluster exports and as whom.
#[derive(Debug, Clone)]
pub(crate) struct Exports {
    /// This cluster's id.
    pub(crate) cluster_id: String,
    /// This cluster's network.
    pub(crate) network: String,
    /// Hostnames exported.
    pub(crate) hosts: BTreeSet<String>,
    /// Labels that export a service carrying all of them (empty: none).
    pub(crate) labels: BTreeMap<String, String>,
}

impl Exports {
    fn selects(&self, service: &MergedService) -> bool {
        self.hosts.contains(service.service.hostname.as_str())
            || (!self.labels.is_empty()
                && self
                    .labels
                    .iter()
                    .all(|(k, v)| service.service.labels.get(k) == Some(v)))
    }

    /// The record of `service` as this cluster exports it.
    fn record(&self, service: &MergedService) -> ExportRecord {
        let s = &service.service;
        ExportRecord {
            cluster_id: self.cluster_id.clone(),
            network: self.network.clone(),
            hostname: s.hostname.to_string(),
            namespace: s.namespace.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| ExportPort {
                    name: p.name.clone(),
                    number: p.number,
                    protocol: format!("{:?}", p.protocol).to_uppercase(),
                })
                .collect(),
            endpoints: service
                .endpoints
                .iter()
                .filter(|e| e.source.kind() != SourceKind::Federation)
                .filter_map(|e| {
                    let Address::Ip(ip) = &e.address else {
                        return None;
                    };
                    Some(ExportEndpoint {
                        address: ip.to_string(),
                        ports: e.ports.clone(),
                        labels: e.labels.clone(),
                        locality: e.locality.to_string(),
                        network: e.network.to_string(),
                        weight: e.weight,
                        healthy: matches!(e.health, Health::Healthy | Health::Unknown),
                        service_account: e.service_account.to_string(),
                        istio_tls: e.tls_mode == TlsMode::Istio,
                    })
                })
                .collect(),
        }
    }

    fn desired(&self, view: &View) -> BTreeMap<String, ExportRecord> {
        view.services()
            .filter(|(_, s)| self.selects(s))
            .map(|(host, s)| (host.to_string(), self.record(s)))
            .collect()
    }
}

/// Writes this cluster's exports to etcd until `shutdown`, following the
/// registry (see the module docs). Failures are logged once per outage
/// and retried (`etcd_sync`).
pub(crate) async fn run(
    exports: Exports,
    mut reader: Reader,
    mut writer: Writer,
    shutdown: CancellationToken,
) {
    let mut sent: BTreeMap<String, ExportRecord> = BTreeMap::new();
    let mut outage = crate::etcd_sync::Outage::new("federation exports");
    let mut view = reader.view();
    loop {
        let desired = exports.desired(&view);
        if writer.lost() {
            sent.clear();
        }
        let mut store = (&mut writer, exports.cluster_id.as_str());
        let error = crate::etcd_sync::write_changes(&mut store, &desired, &mut sent).await;
        let retry = outage.after(error);
        let check = (!sent.is_empty()).then(|| Instant::now() + writer.check_every());
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = reader.changed() => match changed {
                Some(v) => view = v,
                None => return,
            },
            () = crate::etcd_sync::sleep_until_first(&[retry, check]) => {}
        }
    }
}

/// This cluster's exports, by hostname.
impl crate::etcd_sync::Store<String, ExportRecord> for (&mut Writer, &str) {
    async fn put(&mut self, _: &String, record: &ExportRecord) -> Result<(), String> {
        self.0.put_export(record).await.map_err(|e| e.to_string())
    }

    async fn delete(&mut self, host: &String) -> Result<(), String> {
        self.0
            .delete_export(self.1, host)
            .await
            .map_err(|e| e.to_string())
    }
}
