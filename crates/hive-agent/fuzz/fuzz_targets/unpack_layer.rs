//! Fuzzes the layer unpacker with arbitrary (uncompressed and gzip) tarballs: it must never
//! panic, never write outside the layer directory, and remove the layer dir on error.
#![no_main]

use hive_agent::image::unpack::{Compression, Limits, unpack_layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else {
        return;
    };
    let compression = if mode & 1 == 0 {
        Compression::None
    } else {
        Compression::Gzip
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dest = tmp.path().join("layer");
    let limits = Limits {
        max_bytes: 8 << 20,
        max_entries: 512,
    };
    let result = unpack_layer(tar, compression, &dest, limits);
    // Only the layer dir may exist next to it, and only when the unpack succeeded.
    for entry in std::fs::read_dir(tmp.path()).expect("read_dir") {
        let name = entry.expect("entry").file_name();
        assert_eq!(name, "layer", "wrote outside the layer dir");
        assert!(result.is_ok(), "failed unpack left its dir behind");
    }
});
