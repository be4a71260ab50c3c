//! `meshreg --check`: the config and every source's objects, before
//! anything binds (issue 9).

use std::process::Command;

fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meshreg.yaml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshreg"))
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_validates_config_and_objects() {
    let objects = tempfile::tempdir().unwrap();
    std::fs::write(
        objects.path().join("good.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: good}\n\
         spec:\n  hosts: [good.test]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n",
    )
    .unwrap();
    let dir = objects.path().display();
    let (code, text) = check(&format!("sources: [{{kind: serviceentry, dir: {dir}}}]"));
    assert_eq!(code, 0, "{text}");

    std::fs::write(
        objects.path().join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\n\
         spec:\n  hosts: [bad.test]\n  ports: [{number: 80, name: Bad_Name, protocol: HTTP}]\n",
    )
    .unwrap();
    let (code, text) = check(&format!("sources: [{{kind: serviceentry, dir: {dir}}}]"));
    assert_eq!(code, 65, "{text}");
    assert!(
        text.contains("bad.yaml") && text.contains("ValidatePortName"),
        "{text}"
    );

    let (code, text) = check(&format!(
        "sources: [{{kind: serviceentry, dir: {dir}, rescan_interval: 0s}}]"
    ));
    assert_eq!(code, 64, "{text}");
    let (code, text) = check(&format!(
        "sources: [{{kind: serviceentry, dir: {}}}]",
        objects.path().join("good.yaml").display()
    ));
    assert_eq!(code, 64, "{text}");
}
