//! See `clawrl_tui_fuzz::gguf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    clawrl_tui_fuzz::gguf(data);
});
