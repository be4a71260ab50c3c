//! Upstream TLS from a DestinationRule with a real Envoy and real TLS
//! servers (`openssl s_server`, certificates made by `openssl` for the
//! test): SIMPLE verifies the server against the rule's CA and SANs,
//! MUTUAL presents the rule's client certificate, and a wrong SAN or a
//! missing client certificate fails the request.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::peers::free_port;
use crate::support::{Ads, Daemon, Envoy, eventually, http_get, openssl};

/// A CA, and a certificate signed by it named `name` for `san`.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=meshreg-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (name, san) in [
        ("server", "DNS:backend.tls.test"),
        ("client", "URI:spiffe://meshreg.test/client"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
        let mut req = vec!["req", "-subj"];
        let subject = format!("/CN={name}");
        req.push(&subject);
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
}

/// `openssl s_server` answering HTTP on `ip:port`; with `mutual`, only
/// clients with a certificate from the test CA.
fn server(dir: &Path, ip: &str, port: u16, mutual: bool) -> Child {
    let accept = format!("{ip}:{port}");
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &accept, "-www", "-quiet"])
        .args(["-cert", "server.pem", "-key", "server.key"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if mutual {
        cmd.args(["-Verify", "1", "-CAfile", "ca.pem"]);
    }
    cmd.spawn().expect("openssl s_server")
}

fn entry(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  hosts: [{name}.tls.test]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{{number: {port}, name: http, protocol: HTTP}}]\n\
         \x20 endpoints: [{{address: {ip}}}]\n---\n"
    )
}

fn rule(name: &str, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  host: {name}.tls.test\n  trafficPolicy:\n    tls: {tls}\n---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_mutual_tls_reach_real_tls_servers() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let d = certs.path().display();
    let (simple_port, mutual_port) = (free_port(), free_port());
    let _simple = server(certs.path(), "127.0.0.95", simple_port, false);
    let _mutual = server(certs.path(), "127.0.0.96", mutual_port, true);

    let dir = tempfile::tempdir().unwrap();
    let verify = format!("caCertificates: {d}/ca.pem, sni: backend.tls.test");
    let yaml = [
        entry("simple", "127.0.0.95", simple_port),
        rule(
            "simple",
            &format!("{{mode: SIMPLE, {verify}, subjectAltNames: [backend.tls.test]}}"),
        ),
        entry("wrongsan", "127.0.0.95", simple_port),
        rule(
            "wrongsan",
            &format!("{{mode: SIMPLE, {verify}, subjectAltNames: [other.example.com]}}"),
        ),
        entry("mutual", "127.0.0.96", mutual_port),
        rule(
            "mutual",
            &format!(
                "{{mode: MUTUAL, {verify}, clientCertificate: {d}/client.pem, privateKey: {d}/client.key}}"
            ),
        ),
        entry("nocert", "127.0.0.96", mutual_port),
        rule("nocert", &format!("{{mode: SIMPLE, {verify}}}")),
    ]
    .concat();
    std::fs::write(dir.path().join("tls.yaml"), yaml).unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let cluster = |name: &str, port: u16| format!("outbound|{port}||{name}.tls.test");
    let routes = [
        ("simple", cluster("simple", simple_port)),
        ("wrongsan", cluster("wrongsan", simple_port)),
        ("mutual", cluster("mutual", mutual_port)),
        ("nocert", cluster("nocert", mutual_port)),
    ];
    let routes: Vec<(&str, &str)> = routes.iter().map(|(h, c)| (*h, c.as_str())).collect();
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "tls", &routes).await;
    eventually("the four TLS clusters", Duration::from_secs(20), || async {
        (envoy.clusters().await.len() == 4 && envoy.warming_clusters().await == 0).then_some(())
    })
    .await;
    let listener = envoy.listener().await;
    for host in ["simple", "mutual"] {
        let (status, body) = eventually(host, Duration::from_secs(20), || async {
            http_get(listener, "/", host)
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .await;
        assert_eq!(status, 200);
        assert!(body.contains("s_server"), "{host}: {body}");
    }
    for host in ["wrongsan", "nocert"] {
        let (status, _) = http_get(listener, "/", host).await.unwrap();
        assert_eq!(status, 503, "{host} must fail the handshake");
    }
    let stats = envoy.admin("/stats?filter=ssl.fail_verify_san").await;
    assert!(
        stats
            .lines()
            .any(|l| l.contains("wrongsan") && !l.ends_with(": 0")),
        "{stats}"
    );
}
