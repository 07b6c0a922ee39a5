//! See `clawrl_tui_fuzz::chat_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    clawrl_tui_fuzz::chat_request(data);
});
