//! `framing::Framer::scan` on arbitrary bytes, fed in reads of a size the first byte
//! picks, keeping an incomplete head for the next call as `connection::GuardedIo` does:
//! it never panics, never clears or refuses past the bytes it was given, and its count
//! of heads never goes down.
#![no_main]

use campaign_gate::framing::{Framer, Limits, Scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut framer = Framer::new(Limits {
        max_header_bytes: 8192,
        max_headers: 20,
        max_uri_bytes: 1024,
    });
    let (mut cleared, mut end, mut heads) = (0, 0, 0);
    while end < bytes.len() {
        end = (end + step).min(bytes.len());
        let slice = &bytes[cleared..end];
        let scan = framer.scan(slice);
        assert!(framer.heads() >= heads, "head count went down");
        heads = framer.heads();
        match scan {
            Scan::Clear(n) => {
                assert!(n <= slice.len(), "cleared {n} of {}", slice.len());
                cleared += n;
            }
            Scan::Refuse { at, .. } => {
                assert!(at <= slice.len(), "refused at {at} of {}", slice.len());
                return;
            }
        }
    }
});
