//! `st8s.io/` annotation values and Traefik route matchers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| st8s::fuzzing::annotation_text(data));
