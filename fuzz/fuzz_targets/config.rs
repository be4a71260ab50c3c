//! The daemon's config file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshreg::Config::parse(text, "fuzz", std::path::Path::new("/nonexistent"));
    }
});
