//! The `webhook` fuzz target: a shim over `checks/webhook.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/webhook.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _accepted = check::run(data);
});
