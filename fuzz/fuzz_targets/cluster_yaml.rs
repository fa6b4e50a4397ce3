//! Cluster YAML through the model, the plan and the `st8s dns` collector.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| st8s::fuzzing::cluster_text(data));
