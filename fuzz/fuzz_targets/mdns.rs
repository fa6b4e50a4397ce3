//! mDNS messages as the agent hears them on the LAN (`st8s agent --mdns`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| st8s::fuzzing::mdns_message(data));
