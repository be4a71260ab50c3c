//! Keeps `protoc-bin-vendored` in the build graph, so cargo downloads it
//! before any build script runs: `.cargo/protoc` falls back to it when the
//! system has no protoc for etcd-client's build script.

fn main() {
    // Only the download matters; an unsupported platform needs a system
    // protoc instead.
    let _ = protoc_bin_vendored::protoc_bin_path();
    println!("cargo:rerun-if-changed=build.rs");
}
