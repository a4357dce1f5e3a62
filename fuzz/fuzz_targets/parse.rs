//! Fuzzes the structural parsers: `SealedMuscle::parse` and `Header::decode` must never panic,
//! and whatever they accept must be the canonical encoding (re-encoding gives the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use referee_muscle::{Header, SealedMuscle};

/// Magic (8) + format version (2) + header length (4, little-endian at offset 10).
const PREFIX_LEN: usize = 14;

fuzz_target!(|data: &[u8]| {
    if let Ok(sealed) = SealedMuscle::parse(data) {
        let len_bytes: [u8; 4] = data[10..PREFIX_LEN].try_into().expect("parse accepted a prefix");
        let header_len = u32::from_le_bytes(len_bytes) as usize;
        let body = &data[PREFIX_LEN..PREFIX_LEN + header_len];
        let encoded = sealed.header.encode().expect("a parsed header re-encodes");
        assert_eq!(encoded.as_slice(), body, "re-encoding the parsed header changed its bytes");
        let decoded = Header::decode(body).expect("a parsed header body decodes on its own");
        assert_eq!(decoded, sealed.header);
    }
    if let Ok(header) = Header::decode(data) {
        let encoded = header.encode().expect("a decoded header re-encodes");
        assert_eq!(encoded.as_slice(), data, "Header::decode accepted a non-canonical encoding");
    }
});
