//! delta ADS requests (u16-length-prefixed messages) decoded as the stream
//! decodes them and applied to one connection over a snapshot of two
//! services, every response taken in between.
#![no_main]

use std::sync::{Arc, LazyLock};

use meshreg_registry::test_util::{contribution, reset};

static SNAPSHOT: LazyLock<Arc<meshreg_xds::Snapshot>> = LazyLock::new(|| {
    let (mut writer, reader) = meshreg_registry::new([meshreg_registry::test_util::test_source()]);
    writer.apply(reset(vec![
        contribution("a.test", &["10.0.0.1", "10.0.0.2"]),
        contribution("b.test", &["10.0.0.3"]),
    ]));
    let mut generator = meshreg_xds::Generator::new();
    generator.apply(&reader.view());
    generator.snapshot().clone()
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshreg_xds::fuzzing::delta(&SNAPSHOT, data);
});
