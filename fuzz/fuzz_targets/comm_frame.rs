//! Fuzz the neural-comm wire decoders (frames, records, envelopes): no input may panic, every
//! accepted frame respects the size limits, and every accepted envelope re-encodes to itself.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run comm_frame -s none` from `fuzz/`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use referee_comm::frame::{self, Envelope, FrameDecoder, Record};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, data)) = data.split_first() else { return };
    // 1. The byte stream splitter, fed in two pieces at a data-chosen point.
    let max = frame::TAG_LEN + usize::from(knob) * 257;
    let cut = usize::from(knob).min(data.len());
    let (a, b) = data.split_at(cut);
    let mut dec = FrameDecoder::new(max);
    let mut frames = Vec::new();
    'feed: for piece in [a, b] {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    for f in &frames {
        assert!(f.len() >= frame::TAG_LEN && f.len() <= max.min(frame::MAX_NOISE_MESSAGE));
    }

    // 2. The same bytes as a decrypted record, and every envelope inside it.
    let rec = Bytes::copy_from_slice(data);
    if let Ok(Record::Batch(entries)) = frame::parse_record(&rec) {
        for entry in entries {
            let Ok(entry) = entry else { break };
            check_envelope(&rec, entry);
        }
    }
    // 3. The bytes as a bare envelope.
    check_envelope(&rec, &rec);
});

fn check_envelope(record: &Bytes, entry: &[u8]) {
    if let Ok(env) = Envelope::decode(record, entry) {
        let mut out = Vec::new();
        if env.encode_into(&mut out).is_ok() {
            let again = Bytes::from(out);
            assert_eq!(Envelope::decode(&again, &again).ok(), Some(env));
        }
    }
}
