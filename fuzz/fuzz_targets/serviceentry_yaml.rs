//! ServiceEntry/WorkloadEntry/DestinationRule/Sidecar files: YAML, Istio's
//! validation and the conversion to registry objects.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshreg_adapters::serviceentry::validate_text("fuzz.yaml", text, "default");
    }
});
