//! Issue 18, items 1 and 2: the xDS listener over TLS and mTLS, with real
//! Envoys whose ADS cluster has a TLS transport socket. Certificates are
//! made with openssl: a CA, a server certificate for 127.0.0.1, and client
//! certificates with Istio's SPIFFE URI SANs. An Envoy presenting namespace
//! `a`'s identity and claiming `a` gets its clusters; one presenting `b`'s
//! while claiming `a` is refused (PermissionDenied, counted); a trusted
//! identity may claim anything; a server certificate rotated on disk is
//! served to the next connection; plaintext stays on its own listener.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{Daemon, Envoy, copy_dir, eventually, openssl, repo};

/// A certificate `name`.pem / `name`-key.pem signed by the CA, with `san`.
fn issue(dir: &Path, name: &str, subject: &str, san: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &ext,
        ],
    );
}

fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=meshreg test CA",
        ],
    );
    issue(dir, "server", "/CN=meshreg", "IP:127.0.0.1,DNS:localhost");
    issue(
        dir,
        "ns-a",
        "/CN=a",
        "URI:spiffe://cluster.local/ns/a/sa/default",
    );
    issue(
        dir,
        "ns-b",
        "/CN=b",
        "URI:spiffe://cluster.local/ns/b/sa/default",
    );
    issue(
        dir,
        "tool",
        "/CN=tool",
        "URI:spiffe://cluster.local/ns/ops/sa/inspector",
    );
}

/// An Envoy on the TLS listener at `port`, with client certificate
/// `client` (or none), claiming namespace `ns`.
async fn envoy(certs: &Path, port: u16, client: Option<&str>, id: &str, ns: &str) -> Envoy {
    let dir = tempfile::tempdir().unwrap();
    let client_cert = client
        .map(|c| {
            format!(
                "tls_certificates: [{{certificate_chain: {{filename: {0}/{c}.pem}}, private_key: {{filename: {0}/{c}-key.pem}}}}]",
                certs.display()
            )
        })
        .unwrap_or_default();
    let bootstrap = format!(
        r#"node: {{id: "{id}", cluster: test, metadata: {{NAMESPACE: "{ns}"}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config: {{api_type: DELTA_GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: meshreg}}}}]}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: meshreg
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: meshreg, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [h2]
          validation_context: {{trusted_ca: {{filename: {ca}}}}}
          {client_cert}
"#,
        ca = certs.join("ca.pem").display(),
    );
    Envoy::from_bootstrap(dir, &bootstrap).await
}

/// Waits until `envoy` holds bookinfo's six endpoints.
async fn gets_bookinfo(envoy: &Envoy, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        (envoy.endpoints().await.len() == 6).then_some(())
    })
    .await;
}

/// The serial of the certificate the TLS listener presents now.
fn served_serial(port: u16, ca: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile {} -alpn h2 </dev/null 2>/dev/null | openssl x509 -noout -serial",
            ca.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_checks_the_claimed_namespace_and_rotates_certificates() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let c = certs.path().display();
    let text = Daemon::config_text(&[dir.path()], "").replace(
        "xds: {listen: 127.0.0.1:0}",
        &format!(
            "xds: {{listen: 127.0.0.1:0, tls: {{listen: 127.0.0.1:0, cert_file: {c}/server.pem, \
             key_file: {c}/server-key.pem, client_ca_file: {c}/ca.pem, \
             trusted_identities: [\"spiffe://cluster.local/ns/ops/sa/inspector\"]}}}}"
        ),
    );
    let daemon = Daemon::start_config(&text).await;
    let tls = daemon.xds_tls.expect("the TLS listener is announced");
    // TLS with namespace a's certificate, claiming a: served.
    let a = envoy(
        certs.path(),
        tls.port(),
        Some("ns-a"),
        "sidecar~10.0.0.1~p.a~a.svc.cluster.local",
        "a",
    )
    .await;
    gets_bookinfo(&a, "namespace a's Envoy gets bookinfo").await;
    // A trusted tool claiming any namespace: served.
    let tool = envoy(
        certs.path(),
        tls.port(),
        Some("tool"),
        "inspector",
        "default",
    )
    .await;
    gets_bookinfo(&tool, "the trusted tool gets bookinfo").await;
    // Namespace b's certificate claiming a: refused, and counted.
    let b = envoy(
        certs.path(),
        tls.port(),
        Some("ns-b"),
        "sidecar~10.0.0.2~p.a~a.svc.cluster.local",
        "a",
    )
    .await;
    eventually("the impostor refused", Duration::from_secs(20), || async {
        (daemon
            .metric("meshreg_xds_auth_refused_total", &["reason=\"namespace\""])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(b.clusters().await.is_empty(), "an impostor got clusters");
    // No client certificate with mTLS required: the handshake fails.
    let anon = envoy(certs.path(), tls.port(), None, "anon", "a").await;
    eventually(
        "the anonymous client refused",
        Duration::from_secs(20),
        || async {
            (daemon
                .metric("meshreg_xds_auth_refused_total", &["reason=\"handshake\""])
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(anon.clusters().await.is_empty());
    // Plaintext stays on its own listener.
    let plain = Envoy::start(daemon.xds, crate::support::Ads::Delta, "plain", &[]).await;
    gets_bookinfo(&plain, "plaintext still served").await;

    // Rotation: a new server certificate on disk is what the next
    // connection gets.
    let before = served_serial(tls.port(), &certs.path().join("ca.pem"));
    assert!(before.starts_with("serial="), "{before:?}");
    issue(
        certs.path(),
        "server",
        "/CN=meshreg rotated",
        "IP:127.0.0.1,DNS:localhost",
    );
    let after = eventually(
        "the rotated certificate served",
        Duration::from_secs(10),
        || {
            let now = served_serial(tls.port(), &certs.path().join("ca.pem"));
            let changed = now.starts_with("serial=") && now != before;
            async move { changed.then_some(now) }
        },
    )
    .await;
    assert_ne!(before, after);
    // A proxy connecting after the rotation is served.
    let a2 = envoy(
        certs.path(),
        tls.port(),
        Some("ns-a"),
        "sidecar~10.0.0.3~q.a~a.svc.cluster.local",
        "a",
    )
    .await;
    gets_bookinfo(&a2, "a new Envoy after the rotation").await;
}
